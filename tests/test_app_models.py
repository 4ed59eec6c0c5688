"""The app with more than two models offered, end to end: `python app.py --models ...` in a
subprocess, a visitor who switches the pair in Chromium (headings, Across depth, a correlation),
an API client that names its pair, and the shared models left as they were found."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import EXAMPLES, ROOT, load_test_module
from narrow_models import APP

ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
HAS_CHROMIUM = Path(CHROMIUM).exists() and shutil.which("chromium") is not None
OFFERED = "resnet50,sanet50,seresnet50"


@pytest.fixture(scope="module")
def models_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Untrained ResNet50 and SANet50 at start; SE-ResNet50 offered, loaded on its first pick (the
    narrow architectures: tests/narrow_app.py)."""
    lt = load_test_module()
    folder = tmp_path_factory.mktemp("models-app")
    proc, url = lt.start_app(["--models", OFFERED, "--resnet50", "untrained", "--sanet50", "untrained",
                              "--weights-dir", str(folder / "none")], log_path=folder / "app.log",
                             env={"GRADIO_TEMP_DIR": str(folder / "gradio")}, script=APP)
    try:
        yield {"url": url, "log": folder / "app.log", "start": lt.model_state(lt.debug_stats(url))}
    finally:
        lt.stop_app(proc)
    text = (folder / "app.log").read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def _models_as_found(app: dict[str, Any]) -> None:
    """Every loaded model (SE-ResNet50 too, once loaded) without hooks or gradients, frozen, in eval mode."""
    lt = load_test_module()
    stats = lt.wait_idle(app["url"])
    state = lt.model_state(stats)
    assert {k: v for k, v in state.items() if k in app["start"]} == app["start"]
    assert all(m["hooks"] == m["tensor_hooks"] == m["grads"] == m["requires_grad"] == m["training"] == 0
               for m in stats["models"].values()), stats
    assert stats["global_hooks"] == 0


def _chromium(playwright):  # type: ignore[no-untyped-def]
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"])


def _pick(page, side: str, name: str) -> None:  # type: ignore[no-untyped-def]
    page.locator(f"#model-{side} input").click()
    page.get_by_role("option", name=name).first.click()


def _rendered(page, selector: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether the picture in ``selector`` has loaded (waits up to a minute for it)."""
    page.wait_for_function(f"() => {{ const img = document.querySelector('{selector} img'); "
                           "return img && img.complete && img.naturalWidth > 50; }", timeout=60_000)
    return True


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not HAS_CHROMIUM, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_visitor_switches_the_pair(models_app: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(models_app["url"])
            page.wait_for_selector("#analyse-button", timeout=60_000)
            banner = page.inner_text("#weights-banner")
            assert "SE-ResNet50" in banner and "untrained" in banner
            page.set_input_files("#image-input input[type=file]", str(EXAMPLES / "chelsea.jpg"))
            page.wait_for_selector("#image-input img", timeout=30_000)
            page.click("#analyse-button")
            page.wait_for_selector("#top5-sanet50 .headline", timeout=180_000)
            assert "SANet50 minus ResNet50" in page.inner_text("#difference-box")

            # The right model becomes SE-ResNet50: loaded on this first pick, the picture analysed again.
            _pick(page, "right", "SE-ResNet50")
            page.wait_for_function("() => document.querySelector('#compare-status')?.innerText.includes('Loading')"
                                   " || document.querySelector('#top5-seresnet50 .headline')", timeout=60_000)
            page.wait_for_selector("#top5-seresnet50 .headline", timeout=300_000)
            assert _rendered(page, "#overlay-resnet50") and _rendered(page, "#overlay-seresnet50")
            assert "SE-ResNet50 minus ResNet50" in page.inner_text("#difference-box")
            # The left becomes SANet50; the same model on both sides is refused and changes nothing.
            _pick(page, "left", "SANet50")
            page.wait_for_selector("#top5-sanet50 .headline", timeout=300_000)
            difference = page.inner_text("#difference-box")
            assert "SE-ResNet50 minus SANet50" in difference
            assert "SANet50 looks more" in difference and "SE-ResNet50 looks more" in difference
            assert "SANet50" in page.inner_text("#overlay-sanet50") and "SE-ResNet50" in page.inner_text(
                "#overlay-seresnet50")
            _pick(page, "right", "SANet50")
            page.wait_for_function("() => document.querySelector('#compare-status')?.innerText"
                                   ".includes('two different models')", timeout=30_000)
            assert page.locator("#overlay-seresnet50").count() == 1, "the pair stays"
            page.screenshot(path=str(ARTIFACTS / "models-compare.png"), full_page=True)

            page.get_by_role("tab", name="SA groups").click()
            page.wait_for_selector("#probe-chart img", timeout=180_000)
            assert "Also probe SANet50" in page.inner_text("#probe-resnet")
            page.get_by_role("tab", name="Across depth").click()
            page.wait_for_selector("#gates-heatmap img", timeout=60_000)
            page.wait_for_selector("#gates-lines img", timeout=60_000)
            about = page.inner_text("#gates-about")
            assert "Shuffle Attention (SA)" in about and "Squeeze-and-Excitation (SE)" in about
            assert _rendered(page, "#gates-heatmap") and _rendered(page, "#gates-lines")
            page.screenshot(path=str(ARTIFACTS / "models-depth.png"), full_page=True)

            page.get_by_role("tab", name="Class correlation").click()
            assert "SE-ResNet50 (SE)" in page.inner_text("#correlation-intro")
            files = [str(EXAMPLES / n) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
            page.set_input_files("#correlation-files input[type=file]", files)
            page.get_by_label("Labels (optional", exact=False).fill("cat\ncup\nrocket")
            page.wait_for_timeout(1000)
            page.click("#correlate-button")
            page.wait_for_selector("#correlation-depth img", timeout=180_000)
            page.wait_for_function("() => document.body.innerText.includes('SE-ResNet50 prediction')",
                                   timeout=30_000)
            assert _rendered(page, "#correlation-depth") and _rendered(page, "#correlation-matrices")
            assert "SANet50 is untrained" in page.inner_text("body")
        finally:
            browser.close()
    _models_as_found(models_app)


@pytest.mark.slow
def test_an_api_client_names_its_pair_and_correlate_keeps_its_numbers(models_app: dict[str, Any]) -> None:
    from gradio_client import handle_file

    lt = load_test_module()
    client = lt.client(models_app["url"])
    named = lt.result_of(client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), models="sanet50,seresnet50",
                                        api_name="/analyze"))
    assert list(named["models"]) == ["sanet50", "seresnet50"]
    assert named["models"]["seresnet50"]["gates"]["kind"] == "SE" and named["pretrained"] is False
    default = lt.result_of(client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), api_name="/analyze"))
    assert list(default["models"]) == ["resnet50", "sanet50"], "without the input: the starting pair"
    with pytest.raises(Exception, match="two different models"):
        client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), models="sanet50,sanet50", api_name="/analyze")
    files = [handle_file(str(EXAMPLES / n)) for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
    *_, table, _note, numbers = client.predict(files, "cat\ncup\nrocket", api_name="/correlate")
    assert numbers["depths"][0] == "SA_2_1" and set(numbers["models"]) == {"sanet50"}, "SANet50's, as before"
    assert table["headers"] == ["image", "class used", "SANet50 prediction"]
    _models_as_found(models_app)
