"""Decoding any picture a person uploads, and the papers' evaluation preprocessing."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import functional as TF

from .weights import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ImageDecodeError", "DecodeLimits", "decode_image", "PreparedImage", "prepare", "DEFAULT_LIMITS"]

# A truncated file must fail loudly, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """The input is not a picture we can analyse; the message names it and says why."""


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = int(os.environ.get("SANET_VIZ_MAX_PIXELS", 50_000_000))
    max_bytes: int = int(os.environ.get("SANET_VIZ_MAX_FILE_BYTES", 50 * 1024 * 1024))
    max_aspect: float = 100.0  # width/height beyond this leaves no content after the centre crop


DEFAULT_LIMITS = DecodeLimits()

ImageInput = str | os.PathLike[str] | bytes | BinaryIO | Image.Image


def _name_of(source: ImageInput) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name
    if isinstance(source, Image.Image):
        return "image"
    return getattr(source, "name", None) or "upload"


def decode_image(source: ImageInput, *, limits: DecodeLimits = DEFAULT_LIMITS,
                 name: str | None = None) -> Image.Image:
    """An RGB image from a path, bytes, file object or PIL image.

    EXIF orientation is applied; the first frame of animations and multi-page files is used;
    16-bit, float, palette, CMYK and alpha images become 8-bit RGB (alpha over white). Raises
    :class:`ImageDecodeError` for anything else, including files over the byte or pixel limit.
    """
    label = name or _name_of(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read_bytes(source, label, limits)
        if not data:
            raise ImageDecodeError(f"{label}: empty file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"{label}: not a supported image ({_short(exc)})") from exc
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's parsers raise these on bad headers
            raise ImageDecodeError(f"{label}: not a readable image ({_short(exc)})") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{label}: image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(f"{label}: {width}x{height} pixels is over the limit of "
                               f"{limits.max_pixels:,} (SANET_VIZ_MAX_PIXELS)")
    if max(width / height, height / width) > limits.max_aspect:
        raise ImageDecodeError(f"{label}: aspect ratio {width}x{height} is too extreme "
                               f"(over {limits.max_aspect:g}:1) to classify a centre crop")
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageDecodeError(f"{label}: corrupt or truncated image ({_short(exc)})") from exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _read_bytes(source: str | os.PathLike[str] | bytes | BinaryIO, label: str, limits: DecodeLimits) -> bytes:
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError(f"{label}: no such file")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ImageDecodeError(f"{label}: {size / 2**20:.1f} MiB is over the upload limit of "
                                   f"{limits.max_bytes / 2**20:.0f} MiB")
        data = path.read_bytes()
    else:
        data = source.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"{label}: over the upload limit of {limits.max_bytes / 2**20:.0f} MiB")
    return data


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        # High bit-depth: scale the actual range to 8 bits rather than clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        finite = array[np.isfinite(array)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scaled = np.zeros_like(array) if hi <= lo else (np.nan_to_num(array, nan=lo) - lo) / (hi - lo)
        image = Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), "L")
        mode = "L"
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class PreparedImage:
    """A decoded picture ready for the models."""

    tensor: Tensor  # (1, 3, crop, crop), normalised
    display: np.ndarray  # (crop, crop, 3) uint8: exactly what the models see, for overlays
    original_size: tuple[int, int]  # (width, height) after EXIF orientation


def prepare(image: Image.Image, *, resize_size: int = 256, crop_size: int = 224,
            mean: tuple[float, float, float] = IMAGENET_MEAN,
            std: tuple[float, float, float] = IMAGENET_STD) -> PreparedImage:
    """Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize, as in the official evaluation."""
    cropped = TF.center_crop(TF.resize(image, [resize_size], antialias=True), [crop_size])
    display = np.asarray(cropped, dtype=np.uint8).copy()
    tensor = TF.normalize(TF.to_tensor(cropped), list(mean), list(std)).unsqueeze(0)
    return PreparedImage(tensor.contiguous(), display, image.size)


def load_and_prepare(source: ImageInput, *, limits: DecodeLimits = DEFAULT_LIMITS,
                     name: str | None = None) -> PreparedImage:
    return prepare(decode_image(source, limits=limits, name=name))


def denormalize(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x * std + mean
