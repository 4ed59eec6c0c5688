"""The app as its visitors meet it, with untrained models (as on a fresh server): honest numbers
from the API, fairness between a slow and a fast request, and the page at desktop and phone width.
The server runs the narrow architectures (tests/narrow_app.py), which keep every module name and
SA_5_3's 64 groups."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EXAMPLES, ROOT, load_test_module

ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
HAS_CHROMIUM = Path(CHROMIUM).exists() and shutil.which("chromium") is not None


# Narrow models that sleep per forwarded image (tests/narrow_models.py): the Score-CAM below forwards
# 2 x 128 masked images (~26 s), the Grad-CAM beside it about 70 (~7 s, its probe), so the Score-CAM
# is still running when the Grad-CAM is done, without the CPU that full-size models would take.
SECONDS_PER_IMAGE = 0.1


@pytest.fixture(scope="module")
def untrained_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from narrow_models import APP, SECONDS_PER_IMAGE_ENV

    lt = load_test_module()
    port = lt.free_port()
    folder = tmp_path_factory.mktemp("untrained-app")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", SANET_VIZ_OFFLINE="1", HF_HUB_OFFLINE="1",
               GRADIO_TEMP_DIR=str(folder / "gradio"), **{SECONDS_PER_IMAGE_ENV: str(SECONDS_PER_IMAGE)})
    with open(folder / "app.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(APP), "--port", str(port), "--resnet50", "untrained",
                                 "--sanet50", "untrained", "--weights-dir", str(folder / "none")],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            lt.wait_ready(url, proc, timeout=300.0)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    text = (folder / "app.log").read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def _result(outputs: tuple[object, ...]) -> dict:  # type: ignore[type-arg]
    found = [o for o in outputs if isinstance(o, dict) and "models" in o]
    assert len(found) == 1
    return found[0]


@pytest.mark.slow
def test_api_correlation_numbers_are_null_where_gates_are_constant(untrained_app: str) -> None:
    from gradio_client import Client, handle_file

    files = [handle_file(str(EXAMPLES / n)) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
    *_, table, note, numbers = Client(untrained_app, verbose=False).predict(files, "cat\ncup\nrocket",
                                                                            api_name="/correlate")
    assert len(table["data"]) == 3
    assert numbers["classes"] == ["cat", "cup", "rocket"]
    assert numbers["depths"] == [f"SA_{s}_{b}" for s, n in ((2, 3), (3, 4), (4, 6), (5, 3)) for b in range(1, n + 1)]
    # Untrained SA layers: every gate is sigmoid(1); a correlation of constant profiles is undefined.
    assert numbers["mean_between_class_correlation"] == [None] * 16
    assert set(numbers["undefined"]) == set(numbers["depths"])
    assert "Undefined at 16 of 16 depths" in note and "untrained" in note.lower()


@pytest.mark.slow
def test_api_says_which_methods_ignore_the_class(untrained_app: str) -> None:
    from gradio_client import Client, handle_file

    client = Client(untrained_app, verbose=False)
    for method, agnostic in (("eigencam", True), ("gradcam", False)):
        result = _result(client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), method, "281", "layer4.2", 0.5,
                                        False, api_name="/analyze"))
        assert {m["cam"]["class_agnostic"] for m in result["models"].values()} == {agnostic}
        assert result["pretrained"] is False and "UNTRAINED" in result["warning"]


@pytest.mark.slow
def test_a_grad_cam_completes_while_another_clients_score_cam_runs(untrained_app: str) -> None:
    from gradio_client import Client, handle_file

    slow = Client(untrained_app, verbose=False).submit(handle_file(str(EXAMPLES / "rocket.jpg")), "scorecam",
                                                       api_name="/analyze")
    time.sleep(3)  # the Score-CAM has started
    assert not slow.done()
    fast = _result(Client(untrained_app, verbose=False).predict(handle_file(str(EXAMPLES / "chelsea.jpg")),
                                                                api_name="/analyze"))
    assert fast["models"]["sanet50"]["cam"]["method"] == "gradcam"
    assert not slow.done(), "the Grad-CAM did not wait for the Score-CAM"
    # A second Score-CAM is told the slow lane is busy instead of holding a fast slot.
    busy = Client(untrained_app, verbose=False)
    with pytest.raises(Exception, match="one at a time"):
        busy.predict(handle_file(str(EXAMPLES / "coffee.jpg")), "scorecam", api_name="/analyze")
    slow.cancel()


def _chromium(playwright):  # type: ignore[no-untyped-def]
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"])


def _box(page, selector: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    box = page.locator(selector).first.bounding_box()
    assert box is not None, selector
    return box


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not HAS_CHROMIUM, reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("width,height", [(1400, 1000), (390, 844)])
def test_both_heatmaps_on_screen_together(untrained_app: str, width: int, height: int) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _chromium(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(untrained_app)
            page.wait_for_selector("#analyse-button", timeout=60_000)
            assert "untrained" in page.inner_text("#weights-banner").lower()
            assert _box(page, "#analyse-button")["y"] + _box(page, "#analyse-button")["height"] <= height, \
                "Analyse is in the first screen"
            # Gradio's Tabs add their tab buttons once the tab contents have mounted, which can be a
            # moment after the button above is on the page (seen on a loaded CI machine).
            page.wait_for_function("() => document.querySelectorAll('[role=tab]').length >= 6", timeout=30_000)
            tabs = page.get_by_role("tab")
            assert tabs.count() == 6 and all(tabs.nth(i).is_visible() for i in range(6)), "every tab reachable"
            page.set_input_files("#image-input input[type=file]", str(EXAMPLES / "chelsea.jpg"))
            page.wait_for_selector("#image-input img", timeout=30_000)
            page.click("#analyse-button")
            page.wait_for_selector("#overlay-resnet50 img", timeout=120_000)
            page.wait_for_selector("#overlay-sanet50 img", timeout=120_000)
            page.locator("#overlay-row").scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            a, b = _box(page, "#overlay-resnet50 img"), _box(page, "#overlay-sanet50 img")
            top = page.evaluate("window.scrollY")
            for box in (a, b):  # both inside the viewport at once
                assert box["y"] >= 0 and box["y"] + box["height"] <= height, (box, top)
                assert box["width"] > width * 0.3 if width < 700 else box["width"] > 200
            assert abs(a["y"] - b["y"]) < 5 and a["x"] + a["width"] <= b["x"], "side by side"
            page.screenshot(path=str(ARTIFACTS / f"visitor-{width}-compare.png"))
            page.get_by_role("tab", name="SA groups").click()
            page.wait_for_selector("#probe-chart img", timeout=120_000)
            page.locator("#group-grid [data-group='9']").click()
            page.wait_for_function("() => document.querySelector('#group-text')?.innerText.includes('Chunk 9')",
                                   timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / f"visitor-{width}-groups.png"), full_page=True)
        finally:
            browser.close()
