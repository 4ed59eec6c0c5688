"""Decoding whatever a person uploads, and the official evaluation preprocessing."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from sanet_viz.preprocessing import ImageDecodeError, decode_image, load_and_prepare, prepare

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# ImageNet statistics, as in the official evaluation script (shared notes).
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

RED, BLUE = (255, 0, 0), (0, 0, 255)


def two_halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = RED
    a[:, width // 2:] = BLUE
    return Image.fromarray(a)


def close(pixel: tuple[int, ...], colour: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(int(p) - c) <= tol for p, c in zip(pixel, colour, strict=True))


# ------------------------------------------------------------------------------------------
# EXIF, modes, animations


def test_exif_orientation_6_is_rotated(tmp_path: Path) -> None:
    stored = two_halves(80, 40)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(path).size == (80, 40)

    image = decode_image(path)
    assert image.mode == "RGB"
    assert image.size == (40, 80)  # portrait once displayed
    # Rotating clockwise puts the stored left edge on top.
    assert close(image.getpixel((20, 10)), RED)
    assert close(image.getpixel((20, 70)), BLUE)


def test_without_exif_nothing_is_rotated(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    two_halves(80, 40).save(path, "JPEG", quality=95)
    image = decode_image(path)
    assert image.size == (80, 40)
    assert close(image.getpixel((10, 20)), RED) and close(image.getpixel((70, 20)), BLUE)


def _mode_images() -> dict[str, Image.Image]:
    grey = np.linspace(0, 255, 32 * 24).reshape(24, 32).astype(np.uint8)
    alpha = np.full((24, 32), 255, np.uint8)
    alpha[:, :16] = 0  # left half fully transparent
    palette = Image.fromarray(grey).convert("P")
    palette.info["transparency"] = 0
    rgba = np.dstack([np.full((24, 32), 10, np.uint8), np.full((24, 32), 200, np.uint8),
                      np.full((24, 32), 30, np.uint8), alpha])
    i16 = (np.linspace(0, 60000, 32 * 24).reshape(24, 32)).astype(np.uint16)
    return {
        "L": Image.fromarray(grey, "L"),
        "LA": Image.fromarray(np.dstack([grey, alpha]), "LA"),
        "P": palette,
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "CMYK": Image.new("CMYK", (32, 24), (0, 255, 255, 0)),  # red in CMYK
        "I;16": Image.fromarray(i16),
        "F": Image.fromarray(np.linspace(-1.5, 3.0, 32 * 24).reshape(24, 32).astype(np.float32), "F"),
    }


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "F"])
def test_any_mode_becomes_rgb(mode: str, tmp_path: Path) -> None:
    source = _mode_images()[mode]
    assert source.mode == mode
    # Through a file where the format keeps the mode, and as a PIL image.
    inputs: list[object] = [source]
    fmt = {"CMYK": "TIFF", "F": "TIFF", "I;16": "PNG"}.get(mode, "PNG")
    path = tmp_path / f"image.{fmt.lower()}"
    source.save(path, fmt)
    inputs.append(path)
    for item in inputs:
        image = decode_image(item)  # type: ignore[arg-type]
        assert image.mode == "RGB" and image.size == (32, 24), item
        array = np.asarray(image)
        assert array.dtype == np.uint8
        if mode in {"L", "I;16", "F"}:  # grey ramps stay grey ramps over a real range
            assert np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2])
            assert int(array.max()) - int(array.min()) > 200, "high bit-depth range was clipped"
            assert array[0, 0, 0] < array[-1, -1, 0]
        if mode == "RGBA":
            assert close(tuple(array[5, 25]), (10, 200, 30), tol=2)  # opaque part kept
            assert len({tuple(p) for p in array[:, :16].reshape(-1, 3)}) == 1  # transparent part uniform
        if mode == "CMYK":
            assert close(tuple(array[5, 5]), RED, tol=2)


def test_palette_with_transparency_does_not_leak_hidden_colour() -> None:
    a = np.zeros((8, 8), np.uint8)
    a[:, 4:] = 1
    image = Image.fromarray(a, "P")
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.info["transparency"] = 0  # index 0 (black) is transparent
    rgb = np.asarray(decode_image(image))
    assert close(tuple(rgb[0, 6]), (0, 255, 0), tol=0)
    assert tuple(rgb[0, 0]) != (0, 0, 0)  # not the hidden palette colour


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE, (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    image = decode_image(path)
    assert image.mode == "RGB"
    assert close(image.getpixel((10, 10)), RED, tol=10)
    with open(path, "rb") as f:  # file objects and bytes too
        assert close(decode_image(f).getpixel((3, 3)), RED, tol=10)
    assert close(decode_image(path.read_bytes()).getpixel((3, 3)), RED, tol=10)


# ------------------------------------------------------------------------------------------
# What is not an image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header that declares width x height pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize(("name", "content"), [
    ("bad.jpg", b"this is a text file, not a picture\n"),
    ("empty.png", b""),
    ("cut.jpg", truncated_jpeg()),
    ("bomb.png", huge_png(100_000, 100_000)),
    ("wide-bomb.png", huge_png(60_000, 1_000)),  # 60 Mpx: over the 50 Mpx limit, under PIL's own
])
def test_undecodable_inputs_raise_naming_the_file(name: str, content: bytes, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=re.escape(name)):
        decode_image(path)
    with pytest.raises(ImageDecodeError, match=re.escape(name)):
        load_and_prepare(path)
    with pytest.raises(ImageDecodeError, match=re.escape(name)) as err:
        decode_image(content, name=name)
    if "bomb" in name:  # refused for its declared size, before any pixel is decoded
        assert re.search(r"pixels", str(err.value))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="ghost.png"):
        decode_image(tmp_path / "ghost.png")


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(ImageDecodeError, ValueError)


# ------------------------------------------------------------------------------------------
# The official evaluation preprocessing


def official_transform() -> transforms.Compose:
    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])


@pytest.mark.parametrize("source", ["chelsea.jpg", "coffee.jpg", "synthetic-tall", "synthetic-small"])
def test_prepare_equals_torchvision_eval_transform(source: str) -> None:
    if source == "synthetic-tall":
        image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (500, 300, 3), dtype=np.uint8))
    elif source == "synthetic-small":  # smaller than the crop: upscaled
        image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (100, 150, 3), dtype=np.uint8))
    else:
        image = decode_image(EXAMPLES / source)
    prepared = prepare(image)
    assert prepared.tensor.shape == (1, 3, 224, 224)
    assert prepared.tensor.dtype == torch.float32
    expected = official_transform()(image).unsqueeze(0)
    torch.testing.assert_close(prepared.tensor, expected, atol=1e-6, rtol=0)
    assert prepared.original_size == image.size
    # The display crop is exactly what the model saw, before normalisation.
    assert prepared.display.shape == (224, 224, 3) and prepared.display.dtype == np.uint8
    unnormalised = prepared.tensor[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    torch.testing.assert_close(torch.from_numpy(prepared.display).permute(2, 0, 1).float() / 255,
                               unnormalised, atol=1e-5, rtol=0)


def test_load_and_prepare_from_path_applies_exif(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    two_halves(400, 300).save(path, "JPEG", quality=95, exif=exif.tobytes())
    prepared = load_and_prepare(path)
    assert prepared.original_size == (300, 400)
    assert prepared.tensor.shape == (1, 3, 224, 224)
    top, bottom = prepared.display[10, 112], prepared.display[-10, 112]
    assert close(tuple(top), RED) and close(tuple(bottom), BLUE)
