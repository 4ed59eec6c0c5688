"""Time from pressing *Analyse* to both heatmaps on screen, in a real browser (models warm).

    python benchmarks/bench_app_latency.py [--runs 7] [--app-arg --sanet50 --app-arg PATH ...]

Starts ``app.py`` on a free port (weights as the app finds them; untrained if none), opens it in
Debian's Chromium through Playwright, and per run: picks an example image, presses *Analyse* and
waits until both overlay images have changed and finished loading; then until the probe chart
has. The first run warms the models and the page and is not counted. Prints the medians;
benchmarks/bench_analysis.py gives the server-side stages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import machine, start_app, stop_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHANGED = ("old => old.every(([sel, src]) => { const img = document.querySelector(sel + ' img'); "
           "return img && img.src !== src && img.complete && img.naturalWidth > 0; })")

DOWNLOAD_LINK = "el => { const a = el.querySelector('a[href]'); return a ? a.href : null; }"
DOWNLOAD_CHANGED = ("old => { const a = document.querySelector('#download a[href]'); "
                    "return a !== null && a.href !== old; }")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs (after one warm-up)")
    parser.add_argument("--app-arg", action="append", default=[], help="passed to app.py (repeatable)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    images = sorted((ROOT / "examples").glob("*.jpg"))
    log_path = Path(tempfile.mkdtemp(prefix="sanet-viz-latency-")) / "app.log"
    proc, url = start_app(args.app_arg, log_path=log_path)
    heatmaps: list[float] = []
    probes: list[float] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#analyse-button", timeout=60_000)
            download_before = None
            for run in range(args.runs + 1):
                image = images[run % len(images)]
                page.set_input_files("#image-input input[type=file]", str(image))
                page.wait_for_selector("#image-input img", timeout=30_000)
                page.wait_for_timeout(300)  # let the upload settle: it is not part of the timing
                selectors = ["#overlay-resnet50", "#overlay-sanet50"]
                before = [[s, page.get_attribute(f"{s} img", "src") if page.query_selector(f"{s} img") else None]
                          for s in selectors]
                probe_before = [["#probe-chart", page.get_attribute("#probe-chart img", "src")
                                 if page.query_selector("#probe-chart img") else None]]
                start = time.perf_counter()
                page.click("#analyse-button")
                page.wait_for_function(CHANGED, arg=before, timeout=120_000)
                shown = time.perf_counter() - start
                page.get_by_role("tab", name="SA groups").click()  # the chart renders on its tab
                page.wait_for_function(CHANGED, arg=probe_before, timeout=300_000)
                probed = time.perf_counter() - start
                # The last message (result.json, the zip) lands after the chart; a click before
                # it would be ignored (the event is still running).
                page.get_by_role("tab", name="Download").click()
                page.wait_for_function(DOWNLOAD_CHANGED, arg=download_before, timeout=120_000)
                download_before = page.eval_on_selector("#download", DOWNLOAD_LINK)
                page.get_by_role("tab", name="Compare").click()
                if run:
                    heatmaps.append(shown * 1e3)
                    probes.append(probed * 1e3)
                print(f"run {run}{' (warm-up)' if not run else ''}: {image.name}: heatmaps {shown * 1e3:.0f} ms, "
                      f"SANet50 probe chart {probed * 1e3:.0f} ms", flush=True)
            browser.close()
    finally:
        stop_app(proc)
    print(f"\nmachine: {machine()}")
    print(f"median of {args.runs}: both heatmaps on screen {statistics.median(heatmaps):.0f} ms after the click "
          f"(min {min(heatmaps):.0f}); SANet50 probe chart {statistics.median(probes):.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
