"""The browser app end to end: `python app.py` in a subprocess, driven by gradio_client and Chromium."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import urllib.request

from conftest import EXAMPLES, ROOT

ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory, official_checkpoint: Path,
               torchvision_checkpoint: Path) -> Iterator[dict[str, object]]:
    """The real app on a free port, with checkpoints in the released layouts."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", SANET_VIZ_OFFLINE="1", HF_HUB_OFFLINE="1",
               GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port),
                                 "--resnet50", str(torchvision_checkpoint), "--sanet50", str(official_checkpoint),
                                 "--weights-dir", str(tmp_path_factory.mktemp("empty-weights"))],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait_for_http(url, proc)
            yield {"url": url, "proc": proc, "log": log_path,
                   "checkpoints": {"resnet50": torchvision_checkpoint, "sanet50": official_checkpoint}}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _result_dict(outputs: tuple[object, ...]) -> dict[str, object]:
    found = [o for o in outputs if isinstance(o, dict) and "models" in o]
    assert len(found) == 1, f"expected one result dict among the outputs, got {outputs!r}"
    return found[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_api_analyze_returns_the_result_contract(app_server: dict[str, object]) -> None:
    from gradio_client import Client, handle_file

    client = Client(str(app_server["url"]), verbose=False)
    result = _result_dict(client.predict(handle_file(str(EXAMPLES / "chelsea.jpg")), api_name="/analyze"))
    assert result["pretrained"] is True and result["warning"] is None
    for key, ckpt in app_server["checkpoints"].items():  # type: ignore[union-attr]
        model = result["models"][key]  # type: ignore[index]
        assert model["weights"] == {"source": str(ckpt), "pretrained": True, "sha256": _sha256(ckpt)}
        assert len(model["top5"]) == 5
        assert model["top5"][0]["prob"] >= model["top5"][-1]["prob"]
        probe = model["group_probe"]
        assert probe["groups"] == 64 and len(probe["scores"]) == 64
        assert probe["class"] == model["top5"][0]["index"]
        assert all(0.0 <= s <= 1.0 for s in probe["scores"])
    gates = result["models"]["sanet50"]["sa_gates"]  # type: ignore[index]
    assert list(gates) == [f"SA_{s}_{b}" for s, n in ((2, 3), (3, 4), (4, 6), (5, 3)) for b in range(1, n + 1)]

    # Other inputs are optional; choosing a class explains it in both models.
    explained = _result_dict(client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), "gradcam", "281",
                                            api_name="/analyze"))
    assert {m["target_class"] for m in explained["models"].values()} == {281}  # type: ignore[union-attr]


@pytest.mark.slow
def test_concurrent_requests_equal_single_requests(app_server: dict[str, object]) -> None:
    from gradio_client import Client, handle_file

    url = str(app_server["url"])
    images = [EXAMPLES / "chelsea.jpg", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.jpg"]

    def call(path: Path, target: str = "predicted") -> dict[str, object]:
        client = Client(url, verbose=False)
        return _result_dict(client.predict(handle_file(str(path)), "gradcam", target, api_name="/analyze"))

    single = [call(p) for p in images]
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(call, images))
    for a, b in zip(single, together):
        for key in ("resnet50", "sanet50"):
            ma, mb = a["models"][key], b["models"][key]  # type: ignore[index]
            assert [p["index"] for p in ma["top5"]] == [p["index"] for p in mb["top5"]]
            assert ma["group_probe"]["scores"] == pytest.approx(mb["group_probe"]["scores"], abs=1e-6)
            assert ma["target_class"] == mb["target_class"]


def _launch_chromium(playwright):  # type: ignore[no-untyped-def]
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"])


def _rendered(page, selector: str) -> bool:  # type: ignore[no-untyped-def]
    return bool(page.eval_on_selector(f"{selector} img", "img => img.complete && img.naturalWidth > 50"))


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_walkthrough(app_server: dict[str, object]) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with sync_playwright() as p:
        browser = _launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                ("http://127.0.0.1", "http://localhost", "data:", "blob:")) else None)
            page.goto(str(app_server["url"]))
            page.wait_for_selector("#analyse-button", timeout=60_000)
            banner = page.inner_text("#weights-banner")
            assert "pretrained weights" in banner and "UNTRAINED" not in banner

            page.set_input_files("#image-input input[type=file]", str(EXAMPLES / "chelsea.jpg"))
            page.wait_for_selector("#image-input img", timeout=30_000)
            page.click("#analyse-button")
            page.wait_for_selector("#overlay-resnet50 img", timeout=120_000)
            page.wait_for_selector("#overlay-sanet50 img", timeout=120_000)
            assert _rendered(page, "#overlay-resnet50") and _rendered(page, "#overlay-sanet50")
            page.screenshot(path=str(ARTIFACTS / "app-compare.png"), full_page=True)

            page.get_by_role("tab", name="SA groups").click()
            page.wait_for_selector("#probe-chart img", timeout=180_000)
            page.wait_for_selector("#group-grid img", timeout=30_000)
            page.wait_for_selector("#group-detail img", timeout=60_000)
            assert _rendered(page, "#probe-chart") and _rendered(page, "#group-grid")
            page.screenshot(path=str(ARTIFACTS / "app-groups.png"), full_page=True)

            page.get_by_role("tab", name="Across depth").click()
            page.wait_for_selector("#gates-heatmap img", timeout=30_000)
            assert _rendered(page, "#gates-heatmap")

            page.get_by_role("tab", name="Class correlation").click()
            files = [str(EXAMPLES / n) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg")]
            page.set_input_files("#correlation-files input[type=file]", files)
            page.get_by_label("Labels (optional", exact=False).fill("cat\ncup\nrocket\nperson")
            page.wait_for_timeout(1000)
            page.click("#correlate-button")
            page.wait_for_selector("#correlation-depth img", timeout=120_000)
            page.wait_for_selector("#correlation-matrices img", timeout=30_000)
            assert _rendered(page, "#correlation-depth") and _rendered(page, "#correlation-matrices")
            page.screenshot(path=str(ARTIFACTS / "app-correlation.png"), full_page=True)
        finally:
            browser.close()
    assert outside == [], f"the page asked for outside resources: {outside}"
