"""SA-ResNet (Shuffle Attention, Zhang & Yang, ICASSP 2021) and its ResNet baseline; the
channel-attention baselines (timm's SE-ResNet50, ECA-ResNet50d) are built in :mod:`attention`.

The module names and parameter shapes match the released SA-Net checkpoints once their
DataParallel ``module.`` prefix is stripped: torchvision's ResNet keys plus
``layerX.Y.sa.{cweight, cbias, sweight, sbias, gn.weight, gn.bias}``. timm's ResNets share
torchvision's stage and block names (``layer4.2``), so paper names, probes and CAM layers apply
to every model; their stem and head differ (:func:`stem`, :func:`head`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = [
    "SA_GROUPS",
    "ShuffleAttention",
    "FoldedShuffleAttention",
    "InferenceSABottleneck",
    "MixedPrecisionResNet",
    "SABottleneck",
    "SAResNet",
    "sa_resnet50",
    "sa_resnet101",
    "resnet50",
    "stem",
    "head",
    "channel_shuffle",
    "sa_module_names",
    "paper_name_to_module",
    "module_to_paper_name",
    "paper_name_or_none",
    "bottleneck_names",
    "tail_after",
    "fold_channel_shuffle",
    "inference_copy",
    "instance_stats",
]

SA_GROUPS = 64


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: output channel ``g*i + j`` is input channel ``j*C/groups + i``."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleAttention(nn.Module):
    """The SA layer, computed as in the paper (group split, two branches, concat, shuffle).

    Gate parameters have shape (1, C/2G, 1, 1) and are shared by all G groups; they start at
    weight 0 and bias 1 as in the paper.
    """

    def __init__(self, channels: int, groups: int = SA_GROUPS) -> None:
        super().__init__()
        if channels % (2 * groups):
            raise ValueError(f"channels ({channels}) must be divisible by 2*groups ({2 * groups})")
        self.channels = channels
        self.groups = groups
        half = channels // (2 * groups)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        # num_groups == num_channels: a per-channel instance norm with an affine transform.
        self.gn = nn.GroupNorm(half, half)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two branches' gates for input ``x`` (N, C, H, W), in the paper's group order.

        Returns ``channel`` (N, G, C/2G) and ``spatial`` (N, G, C/2G, H, W).
        """
        n, c, h, w = x.shape
        xg = x.reshape(n * self.groups, c // self.groups, h, w)
        x0, x1 = xg.chunk(2, dim=1)
        gate_c = torch.sigmoid(self.cweight * x0.mean((2, 3), keepdim=True) + self.cbias)
        gate_s = torch.sigmoid(self.sweight * self.gn(x1) + self.sbias)
        half = c // (2 * self.groups)
        return gate_c.reshape(n, self.groups, half), gate_s.reshape(n, self.groups, half, h, w)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        xg = x.reshape(n * self.groups, c // self.groups, h, w)
        x0, x1 = xg.chunk(2, dim=1)
        gate_c = torch.sigmoid(self.cweight * x0.mean((2, 3), keepdim=True) + self.cbias)
        gate_s = torch.sigmoid(self.sweight * self.gn(x1) + self.sbias)
        out = torch.cat([x0 * gate_c, x1 * gate_s], dim=1).reshape(n, c, h, w)
        return channel_shuffle(out, 2)


class FoldedShuffleAttention(nn.Module):
    """The SA layer as one per-channel gate, for inputs whose channels are already shuffled.

    Every step of SA before the shuffle acts per channel, so with conv3/bn3's output channels
    permuted into shuffled order (see :func:`fold_channel_shuffle`) SA becomes
    ``x * sigmoid(a * x + b)`` with per-(sample, channel) ``a`` and ``b``: channel-branch
    channels have ``a = 0, b = cweight * mean + cbias``; spatial-branch channels fold the
    instance norm in: ``a = sweight * gn.w * rstd``, ``b = sweight * (gn.b - gn.w * mean * rstd) + sbias``.
    No reshapes, concatenations or shuffle copies, and it keeps channels_last layouts.
    """

    def __init__(self, sa: ShuffleAttention) -> None:
        super().__init__()
        c, g = sa.channels, sa.groups
        half = c // (2 * g)
        self.channels, self.groups, self.eps = c, g, sa.gn.eps
        # Canonical (pre-shuffle) channel index p = group * C/G + branch * C/2G + j.
        p = torch.arange(c)
        j = p % half
        branch = (p // half) % 2
        # Built on the CPU beside the index tensors; the caller moves the module to the model's device.
        cw, cb = (t.detach().cpu().flatten() for t in (sa.cweight, sa.cbias))
        sw, sb = (t.detach().cpu().flatten() for t in (sa.sweight, sa.sbias))
        gw, gb = (t.detach().cpu().flatten() for t in (sa.gn.weight, sa.gn.bias))
        is_spatial = branch.bool()
        w_mean = torch.where(is_spatial, torch.zeros(()), cw[j])  # multiplies the channel mean
        w_norm = torch.where(is_spatial, sw[j] * gw[j], torch.zeros(()))  # multiplies (x-mu)*rstd
        bias = torch.where(is_spatial, sw[j] * gb[j] + sb[j], cb[j])
        order = shuffled_order(c)
        self.register_buffer("w_mean", w_mean[order].reshape(1, c, 1, 1).clone())
        self.register_buffer("w_norm", w_norm[order].reshape(1, c, 1, 1).clone())
        self.register_buffer("bias", bias[order].reshape(1, c, 1, 1).clone())
        self.register_buffer("spatial_mask", is_spatial[order].reshape(1, c, 1, 1).clone())
        # Canonical channel p sits at position inverse[p] of the shuffled layout.
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        # Set by reorder_ when the channel-branch channels come first (C/2 of them): the gate of
        # those is a constant per (sample, channel), and the tail then skips their sigmoid.
        self.channel_branch_first: int | None = None

    @torch.no_grad()
    def reorder_(self, order: Tensor) -> None:
        """Expect input channels in a new order: position i holds the channel now at ``order[i]``
        (for a copy whose conv3 outputs were permuted likewise, see :func:`inference_copy`)."""
        for name in ("w_mean", "w_norm", "bias", "spatial_mask"):
            setattr(self, name, getattr(self, name)[:, order].clone())
        self.inverse = torch.argsort(order.to(self.inverse.device))[self.inverse]
        spatial = self.spatial_mask.flatten()
        half = self.channels // 2
        self.channel_branch_first = half if bool((~spatial[:half]).all() and spatial[half:].all()) else None

    def _coefficients(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = instance_stats(x)
        mean, var = mean.float().reshape(x.shape[0], -1, 1, 1), var.float().reshape(x.shape[0], -1, 1, 1)
        rstd = torch.rsqrt(var + self.eps)
        a = self.w_norm.float() * rstd
        b = self.bias.float() + self.w_mean.float() * mean - a * mean
        return a.to(x.dtype), b.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self._coefficients(x)
        # Three passes over x, one new tensor: gate = sigmoid(a * x + b), then gate * x in place.
        return torch.addcmul(b, a, x).sigmoid_().mul_(x)

    def gate_residual_relu_(self, x: Tensor, residual: Tensor) -> Tensor:
        """``relu(self(x) + residual)``: an SA bottleneck's tail at inference. Eager mode writes it
        into ``x`` and returns ``x``, so ``x`` must not be needed afterwards.

        Same values as the out-of-place expression up to rounding (fp32: a few ulps; bf16: one
        rounding fewer, since the add happens before the product is rounded). Eager PyTorch runs
        one kernel per operation, each a pass over its operands, so the gate, the product, the add
        and the ReLU are applied a cache-sized chunk at a time (:func:`_cache_chunks`): the chunk
        of ``x`` stays in L2 across them, and the gate's temporary is chunk-sized, reused by the
        allocator instead of a fresh multi-megabyte buffer per layer. Under ``torch.compile`` the
        plain expression is traced instead (inductor fuses it into one kernel).
        """
        a, b = self._coefficients(x)
        if torch.compiler.is_compiling():
            return torch.relu(torch.addcmul(b, a, x).sigmoid() * x + residual)
        split = self.channel_branch_first
        if split is not None:  # channel-branch gates are per (sample, channel): no per-pixel sigmoid
            constant, a, b = torch.sigmoid(b[:, :split]), a[:, split:], b[:, split:]
        for samples, rows in _cache_chunks(x):
            part, rest = x[samples, :, rows], residual[samples, :, rows]
            if split is None:
                gate = torch.addcmul(b[samples], a[samples], part).sigmoid_()
                torch.addcmul(rest, part, gate, out=part)
            else:
                torch.addcmul(rest[:, :split], part[:, :split], constant[samples], out=part[:, :split])
                spatial = part[:, split:]
                gate = torch.addcmul(b[samples], a[samples], spatial).sigmoid_()
                torch.addcmul(rest[:, split:], spatial, gate, out=spatial)
            part.relu_()
        return x

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Same contract as :meth:`ShuffleAttention.gates` (paper group order)."""
        n, c, h, w = x.shape
        a, b = self._coefficients(x)
        canon_x = x[:, self.inverse]
        canon_a, canon_b = a[:, self.inverse], b[:, self.inverse]
        gate = torch.sigmoid(torch.addcmul(canon_b, canon_a, canon_x))
        half = c // (2 * self.groups)
        grouped = gate.reshape(n, self.groups, 2, half, h, w)
        return grouped[:, :, 0, :, 0, 0], grouped[:, :, 1]


def instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and biased variance over H, W: (N, C) each, in ``x``'s dtype.

    On the CPU, ``torch.var_mean`` over the spatial dims of a channels_last tensor is 15-25x
    slower than BatchNorm's statistics kernel run on each sample (a (1, C, H, W) slice is a
    contiguous HW x C matrix): benchmarks/bench_sa_stats.py. Both accumulate in fp32. Under
    ``torch.compile`` the plain reduction is traced: inductor generates its own kernel.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
        return mean, var
    stats = [torch.batch_norm_update_stats(sample, None, None, 0.0) for sample in x.split(1)]
    return torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])


# Elements per chunk of the fused SA tail (4 MiB of fp32: about one sample of layer1). Chunks of
# 2^17 to 2^20 elements ran equally fast in one thread on a 2 MiB-L2 Xeon (SANet50 1.11-1.15x
# ResNet50 per masked forward in fp32, vs 1.35-1.38x unfused); the larger chunks make 8x fewer
# operations, and each operation of a 2-thread pool is a barrier that a shared, loaded machine
# can stall. A whole-batch chunk (one 51 MB temporary in layer1) was slower: 1.22x.
CHUNK_ELEMENTS = 1 << 20


def _cache_chunks(x: Tensor) -> Iterator[tuple[slice, slice]]:
    """(samples, rows) index pairs covering ``x`` (N, C, H, W) in pieces of about CHUNK_ELEMENTS.

    Small samples are grouped; a large one is split along H where that keeps the pieces
    contiguous (channels_last: each row of a sample is one contiguous W x C block).
    """
    n, c, h, w = x.shape
    per_sample = c * h * w
    if per_sample <= CHUNK_ELEMENTS or not x.is_contiguous(memory_format=torch.channels_last):
        step = max(1, CHUNK_ELEMENTS // per_sample)
        for start in range(0, n, step):
            yield slice(start, start + step), slice(None)
        return
    rows = max(1, CHUNK_ELEMENTS // (c * w))
    for sample in range(n):
        for start in range(0, h, rows):
            yield slice(sample, sample + 1), slice(start, start + rows)


def shuffled_order(channels: int) -> Tensor:
    """Canonical channel that lands at each position after ``channel_shuffle(., 2)``."""
    half = channels // 2
    i = torch.arange(channels)
    return torch.where(i % 2 == 0, i // 2, half + i // 2)


class SABottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with an SA layer on bn3's output, before the residual add."""

    def __init__(self, *args: Any, sa_groups: int = SA_GROUPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sa: nn.Module = ShuffleAttention(self.conv3.out_channels, sa_groups)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.sa(self.bn3(self.conv3(out)))
        # Out-of-place add (the official block adds in place): hooks that keep SA's output, such
        # as Grad-CAM's activation store, then see it unchanged. Numerically identical.
        return self.relu(out + identity)


class InferenceSABottleneck(nn.Module):
    """An SA bottleneck for no-grad inference (:func:`inference_copy`): BatchNorm fused into the
    convolutions, the shuffle folded into conv3, and SA, the residual add and the final ReLU
    applied in place on conv3's output (:meth:`FoldedShuffleAttention.gate_residual_relu_`).

    Same output as the :class:`SABottleneck` it was made from, up to float rounding.
    """

    def __init__(self, block: SABottleneck) -> None:
        super().__init__()
        if not isinstance(block.sa, FoldedShuffleAttention):
            raise TypeError("fold the channel shuffle first (fold_channel_shuffle)")
        if not all(isinstance(getattr(block, f"bn{i}"), nn.Identity) for i in (1, 2, 3)):
            raise TypeError("fuse BatchNorm into the convolutions first")
        self.conv1, self.conv2, self.conv3 = block.conv1, block.conv2, block.conv3
        self.sa: FoldedShuffleAttention = block.sa
        self.downsample = block.downsample
        self.stride = block.stride
        # Output channel i is the model's block-output channel stream_order[i] (see inference_copy).
        order = getattr(block, "stream_order", None)
        self.register_buffer("stream_order", torch.arange(self.sa.channels) if order is None else order,
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu_(self.conv2(torch.relu_(self.conv1(x))))
        return self.sa.gate_residual_relu_(self.conv3(out), identity)


class SAResNet(nn.Module):
    """ResNet (torchvision's layout and module names) built from :class:`SABottleneck` blocks.

    ``planes`` and ``sa_groups`` exist so that tests can build small networks with the same
    layer; the paper's models use the defaults.
    """

    def __init__(self, layers: Sequence[int], *, num_classes: int = 1000, sa_groups: int = SA_GROUPS,
                 planes: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if len(layers) != 4 or len(planes) != 4:
            raise ValueError("layers and planes need four stages each")
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(planes[0], layers[0], 1, sa_groups)
        self.layer2 = self._make_layer(planes[1], layers[1], 2, sa_groups)
        self.layer3 = self._make_layer(planes[2], layers[2], 2, sa_groups)
        self.layer4 = self._make_layer(planes[3], layers[3], 2, sa_groups)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * SABottleneck.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation; SA keeps the paper's 0/1.
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int, sa_groups: int) -> nn.Sequential:
        out_channels = planes * SABottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(tv_resnet.conv1x1(self.inplanes, out_channels, stride),
                                       nn.BatchNorm2d(out_channels))
        layers = [SABottleneck(self.inplanes, planes, stride, downsample, sa_groups=sa_groups)]
        self.inplanes = out_channels
        layers += [SABottleneck(self.inplanes, planes, sa_groups=sa_groups) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def sa_resnet50(*, num_classes: int = 1000) -> SAResNet:
    """SA-ResNet50 (the paper's SANet50): ResNet50 with an SA layer in each of its 16 bottlenecks."""
    return SAResNet([3, 4, 6, 3], num_classes=num_classes)


def sa_resnet101(*, num_classes: int = 1000) -> SAResNet:
    """SA-ResNet101: ResNet101 with an SA layer in each of its 33 bottlenecks."""
    return SAResNet([3, 4, 23, 3], num_classes=num_classes)


def resnet50(*, num_classes: int = 1000) -> tv_resnet.ResNet:
    """torchvision's ResNet50, untrained (weights are loaded by :mod:`sanet_viz.weights`)."""
    return tv_resnet.resnet50(weights=None, num_classes=num_classes)


def stem(model: nn.Module, x: Tensor) -> Tensor:
    """A ResNet's stem (conv1, bn1, ReLU, max-pool): torchvision's ``relu`` or timm's ``act1``."""
    act = getattr(model, "relu", None) or model.act1
    return model.maxpool(act(model.bn1(model.conv1(x))))


def head(model: nn.Module, features: Tensor) -> Tensor:
    """A ResNet's pooling and classifier on the last stage's features: timm's ``forward_head``
    (global pool, then fc), else torchvision's avgpool, flatten, fc."""
    if hasattr(model, "forward_head"):
        return model.forward_head(features)
    return model.fc(torch.flatten(model.avgpool(features), 1))


# ---------------------------------------------------------------------------------------------
# Paper names: SA_s_b = stage s (2..5 = layer1..layer4), block b (1-based).

_PAPER_RE = re.compile(r"^SA_([2-5])_([1-9]\d*)$")  # ResNets have stages 2..5; blocks count from 1
_MODULE_RE = re.compile(r"^layer([1-4])\.(\d+)(?:\.sa)?$")


def paper_name_to_module(name: str) -> str:
    """``"SA_5_3"`` -> ``"layer4.2"`` (the bottleneck; its SA layer is ``layer4.2.sa``)."""
    m = _PAPER_RE.match(name)
    if not m:
        raise ValueError(f"not a paper layer name: {name!r} (expected SA_<stage 2-5>_<block>, e.g. SA_5_3)")
    return f"layer{int(m.group(1)) - 1}.{int(m.group(2)) - 1}"


def module_to_paper_name(module_name: str) -> str:
    """``"layer4.2"`` or ``"layer4.2.sa"`` -> ``"SA_5_3"``."""
    m = _MODULE_RE.match(module_name)
    if not m:
        raise ValueError(f"not a bottleneck module name: {module_name!r}")
    return f"SA_{int(m.group(1)) + 1}_{int(m.group(2)) + 1}"


def paper_name_or_none(module_name: str) -> str | None:
    """The paper name of a bottleneck or its SA module, None for other modules (``layer4.2.bn3``)."""
    try:
        return module_to_paper_name(module_name)
    except ValueError:
        return None


def bottleneck_names(model: nn.Module) -> list[str]:
    """Names of the model's residual blocks in depth order (``layer1.0`` ... ``layer4.2``)."""
    return [name for name, _ in _iter_blocks(model)]


def tail_after(model: nn.Module, block: str, *, reference_order: bool = False) -> Callable[[Tensor], Tensor]:
    """The rest of a ResNet after bottleneck ``block``: its later blocks, pooling and the classifier.

    ``tail_after(m, "layer4.2")(m_output_of_layer4_2)`` equals ``m(x)``'s logits. It uses the
    model's own modules, read-only: call it under ``torch.no_grad()`` on a model no one trains.
    ``reference_order``: the features come from the model this one was copied from; an inference
    copy keeps its residual stream permuted (:attr:`InferenceSABottleneck.stream_order`), so they
    are put in the copy's order first.
    """
    names = bottleneck_names(model)
    if block not in names:
        raise ValueError(f"{block!r} is not a bottleneck of {type(model).__name__}")
    modules = dict(model.named_modules())
    rest = [modules[n] for n in names[names.index(block) + 1:]]
    order = getattr(modules[block], "stream_order", None) if reference_order else None

    def run(features: Tensor) -> Tensor:
        if order is not None:
            features = features[:, order.to(features.device)]
        for module in rest:
            features = module(features)
        return head(model, features)

    return run


def sa_module_names(model: nn.Module) -> dict[str, str]:
    """Paper name -> SA module name, in depth order; empty for a model without SA layers."""
    return {module_to_paper_name(name): f"{name}.sa" for name, block in _iter_blocks(model)
            if hasattr(block, "sa")}


def _iter_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if _MODULE_RE.match(name) and not name.endswith(".sa"):
            yield name, module


# ---------------------------------------------------------------------------------------------
# Inference-time folding of the channel shuffle into conv3/bn3 (issue: fast analysis).

@torch.no_grad()
def inference_copy(model: nn.Module, *, channels_last: bool = True, fuse_sa: bool = True) -> nn.Module:
    """A copy for no-grad forwards: shuffle folded (SA models), BatchNorm fused into the convs,
    SA bottlenecks as :class:`InferenceSABottleneck` (SA, residual add and ReLU fused, in place).

    Same logits and block outputs as ``model`` up to float rounding; the argument is untouched.
    Its module tree differs (BN layers become Identity, SA blocks change class): hook the
    original, not this copy. ``fuse_sa=False`` keeps the SA blocks as :class:`SABottleneck` with
    :class:`FoldedShuffleAttention` (the unfused schedule, for comparisons).
    """
    import copy

    fast = fold_channel_shuffle(model) if sa_module_names(model) else copy.deepcopy(model).eval()
    _fuse_batchnorms(fast)
    if fuse_sa and sa_module_names(fast):
        _group_sa_branches(fast)
    for parent in [m for m in fast.modules() if isinstance(m, nn.Sequential) and fuse_sa]:
        for index, block in enumerate(parent):
            if isinstance(block, SABottleneck) and isinstance(block.sa, FoldedShuffleAttention):
                parent[index] = InferenceSABottleneck(block)
    fast.requires_grad_(False)
    return fast.to(memory_format=torch.channels_last) if channels_last else fast


def _fuse_batchnorms(model: nn.Module) -> None:
    """Fold every BatchNorm that directly follows a convolution into it (in place, eval mode):
    Conv2d-BatchNorm2d neighbours in any Sequential (downsample paths, with or without timm's
    average pool in front; timm's deep stem), the stem's conv1/bn1 (after a deep stem's last
    conv) and each block's conv{1,2,3}/bn{1,2,3}."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    pairs = [(model, "conv1", "bn1")]
    pairs += [(block, f"conv{i}", f"bn{i}") for _, block in _iter_blocks(model) for i in (1, 2, 3)]
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
        holder, name = parent, conv_name
        if isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[-1], nn.Conv2d):
            holder, name, conv = conv, str(len(conv) - 1), conv[-1]  # a deep stem: its last conv
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(holder, name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())


@torch.no_grad()
def _group_sa_branches(model: nn.Module) -> None:
    """Reorder the residual stream of each SA stage so that its channel-branch channels come
    first (in place, on a folded copy with BatchNorm fused into the convolutions).

    A stage's blocks all add into one stream, and every block of a stage has the same SA branch
    pattern, so one permutation per stage serves: conv3's and the downsample's output channels
    are permuted, and so are the input channels of every convolution that reads the stream (the
    stage's conv1s and downsample, the next stage's first conv1 and downsample, the classifier).
    The logits are unchanged; the blocks' outputs are permuted (``stream_order`` of each
    :class:`InferenceSABottleneck` says how).
    """
    entering: Tensor | None = None  # the order of the stream entering the stage
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        layout = stage[0].sa.spatial_mask.clone()
        order = torch.argsort(layout.flatten().to(torch.uint8), stable=True)
        for index, block in enumerate(stage):
            if not torch.equal(block.sa.spatial_mask, layout):
                raise ValueError("the blocks of a stage have different SA layouts")
            reading = entering if index == 0 else order
            convs_in = [block.conv1] + ([block.downsample[0]] if block.downsample is not None else [])
            convs_out = [block.conv3] + ([block.downsample[0]] if block.downsample is not None else [])
            for conv in convs_in if reading is not None else []:
                conv.weight.copy_(conv.weight[:, reading])
            for conv in convs_out:
                conv.weight.copy_(conv.weight[order])
                conv.bias.copy_(conv.bias[order])
            block.sa.reorder_(order)
            block.register_buffer("stream_order", order.clone(), persistent=False)
        entering = order
    model.fc.weight.copy_(model.fc.weight[:, entering])


@torch.no_grad()
def fold_channel_shuffle(model: SAResNet) -> SAResNet:
    """A copy of ``model`` whose SA layers run as :class:`FoldedShuffleAttention`.

    conv3's output channels and bn3's parameters are permuted into the shuffled order, so the
    shuffle costs nothing. Outputs of every block, and the logits, are unchanged. The argument is
    not modified. The copy is for inference: its state dict is not the released layout.
    """
    import copy

    folded = copy.deepcopy(model).eval()
    for _, block in _iter_blocks(folded):
        sa = getattr(block, "sa", None)
        if not isinstance(sa, ShuffleAttention):
            continue
        order = shuffled_order(sa.channels).to(block.conv3.weight.device)
        block.conv3.weight.copy_(block.conv3.weight[order])
        if block.conv3.bias is not None:
            block.conv3.bias.copy_(block.conv3.bias[order])
        bn: nn.BatchNorm2d = block.bn3
        for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            tensor.copy_(tensor[order])
        block.sa = FoldedShuffleAttention(sa).to(block.conv3.weight.device)
    return folded


class MixedPrecisionResNet(nn.Module):
    """A ResNet-style model (torchvision's or timm's attribute names) run with its stem, layer1 and layer2
    from an fp32 model and layer3, layer4 from a bf16 copy of it; pooling and classifier in fp32.

    Why these stages: on calibrated weights (benchmarks/bench_mixed_precision.py) bf16 in the stem,
    layer1 or layer2 moved ResNet50's probe scores by 0.02-0.03 and broke its group ranking; in
    layer3 and layer4 by at most 0.006. The modules are shared with the two models, not copied: no
    weights are added. For no-grad inference; its module tree is not the original's.
    """

    def __init__(self, fp32: nn.Module, bf16: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.maxpool = fp32.conv1, fp32.bn1, fp32.maxpool
        self.relu = getattr(fp32, "relu", None) or fp32.act1  # torchvision's name, or timm's
        self.layer1, self.layer2 = fp32.layer1, fp32.layer2
        self.layer3, self.layer4 = bf16.layer3, bf16.layer4
        # torchvision: avgpool then flatten; timm: global_pool flattens itself.
        self.pool = getattr(fp32, "global_pool", None) or nn.Sequential(fp32.avgpool, nn.Flatten(1))
        self.fc = fp32.fc

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x)).to(torch.bfloat16)
        x = self.layer4(self.layer3(x)).float()
        return self.fc(self.pool(x))
