"""The command line end to end, as a subprocess, with untrained full-size models (no weights here)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.models import ResNet50_Weights

from sanet_viz.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CATEGORIES = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
PAPER_NAMES = [f"SA_{stage}_{block}" for stage, blocks in ((2, 3), (3, 4), (4, 6), (5, 3))
               for block in range(1, blocks + 1)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli_env(tmp: Path) -> dict[str, str]:
    """No weights anywhere, no downloads, no torch hub cache."""
    env = {k: v for k, v in os.environ.items() if k not in {"SANET_VIZ_RESNET50", "SANET_VIZ_SANET50"}}
    weights_dir = tmp / "no-weights"
    weights_dir.mkdir(exist_ok=True)
    env.update(SANET_VIZ_OFFLINE="1", HF_HUB_OFFLINE="1", SANET_VIZ_WEIGHTS_DIR=str(weights_dir),
               TORCH_HOME=str(tmp / "torch-home"), PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return env


def run(args: list[str], tmp: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanet_viz", *args], cwd=ROOT, env=cli_env(tmp),
                          capture_output=True, text=True, timeout=timeout)


def stderr_lines(stderr: str) -> list[str]:
    """Lines as a person sees them (progress bars redraw with carriage returns)."""
    return [part.strip() for line in stderr.splitlines() for part in line.split("\r") if part.strip()]


# ------------------------------------------------------------------------------------------
# analyze: two examples and a text file named like a JPEG


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp = tmp_path_factory.mktemp("cli")
    bad = tmp / "bad.jpg"
    bad.write_text("this is a text file\n")
    out = tmp / "out"
    proc = run(["analyze", str(EXAMPLES / "chelsea.jpg"), str(EXAMPLES / "coffee.jpg"), str(bad),
                "--out", str(out)], tmp, timeout=400)
    return proc, out


@pytest.mark.slow
def test_analyze_exit_status_and_messages(analyzed: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = analyzed
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = stderr_lines(proc.stderr)
    bad_lines = [line for line in lines if "bad.jpg" in line and re.search(r"error", line, re.I)]
    assert len(bad_lines) == 1, lines
    assert "\n" not in bad_lines[0]
    assert any(re.search(r"untrained", line, re.I) and re.search(r"warn", line, re.I) for line in lines)
    assert sorted(p.name for p in out.iterdir()) == ["chelsea", "coffee"]


def load_result(out: Path, stem: str) -> dict:
    return json.loads((out / stem / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["chelsea", "coffee"])
def test_result_json_contract(stem: str, analyzed: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = analyzed
    folder = out / stem
    data = load_result(out, stem)
    assert data["pretrained"] is False
    assert isinstance(data["warning"], str) and re.search(r"untrained", data["warning"], re.I)
    assert isinstance(data["timings_ms"], dict) and data["timings_ms"]
    assert set(data["models"]) == {"resnet50", "sanet50"}

    for key, m in data["models"].items():
        w = m["weights"]
        assert set(w) >= {"source", "pretrained", "sha256"}
        assert w["pretrained"] is False and w["sha256"] is None and isinstance(w["source"], str)

        top5 = m["top5"]
        assert len(top5) == 5
        for p in top5:
            assert set(p) >= {"index", "label", "prob", "logit"}
            assert isinstance(p["index"], int) and 0 <= p["index"] < 1000
            assert p["label"] == CATEGORIES[p["index"]]
            assert 0 <= p["prob"] <= 1 and math.isfinite(p["logit"])
        probs = [p["prob"] for p in top5]
        logits = [p["logit"] for p in top5]
        assert probs == sorted(probs, reverse=True) and logits == sorted(logits, reverse=True)
        assert sum(probs) <= 1 + 1e-5
        assert len({p["index"] for p in top5}) == 5
        # The softmax ratio of two classes is exp of their logit difference.
        assert probs[1] / probs[0] == pytest.approx(math.exp(logits[1] - logits[0]), rel=1e-3)

        assert m["target_class"] == top5[0]["index"]  # default: each model's own top-1

        cam = m["cam"]
        assert cam["method"] == "gradcam" and cam["layer"] == "layer4.2"
        cam_path = folder / cam["file"]
        assert cam_path.parent == folder and cam_path.suffix == ".npy" and cam_path.is_file()
        array = np.load(cam_path)
        assert array.dtype == np.float32 and array.shape == (224, 224)
        assert np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1

        probe = m["group_probe"]
        assert probe["layer"] == "layer4.2" and probe["groups"] == 64
        assert probe["class"] == m["target_class"]
        assert len(probe["scores"]) == 64
        assert all(isinstance(s, float) and 0 <= s <= 1 for s in probe["scores"])

    assert "sa_gates" not in data["models"]["resnet50"] or not data["models"]["resnet50"]["sa_gates"]
    gates = data["models"]["sanet50"]["sa_gates"]
    assert list(gates) == PAPER_NAMES
    # Untrained SA layers keep the paper's init (weights 0, biases 1): every gate is sigmoid(1).
    sigmoid_1 = 1 / (1 + math.exp(-1))
    for name in PAPER_NAMES:
        assert len(gates[name]["channel"]) == 64 and len(gates[name]["spatial"]) == 64
        assert gates[name]["channel"] == pytest.approx([sigmoid_1] * 64, abs=1e-4)
        assert gates[name]["spatial"] == pytest.approx([sigmoid_1] * 64, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["chelsea", "coffee"])
def test_pictures_written(stem: str, analyzed: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = analyzed
    for name in ("overlays.png", "probe.png", "groups.png", "gates.png"):
        path = out / stem / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.width > 100 and image.height > 100


@pytest.mark.slow
def test_untrained_models_are_seeded(analyzed: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """Same untrained weights for both images: the two images still get their own results."""
    _, out = analyzed
    a, b = load_result(out, "chelsea"), load_result(out, "coffee")
    for key in ("resnet50", "sanet50"):
        assert a["models"][key]["weights"] == b["models"][key]["weights"]
        assert a["models"][key]["top5"] != b["models"][key]["top5"]


# ------------------------------------------------------------------------------------------
# weights and --require-pretrained


def test_weights_json_reports_untrained_with_reason(tmp_path: Path) -> None:
    proc = run(["weights", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"resnet50", "sanet50", "seresnet50", "ecaresnet50d"}  # every registered model
    for key, entry in report.items():
        assert entry["pretrained"] is False and entry["sha256"] is None
        assert entry["kind"] == "untrained"
        assert str(tmp_path / "no-weights") in entry["why"]  # where to put the file
    assert "Traceback" not in proc.stderr


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same environment as the subprocesses, for ``cli.main`` called in this process."""
    for key, value in cli_env(tmp_path).items():
        if key.startswith(("SANET_VIZ_", "HF_HUB_", "TORCH_HOME")):
            monkeypatch.setenv(key, value)
    for key in ("SANET_VIZ_RESNET50", "SANET_VIZ_SANET50"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path / "no-weights"


def test_weights_show_json_with_a_checkpoint(in_process: Path, torchvision_checkpoint: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(torchvision_checkpoint, in_process / torchvision_checkpoint.name)
    for argv in (["weights", "show", "--json"], ["weights", "--json", "show"]):
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["resnet50"]["pretrained"] is True
        assert report["resnet50"]["sha256"] == hashlib.sha256(torchvision_checkpoint.read_bytes()).hexdigest()
        assert report["sanet50"]["pretrained"] is False and report["sanet50"]["why"]


def test_weights_require_pretrained_fails(in_process: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "--require-pretrained"]) != 0
    assert re.search(r"pretrained", capsys.readouterr().err, re.I)
    assert main(["weights", "--require-pretrained", "--sanet50", "untrained"]) != 0


def test_analyze_require_pretrained_fails_clearly(in_process: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = main(["analyze", str(EXAMPLES / "chelsea.jpg"), "--out", str(out), "--require-pretrained"])
    assert status != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in stderr_lines(err) if re.search(r"error", line, re.I)]
    assert len(errors) == 1, err
    assert re.search(r"require-pretrained", errors[0]) and re.search(r"ResNet50|SANet50", errors[0])
    assert not out.exists() or not any(out.rglob("result.json"))


def test_analyze_only_bad_files(in_process: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every image bad: non-zero, one line each, nothing written."""
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    status = main(["analyze", str(empty), str(tmp_path / "ghost.jpg"), "--out", str(tmp_path / "out"),
                   "--no-probe"])
    assert status != 0
    lines = stderr_lines(capsys.readouterr().err)
    for name in ("empty.png", "ghost.jpg"):
        assert len([line for line in lines if name in line and re.search(r"error", line, re.I)]) == 1, lines
    assert not any((tmp_path / "out").rglob("result.json"))
