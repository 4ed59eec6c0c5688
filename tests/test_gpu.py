"""GPU readiness: the CUDA paths give the CPU's numbers (tests marked ``gpu``, skipped without
CUDA), and ``benchmarks/gpu_check.sh`` says so and exits 0 on a machine without a GPU."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, ROOT
from test_reproduce import NUM_CLASSES, OPTIONS, make_folder, tiny_lab

from sanet_viz import reproduce as rp
from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.lab import Lab, LoadedModel
from sanet_viz.preprocessing import decode_image, prepare


def _gpu_check_module() -> object:
    """benchmarks/gpu_check.py (not a package), loaded once."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["gpu_check"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["gpu_check"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run in full")
def test_gpu_check_without_a_gpu_says_so_and_exits_zero() -> None:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU here" in proc.stdout and "nothing to check" in proc.stdout


def test_gpu_check_table_judges_the_default_precision_against_the_targets() -> None:
    gc = _gpu_check_module()
    bench = {"median_ms": {"ours fp32": 80.0, "ours bf16": 40.0, "ours auto": 59.0},
             "stages_ms": {"ours bf16 sanet50 probe": 12.0}, "peak_gpu_mb": 900.0,
             "precision_checks": {"sanet50": {"max_abs_diff": 0.001, "spearman": 0.99, "passed": True,
                                              "verdict": "bf16"}}}
    rows = gc.analysis_rows(bench)  # type: ignore[attr-defined]
    judged = {row.check: row.passed for row in rows if row.passed is not None}
    assert judged == {"analysis, one image, both models (auto)": True}  # fp32 and bf16 are shown, not judged
    bench["median_ms"]["ours auto"] = 61.0
    assert [row.verdict for row in gc.analysis_rows(bench) if row.passed is not None] == ["FAIL"]  # type: ignore
    assert gc.tests_row(1, None).passed is False and gc.tests_row(0, None).verdict == "pass"  # type: ignore


# ---------------------------------------------------------------------------------------------
# On the GPU (skipped here)

def _on(lab: Lab, device: str) -> Lab:
    """The same tiny models, copied to ``device``."""
    return Lab({key: LoadedModel(key, lm.display_name, copy.deepcopy(lm.model).cpu(), lm.weights,
                                 torch.device(device), probe_layer=lm.probe_layer, probe_groups=lm.probe_groups)
                for key, lm in lab.models.items()})


@pytest.mark.gpu
def test_analysis_on_cuda_equals_cpu() -> None:
    cpu = tiny_lab()
    gpu = _on(cpu, "cuda")
    image = prepare(decode_image(EXAMPLES / "chelsea.jpg"))
    options = AnalysisOptions(precision="fp32", probe_batch_size=8)
    a, b = analyze(cpu, image, options), analyze(gpu, image, options)
    for key in cpu.models:
        ma, mb = a.models[key], b.models[key]
        assert [p.index for p in ma.top5] == [p.index for p in mb.top5]
        np.testing.assert_allclose(ma.logits, mb.logits, atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(ma.cam, mb.cam, atol=2e-3)
        np.testing.assert_allclose(ma.group_maps, mb.group_maps, atol=1e-3, rtol=1e-3)
        assert ma.probe is not None and mb.probe is not None
        np.testing.assert_allclose(ma.probe.scores.numpy(), mb.probe.scores.numpy(), atol=1e-3)
        if ma.sa_gates:
            for depth, gates in ma.sa_gates.items():
                np.testing.assert_allclose(gates["channel"], mb.sa_gates[depth]["channel"], atol=1e-4)
    for lm in gpu.models.values():  # models stay where they were put, without gradients
        assert all(p.device.type == "cuda" and p.grad is None and not p.requires_grad for p in lm.model.parameters())


@pytest.mark.gpu
def test_bf16_probe_on_cuda_is_close_to_fp32() -> None:
    gpu = _on(tiny_lab(), "cuda")
    image = prepare(decode_image(EXAMPLES / "coffee.jpg"))
    fp32 = analyze(gpu, image, AnalysisOptions(precision="fp32"))
    bf16 = analyze(gpu, image, AnalysisOptions(precision="bf16"))
    for key in gpu.models:
        a, b = fp32.models[key].probe, bf16.models[key].probe
        assert a is not None and b is not None and bf16.models[key].precision == "bf16"
        assert float((a.scores - b.scores).abs().max()) <= 0.05


@pytest.mark.gpu
def test_reproduce_on_cuda_equals_cpu(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data")  # one broken file: the pinned batch is filtered on the GPU
    samples = rp.scan_dataset(folder, num_classes=NUM_CLASSES).samples
    cpu = rp.run(tiny_lab(), folder, samples, rp.ReproduceOptions(**OPTIONS))
    gpu = rp.run(_on(tiny_lab(), "cuda"), folder, samples, rp.ReproduceOptions(**OPTIONS))
    assert gpu.device["device"].startswith("cuda") and gpu.decode_errors == 1 and gpu.images == 9
    for key, value in cpu.sums.items():
        if key.endswith("group_correct"):  # a masked prediction may flip on a near tie of GPU and CPU rounding
            assert np.abs(gpu.sums[key] - value).max() <= 1, key
        elif value.dtype.kind in "iu":
            np.testing.assert_array_equal(gpu.sums[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(gpu.sums[key], value, rtol=1e-3, atol=1e-3, err_msg=key)


@pytest.mark.gpu
@pytest.mark.slow
def test_cli_reproduce_on_cuda_full_size(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", broken=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sanet_viz", "reproduce", "--data", str(data), "--out", str(out),
           "--precision", "bf16", "--resnet50", "untrained", "--sanet50", "untrained", "--no-progress",
           "--device", "cuda"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SANET_VIZ_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 9 and summary["device"]["device"].startswith("cuda")
    assert {m["probe_precision"] for m in summary["models"].values()} == {"bf16"}


def test_library_never_calls_cuda_unconditionally() -> None:
    """Devices come from --device / Lab.device: no ``.cuda()`` anywhere in the library."""
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "sanet_viz").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\.cuda\(\s*\)", line)]
    assert offenders == []
