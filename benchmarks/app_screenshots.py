"""Screenshots of every tab of a running app, at desktop (1400 px) and phone (390 px) width.

    python app.py --resnet50 untrained --sanet50 untrained &      # or real weights
    python benchmarks/app_screenshots.py http://127.0.0.1:7860/ docs/screenshots

Uses Debian's Chromium through Playwright (as the browser tests do). Writes
``<width>-<n>-<tab>.webp`` for each tab after analysing examples/chelsea.jpg (and correlating
three examples): lossy WebP at quality 80 (Pillow, ``method=6``), a quarter of the PNG's size with
text, heatmaps and colour bars as sharp to the eye (a 256-colour PNG palette bands the heatmaps
and is bigger). The README shows desktop-1-compare.webp; docs/screenshots/README.md lists the set.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WIDTHS = {"desktop": (1400, 1000), "phone": (390, 844)}
WEBP = {"quality": 80, "method": 6}  # method 6: slowest encoder, smallest file


def save_webp(png: bytes, path: Path) -> None:
    """A screenshot (PNG bytes from Playwright) as lossy WebP at ``path``."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").save(path, "WEBP", **WEBP)


def shoot(url: str, out: Path) -> list[Path]:
    from playwright.sync_api import Page, sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            for name, (width, height) in WIDTHS.items():
                page = browser.new_page(viewport={"width": width, "height": height})

                def snap(file: str, *, full_page: bool = True, page: Page = page) -> None:
                    save_webp(page.screenshot(full_page=full_page), out / file)
                    written.append(out / file)

                page.goto(url)
                page.wait_for_selector("#analyse-button", timeout=120_000)
                page.set_input_files("#image-input input[type=file]", str(EXAMPLES / "chelsea.jpg"))
                page.wait_for_selector("#image-input img", timeout=30_000)
                page.click("#analyse-button")
                page.wait_for_selector("#overlay-sanet50 img", timeout=180_000)
                page.wait_for_timeout(1500)
                snap(f"{name}-1-compare.webp", full_page=False)  # what a visitor sees first
                for i, (tab, ready) in enumerate((("SA groups", "#probe-chart img"),
                                                  ("Across depth", "#gates-heatmap img")), start=2):
                    page.get_by_role("tab", name=tab).click()
                    page.wait_for_selector(ready, timeout=180_000)
                    page.wait_for_timeout(1500)
                    snap(f"{name}-{i}-{tab.lower().replace(' ', '-')}.webp")
                page.get_by_role("tab", name="Class correlation").click()
                page.set_input_files("#correlation-files input[type=file]",
                                     [str(EXAMPLES / n) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")])
                page.get_by_label("Labels (optional", exact=False).fill("cat\ncup\nrocket")
                page.wait_for_timeout(1500)
                page.click("#correlate-button")
                page.wait_for_selector("#correlation-depth img", timeout=180_000)
                page.wait_for_timeout(1500)
                snap(f"{name}-4-class-correlation.webp")
                for i, tab in enumerate(("Faithfulness", "Download"), start=5):
                    if page.get_by_role("tab", name=tab).count():
                        page.get_by_role("tab", name=tab).click()
                        if tab == "Faithfulness":  # measured, as a visitor would see it after the click
                            page.click("#faithfulness-button")
                            page.wait_for_selector("#faithfulness-curves img", timeout=600_000)
                        page.wait_for_timeout(2500)
                        snap(f"{name}-{i}-{tab.lower()}.webp")
                page.close()
        finally:
            browser.close()
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for path in shoot(sys.argv[1], Path(sys.argv[2])):
        print(path)
