"""Driving the web app in a headless Chromium (selenium): the browser test and the app benchmark.

Chromium runs with a fresh profile and everything that would reach the network switched
off, so it works on a closed machine. Debian: `apt-get install chromium chromium-driver`.
"""
from __future__ import annotations

import shutil
import socket
import tempfile
import time
from dataclasses import dataclass

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver", "chromium-driver")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900")


def find_browser() -> tuple[str | None, str | None, str]:
    """(chromium binary, chromedriver binary, why not) — the reason is empty when both exist."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER_NAMES) if p), None)
    missing = [what for what, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    why = f"no {' and no '.join(missing)} on PATH (Debian: apt-get install chromium chromium-driver)" if missing else ""
    return browser, driver, why


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_chromium(browser: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='zsbir-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@dataclass
class Query:
    images: int          # result images on the page
    captions: list[str]  # their captions (class · score)
    round_trip_s: float  # page clock: from the click on Search to the first frame showing every result decoded
    status: str          # the status line under the results
    driver_s: float = 0.0  # the same seen through chromedriver's polling (adds its own command latency)


# Installed in the page before the click: stamps the click (capture phase, before Gradio's own
# handler) and then, once per animation frame, checks whether the fresh status line and `expect`
# decoded result images are on screen. Timing inside the page keeps chromedriver's command
# latency (tens of ms a poll while the page is busy) out of the figure the user would feel.
WATCH_JS = """
const [before, expect] = arguments;
const w = window.__zsbirTrip = {click: null, done: null};
const button = document.getElementById('search');
button.addEventListener('click', () => {
  w.click = performance.now();
  const check = () => {
    const images = [...document.querySelectorAll('#results img')];
    const status = document.getElementById('status').innerText.trim();
    if (status && status !== before && images.length >= expect
        && images.every(i => i.complete && i.naturalWidth > 0)) { w.done = performance.now(); return; }
    requestAnimationFrame(check);
  };
  requestAnimationFrame(check);
}, {capture: true, once: true});
"""


def draw_square_and_search(page, url: str, side: int = 120, timeout: float = 60.0, expect: int = 1,
                           settle: float = 1.0) -> Query:
    """Open the app, draw a square on the canvas with the brush, press Search and wait for at
    least `expect` result images, all decoded."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page.get(url)
    WebDriverWait(page, timeout).until(lambda p: p.find_elements(By.CSS_SELECTOR, "#sketch canvas"))
    page.find_element(By.CSS_SELECTOR, "#sketch button[aria-label='Brush']").click()
    canvas = page.find_elements(By.CSS_SELECTOR, "#sketch canvas")[-1]
    step = side // 4
    strokes = ActionChains(page).move_to_element_with_offset(canvas, -side // 2, -side // 2).click_and_hold()
    for dx, dy in [(step, 0)] * 4 + [(0, step)] * 4 + [(-step, 0)] * 4 + [(0, -step)] * 4:
        strokes.move_by_offset(dx, dy)
    strokes.release().perform()
    # The editor hands its image to the page's state after the stroke has been rendered; a
    # click right away can still send the previous (blank) canvas on a loaded machine.
    time.sleep(settle)
    before = page.find_element(By.ID, "status").text.strip()
    page.execute_script(WATCH_JS, before, expect)
    started = time.perf_counter()
    page.find_element(By.ID, "search").click()
    trip = WebDriverWait(page, timeout, poll_frequency=0.005).until(
        lambda p: p.execute_script("const w = window.__zsbirTrip; return w.done === null ? null : w"))
    driver_s = time.perf_counter() - started
    captions = [c.text for c in page.find_elements(By.CSS_SELECTOR, "#results .caption-label")]
    return Query(len(page.find_elements(By.CSS_SELECTOR, "#results img")), captions,
                 (trip["done"] - trip["click"]) / 1e3, page.find_element(By.ID, "status").text, driver_s)


def search_blank_canvas(page, url: str, timeout: float = 60.0) -> str:
    """Open the app, press Search without drawing, and return the error toast's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page.get(url)
    WebDriverWait(page, timeout).until(lambda p: p.find_elements(By.CSS_SELECTOR, "#sketch canvas"))
    page.find_element(By.ID, "search").click()
    toast = "[data-testid='toast-body'], .toast-body"
    WebDriverWait(page, timeout).until(lambda p: any(t.text.strip() for t in p.find_elements(By.CSS_SELECTOR, toast)))
    return " ".join(t.text for t in page.find_elements(By.CSS_SELECTOR, toast))
