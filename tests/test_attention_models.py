"""The paper's attention baselines in the lab (issue 20): timm's SE-ResNet50 and ECA-ResNet50d as
registry entries, their gate adapters against a plain reading of each module's forward, their
inference copies, their weights (a local file in timm's layout, Hugging Face's cache, untrained
and said so), and an analysis of any two models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import EXAMPLES, randomize_sa, tiny_sa_resnet
from PIL import Image
from torch import Tensor, nn

from sanet_viz import attention, models, weights
from sanet_viz.analysis import AnalysisOptions, analyze
from sanet_viz.hooks import GateRecorder, SAGateRecorder
from sanet_viz.lab import Lab, LoadedModel, load_model
from sanet_viz.preprocessing import prepare, prepare_for
from sanet_viz.weights import IMAGENET_EVAL, MODEL_SPECS, TIMM_BICUBIC_EVAL, WeightsInfo, parse_model_keys

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # the adapters do not care about the input size; small inputs keep full-size models quick


def lively(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that gates and fused copies are tested on real spreads."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def timm_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"seresnet50": lively(attention.seresnet50()), "ecaresnet50d": lively(attention.ecaresnet50d(), 1)}


def _inputs_of(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    """The input of each named module in one forward: what the module's own forward reads."""
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach().clone()))
               for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _recorded_gates(model: nn.Module, kind: str) -> tuple[dict[str, str], list[str], dict[str, Tensor], dict]:
    """One forward of a random batch under ``kind``'s recorder: the gate modules by depth, their
    attention modules' names, those modules' inputs, and the recorded gates by depth."""
    modules = attention.LAYOUTS[kind].modules(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    names = [name.removesuffix(".gate") for name in modules.values()]
    inputs = _inputs_of(model, names, x)
    with GateRecorder(model, attention.LAYOUTS[kind], modules) as rec, torch.no_grad():
        model(x)
    return modules, names, inputs, rec.values


def test_the_registry_has_each_model_with_its_source_preprocessing_and_gates() -> None:
    assert list(MODEL_SPECS)[:2] == ["resnet50", "sanet50"] and weights.DEFAULT_MODELS == ("resnet50", "sanet50")
    expected = {"resnet50": None, "sanet50": "SA", "seresnet50": "SE", "ecaresnet50d": "ECA"}
    assert {k: s.attention for k, s in MODEL_SPECS.items()} == expected
    for key in ("seresnet50", "ecaresnet50d"):
        spec = MODEL_SPECS[key]
        assert spec.weights.url == f"hf://timm/{spec.weights.name.split()[-1]}/model.safetensors"
        assert spec.weights.transforms == TIMM_BICUBIC_EVAL and TIMM_BICUBIC_EVAL.same_geometry(IMAGENET_EVAL)
        assert {"acc@1", "paper", "paper_acc@1"} <= set(spec.weights.meta)
    assert parse_model_keys("sanet50, seresnet50") == ("sanet50", "seresnet50")
    with pytest.raises(ValueError, match=r"unknown model 'senet': choose from resnet50, sanet50, seresnet50"):
        parse_model_keys("sanet50,senet")
    with pytest.raises(ValueError, match="named twice"):
        parse_model_keys("sanet50,sanet50")
    with pytest.raises(ValueError, match="exactly 2 models"):
        parse_model_keys("sanet50", exactly=2)


def test_layouts_are_found_from_the_modules(timm_models: dict[str, nn.Module]) -> None:
    assert attention.layout_of(models.resnet50()) is None
    assert attention.layout_of(tiny_sa_resnet()).kind == "SA"
    for key, kind in (("seresnet50", "SE"), ("ecaresnet50d", "ECA")):
        layout = attention.layout_of(timm_models[key])
        assert layout is not None and layout.kind == kind and layout.unit == "channel"
        modules = layout.modules(timm_models[key])
        depths = list(modules)
        assert (depths[0], depths[-1], len(depths)) == (f"{kind}_2_1", f"{kind}_5_3", 16)
        assert modules[f"{kind}_5_3"] == "layer4.2.se.gate"


def test_se_gates_equal_a_plain_reading_of_its_forward(timm_models: dict[str, nn.Module]) -> None:
    model = timm_models["seresnet50"]
    modules, se_names, inputs, values = _recorded_gates(model, "SE")
    for (depth, name), se_name in zip(modules.items(), se_names, strict=True):
        se = model.get_submodule(se_name)
        squeezed = inputs[se_name].mean((2, 3), keepdim=True)  # (N, C, 1, 1): squeeze
        hidden = F.relu(F.conv2d(squeezed, se.fc1.weight, se.fc1.bias))  # excitation: two 1x1 convolutions
        plain = torch.sigmoid(F.conv2d(hidden, se.fc2.weight, se.fc2.bias)).flatten(1)
        got = values[depth]["channel"]
        assert got.shape == plain.shape == (2, se.fc2.out_channels), depth
        torch.testing.assert_close(got, plain, atol=1e-6, rtol=0)
        assert float(got.std()) > 1e-3  # real spread, not a constant
    assert not any(m._forward_hooks for m in model.modules())  # the recorder took its hooks away


def test_eca_gates_equal_a_plain_reading_of_its_forward(timm_models: dict[str, nn.Module]) -> None:
    model = timm_models["ecaresnet50d"]
    modules, eca_names, inputs, values = _recorded_gates(model, "ECA")
    kernels = set()
    for (depth, _), eca_name in zip(modules.items(), eca_names, strict=True):
        conv = model.get_submodule(eca_name).conv
        kernels.add(conv.kernel_size[0])
        squeezed = inputs[eca_name].mean((2, 3))[:, None, :]  # (N, 1, C): channels as a sequence
        plain = torch.sigmoid(F.conv1d(squeezed, conv.weight, padding=conv.padding[0]))[:, 0, :]
        torch.testing.assert_close(values[depth]["channel"], plain, atol=1e-6, rtol=0)
    assert len(kernels) > 1  # ECA's kernel size follows the channel count: more than one size is read
    assert not any(m._forward_hooks for m in model.modules())


def test_the_generic_recorder_reads_sa_as_the_sa_recorder_does(tiny_sanet: models.SAResNet) -> None:
    modules = models.sa_module_names(tiny_sanet)
    x = torch.randn(2, 3, SIZE, SIZE)
    with SAGateRecorder(tiny_sanet, modules) as old, torch.no_grad():
        tiny_sanet(x)
    layout = attention.layout_of(tiny_sanet)
    assert layout.modules(tiny_sanet) == modules
    with GateRecorder(tiny_sanet, layout, modules, keep_maps=["SA_5_1"]) as new, torch.no_grad():
        tiny_sanet(x)
    for depth in modules:
        torch.testing.assert_close(new.values[depth]["channel"], old.channel[depth])
        torch.testing.assert_close(new.values[depth]["spatial"], old.spatial[depth])
    assert new.spatial_maps["SA_5_1"].shape[:2] == (2, 4)


@pytest.mark.parametrize("key", ["seresnet50", "ecaresnet50d"])
def test_inference_copy_mixed_precision_and_tail_work_on_timm_resnets(key: str,
                                                                      timm_models: dict[str, nn.Module]) -> None:
    model = timm_models[key]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model(x)
        fast = models.inference_copy(model, channels_last=True)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # deep stem, avg-down paths too
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), reference,
                                   atol=1e-3 * float(reference.abs().max()), rtol=0)
        mixed = models.MixedPrecisionResNet(fast, copy.deepcopy(fast).to(torch.bfloat16))
        assert (mixed(x) - reference).abs().max() < 0.05 * float(reference.abs().max())
        features = _inputs_of(model, ["layer4.0"], x)["layer4.0"]
        torch.testing.assert_close(models.tail_after(model, "layer3.5")(features), reference)


def _timm_state(key: str) -> dict[str, Tensor]:
    torch.manual_seed(3)
    return {k: v.clone() for k, v in MODEL_SPECS[key].build().state_dict().items()}


def test_timm_weights_load_from_the_weights_folder_and_from_hugging_faces_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    state = _timm_state("seresnet50")
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(state, str(folder / "seresnet50.ra2_in1k.safetensors"))
    model, info = weights.build_model(MODEL_SPECS["seresnet50"], weights_dir=folder)
    assert info.pretrained and info.source.endswith("seresnet50.ra2_in1k.safetensors")
    assert torch.equal(model.state_dict()["layer4.2.se.fc2.weight"], state["layer4.2.se.fc2.weight"])
    # The default download's file in Hugging Face's cache (as hf_hub_download leaves it) is found offline.
    cache = tmp_path / "hf"
    snapshot = cache / "models--timm--seresnet50.ra2_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (cache / "models--timm--seresnet50.ra2_in1k" / "refs").mkdir()
    (cache / "models--timm--seresnet50.ra2_in1k" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    source = weights.resolve_source(MODEL_SPECS["seresnet50"], weights_dir=tmp_path / "empty")
    assert source.kind == "path" and source.reason == "Hugging Face's download cache"
    _, cached = weights.build_model(MODEL_SPECS["seresnet50"], weights_dir=tmp_path / "empty")
    assert cached.pretrained and cached.sha256 == info.sha256


def test_without_weights_a_timm_model_runs_untrained_and_says_why(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "no-cache"))
    lm = load_model("ecaresnet50d", weights_dir=tmp_path, device=torch.device("cpu"))
    assert not lm.weights.pretrained and lm.weights.source == "untrained (seed 0)"
    assert "ecaresnet50d.miil_in1k.safetensors" in lm.weights.note and "downloads are off" in lm.weights.note
    assert "--ecaresnet50d SPEC" in lm.weights.note and "$SANET_VIZ_ECARESNET50D" in lm.weights.note
    with pytest.raises(weights.WeightsError, match=r"ECA-ResNet50d: .*--require-pretrained"):
        load_model("ecaresnet50d", weights_dir=tmp_path, device=torch.device("cpu"), require_pretrained=True)
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file(_timm_state("seresnet50"), str(wrong))  # SE keys for an ECA model: named, refused
    with pytest.raises(weights.WeightsError, match=r"wrong.safetensors: does not fit ResNet: .*unexpected keys"):
        load_model("ecaresnet50d", str(wrong), device=torch.device("cpu"))


def test_models_with_other_interpolation_get_their_own_tensor_of_the_same_crop() -> None:
    picture = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")
    both = prepare_for(picture, [IMAGENET_EVAL, TIMM_BICUBIC_EVAL])
    bilinear, bicubic = both.tensor_for(IMAGENET_EVAL), both.tensor_for(TIMM_BICUBIC_EVAL)
    assert torch.equal(bilinear, prepare(picture).tensor)  # nothing changes for the default models
    assert bicubic.shape == bilinear.shape and not torch.equal(bicubic, bilinear)
    assert float((bicubic - bilinear).abs().mean()) < 0.1  # the same crop, resampled another way
    odd = weights.EvalTransform(resize_size=288, crop_size=256)
    with pytest.raises(ValueError, match="different crops"):
        prepare_for(picture, [IMAGENET_EVAL, odd])


def _tiny_se_lab() -> Lab:
    """A tiny SA-ResNet beside a small timm SE-ResNet (bicubic preprocessing, as the real entry)."""
    import timm

    torch.manual_seed(0)
    se = lively(timm.create_model("seresnet18", pretrained=False, num_classes=10))
    info = WeightsInfo("untrained (test)", False, note="test models")
    sa = randomize_sa(tiny_sa_resnet(), 1)
    return Lab({"sanet50": LoadedModel("sanet50", "Tiny SANet", sa, info, probe_layer="layer4.0", probe_groups=64),
                "seresnet50": LoadedModel("seresnet50", "Tiny SE", se, info, probe_layer="layer4.1", probe_groups=64,
                                          transform=TIMM_BICUBIC_EVAL)})


def test_any_two_models_analyse_side_by_side_with_their_gates(tmp_path: Path) -> None:
    from sanet_viz.export import write_result

    lab = _tiny_se_lab()
    image = lab.prepare(EXAMPLES / "chelsea.jpg")
    result = analyze(lab, image, AnalysisOptions(precision="fp32", num_classes=10), name="chelsea.jpg")
    data = write_result(result, tmp_path)
    se, sa = data["models"]["seresnet50"], data["models"]["sanet50"]
    assert se["gates"]["kind"] == "SE" and se["gates"]["unit"] == "channel" and "sa_gates" not in se
    assert list(se["gates"]["depths"]) == ["SE_2_1", "SE_2_2", "SE_3_1", "SE_3_2", "SE_4_1", "SE_4_2",
                                           "SE_5_1", "SE_5_2"]
    assert [len(v["channel"]) for v in se["gates"]["depths"].values()] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert sa["gates"]["kind"] == "SA" and sa["gates"]["depths"]["SA_5_1"]["channel"] == sa["sa_gates"]["SA_5_1"][
        "channel"]
    assert len(se["top5"]) == 5 and np.load(tmp_path / se["cam"]["file"]).shape == (224, 224)
    assert json.loads((tmp_path / "result.json").read_text())["models"]["seresnet50"]["gates"]["kind"] == "SE"
    # Pictures: SA's heatmaps as always, SE's per-channel spreads, both on one axis of depth.
    for picture in ("gates", "gates_seresnet50", "gates_across_depth"):
        assert data["files"][picture] == f"{picture}.png"
    assert all((tmp_path / name).stat().st_size > 10_000 for name in data["files"].values())
    assert not any(m._forward_hooks for lm in lab.models.values() for m in lm.model.modules())


def test_a_figure_compares_any_two_models_second_minus_first() -> None:
    import re

    from sanet_viz import figures

    lab = _tiny_se_lab()
    image = lab.prepare(EXAMPLES / "coffee.jpg")
    columns = figures.parse_columns("input,sanet50,seresnet50,difference")
    assert figures.models_for(columns, ("sanet50", "seresnet50")) == ("sanet50", "seresnet50")
    result = figures.explain_for_figure(lab, image, AnalysisOptions(num_classes=10), name="cup", columns=columns)
    svg = figures.svg_bytes(figures.comparison_figure([result], columns=columns)).decode()
    words = " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", svg))
    assert "Tiny SE − Tiny SANet" in words and "red: Tiny SE higher" in words
    fig = figures.comparison_figure([result], columns=("difference",))
    (ax,) = [a for a in fig.axes if a.images]
    expected = figures._diff_overlay(result.display, result.models["seresnet50"].cam - result.models["sanet50"].cam,
                                     opacity=0.5)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)
    with pytest.raises(ValueError, match="the difference column compares sanet50 and seresnet50; the columns also "
                                         "name ecaresnet50d"):
        figures.models_for(("ecaresnet50d", "difference"), ("sanet50", "seresnet50"))
    assert len([a for a in figures.result_figure(result).axes if a.images]) == 3  # input and both maps


def test_the_fused_sa_tail_is_the_cpus_choice_only() -> None:
    from sanet_viz.lab import fuse_sa_tail

    assert fuse_sa_tail(torch.device("cpu")) and not fuse_sa_tail(torch.device("cuda"))
    lm = LoadedModel("sanet50", "Tiny", tiny_sa_resnet(), WeightsInfo("untrained (test)", False),
                     probe_layer="layer4.0", probe_groups=4)
    assert any(isinstance(m, models.InferenceSABottleneck) for m in lm.fast_model.modules())


@pytest.mark.gpu
def test_any_pair_on_cuda_equals_cpu() -> None:
    cpu = _tiny_se_lab()
    gpu = Lab({key: LoadedModel(key, lm.display_name, copy.deepcopy(lm.model).cpu(), lm.weights,
                                torch.device("cuda"), probe_layer=lm.probe_layer, probe_groups=lm.probe_groups,
                                transform=lm.transform) for key, lm in cpu.models.items()})
    image = cpu.prepare(EXAMPLES / "chelsea.jpg")
    options = AnalysisOptions(precision="fp32", num_classes=10, probe_batch_size=8)
    a, b = analyze(cpu, image, options), analyze(gpu, image, options)
    for key in cpu.models:
        ma, mb = a.models[key], b.models[key]
        np.testing.assert_allclose(ma.logits, mb.logits, atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(ma.cam, mb.cam, atol=2e-3)
        np.testing.assert_allclose(ma.probe.scores.numpy(), mb.probe.scores.numpy(), atol=1e-3)
        for depth, values in ma.gates.values.items():  # cuDNN's TF32 convolutions: ~1e-4 apart on an H200
            np.testing.assert_allclose(values["channel"], mb.gates.values[depth]["channel"], atol=1e-3)
