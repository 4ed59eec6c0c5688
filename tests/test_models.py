"""SA-ResNet models: layout against the released checkpoint, the SA layer against an independent
implementation written from the paper, channel-shuffle folding, and the paper's layer names."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import block_outputs, randomize_sa, tiny_sa_resnet
from torch import Tensor, nn
from torchvision.models import resnet50 as tv_resnet50

from sanet_viz import models
from sanet_viz.weights import MODEL_SPECS

# SANet50 = ResNet50 with an SA layer in each bottleneck; stages of [3, 4, 6, 3] blocks with
# 256, 512, 1024, 2048 output channels (conv2_x .. conv5_x).
STAGES = {1: (3, 256), 2: (4, 512), 3: (6, 1024), 4: (3, 2048)}
PAPER_NAMES = ["SA_2_1", "SA_2_2", "SA_2_3",
               "SA_3_1", "SA_3_2", "SA_3_3", "SA_3_4",
               "SA_4_1", "SA_4_2", "SA_4_3", "SA_4_4", "SA_4_5", "SA_4_6",
               "SA_5_1", "SA_5_2", "SA_5_3"]
SA_PARAMS = ("cweight", "cbias", "sweight", "sbias", "gn.weight", "gn.bias")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# Layout


@pytest.fixture(scope="module")
def fresh_sanet50() -> models.SAResNet:
    torch.manual_seed(0)
    return models.sa_resnet50().eval()


def test_parameter_counts(fresh_sanet50: models.SAResNet) -> None:
    assert n_params(fresh_sanet50) == 25_557_740
    assert n_params(models.resnet50()) == 25_557_032
    assert n_params(tv_resnet50(weights=None)) == 25_557_032


def test_state_dict_keys_and_shapes_match_released_layout(fresh_sanet50: models.SAResNet) -> None:
    tv_state = tv_resnet50(weights=None).state_dict()
    expected_sa: dict[str, tuple[int, ...]] = {}
    for layer, (blocks, channels) in STAGES.items():
        half = channels // 128  # C / (2 * 64 groups)
        for b in range(blocks):
            for name in ("cweight", "cbias", "sweight", "sbias"):
                expected_sa[f"layer{layer}.{b}.sa.{name}"] = (1, half, 1, 1)
            expected_sa[f"layer{layer}.{b}.sa.gn.weight"] = (half,)
            expected_sa[f"layer{layer}.{b}.sa.gn.bias"] = (half,)
    state = fresh_sanet50.state_dict()
    assert set(state) == set(tv_state) | set(expected_sa)
    assert len(expected_sa) == 16 * 6
    for key, shape in expected_sa.items():
        assert tuple(state[key].shape) == shape, key
    for key, value in tv_state.items():
        assert state[key].shape == value.shape, key
    # 6 * C/128 extra parameters per SA layer.
    assert sum(state[k].numel() for k in expected_sa) == 25_557_740 - 25_557_032


def test_sa_initialisation_is_zero_and_one(fresh_sanet50: models.SAResNet) -> None:
    sas = [m for m in fresh_sanet50.modules() if isinstance(m, models.ShuffleAttention)]
    assert len(sas) == 16
    for sa in sas:
        assert torch.all(sa.cweight == 0) and torch.all(sa.sweight == 0)
        assert torch.all(sa.cbias == 1) and torch.all(sa.sbias == 1)
        assert torch.all(sa.gn.weight == 1) and torch.all(sa.gn.bias == 0)
        assert sa.groups == 64


def test_sa_is_applied_before_the_residual_add() -> None:
    """With a zero SA output (gates -> 0), a block reduces to relu(identity)."""
    torch.manual_seed(0)
    block = models.SABottleneck(256, 64).eval()
    with torch.no_grad():
        block.sa.cbias.fill_(-1e4)
        block.sa.sbias.fill_(-1e4)
        x = torch.randn(2, 256, 6, 6)
        assert torch.allclose(block(x), torch.relu(x), atol=1e-6)


# ------------------------------------------------------------------------------------------
# The SA layer


def test_channel_shuffle_order_on_hand_made_tensor() -> None:
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    out = models.channel_shuffle(x, 2).flatten().tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7]
    c = 12
    y = torch.arange(float(c)).reshape(1, c, 1, 1).expand(2, c, 3, 2).contiguous()
    out = models.channel_shuffle(y, 2)
    for i in range(c // 2):
        assert torch.equal(out[:, 2 * i], y[:, i])
        assert torch.equal(out[:, 2 * i + 1], y[:, c // 2 + i])


def reference_sa(sa: models.ShuffleAttention, x: Tensor) -> Tensor:
    """Straight from the paper: loop over groups, per-channel instance norm, explicit interleave."""
    n, c, h, w = x.shape
    g = sa.groups
    per_group = c // g
    half = per_group // 2
    cw, cb = sa.cweight.detach().flatten(), sa.cbias.detach().flatten()
    sw, sb = sa.sweight.detach().flatten(), sa.sbias.detach().flatten()
    gw, gb, eps = sa.gn.weight.detach(), sa.gn.bias.detach(), sa.gn.eps
    before_shuffle = torch.empty_like(x)
    for k in range(g):
        for j in range(half):
            ch = k * per_group + j  # channel branch: first half of the group
            v = x[:, ch]
            s = v.mean(dim=(1, 2), keepdim=True)
            before_shuffle[:, ch] = v * torch.sigmoid(cw[j] * s + cb[j])
            ch = k * per_group + half + j  # spatial branch: second half
            v = x[:, ch]
            mu = v.mean(dim=(1, 2), keepdim=True)
            var = ((v - mu) ** 2).mean(dim=(1, 2), keepdim=True)
            normed = (v - mu) / torch.sqrt(var + eps) * gw[j] + gb[j]
            before_shuffle[:, ch] = v * torch.sigmoid(sw[j] * normed + sb[j])
    out = torch.empty_like(x)
    for i in range(c // 2):
        out[:, 2 * i] = before_shuffle[:, i]
        out[:, 2 * i + 1] = before_shuffle[:, c // 2 + i]
    return out


def random_sa(channels: int, groups: int, seed: int = 0) -> models.ShuffleAttention:
    sa = models.ShuffleAttention(channels, groups)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sa.cweight, sa.cbias, sa.sweight, sa.sbias, sa.gn.weight, sa.gn.bias):
            p.copy_(torch.randn(p.shape, generator=g))
    return sa.eval()


@pytest.mark.parametrize(("channels", "groups", "hw"), [(16, 4, (5, 3)), (256, 64, (7, 7)), (48, 2, (4, 4))])
def test_shuffle_attention_equals_independent_implementation(channels: int, groups: int,
                                                              hw: tuple[int, int]) -> None:
    sa = random_sa(channels, groups)
    x = torch.randn(3, channels, *hw, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    with torch.no_grad():
        got = sa(x)
        want = reference_sa(sa, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shuffle_attention_with_paper_init_uses_constant_gates() -> None:
    """cweight = sweight = 0, cbias = sbias = 1: every gate is sigmoid(1), then the shuffle."""
    sa = models.ShuffleAttention(32, 4)
    x = torch.randn(2, 32, 3, 3)
    with torch.no_grad():
        out = sa(x)
    scaled = x * torch.sigmoid(torch.tensor(1.0))
    expected = torch.stack([scaled[:, i // 2 + (16 if i % 2 else 0)] for i in range(32)], dim=1)
    torch.testing.assert_close(out, expected)


def test_gates_agree_with_forward_and_reference() -> None:
    channels, groups = 64, 4
    sa = random_sa(channels, groups, seed=3)
    x = torch.randn(2, channels, 5, 4, generator=torch.Generator().manual_seed(4))
    per_group, half = channels // groups, channels // groups // 2
    with torch.no_grad():
        gate_c, gate_s = sa.gates(x)
        out = sa(x)
    assert gate_c.shape == (2, groups, half)
    assert gate_s.shape == (2, groups, half, 5, 4)
    # Rebuild the forward pass from the gates, in paper group order.
    before = torch.empty_like(x)
    for k in range(groups):
        first = k * per_group
        before[:, first:first + half] = x[:, first:first + half] * gate_c[:, k, :, None, None]
        before[:, first + half:first + per_group] = x[:, first + half:first + per_group] * gate_s[:, k]
    rebuilt = torch.stack([before[:, i // 2 + (channels // 2 if i % 2 else 0)] for i in range(channels)], 1)
    torch.testing.assert_close(out, rebuilt, atol=1e-6, rtol=1e-6)
    # Channel gate: sigmoid(cweight * mean + cbias) per group and channel.
    cw, cb = sa.cweight.detach().flatten(), sa.cbias.detach().flatten()
    for k in range(groups):
        for j in range(half):
            mean = x[:, k * per_group + j].mean((1, 2))
            torch.testing.assert_close(gate_c[:, k, j], torch.sigmoid(cw[j] * mean + cb[j]))


# ------------------------------------------------------------------------------------------
# Folding the channel shuffle


def sa_gate_values(model: nn.Module, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    found: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    for paper, name in models.sa_module_names(model).items():
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(
            lambda m, i, o, paper=paper: found.__setitem__(paper, m.gates(i[0]))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def check_folding(model: models.SAResNet, x: Tensor, atol: float) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = models.fold_channel_shuffle(model)
    # The argument is untouched: same tensors, still ShuffleAttention modules.
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(type(m.sa) is models.ShuffleAttention for m in model.modules() if isinstance(m, models.SABottleneck))
    folded_sas = [m.sa for m in folded.modules() if isinstance(m, models.SABottleneck)]
    assert folded_sas and all(isinstance(sa, models.FoldedShuffleAttention) for sa in folded_sas)

    logits, blocks = block_outputs(model, x)
    f_logits, f_blocks = block_outputs(folded, x)
    assert set(blocks) == set(f_blocks) == set(models.bottleneck_names(model))
    # Equal up to float32 rounding, which grows with the activations' scale through 16 blocks.
    for name in blocks:
        scale = float(blocks[name].abs().max())
        torch.testing.assert_close(f_blocks[name], blocks[name], atol=atol * scale, rtol=0, msg=name)
    torch.testing.assert_close(f_logits, logits, atol=atol * float(logits.abs().max()), rtol=0)
    assert torch.equal(f_logits.argmax(-1), logits.argmax(-1))

    gates, f_gates = sa_gate_values(model, x), sa_gate_values(folded, x)
    assert list(gates) == list(f_gates) and gates
    for name, (gc, gs) in gates.items():
        fc, fs = f_gates[name]
        assert fc.shape == gc.shape and fs.shape == gs.shape
        torch.testing.assert_close(fc, gc, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(fs, gs, atol=1e-5, rtol=1e-4, msg=name)


def test_fold_channel_shuffle_tiny() -> None:
    model = tiny_sa_resnet()
    x = torch.randn(3, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    check_folding(model, x, atol=2e-6)


def test_fold_channel_shuffle_full_sanet50(sanet50_random: models.SAResNet) -> None:
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    check_folding(sanet50_random, x, atol=1e-5)


def test_folded_module_gates_equal_unfolded_on_shuffled_input() -> None:
    sa = random_sa(128, 8, seed=5)
    folded = models.FoldedShuffleAttention(sa)
    x = torch.randn(2, 128, 6, 5, generator=torch.Generator().manual_seed(6))
    shuffled = models.channel_shuffle(x, 2)  # what conv3/bn3 give after folding
    with torch.no_grad():
        torch.testing.assert_close(folded(shuffled), sa(x), atol=1e-5, rtol=1e-5)
        for got, want in zip(folded.gates(shuffled), sa.gates(x), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_instance_stats_equal_float64_reference(dtype: torch.dtype, channels_last: bool) -> None:
    x = torch.randn(3, 64, 9, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = models.instance_stats(x.to(dtype))
    want_var, want_mean = torch.var_mean(x.to(dtype).double(), dim=(2, 3), correction=0)
    assert mean.shape == var.shape == (3, 64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the results are rounded to bf16
    torch.testing.assert_close(mean.double(), want_mean, atol=tol * 2, rtol=tol)
    torch.testing.assert_close(var.double(), want_var, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------
# Paper names


def test_paper_names(fresh_sanet50: models.SAResNet) -> None:
    assert models.paper_name_to_module("SA_5_3") == "layer4.2"
    assert models.paper_name_to_module("SA_2_1") == "layer1.0"
    assert models.module_to_paper_name("layer4.2") == "SA_5_3"
    assert models.module_to_paper_name("layer4.2.sa") == "SA_5_3"
    names = models.sa_module_names(fresh_sanet50)
    assert list(names) == PAPER_NAMES
    expected_modules = [f"layer{layer}.{b}.sa" for layer, (blocks, _) in STAGES.items() for b in range(blocks)]
    assert list(names.values()) == expected_modules
    for paper, module in names.items():
        assert models.paper_name_to_module(paper) + ".sa" == module
        assert models.module_to_paper_name(module) == paper
        assert isinstance(fresh_sanet50.get_submodule(module), models.ShuffleAttention)
    assert models.sa_module_names(models.resnet50()) == {}
    assert models.bottleneck_names(models.resnet50()) == [m.removesuffix(".sa") for m in expected_modules]


@pytest.mark.parametrize("bad", ["SA_1_1", "SA_6_1", "SA_5_0", "sa_5_3", "SA_5_3x", "SA_53", "layer4.2", ""])
def test_bad_paper_names_raise(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        models.paper_name_to_module(bad)


@pytest.mark.parametrize("bad", ["layer0.1", "layer5.0", "layer4", "conv1", "layer4.2.conv1", "SA_5_3"])
def test_bad_module_names_raise(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        models.module_to_paper_name(bad)


def test_sa_layer_rejects_indivisible_channels() -> None:
    with pytest.raises(ValueError, match=r"divisible"):
        models.ShuffleAttention(100, 64)


def test_randomize_helper_gives_nonconstant_gates() -> None:
    """Guard for the fold tests: with the paper's init all gates equal and errors could hide."""
    model = randomize_sa(copy.deepcopy(tiny_sa_resnet()))
    gates = sa_gate_values(model, torch.randn(1, 3, 32, 32))
    for gc, gs in gates.values():
        assert gc.std() > 1e-3 and gs.std() > 1e-3


# ---------------------------------------------------------------------------------------------
# The narrow copies app-server tests run (tests/narrow_models.py) are the registered models but narrow

@pytest.mark.parametrize("key", list(MODEL_SPECS))
def test_narrow_copies_keep_every_module_name_and_gate_layout(key: str) -> None:
    import narrow_models

    from sanet_viz.attention import layout_of

    real, narrow = MODEL_SPECS[key].build(), narrow_models.BUILDERS[key](num_classes=MODEL_SPECS[key].num_classes)
    assert [n for n, _ in narrow.named_modules()] == [n for n, _ in real.named_modules()]
    assert [type(m) for _, m in narrow.named_modules()] == [type(m) for _, m in real.named_modules()]
    assert layout_of(narrow) == layout_of(real)
    n_params = sum(p.numel() for p in narrow.parameters())
    assert n_params < sum(p.numel() for p in real.parameters()) / 5, "not narrow"
    if key == "sanet50":
        assert narrow.get_submodule("layer4.2.sa").groups == real.get_submodule("layer4.2.sa").groups == 64
