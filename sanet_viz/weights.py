"""Where each model's weights come from, and loading them safely.

A weights SPEC is a local path, an http(s) URL, ``hf://owner/repo/path/in/repo[@revision]``, or
``untrained``. Resolution order for a model: the explicit SPEC (flag or environment variable),
then known files in the weights folder, then (ResNet50 only) torchvision's IMAGENET1K_V1 download,
then untrained weights. Everything is read with ``weights_only=True`` or as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import urllib.parse
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights

from . import attention, models

__all__ = [
    "EvalTransform",
    "IMAGENET_EVAL",
    "WeightsDescription",
    "WeightsInfo",
    "WeightsError",
    "ModelSpec",
    "MODEL_SPECS",
    "DEFAULT_MODELS",
    "parse_model_keys",
    "TIMM_BICUBIC_EVAL",
    "IMAGENET_CATEGORIES",
    "resolve_source",
    "read_state_dict",
    "load_state_dict_strict",
    "build_model",
    "sha256_of",
    "default_weights_dir",
    "offline",
    "untrained_warning",
]

IMAGENET_CATEGORIES: list[str] = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """A weights file or SPEC that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class EvalTransform:
    """The evaluation preprocessing a checkpoint was measured with (read by preprocessing.prepare):
    Resize(resize_size, interpolation) -> CenterCrop(crop_size) -> ToTensor -> Normalize(mean, std)."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # or "bicubic" (timm's weights)

    def same_geometry(self, other: EvalTransform) -> bool:
        """Whether both crop the same pixels of a picture, so that maps of one image line up."""
        return (self.resize_size, self.crop_size) == (other.resize_size, other.crop_size)


# Both papers' checkpoints: torchvision's ResNet50 IMAGENET1K_V1 and the released SA-Net models.
IMAGENET_EVAL = EvalTransform()
# timm's SE-ResNet50 and ECA-ResNet50d weights at 224 px: crop_pct 0.875 (the same 256 -> 224
# crop as above), bicubic resizing (their pretrained_cfg).
TIMM_BICUBIC_EVAL = EvalTransform(interpolation="bicubic")


@dataclass(frozen=True)
class WeightsDescription:
    """What a set of published weights is: where it lives, what it predicts, how it was evaluated.

    As torchvision's ``Weights``: the builder takes its class count from ``categories``, results
    name classes from it, and images are prepared with ``transforms``.
    """

    name: str
    filenames: tuple[str, ...]  # names recognised in the weights folder, preferred first
    # The default download, where one exists: an http(s) URL (torchvision's cache) or an hf://
    # SPEC (Hugging Face's cache); used unless downloads are off.
    url: str | None = None
    sha256: str | None = None  # of the published file, where known
    categories: list[str] = field(default_factory=lambda: IMAGENET_CATEGORIES)
    meta: Mapping[str, Any] = field(default_factory=dict)
    transforms: EvalTransform = IMAGENET_EVAL


RESNET50_IMAGENET1K_V1 = WeightsDescription(
    name="ResNet50_Weights.IMAGENET1K_V1",
    filenames=("resnet50-0676ba61.pth", "resnet50.safetensors", "resnet50.pth"),
    url=ResNet50_Weights.IMAGENET1K_V1.url,
    meta={"acc@1": 76.13, "acc@5": 92.86, "source": "torchvision (the paper's baseline recipe)",
          "paper": "He et al., CVPR 2016 (torchvision's re-training, IMAGENET1K_V1)", "paper_acc@1": 76.13},
)

SANET50_IMAGENET1K = WeightsDescription(
    name="SANet50 (released SA-Net checkpoint)",
    filenames=("sa_resnet50.pth.tar", "sa_resnet50.safetensors", "sanet50.safetensors", "sa_resnet50.pth"),
    url=None,  # published on BaiduDrive only (share code 474p): users place it in weights/
    meta={"acc@1": 77.88, "acc@5": 93.89, "source": "github.com/wofmanaf/SA-Net (BaiduDrive, code 474p)",
          "paper": "Zhang and Yang, ICASSP 2021 (the released checkpoint)", "paper_acc@1": 77.88},
)

# timm's weights, trained with newer recipes than the papers': their top-1 is not comparable with
# SANet50's 77.88 (as torchvision's ResNet50 V2 would not be). Numbers: timm's results table at 224 px.
SERESNET50_TIMM = WeightsDescription(
    name="timm seresnet50.ra2_in1k",
    filenames=("seresnet50.ra2_in1k.safetensors", "seresnet50.safetensors", "seresnet50.pth"),
    url="hf://timm/seresnet50.ra2_in1k/model.safetensors",
    meta={"acc@1": 80.26, "acc@5": 95.07, "source": "timm (Hugging Face timm/seresnet50.ra2_in1k, RandAugment recipe)",
          "paper": "Hu et al., CVPR 2018, Table 2 (SE-ResNet-50, single 224 crop)", "paper_acc@1": 76.71},
    transforms=TIMM_BICUBIC_EVAL,
)

ECARESNET50D_TIMM = WeightsDescription(
    name="timm ecaresnet50d.miil_in1k",
    filenames=("ecaresnet50d.miil_in1k.safetensors", "ecaresnet50d.safetensors", "ecaresnet50d.pth"),
    url="hf://timm/ecaresnet50d.miil_in1k/model.safetensors",
    meta={"acc@1": 80.63, "acc@5": 95.31, "source": "timm (Hugging Face timm/ecaresnet50d.miil_in1k, DAMO-MIIL recipe)",
          "paper": "Wang et al., CVPR 2020, Table 2 (ECA-Net50: plain stem; timm's 'd' variant has a deep "
                   "stem and average-pool downsampling)", "paper_acc@1": 77.48},
    transforms=TIMM_BICUBIC_EVAL,
)


@dataclass(frozen=True)
class ModelSpec:
    """One model the lab serves: the single source of its configuration."""

    key: str  # "resnet50" / "sanet50" / ...: JSON keys and CLI flags
    display_name: str  # what a person reads
    builder: Callable[..., nn.Module]  # keyword-only ``num_classes``
    weights: WeightsDescription
    env_var: str
    attention: str | None = None  # "SA", "SE", "ECA": its attention module (attention.LAYOUTS); None: plain

    @property
    def num_classes(self) -> int:
        return len(self.weights.categories)

    def build(self) -> nn.Module:
        """The untrained architecture, with as many outputs as the weights have categories."""
        return self.builder(num_classes=self.num_classes)


# The registry: adding a model is one entry here (and, for a new kind of attention module, one
# layout in attention.py). The first two are the default comparison everywhere.
MODEL_SPECS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec("resnet50", "ResNet50", models.resnet50, RESNET50_IMAGENET1K_V1,
                          "SANET_VIZ_RESNET50"),
    "sanet50": ModelSpec("sanet50", "SANet50", models.sa_resnet50, SANET50_IMAGENET1K,
                         "SANET_VIZ_SANET50", attention="SA"),
    "seresnet50": ModelSpec("seresnet50", "SE-ResNet50", attention.seresnet50, SERESNET50_TIMM,
                            "SANET_VIZ_SERESNET50", attention="SE"),
    "ecaresnet50d": ModelSpec("ecaresnet50d", "ECA-ResNet50d", attention.ecaresnet50d, ECARESNET50D_TIMM,
                              "SANET_VIZ_ECARESNET50D", attention="ECA"),
}
DEFAULT_MODELS: tuple[str, str] = ("resnet50", "sanet50")


def parse_model_keys(text: str | Sequence[str], *, exactly: int | None = None) -> tuple[str, ...]:
    """``"sanet50,seresnet50"`` -> registered keys, checked, in the order given (no repeats)."""
    keys = tuple(k.strip() for k in (text.split(",") if isinstance(text, str) else text) if k.strip())
    unknown = [k for k in keys if k not in MODEL_SPECS]
    if unknown or not keys:
        raise ValueError(f"unknown model {', '.join(map(repr, unknown)) or '(none given)'}: choose from "
                         + ", ".join(MODEL_SPECS))
    if len(set(keys)) != len(keys):
        raise ValueError(f"a model is named twice in {','.join(keys)}")
    if exactly is not None and len(keys) != exactly:
        raise ValueError(f"name exactly {exactly} models (got {','.join(keys)})")
    return keys


@dataclass(frozen=True)
class WeightsInfo:
    """Where a loaded model's weights came from; every result carries it."""

    source: str  # a path, URL, hf:// SPEC, or "untrained (seed 0)"
    pretrained: bool
    sha256: str | None = None
    note: str = ""  # why a model is untrained, for banners and warnings

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "pretrained": self.pretrained, "sha256": self.sha256}


@dataclass(frozen=True)
class WeightsSource:
    """A resolved SPEC: ``kind`` is path, url, hf, torchvision or untrained."""

    kind: str
    location: str
    reason: str = ""  # how it was chosen, or why no weights were found
    default: bool = False  # the spec's own download: failing it falls back to untrained weights


UNTRAINED_SPECS = {"untrained", "none", "random"}


def untrained_warning(names: Sequence[str], *, subject: str = "results") -> str:
    """The one wording, everywhere, of "these results do not come from the published weights"."""
    who = " and ".join(names)
    return (f"{subject} come from UNTRAINED {who} (random weights): not those of the published "
            f"model{'s' if len(names) > 1 else ''}; see README, 'Weights'")


def offline() -> bool:
    """True when nothing may be downloaded (SANET_VIZ_OFFLINE=1, HF_HUB_OFFLINE=1; set by tests)."""
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes"}
               for v in ("SANET_VIZ_OFFLINE", "HF_HUB_OFFLINE"))


def default_weights_dir() -> Path:
    return Path(os.environ.get("SANET_VIZ_WEIGHTS_DIR", Path(__file__).resolve().parent.parent / "weights"))


def _torchvision_cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def resolve_source(spec: ModelSpec, explicit: str | None = None, *,
                   weights_dir: Path | None = None) -> WeightsSource:
    """Decide where ``spec``'s weights come from, without reading or downloading anything."""
    chosen = explicit or os.environ.get(spec.env_var) or None
    if chosen:
        how = "given explicitly" if explicit else f"from ${spec.env_var}"
        if chosen.strip().lower() in UNTRAINED_SPECS:
            return WeightsSource("untrained", "untrained", f"untrained weights requested ({how})")
        if chosen.startswith("hf://"):
            return WeightsSource("hf", chosen, how)
        if chosen.startswith(("http://", "https://")):
            return WeightsSource("url", chosen, how)
        return WeightsSource("path", str(Path(chosen).expanduser()), how)
    folder = weights_dir or default_weights_dir()
    for name in spec.weights.filenames:
        if (folder / name).is_file():
            return WeightsSource("path", str(folder / name), f"found in {folder}")
    url = spec.weights.url
    if url and url.startswith("hf://"):
        cached_hf = _hf_cache_file(url)
        if cached_hf is not None:
            return WeightsSource("path", str(cached_hf), "Hugging Face's download cache")
        if not offline():
            return WeightsSource("hf", url, f"{spec.weights.name} download", default=True)
    elif url:
        cached = _torchvision_cache_file(url)
        if cached.is_file():
            return WeightsSource("path", str(cached), "torchvision's download cache")
        if not offline():
            return WeightsSource("torchvision", url, "torchvision's IMAGENET1K_V1 download", default=True)
    names = " or ".join(spec.weights.filenames[:2])
    hint = (f"no weights found: put {names} in {folder}, or pass --{spec.key} SPEC "
            f"(path, URL or hf://owner/repo/file) or set ${spec.env_var}")
    if url and offline():
        hint += "; downloads are off (SANET_VIZ_OFFLINE)"
    return WeightsSource("untrained", "untrained", hint)


def _hf_cache_file(spec: str) -> Path | None:
    """The file of an hf:// SPEC in Hugging Face's local cache, if it is there (reads no network)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename, revision = parse_hf_spec(spec)
    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_manifest(path: Path, digest: str) -> None:
    """Refuse a file whose sha256 differs from the one listed in its folder's manifest.json."""
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return
    try:
        listed = json.loads(manifest.read_text()).get(path.name)
    except (OSError, ValueError, AttributeError) as exc:
        raise WeightsError(f"{manifest}: not a readable manifest ({exc})") from exc
    if listed and listed.lower() != digest:
        raise WeightsError(f"{path}: sha256 {digest} does not match {listed} listed in {manifest}; "
                           "the file is refused (replace it or fix the manifest)")


def fetch(source: WeightsSource, *, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """A local file for ``source``, downloading URL, hf:// and torchvision sources once."""
    if source.kind == "path":
        path = Path(source.location)
        if not path.is_file():
            raise WeightsError(f"{path}: no such weights file")
        return path
    if offline():
        raise WeightsError(f"{source.location}: downloads are off (SANET_VIZ_OFFLINE / HF_HUB_OFFLINE)")
    if source.kind == "hf":
        from huggingface_hub import hf_hub_download

        repo_id, filename, revision = parse_hf_spec(source.location)
        try:
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
        except Exception as exc:  # huggingface_hub raises many types; report them as one
            raise WeightsError(f"{source.location}: download failed ({exc})") from exc
    if source.kind in {"url", "torchvision"}:
        name = Path(urllib.parse.urlparse(source.location).path).name or "weights.pth"
        target = (_torchvision_cache_file(source.location) if source.kind == "torchvision"
                  else (cache_dir or default_weights_dir()) / name)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(source.location, str(target), progress=progress)
            except Exception as exc:  # URLError, HTTPError, OSError, ...
                raise WeightsError(f"{source.location}: download failed ({exc})") from exc
        return target
    raise WeightsError(f"nothing to fetch for {source.kind} weights")


def parse_hf_spec(spec: str) -> tuple[str, str, str | None]:
    """``hf://owner/repo/dir/file.safetensors@rev`` -> ("owner/repo", "dir/file.safetensors", "rev")."""
    rest = spec.removeprefix("hf://")
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise WeightsError(f"{spec}: expected hf://owner/repo/path/in/repo")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint: the released SA-Net .pth.tar, a plain state dict, or .safetensors.

    Pickles are read with ``weights_only=True``: a file that would run code is refused.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(f"{path}: refused: the file holds objects other than tensors "
                               f"(weights_only loading failed: {str(exc).splitlines()[0]})") from exc
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
                IndexError, KeyError, TypeError) as exc:  # the unpickler's errors on garbage input
            raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({exc!r})") from exc
    if isinstance(state, Mapping) and "state_dict" in state:  # the official training script's dict
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return {_strip_prefix(k): v for k, v in state.items()}


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(head) > 9 and head[8:9] == b"{"


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DataParallel, torch.compile
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], *, origin: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the bad keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong_shape:
            parts.append("wrong shapes: " + show([f"{k} {tuple(state[k].shape)} != "
                                                  f"{tuple(expected[k].shape)}" for k in wrong_shape]))
        raise WeightsError(f"{origin}: does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def build_model(spec: ModelSpec, explicit: str | None = None, *, weights_dir: Path | None = None,
                require_pretrained: bool = False, seed: int = 0,
                progress: bool = True) -> tuple[nn.Module, WeightsInfo]:
    """Build ``spec``'s model on the CPU in eval mode with frozen parameters, and load its weights.

    Untrained models are initialised from ``seed`` without touching the global RNG.
    """
    source = resolve_source(spec, explicit, weights_dir=weights_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    if source.default:
        # The automatic download is the last resort before untrained weights: a host without
        # internet still starts (untrained, saying why). An explicit URL that fails stays an error.
        try:
            fetch(source, progress=progress)
        except WeightsError as exc:
            source = WeightsSource("untrained", "untrained",
                                   f"{exc}; put {spec.weights.filenames[0]} in the weights folder or set "
                                   f"SANET_VIZ_OFFLINE=1 to skip the download")
    if source.kind == "untrained":
        if require_pretrained:
            raise WeightsError(f"{spec.display_name}: {source.reason} (--require-pretrained)")
        info = WeightsInfo(f"untrained (seed {seed})", False, None, source.reason)
    else:
        path = fetch(source, progress=progress)
        digest = sha256_of(path)
        _check_manifest(path, digest)
        load_state_dict_strict(model, read_state_dict(path), origin=str(path))
        shown = source.location if source.kind in {"hf", "url"} else str(path)
        info = WeightsInfo(shown, True, digest, source.reason)
    model.eval().requires_grad_(False)
    return model, info


def save_safetensors(state: Mapping[str, Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
