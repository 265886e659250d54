"""A sketch search web app on a trained run: `python -m zsbir.app run_dir=<run> [index=<name>] [--port 7860]`.

Draw a sketch on the canvas (or upload one), press Search, and see the top-K photos of
the run's index with their class and score. For models with a relation network
(experiment=zse_sbir) a slider re-ranks the index's top N with it. Needs the `app` extra: pip install -e ".[app]".
The index is the one `python -m zsbir.search` uses (built on first use for the
unseen-class gallery); nothing leaves the machine (no analytics, no web fonts).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from inspect import signature
from pathlib import Path

import numpy as np
from PIL import Image

from zsbir.errors import ZsbirError, run_cli

log = logging.getLogger("zsbir.app")

CANVAS = (400, 400)
MAX_TOP = 50
MAX_RERANK = 200  # the re-rank slider's end: N photo encodings + N pair passes per query on a CPU


class AppError(ZsbirError):
    """The app cannot start; the message names the fix."""


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must work offline
    try:
        import gradio as gr
    except ImportError:
        raise AppError("the web app needs gradio: pip install -e \".[app]\"") from None
    return gr


def sketch_image(value) -> Image.Image | None:
    """The drawn or uploaded sketch from the canvas' value, None when the canvas is blank.

    The editor's composite is RGBA: strokes on a transparent layer (white paper once
    converted, zsbir/data/transforms.py) over an uploaded image if any.
    """
    if isinstance(value, dict):
        value = value.get("composite")
    if value is None:
        return None
    image = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value))
    pixels = np.asarray(image.convert("RGBA"))
    ink = (pixels[..., 3] > 0) & (pixels[..., :3].min(axis=-1) < 250)
    return image if ink.any() else None


def search_handler(model, store):
    """The Search button's callback: canvas value, top-K[, re-rank N] -> results, status line.

    The results are (path, caption) pairs in rank order; `results_html` turns them into the
    page's grid. `rerank` N > 0 (the slider shown for models with a pair scorer) re-orders the
    index's top N with the relation network (zsbir/search/rerank.py); captions then add its score.
    """
    gr = import_gradio()

    def run(value, top, rerank=0):
        sketch = sketch_image(value)
        if sketch is None:
            raise gr.Error("The canvas is empty: draw a sketch (or upload one), then press Search.")
        from zsbir.search.__main__ import search_sketch

        started = time.perf_counter()
        results, timing, reranked = search_sketch(model, store, sketch, int(top), int(rerank or 0))
        hits = [(r["path"], caption(r)) for r in results]
        status = (f"{len(results)} of {len(store)} photos · sketch encoded in {timing['encode_ms']:.0f} ms, "
                  f"searched in {timing['search_ms']:.1f} ms, "
                  + (f"top {reranked['top_n']} re-ranked by the relation network in {timing['rerank_ms']:.0f} ms, "
                     if reranked["applied"] else "")
                  + f"{(time.perf_counter() - started) * 1e3:.0f} ms in all")
        return hits, status

    return run


THUMB = 256          # longest side of a result as sent to the page
THUMB_INLINE = 64_000  # files up to this size (and THUMB px) are sent as they are, not re-encoded
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def thumbnail_uri(path: str) -> str:
    """A result photo as a data: URI, at most THUMB px a side (JPEG decoded at reduced scale)."""
    import base64
    import io

    with Image.open(path) as image:
        fmt = image.format
        if fmt in MIME and max(image.size) <= THUMB and os.path.getsize(path) <= THUMB_INLINE:
            return f"data:{MIME[fmt]};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"
        image.draft("RGB", (THUMB, THUMB))  # JPEG: decode at 1/2, 1/4 or 1/8 scale; others ignore it
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.thumbnail((THUMB, THUMB))
        out = io.BytesIO()
        image.save(out, "PNG" if image.mode == "RGBA" else "JPEG", quality=85)
    mime = "image/png" if image.mode == "RGBA" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(out.getvalue()).decode()}"


def results_html(hits: list[tuple[str, str]]) -> str:
    """The results grid: each photo inline (no second round of downloads), its caption, its path on hover."""
    from html import escape

    cells = []
    for path, text in hits:
        try:
            img = f'<img src="{thumbnail_uri(path)}" alt="{escape(text)}">'
        except (OSError, ValueError) as error:  # moved or broken since it was indexed
            img = f'<div class="zs-missing">cannot read this photo ({escape(type(error).__name__)})</div>'
        cells.append(f'<figure class="zs-hit" title="{escape(path)}">{img}'
                     f'<figcaption class="caption-label">{escape(text)}</figcaption></figure>')
    return f'<div class="zs-grid">{"".join(cells)}</div>'


RESULTS_CSS = """
.zs-grid { display: grid; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: 8px; margin-top: 1.8em; }
.zs-hit { margin: 0; border: 1px solid var(--border-color-primary); border-radius: 6px; overflow: hidden; }
.zs-hit img { display: block; width: 100%; aspect-ratio: 1; object-fit: contain; background: #fff; }
.zs-hit figcaption { font-size: 0.85em; padding: 2px 6px; text-align: center; }
.zs-missing { aspect-ratio: 1; display: flex; align-items: center; justify-content: center; font-size: 0.8em; }
"""


def caption(result: dict) -> str:
    """class · cosine score[ · relation score]: what a result shows under its photo."""
    text = f"{result['class'] or '?'} · {result['score']:.3f}"
    if result.get("relation_score") is not None:
        text += f" · rel {result['relation_score']:.3f}"
    return text


def build_app(model, store, top: int = 10):
    """The Gradio Blocks of the app (not launched)."""
    from zsbir.eval.rerank import has_pair_scorer

    gr = import_gradio()
    meta = store.meta
    can_rerank = has_pair_scorer(model.encoder)
    source = meta["source"].get("images") or f"{meta['source']['dataset']} / {meta['source']['list']}"
    with gr.Blocks(title="zsbir sketch search") as demo:
        gr.Markdown(f"## Sketch search\nRun `{model.run_dir.name}` ({meta.get('model')}, checkpoint "
                    f"{model.checkpoint.name}, step {model.step}) · index `{store.folder.name}`: "
                    f"{len(store)} photos of {source} ({meta['kind']})")
        with gr.Row():
            with gr.Column(scale=1):
                canvas = gr.Sketchpad(label="Draw a sketch (or upload one)", type="pil", image_mode="RGBA",
                                      sources=("upload",), canvas_size=CANVAS, elem_id="sketch",
                                      brush=gr.Brush(default_size=6, colors=["#000000"], color_mode="fixed"))
                top_k = gr.Slider(1, MAX_TOP, value=min(top, MAX_TOP), step=1, label="photos to show (K)",
                                  elem_id="top-k")
                inputs = [canvas, top_k]
                if can_rerank:  # only models with a relation network can re-rank
                    inputs.append(gr.Slider(0, min(MAX_RERANK, len(store)), value=0, step=1, elem_id="rerank",
                                            label="re-rank the top N with the relation network (0: off)"))
                button = gr.Button("Search", variant="primary", elem_id="search")
            with gr.Column(scale=2):
                scores = "cosine score · relation score" if can_rerank else "cosine score"
                # The photos travel inline with the answer (data: URIs, results_html): a gr.Gallery
                # would fetch each from the server after the answer, ~100 ms of the round trip.
                gallery = gr.HTML(label=f"Top photos (class · {scores})", show_label=True, container=True,
                                  elem_id="results", css_template=RESULTS_CSS, min_height=200)
                status = gr.Markdown(elem_id="status")
        handler = search_handler(model, store)

        def search(*values):
            hits, line = handler(*values)
            return results_html(hits), line

        button.click(search, inputs=inputs, outputs=[gallery, status])
    return demo


def offline_theme():
    """The default theme with system fonts: the stock one fetches Google Fonts, unreachable offline."""
    gr = import_gradio()
    return gr.themes.Default(font=["Helvetica", "Arial", "sans-serif"], font_mono=["monospace"])


def launch(demo, store, host: str, port: int | None, block: bool = True):
    # Later Gradio 6 releases (not 6.0) record every run in the browser's storage by default; with the
    # photos inline each record is ~100 kB and every search got slower than the last (233 -> 410 ms
    # over 30 searches, docs/benchmarks.md). Off: the round trip stays flat, and nothing is kept.
    extra = {"run_history": False} if "run_history" in signature(demo.launch).parameters else {}
    return demo.launch(server_name=host, server_port=port, allowed_paths=[store.meta["root"]], share=False,
                       inbrowser=False, show_error=True, prevent_thread_lock=not block, theme=offline_theme(),
                       quiet=not block, **extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zsbir.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="+", help="run_dir=<run> [index=<name>] [ckpt=best] [device=cpu]")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--top", type=int, default=10, help="photos shown by default (the page has a slider)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    return run_cli(lambda: serve(args), log)


def serve(args: argparse.Namespace) -> None:
    from zsbir.search.__main__ import split_settings
    from zsbir.search.build import find_index
    from zsbir.search.model import load_run_model

    settings, extra = split_settings(args.settings)
    if extra:
        raise AppError(f"unexpected arguments {extra}; the app takes run_dir=<run> [index=<name>] [ckpt=...] [device=...]")
    if "run_dir" not in settings:
        raise AppError("no run directory given: python -m zsbir.app run_dir=<run>")
    import_gradio()
    model = load_run_model(settings["run_dir"], settings.get("ckpt", "best"), settings.get("device", "cpu"))
    store = find_index(model, settings.get("index"))
    launch(build_app(model, store, args.top), store, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
