"""The per-group probe (official GroupAct semantics) and the analysis entry point, on tiny models."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_resnet, tiny_sa_resnet
from torch import Tensor, nn

from sanet_viz import models
from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.cam import compute_cam
from sanet_viz.hooks import SAGateRecorder
from sanet_viz.lab import Lab, LoadedModel, bf16_supported
from sanet_viz.preprocessing import PreparedImage
from sanet_viz.probes import PrecisionCheck, group_maps, masked_scores, probe_masks, spearman
from sanet_viz.weights import WeightsInfo

SIZE = 64  # input side for the tiny models: 2x2 maps at layer4
# Groups for the batching tests: with 2 images, batch 64 spans both images, batch 5 crosses the
# boundary between them, batch 1 is the official one-forward-per-group loop. (analyze uses 64.)
PROBE_G = 32


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# Group maps and masks on hand-checkable tensors


def test_group_maps_are_means_of_consecutive_channels() -> None:
    # 6 channels, 3 groups: group k = channels 2k and 2k+1 (not k, k+3 as an interleave would give).
    values = torch.tensor([1.0, 3.0, 10.0, 20.0, -4.0, 0.0])
    features = values.view(1, 6, 1, 1).expand(1, 6, 2, 2).clone()
    features[0, 0, 0, 0] = 5.0  # channel 0 now [5, 1, 1, 1] -> group 0 at (0, 0) = (5 + 3) / 2
    maps = group_maps(features, 3)
    assert maps.shape == (1, 3, 2, 2)
    expected = torch.tensor([[[4.0, 2.0], [2.0, 2.0]],
                             [[15.0, 15.0], [15.0, 15.0]],
                             [[-2.0, -2.0], [-2.0, -2.0]]])
    torch.testing.assert_close(maps[0], expected)
    with pytest.raises(ValueError, match="6"):
        group_maps(features, 4)


def test_probe_masks_bilinear_half_pixel_and_min_max() -> None:
    # A 1x2 map [2, 4] upsampled to width 4 with align_corners=False: sample positions
    # (i + 0.5) * 2/4 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped to 0, 0.25, 0.75, 1
    # -> values 2, 2.5, 3.5, 4 -> min-max [0, 0.25, 0.75, 1]. (align_corners=True: 0, 1/3, 2/3, 1.)
    maps = torch.tensor([2.0, 4.0]).view(1, 1, 1, 2)
    masks = probe_masks(maps, (1, 4))
    torch.testing.assert_close(masks, torch.tensor([0.0, 0.25, 0.75, 1.0]).view(1, 1, 1, 4))
    # Along the height, and several groups / images at once, each normalised on its own.
    maps = torch.tensor([[[[-1.0], [1.0]], [[10.0], [30.0]]]])  # (1, 2, 2, 1)
    masks = probe_masks(maps, (4, 3))
    assert masks.shape == (1, 2, 4, 3)
    column = torch.tensor([0.0, 0.25, 0.75, 1.0])
    for g in range(2):
        for j in range(3):
            torch.testing.assert_close(masks[0, g, :, j], column)
    # 2x2 -> 4x4: separable weights (1, .75, .25, 0) along each axis.
    maps = torch.tensor([[0.0, 1.0], [2.0, 7.0]]).view(1, 1, 2, 2)
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    up = w @ maps[0, 0] @ w.T
    torch.testing.assert_close(probe_masks(maps, (4, 4))[0, 0], (up - up.min()) / (up.max() - up.min()))


def test_constant_group_gives_zero_mask_without_nan() -> None:
    maps = torch.zeros(2, 3, 3, 3)
    maps[0, 0] = 5.0  # constant, non-zero
    maps[0, 1] = torch.arange(9.0).view(3, 3)
    maps[1, 2] = -1.0
    masks = probe_masks(maps, (8, 8))
    assert not torch.isnan(masks).any()
    assert torch.all(masks[0, 0] == 0) and torch.all(masks[0, 2] == 0) and torch.all(masks[1] == 0)
    assert masks[0, 1].min() == 0 and masks[0, 1].max() == 1
    model = tiny_sa_resnet()
    scores, preds = masked_scores(model, torch.randn(2, 3, SIZE, SIZE)[:, :, :8, :8].contiguous(), masks,
                                  torch.tensor([1, 2]))
    assert torch.isfinite(scores).all()


# ------------------------------------------------------------------------------------------
# Masked scores against the official per-group loop


def official_probe(model: nn.Module, layer: nn.Module, x: Tensor, groups: int) -> tuple[int, Tensor, Tensor]:
    """The official GroupAct loop for one image x (1, 3, H, W): one forward per group."""
    store: dict[str, Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("out", o.detach().clone()))
    try:
        with torch.no_grad():
            c = int(model(x).argmax(1))
    finally:
        handle.remove()
    out = store["out"][0]
    per = out.shape[0] // groups
    scores, maps = [], []
    for k in range(groups):
        a = out[k * per:(k + 1) * per].mean(0)
        maps.append(a)
        a = F.interpolate(a[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
        span = a.max() - a.min()
        a = (a - a.min()) / span if span > 0 else torch.zeros_like(a)  # official: NaN here
        with torch.no_grad():
            scores.append(torch.softmax(model(x * a), dim=1)[0, c])
    return c, torch.stack(scores), torch.stack(maps)


@pytest.fixture(scope="module")
def tiny() -> models.SAResNet:
    return tiny_sa_resnet().requires_grad_(False)


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def reference(tiny: models.SAResNet, images: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    return [official_probe(tiny, tiny.layer4[0], images[n:n + 1], PROBE_G) for n in range(len(images))]


def engine_masks(model: nn.Module, layer: str, x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    store: dict[str, Tensor] = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.__setitem__("o", o.clone()))
    try:
        with torch.no_grad():
            classes = model(x).argmax(1)
    finally:
        handle.remove()
    return probe_masks(group_maps(store["o"], groups), tuple(x.shape[-2:])), classes


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_masked_scores_equal_official_loop(batch_size: int, tiny: models.SAResNet, images: Tensor,
                                           reference: list[tuple[int, Tensor, Tensor]]) -> None:
    masks, classes = engine_masks(tiny, "layer4.0", images, PROBE_G)
    assert masks.shape == (2, PROBE_G, SIZE, SIZE)
    assert classes.tolist() == [c for c, _, _ in reference]
    scores, preds = masked_scores(tiny, images, masks, classes, batch_size=batch_size)
    assert scores.shape == (2, PROBE_G) and scores.dtype == torch.float32 and preds.shape == (2, PROBE_G)
    for n, (_, want, _) in enumerate(reference):
        torch.testing.assert_close(scores[n], want, atol=1e-5, rtol=1e-4)
    # Predictions are the argmax of each masked forward.
    with torch.no_grad():
        for n, k in [(0, 0), (1, 17), (1, PROBE_G - 1)]:
            assert int(preds[n, k]) == int(tiny(images[n:n + 1] * masks[n, k]).argmax())


def test_scores_differ_between_groups(reference: list[tuple[int, Tensor, Tensor]]) -> None:
    """Guard: the probe must be sensitive to the mask, otherwise equalities above prove little."""
    for _, scores, maps in reference:
        assert scores.std() > 1e-3
        assert maps.shape == (PROBE_G, math.ceil(SIZE / 32), math.ceil(SIZE / 32))


def test_masked_scores_on_folded_model_equal_official_loop(tiny: models.SAResNet, images: Tensor,
                                                           reference: list[tuple[int, Tensor, Tensor]]) -> None:
    masks, classes = engine_masks(tiny, "layer4.0", images, PROBE_G)
    scores, _ = masked_scores(models.fold_channel_shuffle(tiny), images, masks, classes, batch_size=16)
    for n, (_, want, _) in enumerate(reference):
        torch.testing.assert_close(scores[n], want, atol=1e-5, rtol=1e-4)


def test_bf16_probe_runs_and_stays_close(tiny: models.SAResNet, images: Tensor) -> None:
    masks, classes = engine_masks(tiny, "layer4.0", images, PROBE_G)
    fp32, _ = masked_scores(tiny, images, masks, classes, batch_size=32)
    bf16, _ = masked_scores(tiny, images, masks, classes, batch_size=32, precision="bf16")
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert float((bf16 - fp32).abs().max()) < 0.05
    assert float((bf16 - fp32).abs().mean()) < 0.01
    with pytest.raises(ValueError, match="fp16"):
        masked_scores(tiny, images, masks, classes, precision="fp16")


# ------------------------------------------------------------------------------------------
# analysis.analyze on tiny models


def all_hooks(model: nn.Module) -> list[str]:
    found = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                     "_load_state_dict_pre_hooks"):
            if getattr(m, attr, None):
                found.append(f"{name or '<root>'}.{attr}")
    return found


@pytest.fixture(scope="module")
def lab() -> Lab:
    sanet = tiny_sa_resnet(seed=3)
    return Lab({
        "resnet50": LoadedModel("resnet50", "Tiny ResNet", tiny_resnet(seed=2), WeightsInfo("untrained (test)", False),
                                probe_layer="layer4.0", probe_groups=64),
        "sanet50": LoadedModel("sanet50", "Tiny SANet", sanet, WeightsInfo("untrained (test)", False),
                               probe_layer="layer4.0", probe_groups=64),
    })


def prepared(seed: int) -> PreparedImage:
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return PreparedImage(x, np.zeros((SIZE, SIZE, 3), np.uint8), (SIZE, SIZE))


def snapshot(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_analyze_matches_direct_computations(lab: Lab) -> None:
    image = prepared(11)
    x = image.tensor
    before = {k: snapshot(lm.model) for k, lm in lab.models.items()}
    result = analyze(lab, image, AnalysisOptions(precision="fp32"), name="noise")
    assert set(result.models) == {"resnet50", "sanet50"}

    for key, lm in lab.models.items():
        model = lm.model
        r = result.models[key]
        # The model is left as it was found.
        assert snapshot(model) == before[key], key
        assert all_hooks(model) == [], key
        if lm.fast_model is not None:
            assert all_hooks(lm.fast_model) == []
        assert all(p.grad is None for p in model.parameters())

        c, want_scores, want_maps = official_probe(model, model.layer4[0], x, 64)
        with torch.no_grad():
            logits = model(x)
        probs = torch.softmax(logits, 1)[0]
        assert r.target_class == c
        assert [p.index for p in r.top5] == probs.topk(5).indices.tolist()
        for p in r.top5:
            assert p.prob == pytest.approx(float(probs[p.index]), abs=1e-5)
            assert p.logit == pytest.approx(float(logits[0, p.index]), abs=1e-4)
        assert r.probe is not None and r.probe.target_class == c and r.probe.groups == 64
        torch.testing.assert_close(r.probe.scores, want_scores, atol=1e-5, rtol=1e-4)
        assert r.probe.unmasked_score == pytest.approx(float(probs[c]), abs=1e-5)
        np.testing.assert_allclose(r.group_maps, want_maps.numpy(), atol=1e-5)
        direct_cam = compute_cam(model, x, layer="layer4.0")
        np.testing.assert_allclose(r.cam, direct_cam.cam, atol=1e-5)
        assert r.cam.shape == (SIZE, SIZE) and r.cam.dtype == np.float32

    assert result.models["resnet50"].sa_gates is None
    gates = result.models["sanet50"].sa_gates
    sanet = lab.models["sanet50"].model
    names = models.sa_module_names(sanet)
    assert gates is not None and list(gates) == list(names) == ["SA_2_1", "SA_3_1", "SA_4_1", "SA_5_1"]

    # Directly from ShuffleAttention.gates() on each SA layer's input.
    inputs: dict[str, Tensor] = {}
    handles = [sanet.get_submodule(module).register_forward_hook(
        lambda m, i, o, paper=paper: inputs.__setitem__(paper, i[0].detach().clone()))
        for paper, module in names.items()]
    with torch.no_grad():
        sanet(x)
    for h in handles:
        h.remove()
    for paper, module in names.items():
        gate_c, gate_s = sanet.get_submodule(module).gates(inputs[paper])
        np.testing.assert_allclose(gates[paper]["channel"], gate_c.mean(-1)[0].numpy(), atol=1e-6)
        np.testing.assert_allclose(gates[paper]["spatial"], gate_s.mean((2, 3, 4))[0].numpy(), atol=1e-6)
        assert gates[paper]["channel"].shape == (4,)  # the tiny model's 4 SA groups
    _, gate_s = sanet.get_submodule(names["SA_5_1"]).gates(inputs["SA_5_1"])
    np.testing.assert_allclose(result.models["sanet50"].sa_spatial_maps, gate_s.mean(2)[0].numpy(), atol=1e-6)

    # ... and through SAGateRecorder used directly.
    with SAGateRecorder(sanet, names) as recorder, torch.no_grad():
        sanet(x)
    assert all_hooks(sanet) == []
    for paper in names:
        np.testing.assert_allclose(gates[paper]["channel"], recorder.channel[paper][0].numpy(), atol=1e-6)
        np.testing.assert_allclose(gates[paper]["spatial"], recorder.spatial[paper][0].numpy(), atol=1e-6)

    data = result.to_dict({"resnet50": "a.npy", "sanet50": "b.npy"})
    assert data["pretrained"] is False and data["warning"]
    assert data["models"]["sanet50"]["group_probe"]["scores"] == pytest.approx(
        result.models["sanet50"].probe.scores.tolist())


def test_analyze_with_chosen_class_and_bf16(lab: Lab) -> None:
    image = prepared(12)
    fp32 = analyze(lab, image, AnalysisOptions(precision="fp32", target_class=3))
    bf16 = analyze(lab, image, AnalysisOptions(precision="bf16", target_class=3))
    for key, lm in lab.models.items():
        assert fp32.models[key].target_class == 3
        assert bf16.models[key].precision == "bf16"
        direct = compute_cam(lm.model, image.tensor, layer="layer4.0", target_class=3)
        np.testing.assert_allclose(fp32.models[key].cam, direct.cam, atol=1e-5)
        a, b = fp32.models[key].probe.scores, bf16.models[key].probe.scores
        assert torch.isfinite(b).all() and float((a - b).abs().max()) < 0.05
        assert all_hooks(lm.model) == []


def test_analyze_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="nosuchcam"):
        AnalysisOptions(method="nosuchcam")
    with pytest.raises(ValueError, match="1000"):
        AnalysisOptions(target_class=1000)
    with pytest.raises(ValueError, match="fp8"):
        AnalysisOptions(precision="fp8")


# ------------------------------------------------------------------------------------------
# Work per analysis, and the bf16 check behind ``auto`` precision


def tiny_lab() -> Lab:
    return Lab({
        "resnet50": LoadedModel("resnet50", "Tiny ResNet", tiny_resnet(seed=2), WeightsInfo("untrained (test)", False),
                                probe_layer="layer4.0", probe_groups=64),
        "sanet50": LoadedModel("sanet50", "Tiny SANet", tiny_sa_resnet(seed=3),
                               WeightsInfo("untrained (test)", False), probe_layer="layer4.0", probe_groups=64),
    })


class ForwardCounter:
    """Counts top-level forward calls of each named module (removed on exit)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.calls = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_pre_hook(lambda mod, args, name=name: self._count(name))
                        for name, m in modules.items()]

    def _count(self, name: str) -> None:
        self.calls[name] += 1

    def __enter__(self) -> ForwardCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("batch_size", [16, 64, 10])
def test_forward_calls_per_analysis(batch_size: int) -> None:
    """Per model: one forward of the model as defined (the CAM pass; its logits, features and
    gates are reused) and ceil(64 / batch) masked forwards of the inference copy, nothing else."""
    lab = tiny_lab()
    watched = {f"{k} {kind}": m for k, lm in lab.models.items()
               for kind, m in (("model", lm.model), ("fast", lm.fast_model), ("bf16", lm.probe_model_for("bf16")))}
    with ForwardCounter(watched) as counter:
        analyze(lab, prepared(21), AnalysisOptions(precision="fp32", probe_batch_size=batch_size))
    masked = math.ceil(64 / batch_size)
    assert counter.calls == {"resnet50 model": 1, "resnet50 fast": masked, "resnet50 bf16": 0,
                             "sanet50 model": 1, "sanet50 fast": masked, "sanet50 bf16": 0}
    with ForwardCounter(watched) as counter:
        analyze(lab, prepared(21), AnalysisOptions(precision="bf16", probe=False))
    assert counter.calls == dict.fromkeys(watched, 0) | {"resnet50 model": 1, "sanet50 model": 1}


def test_precision_check_rule() -> None:
    scores = torch.linspace(0.1, 0.9, 64)
    assert PrecisionCheck.compare(scores, scores + 0.019, "a").passed
    assert not PrecisionCheck.compare(scores, scores + 0.021, "a").passed  # a score moved too far
    swapped = scores.clone()
    swapped[::2], swapped[1::2] = scores[1::2], scores[::2]  # each neighbour pair swapped: 0.0127 apart
    check = PrecisionCheck.compare(scores, swapped, "a")
    assert check.max_abs_diff < 0.02 and check.spearman < 1 and check.passed
    shuffled = scores[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    assert not PrecisionCheck.compare(scores, shuffled, "a").passed  # ranking lost
    constant = torch.full((64,), 0.5)
    assert not PrecisionCheck.compare(constant, constant, "a").passed  # no ranking to keep: NaN
    assert spearman(scores, scores.flip(0)) == pytest.approx(-1.0)
    assert PrecisionCheck.compare(scores, scores, "cat.jpg").to_dict()["passed"] is True


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_auto_precision_checks_bf16_once_then_follows_the_verdict() -> None:
    lab = tiny_lab()
    image = prepared(22)
    exact = analyze(lab, image, AnalysisOptions(precision="fp32"))
    assert all(lm.bf16_check is None for lm in lab.models.values())  # explicit fp32: no check

    first = analyze(lab, image, AnalysisOptions(precision="auto"), name="first.jpg")
    for key, lm in lab.models.items():
        r = first.models[key]
        assert lm.bf16_check is not None and lm.bf16_check.image == "first.jpg"
        assert r.precision == "fp32" and r.precision_check is lm.bf16_check
        torch.testing.assert_close(r.probe.scores, exact.models[key].probe.scores)  # fp32 reported
        bf16 = analyze(lab, image, AnalysisOptions(precision="bf16")).models[key].probe.scores
        assert lm.bf16_check.max_abs_diff == pytest.approx(float((bf16 - r.probe.scores).abs().max()), abs=1e-6)
        assert r.to_dict()["bf16_check"]["image"] == "first.jpg"

    second = analyze(lab, image, AnalysisOptions(precision="auto"))
    for key, lm in lab.models.items():
        assert second.models[key].precision == lm.bf16_check.verdict

    # A failed check keeps auto at fp32, exactly.
    for lm in lab.models.values():
        lm.bf16_check = PrecisionCheck("bad.jpg", 0.5, 0.2)
    third = analyze(lab, image, AnalysisOptions(precision="auto"))
    for key in lab.models:
        assert third.models[key].precision == "fp32"
        torch.testing.assert_close(third.models[key].probe.scores, exact.models[key].probe.scores)


def test_auto_precision_is_fp32_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    import sanet_viz.lab as lab_module

    monkeypatch.setattr(lab_module, "bf16_supported", lambda device: False)
    lab = tiny_lab()
    result = analyze(lab, prepared(23), AnalysisOptions(precision="auto"))
    assert {r.precision for r in result.models.values()} == {"fp32"}
    assert all(lm.bf16_check is None for lm in lab.models.values())



@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler for inductor")
def test_compiled_probe_models_give_the_same_scores() -> None:
    """--compile: the masked forwards through torch.compile (inductor, frozen weights) agree."""
    plain, compiled = tiny_lab(), tiny_lab()
    for lm in compiled.models.values():
        lm.compile_probe = True
    image = prepared(24)
    want = analyze(plain, image, AnalysisOptions(precision="fp32"))
    got = analyze(compiled, image, AnalysisOptions(precision="fp32"))
    for key, lm in compiled.models.items():
        assert lm.probe_model_for("fp32") is not lm.fast_model  # the compiled wrapper, cached
        assert lm.probe_model_for("fp32") is lm.probe_model_for("fp32")
        torch.testing.assert_close(got.models[key].probe.scores, want.models[key].probe.scores,
                                   atol=1e-4, rtol=1e-3)


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sanet_viz.lab import check_compiler

    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ValueError,
                       match=r"C\+\+ compiler \('no-such-c\+\+-compiler' is not on PATH\).*without --compile"):
        check_compiler(torch.device("cpu"))
    check_compiler(torch.device("cuda"))  # GPU kernels come from Triton, not a host compiler
