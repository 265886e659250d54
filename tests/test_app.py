"""The web app in a real browser: headless Chromium draws on the canvas, presses Search and
sees K result images. Skips (with the reason) where gradio, selenium or a browser is missing;
.ci/run installs them so CI runs it."""
from __future__ import annotations

import pytest

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install -e '.[app]')")
pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[app]')")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")

from zsbir.app import build_app, launch, sketch_image  # noqa: E402
from zsbir.search.browser import (draw_square_and_search, find_browser, free_port, search_blank_canvas,  # noqa: E402
                                  start_chromium)
from zsbir.search.build import find_index  # noqa: E402
from zsbir.search.model import load_run_model  # noqa: E402
from smokerun import train_smoke_run  # noqa: E402

TOP = 6


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, zsbir_cache):
    return train_smoke_run(tmp_path_factory.mktemp("app"))


def test_browser_draws_a_sketch_and_sees_k_results(trained_run, tmp_path):
    browser, driver, why = find_browser()
    if why:
        pytest.skip(why)
    model = load_run_model(trained_run)
    store = find_index(model)  # the run has none yet: built for the unseen-class gallery
    classes = {it["class"] for it in store.items}
    port = free_port()
    demo = build_app(model, store, top=TOP)
    launch(demo, store, "127.0.0.1", port, block=False)
    assert getattr(demo, "run_history", False) is False  # Gradio 6's per-run browser record slows every search
    page = start_chromium(browser, driver)
    try:
        query = draw_square_and_search(page, f"http://127.0.0.1:{port}/", expect=TOP)
        page.save_screenshot(str(tmp_path / "app.png"))
        assert query.images == TOP, query
        assert len(query.captions) == TOP and all(c.split(" · ")[0] in classes for c in query.captions), query
        assert query.status.startswith(f"{TOP} of {len(store)} photos")
        again = draw_square_and_search(page, f"http://127.0.0.1:{port}/", expect=TOP)  # a second visit
        assert again.images == TOP
        assert 0 < again.round_trip_s < again.driver_s  # timed in the page, from the click to the results
        # the handler's error reaches the page with its message (it would be a bare "Error" off the queue)
        assert "The canvas is empty: draw a sketch" in search_blank_canvas(page, f"http://127.0.0.1:{port}/")
    finally:
        page.quit()
        demo.close()


def test_a_blank_canvas_is_not_a_sketch():
    import numpy as np
    from PIL import Image

    blank = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    assert sketch_image({"composite": blank}) is None and sketch_image(None) is None
    assert sketch_image({"composite": Image.new("RGB", (50, 50), "white")}) is None
    inked = np.zeros((50, 50, 4), np.uint8)
    inked[10:20, 10, :] = (0, 0, 0, 255)
    assert sketch_image({"composite": inked}) is not None


def test_results_travel_inline_as_bounded_thumbnails(tmp_path):
    import base64
    import io

    from PIL import Image

    from zsbir.app import THUMB, results_html, thumbnail_uri

    small = tmp_path / "small.png"
    Image.new("RGB", (64, 48), "red").save(small)
    assert thumbnail_uri(str(small)) == "data:image/png;base64," + base64.b64encode(small.read_bytes()).decode()
    big = tmp_path / "big.jpg"
    Image.effect_noise((1200, 900), 60).convert("RGB").save(big, quality=95)
    uri = thumbnail_uri(str(big))
    assert uri.startswith("data:image/jpeg;base64,")
    shown = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(shown.size) == THUMB and abs(shown.size[0] / shown.size[1] - 4 / 3) < 0.02
    page = results_html([(str(small), "<cat> · 0.900"), (str(tmp_path / "gone.png"), "dog · 0.800")])
    assert page.count("<figure") == 2 and page.count("<img") == 1 and "&lt;cat&gt; · 0.900" in page
    assert "cannot read this photo" in page  # a photo removed since indexing does not break the page
