"""Decoding any picture a person uploads, and the papers' evaluation preprocessing."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import functional as TF

from .limits import limit_default, parse_size
from .weights import IMAGENET_EVAL, EvalTransform

__all__ = ["ImageDecodeError", "DecodeLimits", "decode_image", "PreparedImage", "prepare", "prepare_for",
           "DEFAULT_LIMITS",
           "PREVIEW_SIZE", "SUPPORTED_FORMATS", "parse_size"]

# A truncated file must fail loudly, not be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Only these decoders ever see uploaded bytes. PIL knows ~40 formats; several are rarely used,
# weakly identified (TGA has no magic number, so random bytes "open" as one) or hand data to
# outside programs (EPS runs Ghostscript). The MPO pictures of phones are opened by "JPEG".
_WANTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF")
Image.init()
SUPPORTED_FORMATS: tuple[str, ...] = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)
_SUPPORTED_TEXT = ", ".join("PNM" if f == "PPM" else f for f in SUPPORTED_FORMATS)

class ImageDecodeError(ValueError):
    """The input is not a picture we can analyse; the message names it, says why and what to do.

    Messages are for whoever sent the file (often a visitor): they name no server settings.
    ``setting`` names the environment variable of a limit that refused it, for operators (the
    CLI prints it).
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoded input may be; defaults from :data:`limits.LIMITS` (read when constructed)."""

    max_pixels: int = field(default_factory=lambda: int(limit_default("max_pixels")))
    max_bytes: int = field(default_factory=lambda: int(limit_default("max_file_size")))
    # width/height beyond this leaves no content after the centre crop
    max_aspect: float = field(default_factory=lambda: float(limit_default("max_aspect")))


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
    :class:`ImageDecodeError`, and nothing else, for anything else: files that are not pictures
    in a supported format, corrupt or truncated files, and files over the byte or pixel limits
    (checked on the header, before any pixel is decoded).
    """
    label = str(name or _name_of(source))
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(_read_bytes(source, label, limits), label, limits)
    try:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageDecodeError(f"{label}: image has no pixels ({width}x{height})")
        if width * height > limits.max_pixels:
            raise ImageDecodeError(f"{label}: {width}x{height} pixels is over the limit of {limits.max_pixels:,} "
                                   "pixels; please resize it (a few megapixels are plenty)",
                                   setting="SANET_VIZ_MAX_PIXELS")
        if max(width / height, height / width) > limits.max_aspect:
            raise ImageDecodeError(f"{label}: aspect ratio {width}x{height} is too extreme "
                                   f"(over {limits.max_aspect:g}:1) to classify a centre crop")
        # Opening leaves animations and multi-page files on their first frame: load only that
        # (asking for n_frames would walk every frame of the file).
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except MemoryError as exc:
        raise ImageDecodeError(f"{label}: too large to decode in the memory available") from exc
    except Exception as exc:
        raise ImageDecodeError(f"{label}: corrupt or truncated image ({_short(exc)})") from exc


def _open(data: bytes, label: str, limits: DecodeLimits) -> Image.Image:
    if not data:
        raise ImageDecodeError(f"{label}: empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise ImageDecodeError(f"{label}: declares far more pixels than the limit of {limits.max_pixels:,}: "
                               "refused as a decompression bomb", setting="SANET_VIZ_MAX_PIXELS") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{label}: not a picture in a supported format ({_what_is(data)}); "
                               f"supported: {_SUPPORTED_TEXT}") from exc
    except MemoryError as exc:
        raise ImageDecodeError(f"{label}: too large to decode in the memory available") from exc
    except Exception as exc:
        raise ImageDecodeError(f"{label}: not a readable image ({_short(exc)})") from exc


def _what_is(data: bytes) -> str:
    """A few words on what unrecognised bytes look like, for the error message."""
    head = data[:1024]
    for magic, kind in ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
                        (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP")):
        if head.startswith(magic):
            return f"a corrupt or truncated {kind} file"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a corrupt or truncated WEBP file"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<"):
        if b"<svg" in text:
            return "an SVG drawing; vector images are not supported, export it as PNG"
        if b"<html" in text or text.startswith(b"<!doctype html"):
            return "an HTML page"
        return "XML or markup text"
    for magic, kind in ((b"PK\x03\x04", "a ZIP archive"), (b"PK\x05\x06", "an empty ZIP archive"),
                        (b"\x1f\x8b", "a gzip archive"), (b"Rar!", "a RAR archive"),
                        (b"7z\xbc\xaf", "a 7-Zip archive"), (b"%PDF", "a PDF document"),
                        (b"%!PS", "a PostScript file"), (b"8BPS", "a Photoshop file"),
                        (b"\x7fELF", "a program"), (b"MZ", "a Windows program")):
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("latin-1")
        if brand in {"heic", "heix", "hevc", "mif1", "msf1", "heim", "heis"}:
            return "a HEIC/HEIF photo, which cannot be decoded here; save it as JPEG"
        return f"an ISO media file ({brand.strip()!r})"
    try:
        head.decode("utf-8")
        if b"\x00" not in head:
            return "a text file"
    except UnicodeDecodeError:
        pass
    return "unrecognised data"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _read_bytes(source: str | os.PathLike[str] | bytes | BinaryIO, label: str, limits: DecodeLimits) -> bytes:
    advice = "please save it smaller (e.g. as JPEG) and try again"
    too_big = f"{label}: over the upload limit of {limits.max_bytes / 2**20:g} MiB; {advice}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if not path.is_file():
                raise ImageDecodeError(f"{label}: not a file (a folder or a device)" if path.exists()
                                       else f"{label}: no such file")
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise ImageDecodeError(f"{label}: {size / 2**20:.1f} MiB is over the upload limit of "
                                       f"{limits.max_bytes / 2**20:g} MiB; {advice}", setting="SANET_VIZ_MAX_FILE_SIZE")
            with open(path, "rb") as f:  # read no more than the limit, even if the file grows
                data = f.read(limits.max_bytes + 1)
        except OSError as exc:
            raise ImageDecodeError(f"{label}: cannot be read ({_short(exc)})") from exc
    else:
        try:
            data = source.read(limits.max_bytes + 1)
        except Exception as exc:
            raise ImageDecodeError(f"{label}: cannot be read ({_short(exc)})") from exc
        if not isinstance(data, bytes):
            raise ImageDecodeError(f"{label}: expected binary data, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(too_big, setting="SANET_VIZ_MAX_FILE_SIZE")
    return data


_HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _to_eight_bits(image: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit or float image's actual range to 8 bits (rather than clip at 255).

    Works in bands of rows so that a large float TIFF needs little memory beyond its pixels.
    NaN counts as the minimum, +inf as the maximum.
    """
    array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"unexpected {image.mode} array of shape {array.shape}")
    finite = np.isfinite(array) if array.dtype.kind == "f" else None
    if finite is not None and not finite.any():
        lo = hi = 0.0
    else:
        lo = float(np.min(array, where=finite, initial=np.inf) if finite is not None else array.min())
        hi = float(np.max(array, where=finite, initial=-np.inf) if finite is not None else array.max())
    out = np.zeros(array.shape, np.uint8)
    if hi > lo:
        step = max(1, (1 << 22) // max(1, array.shape[1]))
        for r in range(0, array.shape[0], step):
            with np.errstate(invalid="ignore"):  # signalling NaNs (corrupt floats) warn when cast
                band = np.nan_to_num(array[r:r + step].astype(np.float64), nan=lo, posinf=hi, neginf=lo)
            band -= lo
            band /= hi - lo
            np.clip(band, 0.0, 1.0, out=band)
            out[r:r + step] = np.rint(band * 255)
    return Image.fromarray(out, "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in _HIGH_DEPTH:
        image, mode = _to_eight_bits(image), "L"
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
    # The whole picture, longest side at most PREVIEW_SIZE, and where the models' crop lies in it
    # (x0, y0, x1, y1 in preview pixels): to show a map in place on the whole photo.
    preview: np.ndarray | None = None
    crop_box: tuple[float, float, float, float] | None = None
    # What ``tensor`` was made with, and the same crop made with other models' preprocessing
    # (another interpolation or normalisation): :meth:`tensor_for`. None: ``tensor`` serves all.
    transform: EvalTransform | None = None
    others: Mapping[EvalTransform, Tensor] = field(default_factory=dict)

    def tensor_for(self, transform: EvalTransform | None) -> Tensor:
        """The input for a model evaluated with ``transform`` (see :func:`prepare_for`)."""
        if transform is None or self.transform is None or transform == self.transform:
            return self.tensor
        if transform not in self.others:
            raise ValueError(f"this image was not prepared with {transform}: prepare it for every model's "
                             "preprocessing (Lab.prepare)")
        return self.others[transform]


PREVIEW_SIZE = 640


def prepare(image: Image.Image, transform: EvalTransform = IMAGENET_EVAL) -> PreparedImage:
    """The weights' evaluation preprocessing (``WeightsDescription.transforms``): for both papers'
    checkpoints Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet mean, std)."""
    resized, cropped, tensor = _transformed(image, transform)
    display = np.asarray(cropped, dtype=np.uint8).copy()
    preview, box = _preview(image, resized.size, transform.crop_size)
    return PreparedImage(tensor, display, image.size, preview, box, transform)


def prepare_for(image: Image.Image, transforms: Sequence[EvalTransform]) -> PreparedImage:
    """One picture for models evaluated with different preprocessing: the first transform's
    tensor, display and preview, and each other's tensor (:meth:`PreparedImage.tensor_for`).

    They must crop the same pixels (same resize and crop sizes), so that every model's map lies
    over the same display; they may differ in interpolation and normalisation.
    """
    first, *rest = list(dict.fromkeys(transforms))
    for other in rest:
        if not first.same_geometry(other):
            raise ValueError(f"the models were evaluated with different crops ({first.resize_size}->"
                             f"{first.crop_size} vs {other.resize_size}->{other.crop_size}): their maps would not "
                             "line up; analyse them separately")
    prepared = prepare(image, first)
    return replace(prepared, others={t: _transformed(image, t)[2] for t in rest})


def _transformed(image: Image.Image, transform: EvalTransform) -> tuple[Image.Image, Image.Image, Tensor]:
    """(resized, cropped, normalised (1, 3, crop, crop) tensor) of ``image`` under ``transform``."""
    mode = TF.InterpolationMode(transform.interpolation)
    resized = TF.resize(image, [transform.resize_size], interpolation=mode, antialias=True)
    cropped = TF.center_crop(resized, [transform.crop_size])
    tensor = TF.normalize(TF.to_tensor(cropped), list(transform.mean), list(transform.std)).unsqueeze(0)
    return resized, cropped, tensor.contiguous()


def _preview(image: Image.Image, resized: tuple[int, int], crop: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """A small copy of the whole picture and the centre crop's box in it (torchvision's rounding)."""
    width, height = image.size
    scale = min(1.0, PREVIEW_SIZE / max(width, height))
    small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR) \
        if scale < 1.0 else image
    rw, rh = resized
    left, top = round((rw - crop) / 2.0), round((rh - crop) / 2.0)
    to_preview = (small.size[0] / rw, small.size[1] / rh)
    box = (left * to_preview[0], top * to_preview[1], (left + crop) * to_preview[0], (top + crop) * to_preview[1])
    return np.asarray(small, dtype=np.uint8).copy(), box


def load_and_prepare(source: ImageInput, *, limits: DecodeLimits = DEFAULT_LIMITS, name: str | None = None,
                     transform: EvalTransform | Sequence[EvalTransform] = IMAGENET_EVAL) -> PreparedImage:
    """Decode ``source`` within ``limits`` and prepare it with ``transform`` (or, given several,
    for each of them: :func:`prepare_for`)."""
    image = decode_image(source, limits=limits, name=name)
    return prepare(image, transform) if isinstance(transform, EvalTransform) else prepare_for(image, transform)
