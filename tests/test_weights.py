"""Weights: the released and torchvision layouts, safetensors, strict keys, refused pickles,
resolution order, manifests, seeded untrained models. All checkpoints are generated here."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from sanet_viz import models, weights
from sanet_viz.weights import MODEL_SPECS, ModelSpec, WeightsDescription, WeightsError

TINY_ENV = "SANET_VIZ_TEST_TINY_WEIGHTS"


def tiny_builder(*, num_classes: int) -> models.SAResNet:
    return models.SAResNet([1, 1, 1, 1], num_classes=num_classes, sa_groups=4, planes=(8, 16, 32, 64))


TINY_SPEC = ModelSpec("tiny", "Tiny SA-ResNet", tiny_builder,
                      WeightsDescription(name="tiny", filenames=("tiny.pth.tar", "tiny.safetensors"),
                                         categories=[f"class {i}" for i in range(10)]), TINY_ENV)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No environment SPECs, an empty default weights folder and torch hub cache, no downloads."""
    for var in ("SANET_VIZ_RESNET50", "SANET_VIZ_SANET50", TINY_ENV):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "default-weights"
    empty.mkdir()
    monkeypatch.setenv("SANET_VIZ_WEIGHTS_DIR", str(empty))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("SANET_VIZ_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test tried to download {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return empty


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = TINY_SPEC.build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # SA parameters off their 0/1 init
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# Formats


def test_official_layout_loads_with_identical_tensors(official_checkpoint: Path,
                                                      sanet50_random: models.SAResNet) -> None:
    raw = torch.load(official_checkpoint, map_location="cpu", weights_only=True)
    assert {"epoch", "arch", "state_dict", "best_acc", "optimizer"} <= set(raw)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert isinstance(raw["best_acc"], torch.Tensor)

    model, info = weights.build_model(MODEL_SPECS["sanet50"], str(official_checkpoint))
    assert isinstance(model, models.SAResNet)
    assert_same_tensors(model, sanet50_random.state_dict())
    assert info.pretrained is True
    assert info.sha256 == sha256(official_checkpoint)
    assert Path(info.source) == official_checkpoint
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), sanet50_random(x))


def test_torchvision_state_dict_loads_from_weights_dir(torchvision_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copy(torchvision_checkpoint, folder / torchvision_checkpoint.name)
    model, info = weights.build_model(MODEL_SPECS["resnet50"], weights_dir=folder)
    assert info.pretrained and info.sha256 == sha256(torchvision_checkpoint)
    assert_same_tensors(model, torch.load(torchvision_checkpoint, weights_only=True))
    from torchvision.models import resnet50

    reference = resnet50(weights=None).eval()
    reference.load_state_dict(torch.load(torchvision_checkpoint, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_safetensors_loads(tmp_path: Path) -> None:
    state = tiny_state(3)
    path = tmp_path / "tiny-weights.safetensors"
    weights.save_safetensors(state, path)
    model, info = weights.build_model(TINY_SPEC, str(path))
    assert_same_tensors(model, state)
    assert info.pretrained and info.sha256 == sha256(path)
    # Recognised by its content too, whatever its name.
    renamed = tmp_path / "tiny.bin"
    shutil.copy(path, renamed)
    assert set(weights.read_state_dict(renamed)) == set(state)


def test_safetensors_conversion_of_official_layout(official_checkpoint: Path, tmp_path: Path,
                                                   sanet50_random: models.SAResNet) -> None:
    out = tmp_path / "sa_resnet50.safetensors"
    weights.save_safetensors(weights.read_state_dict(official_checkpoint), out)
    model, _ = weights.build_model(MODEL_SPECS["sanet50"], weights_dir=tmp_path)
    assert_same_tensors(model, sanet50_random.state_dict())


# ------------------------------------------------------------------------------------------
# Strict keys


def test_missing_and_unexpected_keys_name_file_and_keys(tmp_path: Path) -> None:
    state = tiny_state(0)
    del state["layer4.0.sa.cweight"]
    state["layer4.0.sa.extra_gate"] = torch.zeros(1)
    path = tmp_path / "broken-tiny.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=re.escape(path.name)) as err:
        weights.build_model(TINY_SPEC, str(path))
    message = str(err.value)
    assert "layer4.0.sa.cweight" in message and "layer4.0.sa.extra_gate" in message
    assert re.search(r"missing", message, re.I) and re.search(r"unexpected", message, re.I)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    state = tiny_state(0)
    state["fc.weight"] = torch.zeros(11, state["fc.weight"].shape[1])
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=re.escape(path.name)) as err:
        weights.build_model(TINY_SPEC, str(path))
    assert "fc.weight" in str(err.value)


def test_resnet_checkpoint_into_sanet_names_missing_sa_keys(torchvision_checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match=re.escape(torchvision_checkpoint.name)) as err:
        weights.build_model(MODEL_SPECS["sanet50"], str(torchvision_checkpoint))
    assert re.search(r"layer\d\.\d+\.sa\.", str(err.value))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match=re.escape(path.name)):
        weights.read_state_dict(path)


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match=re.escape(path.name)):
        weights.build_model(TINY_SPEC, str(path))


# ------------------------------------------------------------------------------------------
# Pickles that run code


class _RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_executing_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "code-ran"
    payload = {"state_dict": tiny_state(0), "payload": _RunsCode(marker)}
    path = tmp_path / "evil.pth.tar"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)

    with pytest.raises(WeightsError, match=re.escape(path.name)):
        weights.read_state_dict(path)
    with pytest.raises(WeightsError, match=re.escape(path.name)):
        weights.build_model(TINY_SPEC, str(path))
    assert not marker.exists(), "loading the checkpoint ran its code"

    # Control: the payload is live, so the checks above could have failed.
    with open(path, "rb") as f:
        if writer == "torch.save":
            torch.load(f, weights_only=False)
        else:
            pickle.load(f)
    assert marker.exists()


# ------------------------------------------------------------------------------------------
# Resolution order


def write_tiny(path: Path, seed: int) -> dict[str, torch.Tensor]:
    state = tiny_state(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = write_tiny(tmp_path / "a" / "explicit.pth", 1)
    from_env = write_tiny(tmp_path / "b" / "env.pth", 2)
    folder = tmp_path / "folder"
    in_folder = write_tiny(folder / "tiny.pth.tar", 3)
    monkeypatch.setenv(TINY_ENV, str(tmp_path / "b" / "env.pth"))

    # 1. the explicit SPEC beats the environment variable and the folder
    model, info = weights.build_model(TINY_SPEC, str(tmp_path / "a" / "explicit.pth"), weights_dir=folder)
    assert_same_tensors(model, explicit)
    assert info.pretrained and Path(info.source) == tmp_path / "a" / "explicit.pth"
    # 2. the environment variable beats the folder
    model, info = weights.build_model(TINY_SPEC, weights_dir=folder)
    assert_same_tensors(model, from_env)
    assert Path(info.source) == tmp_path / "b" / "env.pth"
    src = weights.resolve_source(TINY_SPEC, weights_dir=folder)
    assert src.kind == "path" and TINY_ENV in src.reason
    # 3. the folder
    monkeypatch.delenv(TINY_ENV)
    model, info = weights.build_model(TINY_SPEC, weights_dir=folder)
    assert_same_tensors(model, in_folder)
    assert Path(info.source) == folder / "tiny.pth.tar"
    # ... and SANET_VIZ_WEIGHTS_DIR is the default folder
    monkeypatch.setenv("SANET_VIZ_WEIGHTS_DIR", str(folder))
    assert weights.resolve_source(TINY_SPEC).location == str(folder / "tiny.pth.tar")
    # 4. nothing: untrained, with a reason that says where weights would go
    empty = tmp_path / "empty"
    empty.mkdir()
    src = weights.resolve_source(TINY_SPEC, weights_dir=empty)
    assert src.kind == "untrained" and str(empty) in src.reason and TINY_ENV in src.reason
    model, info = weights.build_model(TINY_SPEC, weights_dir=empty)
    assert info.pretrained is False and info.sha256 is None and info.note == src.reason
    # An explicit "untrained" wins over everything.
    monkeypatch.setenv(TINY_ENV, str(tmp_path / "b" / "env.pth"))
    assert weights.resolve_source(TINY_SPEC, "untrained", weights_dir=folder).kind == "untrained"


def test_folder_filenames_in_preference_order(tmp_path: Path) -> None:
    write_tiny(tmp_path / "tiny.safetensors", 0)  # wrong format for its name: never read here
    write_tiny(tmp_path / "tiny.pth.tar", 1)
    assert weights.resolve_source(TINY_SPEC, weights_dir=tmp_path).location == str(tmp_path / "tiny.pth.tar")


def test_spec_kinds() -> None:
    spec = MODEL_SPECS["sanet50"]
    assert weights.resolve_source(spec, "hf://owner/repo/sa_resnet50.safetensors").kind == "hf"
    assert weights.resolve_source(spec, "https://example.org/sa.pth").kind == "url"
    assert weights.resolve_source(spec, "http://example.org/sa.pth").kind == "url"
    assert weights.resolve_source(spec, "/some/where/sa.pth").kind == "path"
    for word in ("untrained", "none", "random", "UNTRAINED"):
        assert weights.resolve_source(spec, word).kind == "untrained"


def test_offline_means_no_torchvision_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               isolated: Path) -> None:
    resnet = MODEL_SPECS["resnet50"]
    src = weights.resolve_source(resnet)
    assert src.kind == "untrained" and src.reason
    model, info = weights.build_model(resnet)  # download_url_to_file would raise
    assert info.pretrained is False and info.note
    # Online, ResNet50 (only) would come from torchvision's IMAGENET1K_V1 file.
    monkeypatch.delenv("SANET_VIZ_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    src = weights.resolve_source(resnet)
    assert src.kind == "torchvision" and src.location.endswith("resnet50-0676ba61.pth")
    assert weights.resolve_source(MODEL_SPECS["sanet50"]).kind == "untrained"  # BaiduDrive only


def test_torchvision_cache_is_used_offline(tmp_path: Path, torchvision_checkpoint: Path) -> None:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    assert str(tmp_path) in str(cache)  # the autouse fixture's TORCH_HOME
    cache.mkdir(parents=True)
    shutil.copy(torchvision_checkpoint, cache / "resnet50-0676ba61.pth")
    src = weights.resolve_source(MODEL_SPECS["resnet50"])
    assert src.kind == "path" and Path(src.location) == cache / "resnet50-0676ba61.pth"


@pytest.mark.parametrize("spec", ["hf://owner/repo/sa_resnet50.safetensors", "https://example.org/sa.pth"])
def test_remote_specs_offline_are_refused_without_network(spec: str) -> None:
    with pytest.raises(WeightsError, match=re.escape(spec)):
        weights.build_model(MODEL_SPECS["sanet50"], spec)


def test_require_pretrained(isolated: Path) -> None:
    for key in ("resnet50", "sanet50"):
        with pytest.raises(WeightsError, match=r"(?i)pretrained"):
            weights.build_model(MODEL_SPECS[key], require_pretrained=True)
    with pytest.raises(WeightsError):
        weights.build_model(TINY_SPEC, "untrained", require_pretrained=True)


# ------------------------------------------------------------------------------------------
# Manifest


def test_manifest_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    state = write_tiny(tmp_path / "tiny.pth.tar", 5)
    digest = sha256(tmp_path / "tiny.pth.tar")
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    (tmp_path / "manifest.json").write_text(json.dumps({"tiny.pth.tar": wrong}))
    with pytest.raises(WeightsError, match=re.escape("tiny.pth.tar")) as err:
        weights.build_model(TINY_SPEC, weights_dir=tmp_path)
    assert digest in str(err.value)
    (tmp_path / "manifest.json").write_text(json.dumps({"tiny.pth.tar": digest.upper()}))
    model, info = weights.build_model(TINY_SPEC, weights_dir=tmp_path)
    assert info.sha256 == digest
    assert_same_tensors(model, state)
    # Files not listed are loaded as they are.
    (tmp_path / "manifest.json").write_text(json.dumps({"other.pth": wrong}))
    weights.build_model(TINY_SPEC, weights_dir=tmp_path)


def test_unreadable_manifest_is_an_error(tmp_path: Path) -> None:
    write_tiny(tmp_path / "tiny.pth.tar", 5)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(WeightsError, match="manifest"):
        weights.build_model(TINY_SPEC, weights_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# Untrained models


def test_untrained_models_are_seeded_and_leave_global_rng_alone() -> None:
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    a, info_a = weights.build_model(TINY_SPEC, "untrained")
    b, _ = weights.build_model(TINY_SPEC, "untrained")
    c, _ = weights.build_model(TINY_SPEC, "untrained", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert_same_tensors(b, a.state_dict())
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert info_a.pretrained is False and info_a.sha256 is None and "seed 0" in info_a.source
    assert info_a.to_dict() == {"source": info_a.source, "pretrained": False, "sha256": None}


def test_untrained_sanet50_keeps_paper_init(isolated: Path) -> None:
    model, info = weights.build_model(MODEL_SPECS["sanet50"])
    assert info.pretrained is False and info.note
    sa = model.get_submodule("layer4.2.sa")
    assert torch.all(sa.cweight == 0) and torch.all(sa.cbias == 1)


# ------------------------------------------------------------------------------------------
# hf:// SPECs


def test_parse_hf_spec() -> None:
    assert weights.parse_hf_spec("hf://owner/repo/dir/file.safetensors@v1") == (
        "owner/repo", "dir/file.safetensors", "v1")
    assert weights.parse_hf_spec("hf://owner/repo/sa_resnet50.pth.tar") == ("owner/repo", "sa_resnet50.pth.tar", None)
    for bad in ("hf://owner/repo", "hf://owner//file.pth", "hf://", "hf://owner/repo/"):
        with pytest.raises(WeightsError, match=re.escape(bad)):
            weights.parse_hf_spec(bad)


def test_failed_torchvision_download_falls_back_to_untrained(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """No weights and no internet: the app must still start, untrained, saying why."""
    from sanet_viz import weights

    monkeypatch.delenv("SANET_VIZ_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SANET_VIZ_RESNET50", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def unreachable(url: str, dst: str, progress: bool = True) -> None:
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    model, info = weights.build_model(weights.MODEL_SPECS["resnet50"], weights_dir=tmp_path)
    assert calls == [weights.MODEL_SPECS["resnet50"].weights.url]
    assert info.pretrained is False
    assert "download failed" in info.note and "network is unreachable" in info.note
    with pytest.raises(weights.WeightsError, match="download failed"):
        weights.build_model(weights.MODEL_SPECS["resnet50"], weights_dir=tmp_path, require_pretrained=True)
    # An explicit URL that fails is the user's request: an error, not a silent fallback.
    with pytest.raises(weights.WeightsError, match="download failed"):
        weights.build_model(weights.MODEL_SPECS["resnet50"], "https://example.invalid/r.pth", weights_dir=tmp_path)
