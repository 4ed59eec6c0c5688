"""The inference copy's fused SA tail against the reference SA layer, and the fp32 probe on it
against the official one-forward-per-group loop, on weights with realistic scores."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import block_outputs, calibrated_module, randomize_sa, tiny_resnet, tiny_sa_resnet
from test_probes import official_probe
from torch import Tensor, nn

from sanet_viz import models
from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.lab import Lab, LoadedModel, bf16_supported
from sanet_viz.preprocessing import PreparedImage
from sanet_viz.probes import SPEED_MARGIN, PrecisionCheck, best_interleaved_ms
from sanet_viz.weights import WeightsInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def random_sa(channels: int, groups: int, seed: int) -> models.ShuffleAttention:
    torch.manual_seed(seed)
    return randomize_sa(models.ShuffleAttention(channels, groups), seed).eval()


def layout(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def reference_tail(sa: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """An SABottleneck's tail as the model defines it: relu(SA(x) + identity)."""
    with torch.no_grad():
        return torch.relu(sa(x) + residual)


# ------------------------------------------------------------------------------------------
# The fused SA tail


@pytest.mark.parametrize("shape", [(5, 3, 7), (2, 1, 1), (1, 9, 4)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("chunk", [1 << 17, 64 * 7 * 2, 64 * 9 * 7 * 2, 1])
def test_cache_chunks_cover_every_element_once(shape: tuple[int, int, int], channels_last: bool, chunk: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "CHUNK_ELEMENTS", chunk)
    n, h, w = shape
    x = layout(torch.zeros(n, 64, h, w), channels_last)
    pieces = list(models._cache_chunks(x))
    for samples, rows in pieces:
        x[samples, :, rows] += 1
    assert torch.equal(x, torch.ones_like(x))
    if channels_last:  # each piece is one contiguous block of memory
        assert all(x[s, :, r].is_contiguous(memory_format=torch.channels_last) for s, r in pieces)


def folded_inputs(sa: models.ShuffleAttention, x: Tensor, residual: Tensor, *, grouped: bool,
                  channels_last: bool) -> tuple[models.FoldedShuffleAttention, Tensor, Tensor, Tensor]:
    """The folded layer and its inputs in conv3's folded output order (shuffled; with ``grouped``,
    then reordered so that the channel-branch channels come first, as inference_copy does), and
    the order that maps them back (position i holds the model's channel order[i])."""
    folded = models.FoldedShuffleAttention(sa).to(x.dtype)
    order = torch.arange(sa.channels)
    if grouped:
        order = torch.argsort(folded.spatial_mask.flatten().to(torch.uint8), stable=True)
        folded.reorder_(order)
        assert folded.channel_branch_first == sa.channels // 2
    shuffled = models.channel_shuffle(x, 2)[:, order]
    return folded, layout(shuffled, channels_last), layout(residual[:, order], channels_last), order


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("chunk", [None, 64 * 7 * 2, 64 * 9 * 7 * 2])  # default; split rows; group samples
def test_fused_sa_tail_equals_reference_sa_fp32(grouped: bool, channels_last: bool, chunk: int | None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if chunk is not None:
        monkeypatch.setattr(models, "CHUNK_ELEMENTS", chunk)
    sa = random_sa(64, 4, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, 9, 7, generator=g) * 2 + 0.5
    residual = torch.randn(5, 64, 9, 7, generator=g)
    want = reference_tail(sa, x, residual)
    exact = reference_tail(copy.deepcopy(sa).double(), x.double(), residual.double())
    folded, shuffled, rest, order = folded_inputs(sa, x, residual, grouped=grouped, channels_last=channels_last)
    with torch.no_grad():
        got = folded.gate_residual_relu_(shuffled, rest)
    assert got.data_ptr() == shuffled.data_ptr()  # written in place
    got = torch.empty_like(got).index_copy_(1, order, got)  # back to the model's order
    # Exact to fp32 rounding: as close to float64 as the reference layer is.
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    assert float((got.double() - exact).abs().max()) <= 2 * float((want.double() - exact).abs().max()) + 1e-6


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_sa_tail_equals_reference_sa_bf16(grouped: bool, channels_last: bool) -> None:
    sa = random_sa(128, 8, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 128, 6, 5, generator=g) * 2 + 0.5
    residual = torch.randn(4, 128, 6, 5, generator=g)
    exact = reference_tail(copy.deepcopy(sa).double(), x.double(), residual.double())
    sa16 = copy.deepcopy(sa).to(torch.bfloat16)
    want = reference_tail(sa16, x.bfloat16(), residual.bfloat16())
    folded, shuffled, rest, order = folded_inputs(sa, x.bfloat16(), residual.bfloat16(), grouped=grouped,
                                                  channels_last=channels_last)
    with torch.no_grad():
        got = folded.gate_residual_relu_(shuffled, rest)
    assert got.dtype == torch.bfloat16
    got = torch.empty_like(got).index_copy_(1, order, got)
    # Within bf16 rounding of the exact values, and no further from them than the reference SA in bf16.
    torch.testing.assert_close(got.double(), exact, atol=0.05, rtol=0.02)
    ref_error = float((want.double() - exact).abs().max())
    assert float((got.double() - exact).abs().max()) <= max(2 * ref_error, 0.02)


def test_compiled_schedule_is_the_same_expression(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the tail is the plain expression (and the statistics var_mean): the same
    values, x left alone. Checked by tracing it eagerly, without needing a C++ compiler."""
    sa = random_sa(64, 4, seed=5)
    folded = models.FoldedShuffleAttention(sa)
    g = torch.Generator().manual_seed(6)
    x = layout(torch.randn(3, 64, 8, 8, generator=g), True)
    residual = layout(torch.randn(3, 64, 8, 8, generator=g), True)
    with torch.no_grad():
        eager = folded.gate_residual_relu_(x.clone(), residual)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        before = x.clone()
        traced = folded.gate_residual_relu_(x, residual)
    assert torch.equal(x, before)
    torch.testing.assert_close(traced, eager, atol=2e-6, rtol=2e-6)


def test_inference_bottleneck_requires_folded_fused_block() -> None:
    block = tiny_sa_resnet().layer1[0]
    with pytest.raises(TypeError, match="fold the channel shuffle"):
        models.InferenceSABottleneck(block)


# ------------------------------------------------------------------------------------------
# The whole inference copy


@pytest.mark.parametrize("channels_last", [True, False])
def test_inference_copy_with_fused_sa_equals_model(channels_last: bool) -> None:
    model = tiny_sa_resnet(seed=7)
    x = torch.randn(3, 3, 64, 48, generator=torch.Generator().manual_seed(8))
    fused = models.inference_copy(model, channels_last=channels_last)
    unfused = models.inference_copy(model, channels_last=channels_last, fuse_sa=False)
    blocks = [m for m in fused.modules() if isinstance(m, models.InferenceSABottleneck)]
    assert len(blocks) == 4 and not any(isinstance(m, models.SABottleneck) for m in fused.modules())
    # Each stage's stream has its channel-branch channels first, so their gates skip the sigmoid.
    assert all(b.sa.channel_branch_first == b.sa.channels // 2 for b in blocks)
    assert all(not torch.equal(b.stream_order, torch.arange(b.sa.channels)) for b in blocks)
    assert all(isinstance(m.sa, models.FoldedShuffleAttention) for m in unfused.modules()
               if isinstance(m, models.SABottleneck))
    xin = layout(x, channels_last)
    want_logits, want = block_outputs(model, x)
    for copy_ in (fused, unfused):
        logits, got = block_outputs(copy_, xin)
        assert set(got) == set(want)
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, atol=2e-6 * float(value.abs().max()), rtol=0, msg=name)
        torch.testing.assert_close(logits, want_logits, atol=2e-6 * float(want_logits.abs().max()), rtol=0)
    logits16, _ = block_outputs(copy.deepcopy(fused).to(torch.bfloat16), xin.bfloat16())
    torch.testing.assert_close(logits16, want_logits, atol=0.05 * float(want_logits.abs().max()), rtol=0)


def test_inference_copy_of_full_sanet50(sanet50_random: models.SAResNet) -> None:
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    want_logits, want = block_outputs(sanet50_random, x)
    logits, got = block_outputs(models.inference_copy(sanet50_random), x.contiguous(memory_format=torch.channels_last))
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-5 * float(value.abs().max()), rtol=0, msg=name)
    torch.testing.assert_close(logits, want_logits, atol=1e-5 * float(want_logits.abs().max()), rtol=0)


# ------------------------------------------------------------------------------------------
# fp32 probe == the official loop, on weights whose scores look like a trained model's


SIZE = 64


@pytest.fixture(scope="module")
def calibrated_lab() -> Lab:
    calibrated = calibrated_module()
    batch = calibrated.example_batch(SIZE, per_image=4)
    # Seeded: an unseeded ResNet gave a saturated softmax (0.987) in one CI run.
    nets = {"resnet50": calibrated.calibrate(tiny_resnet(seed=2), batch, seed=1),
            "sanet50": calibrated.calibrate(tiny_sa_resnet(seed=3), batch, seed=2)}
    return Lab({key: LoadedModel(key, f"calibrated tiny {key}", net, WeightsInfo(calibrated.CALIBRATED_SOURCE, False),
                                 probe_layer="layer4.0", probe_groups=64) for key, net in nets.items()})


def test_calibration_gives_trained_looking_statistics() -> None:
    calibrated = calibrated_module()
    batch = calibrated.example_batch(SIZE, per_image=4)
    assert batch.shape == (16, 3, SIZE, SIZE)
    assert torch.equal(batch, calibrated.example_batch(SIZE, per_image=4))  # deterministic
    model = calibrated.calibrate(tiny_sa_resnet(seed=4), batch)
    assert not model.training and all(not m.training for m in model.modules())
    with torch.no_grad():
        logits = model(batch)
        stem = model.conv1(batch)
    assert float(logits.std(dim=1).mean()) == pytest.approx(3.0, rel=1e-4)
    # The first BatchNorm's running statistics are those of its input on the batch.
    var, mean = torch.var_mean(stem, dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.bn1.running_var, var, atol=1e-5, rtol=1e-3)
    gates = [m.sweight for m in model.modules() if isinstance(m, models.ShuffleAttention)]
    assert gates and all(float(p.detach().abs().sum()) > 0 for p in gates)  # not the paper's constant-gate init


def test_fp32_probe_equals_official_loop_on_calibrated_weights(calibrated_lab: Lab) -> None:
    image_tensor = calibrated_module().example_batch(SIZE, per_image=1, seed=5)[1:2]
    import numpy as np

    image = PreparedImage(image_tensor, np.zeros((SIZE, SIZE, 3), np.uint8), (SIZE, SIZE))
    result = analyze(calibrated_lab, image, AnalysisOptions(precision="fp32"))
    for key, lm in calibrated_lab.models.items():
        c, want, _ = official_probe(lm.model, lm.model.layer4[0], image_tensor, 64)
        probe = result.models[key].probe
        assert probe is not None and probe.target_class == c
        # Realistic scores: not a saturated softmax, and the groups differ (else equality proves little).
        assert probe.unmasked_score < 0.9 and float(want.std()) > 1e-3
        torch.testing.assert_close(probe.scores, want, atol=1e-3, rtol=0)
        torch.testing.assert_close(probe.scores, want, atol=1e-5, rtol=1e-4)  # in fact to fp32 rounding


@pytest.mark.slow
def test_fp32_probe_equals_official_loop_full_sanet50_calibrated() -> None:
    """The full-size model: 16 fused SA tails and BN folding between the official loop and ours."""
    import numpy as np

    calibrated = calibrated_module()
    torch.manual_seed(0)
    net = calibrated.calibrate(models.sa_resnet50(), calibrated.example_batch(224, per_image=2))
    lm = LoadedModel("sanet50", "calibrated SANet50", net, WeightsInfo(calibrated.CALIBRATED_SOURCE, False))
    x = calibrated.example_batch(224, per_image=1, seed=1)[:1]
    image = PreparedImage(x, np.zeros((224, 224, 3), np.uint8), (224, 224))
    result = analyze(Lab({"sanet50": lm}), image, AnalysisOptions(precision="fp32"))
    c, want, _ = official_probe(net, net.layer4[2], x, 64)
    probe = result.models["sanet50"].probe
    assert probe is not None and probe.target_class == c
    assert probe.unmasked_score < 0.9 and float(want.std()) > 1e-3
    torch.testing.assert_close(probe.scores, want, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------
# What auto's check costs is said


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_auto_check_records_its_cost() -> None:
    from test_probes import prepared, tiny_lab

    lab = tiny_lab()
    result = analyze(lab, prepared(41), AnalysisOptions(precision="auto"), name="first.jpg")
    for key, lm in lab.models.items():
        check = lm.bf16_check
        assert check is not None and check.seconds is not None
        # fp32 and bf16 always; mixed exactly when bf16 failed the rule.
        assert set(check.seconds) == ({"fp32", "bf16"} if check.passed else {"fp32", "bf16", "mixed"})
        assert all(s > 0 for s in check.seconds.values())
        total = sum(check.seconds.values())
        assert total <= result.models[key].timings_ms["probe"] / 1e3 + 1e-6  # all inside the probe stage
        assert f"the check cost {total:.1f} s" in check.describe()
        assert result.models[key].to_dict()["bf16_check"]["seconds"] == {
            k: round(v, 3) for k, v in check.seconds.items()}


# ------------------------------------------------------------------------------------------
# Mixed precision: bf16 in layer3 and layer4 only


def test_mixed_model_shares_modules_and_casts_between_stages() -> None:
    model = tiny_sa_resnet(seed=11)
    fp32 = models.inference_copy(model)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    mixed = models.MixedPrecisionResNet(fp32, bf16)
    shared = {id(p) for p in fp32.parameters()} | {id(p) for p in bf16.parameters()}
    assert {id(p) for p in mixed.parameters()} <= shared  # no weights added
    for name, p in mixed.named_parameters():
        want = torch.bfloat16 if name.startswith(("layer3", "layer4")) else torch.float32
        assert p.dtype == want, name
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12)).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        early = fp32.layer2(fp32.layer1(fp32.maxpool(fp32.relu(fp32.bn1(fp32.conv1(x))))))
        late = bf16.layer4(bf16.layer3(early.to(torch.bfloat16))).float()
        want = fp32.fc(torch.flatten(fp32.avgpool(late), 1))
        got = mixed(x)
        exact = model(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    torch.testing.assert_close(got, exact, atol=0.05 * float(exact.abs().max()), rtol=0)


def test_verdict_of_a_check() -> None:
    good, bad = PrecisionCheck("x.jpg", 0.001, 0.99), PrecisionCheck("x.jpg", 0.05, 0.8)
    assert good.verdict == "bf16" and bad.verdict == "fp32"
    assert replace(bad, mixed=good).verdict == "mixed" and replace(bad, mixed=bad).verdict == "fp32"
    assert replace(good, mixed=bad).verdict == "bf16"
    # A lower precision must also have been faster than fp32 where the check timed it.
    assert replace(good, seconds={"fp32": 1.0, "bf16": 1.4}).verdict == "fp32"
    assert replace(good, seconds={"fp32": 1.0, "bf16": 0.6}).verdict == "bf16"
    assert replace(bad, mixed=good, seconds={"fp32": 1.0, "bf16": 0.5, "mixed": 1.2}).verdict == "fp32"
    described = replace(bad, mixed=good, seconds={"fp32": 1.0, "bf16": 0.5, "mixed": 0.75}).describe()
    assert "mixed (bf16 in layer3-layer4): max |diff| 0.0010" in described
    assert described.endswith("probes run in mixed (the check cost 2.2 s: fp32 probe 1.0 s + bf16 probe 0.5 s "
                              "+ mixed probe 0.8 s)")
    data = replace(bad, mixed=good).to_dict()
    assert data["passed"] is False and data["verdict"] == "mixed" and data["mixed"]["passed"] is True


def test_a_lower_precision_needs_a_ten_percent_margin_and_the_log_says_when_it_is_close() -> None:
    good, bad = PrecisionCheck("x.jpg", 0.001, 0.99), PrecisionCheck("x.jpg", 0.05, 0.8)
    # The turns' timings decide when there are some; the probes' own first-call seconds do not.
    timed = replace(good, seconds={"fp32": 1.0, "bf16": 0.5}, timing_ms={"fp32": 100.0, "bf16": 95.0})
    assert timed.speed_ratio("bf16") == pytest.approx(0.95) and timed.verdict == "fp32"  # faster, but < 10%
    assert replace(timed, timing_ms={"fp32": 100.0, "bf16": 90.0}).verdict == "bf16"  # exactly the margin
    assert replace(good, seconds={"fp32": 1.0, "bf16": 0.93}).verdict == "fp32"  # untimed: seconds, same margin
    line = timed.describe()
    assert "bf16 at 0.95x fp32's time (kept only at <= 0.9x)" in line and "probes run in fp32" in line
    assert "may choose otherwise" in line  # 0.95 is within 0.05 of the margin
    far = replace(timed, timing_ms={"fp32": 100.0, "bf16": 140.0})
    assert "bf16 at 1.40x" in far.describe() and "may choose otherwise" not in far.describe()
    mixed = replace(bad, mixed=good, timing_ms={"fp32": 100.0, "mixed": 70.0})
    assert mixed.verdict == "mixed" and mixed.candidates() == ["mixed"]
    assert mixed.to_dict()["timing_ms"] == {"fp32": 100.0, "mixed": 70.0}
    assert "0.9x" in mixed.to_dict()["speed_rule"]


def test_best_interleaved_ms_runs_in_turns_and_keeps_the_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from sanet_viz import probes

    clock = [0.0]  # a fake clock: each run advances it by its planned duration (no wall time in tests)
    monkeypatch.setattr(probes, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    order: list[str] = []
    durations = {"a": iter([0.030, 0.010, 0.020]), "b": iter([0.004, 0.020, 0.005])}

    def run(name: str) -> None:
        order.append(name)
        clock[0] += next(durations[name])

    best = best_interleaved_ms({"a": lambda: run("a"), "b": lambda: run("b")}, rounds=3)
    assert order == ["a", "b"] * 3
    assert best == {"a": pytest.approx(10.0), "b": pytest.approx(4.0)}


def test_auto_follows_a_mixed_verdict_and_mixed_stays_close_to_fp32(calibrated_lab: Lab) -> None:
    import numpy as np

    image_tensor = calibrated_module().example_batch(SIZE, per_image=1, seed=6)[2:3]
    image = PreparedImage(image_tensor, np.zeros((SIZE, SIZE, 3), np.uint8), (SIZE, SIZE))
    fp32 = analyze(calibrated_lab, image, AnalysisOptions(precision="fp32"))
    mixed = analyze(calibrated_lab, image, AnalysisOptions(precision="mixed"))
    for key, lm in calibrated_lab.models.items():
        assert mixed.models[key].precision == "mixed"
        a, b = fp32.models[key].probe.scores, mixed.models[key].probe.scores
        assert float((a - b).abs().max()) < 0.05 and not torch.equal(a, b)  # bf16 did run
        assert all(p.dtype == torch.float32 for p in lm.fast_model.parameters())  # the fp32 copy is untouched
        before = lm.bf16_check
        try:
            lm.bf16_check = PrecisionCheck("x", 0.5, 0.2, mixed=PrecisionCheck("x", 0.001, 0.99))
            if lm.probe_precision("auto") != "fp32":  # a CPU without native bf16 keeps fp32
                assert lm.probe_precision("auto") == "mixed"
                auto = analyze(calibrated_lab, image, AnalysisOptions(precision="auto"), model_keys=(key,))
                assert auto.models[key].precision == "mixed"
                torch.testing.assert_close(auto.models[key].probe.scores, b)
        finally:
            lm.bf16_check = before


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bf16")
def test_auto_tries_mixed_exactly_when_bf16_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_probes import prepared, tiny_lab

    from sanet_viz import probes

    monkeypatch.setattr(probes, "BF16_MAX_ABS_DIFF", -1.0)  # nothing passes: bf16 fails, then mixed too
    lab = tiny_lab()
    result = analyze(lab, prepared(42), AnalysisOptions(precision="auto"), name="first.jpg")
    for key, lm in lab.models.items():
        check = lm.bf16_check
        assert check is not None and check.mixed is not None and not check.mixed.passed
        assert check.verdict == "fp32" and result.models[key].precision == "fp32"
        assert set(check.seconds) == {"fp32", "bf16", "mixed"}
        assert lm.probe_precision("auto") == "fp32"
    monkeypatch.setattr(probes, "BF16_MAX_ABS_DIFF", 1.0)  # everything passes: mixed is not tried
    lab = tiny_lab()
    analyze(lab, prepared(42), AnalysisOptions(precision="auto"), name="first.jpg")
    for lm in lab.models.values():
        check = lm.bf16_check
        assert check.mixed is None  # bf16 passed: mixed is not tried
        # The speed rule (issue 19): bf16 kept only at <= SPEED_MARGIN of fp32's time in the check's turns.
        assert set(check.timing_ms) == {"fp32", "bf16"}
        assert check.verdict == ("bf16" if check.speed_ratio("bf16") <= SPEED_MARGIN else "fp32")
