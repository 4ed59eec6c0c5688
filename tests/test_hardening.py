"""Hostile and odd uploads everywhere a file comes in, and many visitors at once.

The corpus is generated here (PIL/numpy); nothing binary is committed. Entry points covered:
the decoder (in-process), the CLI (subprocess), the app's /analyze and /correlate API and its
browser upload (a running ``app.py``). The short load test reuses benchmarks/load_test.py.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, ROOT, load_test_module
from PIL import Image

from sanet_viz.preprocessing import (
    SUPPORTED_FORMATS,
    DecodeLimits,
    ImageDecodeError,
    decode_image,
    load_and_prepare,
    parse_size,
)

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

CHROMIUM = "/usr/bin/chromium"
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


lt = load_test_module()


# ---------------------------------------------------------------------------------------------
# The corpus

def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _halves(width: int = 64, height: int = 48, left: tuple[int, int, int] = RED,
            right: tuple[int, int, int] = BLUE) -> Image.Image:
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2], a[:, width // 2:] = left, right
    return Image.fromarray(a)


def _near(pixel: tuple[int, ...], colour: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(int(p) - c) <= tol for p, c in zip(pixel, colour, strict=True))


@dataclass
class Odd:
    """A real picture in an unusual form, and what its decoded RGB image must show."""

    name: str
    data: bytes
    check: Callable[[Image.Image], None]


def _left_red_right_blue(image: Image.Image) -> None:
    w, h = image.size
    assert _near(image.getpixel((w // 8, h // 2)), RED), image.getpixel((w // 8, h // 2))
    assert _near(image.getpixel((w - 1 - w // 8, h // 2)), BLUE), image.getpixel((w - 1 - w // 8, h // 2))


def _grey_ramp(image: Image.Image) -> None:
    a = np.asarray(image).astype(int)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all(), "grey became colour"
    assert a.max() - a.min() > 200, f"range {a.min()}..{a.max()}: high bit depth was clipped or lost"
    assert a[0, 0, 0] < a[-1, -1, 0], "ramp direction lost"


def _uniform(colour: tuple[int, int, int], tol: int = 12) -> Callable[[Image.Image], None]:
    def check(image: Image.Image) -> None:
        for xy in ((0, 0), (image.width - 1, image.height - 1), (image.width // 2, image.height // 2)):
            assert _near(image.getpixel(xy), colour, tol), (xy, image.getpixel(xy), colour)
    return check


def _size(width: int, height: int, then: Callable[[Image.Image], None] | None = None) -> Callable[[Image.Image], None]:
    def check(image: Image.Image) -> None:
        assert image.size == (width, height)
        if then:
            then(image)
    return check


def odd_pictures() -> list[Odd]:
    ramp = np.add.outer(np.arange(48), np.arange(64))
    grey8 = (ramp * 255 / ramp.max()).astype(np.uint8)
    grey16 = (ramp * 60000 / ramp.max()).astype(np.uint16)
    floats = (ramp / ramp.max() * 7.5 - 2.0).astype(np.float32)
    floats[0, 5], floats[1, 5], floats[2, 5] = np.nan, np.inf, -np.inf  # must not poison the scaling

    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([0, 0, 0] + list(GREEN) + [0] * 762)  # index 0 (black) is transparent
    palette.paste(1, (32, 0, 64, 48))
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, 32:] = (10, 200, 30, 255)  # left half fully transparent

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, BLUE, GREEN)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:], duration=80)
    tiff_pages = io.BytesIO()
    Image.new("RGB", (20, 10), RED).save(tiff_pages, "TIFF", save_all=True,
                                          append_images=[Image.new("RGB", (300, 300), BLUE)])
    jpeg = _save(_halves(), "JPEG", quality=92)
    png = _save(_halves(), "PNG")

    def transparent_left(image: Image.Image) -> None:
        assert _near(image.getpixel((5, 20)), WHITE, 2), "transparent pixels must become white"
        assert not _near(image.getpixel((50, 20)), WHITE, 60)

    def one_pixel(image: Image.Image) -> None:
        assert image.size == (1, 1) and image.getpixel((0, 0)) == (12, 34, 56)

    def rotated(image: Image.Image) -> None:  # 90 degrees clockwise: the stored left edge on top
        assert image.size == (48, 64)
        assert _near(image.getpixel((24, 5)), RED) and _near(image.getpixel((24, 58)), BLUE)

    odd = [
        Odd("grey.png", _save(Image.fromarray(grey8, "L"), "PNG"), _grey_ramp),
        Odd("grey16.png", _save(Image.fromarray(grey16), "PNG"), _grey_ramp),
        Odd("grey16.tif", _save(Image.fromarray(grey16), "TIFF"), _grey_ramp),
        Odd("grey16.pgm", _save(Image.fromarray(grey16), "PPM"), _grey_ramp),
        Odd("float.tif", _save(Image.fromarray(floats, "F"), "TIFF"), _grey_ramp),
        Odd("bilevel.png", _save(Image.fromarray(grey8 > 128).convert("1"), "PNG"),
            lambda im: None if set(np.unique(np.asarray(im))) <= {0, 255} else pytest.fail("not black/white")),
        Odd("grey-alpha.png", _save(Image.fromarray(np.dstack([grey8, np.full_like(grey8, 255)]), "LA"), "PNG"),
            _grey_ramp),
        Odd("palette-transparent.png", _save(palette, "PNG", transparency=0), transparent_left),
        Odd("rgba.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"), transparent_left),
        Odd("cmyk.jpg", _save(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95), _uniform(RED, 16)),
        Odd("cmyk.tif", _save(Image.new("CMYK", (64, 48), (255, 255, 0, 0)), "TIFF"), _uniform(BLUE, 16)),
        Odd("animated.gif", gif.getvalue(), _size(40, 30, _uniform(RED))),
        Odd("animated.png", apng.getvalue(), _size(40, 30, _uniform(RED))),
        Odd("pages.tif", tiff_pages.getvalue(), _size(20, 10, _uniform(RED))),
        Odd("photo.webp", _save(_halves(), "WEBP", quality=90), _left_red_right_blue),
        Odd("lossless.webp", _save(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True), transparent_left),
        Odd("photo.bmp", _save(_halves(), "BMP"), _left_red_right_blue),
        Odd("progressive.jpg", _save(_halves(), "JPEG", quality=90, progressive=True), _left_red_right_blue),
        Odd("one-pixel.png", _save(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"), one_pixel),
        Odd("phone-rotated.jpg", _save(_halves(), "JPEG", quality=92, exif=exif.tobytes()), rotated),
        Odd("wide-100-to-1.png", _save(_halves(2000, 20), "PNG"), _size(2000, 20, _left_red_right_blue)),
        Odd("tall-1-to-100.png", _save(Image.new("RGB", (20, 2000), GREEN), "PNG"), _size(20, 2000)),
        Odd("photo", jpeg, _left_red_right_blue),  # no extension
        Odd("really-a-png.jpg", png, _left_red_right_blue),  # the extension lies
        Odd("png-as.txt", png, _left_red_right_blue),
        Odd("SHOUTING.JPEG", jpeg, _left_red_right_blue),
        Odd("dots.in.name.jpeg.bin", jpeg, _left_red_right_blue),
        Odd("ünïcødé 名前.jpg", jpeg, _left_red_right_blue),
    ]
    if "AVIF" in SUPPORTED_FORMATS:
        odd.append(Odd("photo.avif", _save(_halves(), "AVIF", quality=90), _left_red_right_blue))
    return odd


@dataclass
class Bad:
    """Not a picture we can analyse, and the words its message must contain."""

    name: str
    data: bytes
    reason: str  # a regular expression, searched case-insensitively


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_declaring(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_declaring(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08\x02\x4c\x01\x00\x3b")


def _tiff_declaring(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 16


def _bmp_declaring(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + 16, 0, 0, 14 + len(header)) + header + b"\0" * 16


def _zip_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(name, data)
    return buffer.getvalue()


def not_pictures() -> list[Bad]:
    png = _save(_halves(256, 256), "PNG")
    jpeg = _save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)),
                 "JPEG", quality=90)
    rng = np.random.default_rng(5)
    random_bytes = b"\x00\x13" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    corrupt_png = bytearray(png)
    idat = corrupt_png.index(b"IDAT")
    corrupt_png[idat + 20:idat + 60] = b"\xff" * 40  # garbage in the compressed pixels
    return [
        Bad("empty.jpg", b"", "empty"),
        Bad("notes.png", b"shopping list:\n- milk\n- a picture of a cat\n", "text"),
        Bad("page.jpg", b"<!DOCTYPE html><html><body><img src='cat.jpg'></body></html>", "HTML"),
        Bad("drawing.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
            b'height="10"><rect width="10" height="10"/></svg>', "SVG"),
        Bad("drawing-without-extension", b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
        Bad("holiday.zip", _zip_of("cat.png", png), "ZIP"),
        Bad("cat.png.gz", gzip.compress(png), "gzip"),
        Bad("paper.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "PDF"),
        Bad("iphone.heic", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "HEIC"),
        Bad("noise.jpg", random_bytes, "not a picture|unrecognised"),
        Bad("half.jpg", jpeg[: len(jpeg) // 2], "truncated|corrupt"),
        Bad("half.png", png[: len(png) // 2], "truncated|corrupt"),
        Bad("header-only.png", png[:33], "truncated|corrupt|readable"),
        Bad("garbled.png", bytes(corrupt_png), "corrupt|readable|truncated"),
        Bad("header-only.gif", b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0, 0, 0) + b"\x3b",
            "corrupt|truncated|readable"),
        Bad("bomb.png", _png_declaring(100_000, 100_000), "pixels"),
        Bad("bomb-60mpx.png", _png_declaring(60_000, 1_000), "pixels"),
        Bad("bomb.jpg", _jpeg_declaring(65_000, 65_000), "pixels"),
        Bad("bomb-81mpx.jpg", _jpeg_declaring(9_000, 9_000), "pixels"),
        Bad("bomb.gif", _gif_declaring(65_535, 65_535), "pixels"),
        Bad("bomb.tif", _tiff_declaring(100_000, 100_000), "pixels"),
        Bad("bomb.bmp", _bmp_declaring(50_000, 50_000), "pixels"),
        Bad("needle.png", _save(Image.new("RGB", (1, 5000), RED), "PNG"), "aspect"),
        Bad("zero-width.png", _png_declaring(0, 10), "pixels|readable|corrupt"),
    ]


ODD = odd_pictures()
BAD = not_pictures()


# ---------------------------------------------------------------------------------------------
# The decoder, in-process

@pytest.mark.parametrize("case", ODD, ids=[c.name for c in ODD])
def test_odd_but_real_pictures_decode(case: Odd, tmp_path: Path) -> None:
    path = tmp_path / case.name
    path.write_bytes(case.data)
    for source in (path, case.data):
        image = decode_image(source, name=case.name)
        assert image.mode == "RGB"
        case.check(image)
    prepared = load_and_prepare(path)
    assert tuple(prepared.tensor.shape) == (1, 3, 224, 224) and bool(prepared.tensor.isfinite().all())


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_not_pictures_are_refused_quickly_with_a_message_naming_the_file(case: Bad, tmp_path: Path) -> None:
    path = tmp_path / case.name
    path.write_bytes(case.data)
    for source in (path, case.data):
        start = time.perf_counter()
        with pytest.raises(ImageDecodeError, match=re.escape(case.name)) as err:
            load_and_prepare(source, name=case.name)
        assert time.perf_counter() - start < 3.0, "refusing must not decode the declared pixels"
        assert re.search(case.reason, str(err.value), re.IGNORECASE), str(err.value)
        assert "Traceback" not in str(err.value) and "\n" not in str(err.value)


def test_over_the_byte_limit_is_refused_before_reading(tmp_path: Path) -> None:
    limits = DecodeLimits(max_bytes=parse_size("64kb"))
    noise = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "big-noise.png"
    path.write_bytes(_save(Image.fromarray(noise), "PNG"))  # ~190 KiB of incompressible pixels
    assert path.stat().st_size > limits.max_bytes
    for source in (path, path.read_bytes(), open(path, "rb")):
        with pytest.raises(ImageDecodeError, match=r"big-noise\.png.*upload limit"):
            decode_image(source, limits=limits, name="big-noise.png")
    assert decode_image(path).size == (256, 256)  # the default limit takes it


def test_folders_devices_and_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(ImageDecodeError, match=r"a-folder: not a file"):
        decode_image(tmp_path / "a-folder")
    with pytest.raises(ImageDecodeError, match=r"null: not a file"):
        decode_image("/dev/null")
    with pytest.raises(ImageDecodeError, match=r"ghost\.jpg.*no such file"):
        decode_image(tmp_path / "ghost.jpg")


def test_parse_size_matches_gradio() -> None:
    from gradio.utils import _parse_file_size

    for text in ("20mb", "512kb", "1gb", "300b", "20 MB"):
        assert parse_size(text) == _parse_file_size(text), text
    assert parse_size("1.5mb") == 3 * 2**19 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_size("twenty megabytes")


def _peak_decode(path: Path, tmp_path: Path) -> dict[str, float]:
    """Decode and prepare ``path`` in a fresh interpreter: seconds and peak resident growth."""
    script = tmp_path / "peak.py"
    script.write_text(
        "import json, resource, sys, time\n"
        "from sanet_viz.preprocessing import load_and_prepare\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.perf_counter()\n"
        "p = load_and_prepare(sys.argv[1])\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'size': p.original_size,\n"
        "    'growth_mb': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))\n")
    out = subprocess.run([sys.executable, str(script), str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rgb", "grey16"])
def test_largest_allowed_pictures_decode_in_bounded_time_and_memory(kind: str, tmp_path: Path) -> None:
    """49 Mpx (just under the 50 Mpx limit), stored in ~1 MB: a small file, a large decode."""
    side = 7000
    if kind == "rgb":
        image = Image.new("RGB", (side, side), (10, 200, 30))
        bytes_per_pixel = 3
    else:
        ramp = np.add.outer(np.arange(side, dtype=np.uint32), np.arange(side, dtype=np.uint32))
        image = Image.fromarray((ramp % 65536).astype(np.uint16))
        bytes_per_pixel = 2
        del ramp
    path = tmp_path / f"{kind}.png"
    image.save(path, "PNG", compress_level=1)
    del image
    assert path.stat().st_size < DecodeLimits().max_bytes
    measured = _peak_decode(path, tmp_path)
    pixels = side * side
    assert tuple(measured["size"]) == (side, side)
    assert measured["seconds"] < 30, measured
    # The decoded pixels (bytes_per_pixel) and their 8-bit RGB (3 bytes) are needed; a full-size
    # float64 copy of the image (8 bytes a pixel, as the first version made) is not.
    budget_mb = pixels * (bytes_per_pixel + 3 + 4) / 2**20 + 64
    assert measured["growth_mb"] < budget_mb, measured


# ---------------------------------------------------------------------------------------------
# The CLI

@pytest.mark.slow
def test_cli_analyses_odd_pictures_and_names_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    odd = [c for c in ODD if c.name in {"grey16.png", "float.tif", "photo"}]  # each costs a few seconds
    for case in odd + BAD:
        (folder / case.name).write_bytes(case.data)
    files = [str(folder / c.name) for c in odd + BAD]
    out = subprocess.run([sys.executable, "-m", "sanet_viz", "analyze", *files, "--out", str(tmp_path / "out"),
                          "--resnet50", "untrained", "--sanet50", "untrained", "--no-probe",
                          "--weights-dir", str(tmp_path / "no-weights")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, SANET_VIZ_OFFLINE="1", HF_HUB_OFFLINE="1"))
    assert out.returncode == 1, out.stderr[-3000:]  # some inputs failed, and it says so
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for case in BAD:
        line = next((ln for ln in out.stderr.splitlines() if ln.startswith("error:") and case.name in ln), None)
        assert line is not None, f"no error line names {case.name}:\n{out.stderr[-3000:]}"
        assert re.search(case.reason, line, re.IGNORECASE), line
    for case in odd:
        stem = Path(case.name).stem or case.name
        result = json.loads((tmp_path / "out" / stem / "result.json").read_text())
        assert result["models"]["sanet50"]["top5"], case.name
    assert f"wrote {len(odd)} of {len(odd) + len(BAD)}" in out.stderr


# ---------------------------------------------------------------------------------------------
# The engine: a failure inside an analysis leaves the shared models as they were

def _hooks(model: torch.nn.Module) -> int:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, k)) for m in model.modules() for k in kinds)


def _model_state(lab: object) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for key, lm in lab.models.items():  # type: ignore[attr-defined]
        nets = [lm.model] + ([lm.fast_model] if lm.fast_model is not None else [])
        out[key] = (sum(_hooks(n) for n in nets), sum(p.grad is not None for n in nets for p in n.parameters()),
                    sum(p.requires_grad for n in nets for p in n.parameters()),
                    sum(m.training for n in nets for m in n.modules()))
    return out


@pytest.mark.slow
def test_a_request_that_fails_midway_leaves_no_hooks_and_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    from sanet_viz import analysis
    from sanet_viz.analysis import AnalysisOptions, explain
    from sanet_viz.lab import Lab

    lab = Lab.load(resnet50="untrained", sanet50="untrained", device="cpu")
    image = load_and_prepare(EXAMPLES / "chelsea.jpg")
    options = AnalysisOptions(probe=False)
    clean = _model_state(lab)
    assert all(hooks == 0 and grads == 0 for hooks, grads, _, _ in clean.values()), clean
    before = explain(lab, image, options)

    real = analysis.compute_cam
    seen: list[int] = []

    def fails_after_the_backward(*args: object, **kwargs: object) -> object:
        real(*args, **kwargs)  # hooks are registered and have fired; gradients exist
        seen.append(sum(_hooks(lm.model) for lm in lab.models.values()))
        raise RuntimeError("simulated failure inside the CAM pass")

    monkeypatch.setattr(analysis, "compute_cam", fails_after_the_backward)
    with pytest.raises(RuntimeError, match="simulated failure"):
        explain(lab, image, options)
    assert seen and seen[0] > 0, "the failure must happen while hooks are registered"
    assert _model_state(lab) == clean
    assert not any(lm.lock.locked() for lm in lab.models.values())

    monkeypatch.setattr(analysis, "compute_cam", real)
    after = explain(lab, image, options)
    for key in before.models:
        a, b = before.models[key], after.models[key]
        assert [p.index for p in a.top5] == [p.index for p in b.top5]
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.cam, b.cam, rtol=0, atol=1e-5)
    assert _model_state(lab) == clean


# ---------------------------------------------------------------------------------------------
# The running app

QUEUE_SIZE, CONCURRENCY = 2, 2
MAX_FILE_SIZE = "1mb"


# An analysis with its probe is ~70 forwarded images: ~3.5 s of sleep (~9.5 s a request here with
# the narrow models' own work), so both slots are still busy while the queue fills and a cancel
# lands mid-probe, without the CPU full-size models would take.
SECONDS_PER_IMAGE = 0.05


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, narrow_checkpoints: dict[str, Path]) -> Iterator[dict[str, object]]:
    """app.py with generated checkpoints, a small queue and upload limit, and /debug_stats (the
    narrow architectures, sleeping per image: tests/narrow_models.py)."""
    from narrow_models import APP, SECONDS_PER_IMAGE_ENV

    folder = tmp_path_factory.mktemp("hardening-app")
    proc, url = lt.start_app(  # type: ignore[attr-defined]
        ["--resnet50", str(narrow_checkpoints["resnet50"]), "--sanet50", str(narrow_checkpoints["sanet50"]),
         "--weights-dir", str(folder / "no-weights"), "--queue-size", str(QUEUE_SIZE),
         "--concurrency", str(CONCURRENCY), "--max-file-size", MAX_FILE_SIZE],
        log_path=folder / "app.log", script=APP,
        env={"GRADIO_TEMP_DIR": str(folder / "gradio"), SECONDS_PER_IMAGE_ENV: str(SECONDS_PER_IMAGE)})
    try:
        yield {"url": url, "proc": proc, "log": folder / "app.log", "start": lt.debug_stats(url)}  # type: ignore
    finally:
        lt.stop_app(proc)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for case in ODD + BAD:
        (folder / case.name).write_bytes(case.data)
    return folder


def _app_error(fn: Callable[[], object]) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        fn()
    return str(err.value)


@pytest.mark.slow
def test_api_refuses_each_non_picture_with_its_name_and_no_traceback(app: dict[str, object],
                                                                        corpus_dir: Path) -> None:
    from gradio_client import Client, handle_file

    client = Client(str(app["url"]), verbose=False)
    for case in BAD:
        start = time.perf_counter()
        message = _app_error(lambda: client.predict(handle_file(str(corpus_dir / case.name)), api_name="/analyze"))
        assert time.perf_counter() - start < 20
        assert case.name in message, message
        assert re.search(case.reason, message, re.IGNORECASE), message
        assert "Traceback" not in message and "preprocess" not in message.lower(), message
    log = Path(str(app["log"])).read_text(errors="replace")
    assert "UnidentifiedImageError" not in log and "ComponentProcessingError" not in log
    assert lt.model_state(lt.debug_stats(app["url"])) == lt.model_state(app["start"])  # type: ignore


@pytest.mark.slow
def test_api_upload_over_the_size_limit_is_refused(app: dict[str, object], tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    big = tmp_path / "huge-scan.png"
    noise = np.random.default_rng(2).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big, "PNG")
    assert big.stat().st_size > parse_size(MAX_FILE_SIZE)
    client = Client(str(app["url"]), verbose=False)  # the client knows the limit and names the file
    with pytest.raises(ValueError, match=r"huge-scan\.png exceeds the maximum file size"):
        client.predict(handle_file(str(big)), api_name="/analyze")
    # Sent anyway, straight to the upload route: refused while it arrives, nothing stored.
    boundary = "----limit"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge-scan.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{app['url']}gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 413 and b"maximum allowed size" in err.value.read()
    gradio_temp = Path(str(app["log"])).parent / "gradio"
    assert not [p for p in gradio_temp.rglob("huge-scan.png")], "a refused upload must not be stored"


@pytest.mark.slow
def test_correlation_gallery_takes_odd_pictures_and_names_the_rest(app: dict[str, object],
                                                                   corpus_dir: Path) -> None:
    from gradio_client import Client, handle_file

    odd = [c for c in ODD if c.name != "one-pixel.png"][:14]
    bad = [BAD[1], BAD[3], BAD[15]]  # text, SVG, a bomb
    files = [handle_file(str(corpus_dir / c.name)) for c in odd + bad]
    labels = "\n".join("ab"[i % 2] for i in range(len(files)))
    client = Client(str(app["url"]), verbose=False)
    _, _, table, note, _numbers = client.predict(files, labels, api_name="/correlate")
    names = [row[0] for row in table["data"]]
    assert sorted(names) == sorted(c.name for c in odd), names
    for case in bad:
        assert case.name in note and re.search(case.reason, note, re.IGNORECASE), note
    # Only non-pictures: a message, not a traceback.
    message = _app_error(lambda: client.predict([handle_file(str(corpus_dir / c.name)) for c in bad], "",
                                                api_name="/correlate"))
    assert all(c.name in message for c in bad), message


@pytest.fixture(scope="module")
def load_images(corpus_dir: Path) -> list[Path]:
    """A photo and an odd picture (16-bit greyscale PNG with no extension) for the load test."""
    odd = corpus_dir / "grey16-no-extension"
    odd.write_bytes(next(c.data for c in ODD if c.name == "grey16.png"))
    return [EXAMPLES / "chelsea.jpg", odd]


@pytest.fixture(scope="module")
def references(app: dict[str, object], load_images: list[Path]) -> dict[str, dict[str, object]]:
    refs, _ = lt.single(str(app["url"]), load_images)  # type: ignore[attr-defined]
    return refs


@pytest.mark.slow
def test_load_short_variant(app: dict[str, object], load_images: list[Path],
                            references: dict[str, dict[str, object]]) -> None:
    """Both slots busy, the queue full, one more refused; every result equals its single result."""
    url = str(app["url"])
    check = lt.queue_limit(url, load_images, concurrency=CONCURRENCY, queue_size=QUEUE_SIZE,  # type: ignore
                           overflow=1, references=references, timeout=400)
    assert check.passed, json.dumps(check.details, indent=1)[:3000]
    assert check.details["completed"] == CONCURRENCY + QUEUE_SIZE
    stats = lt.wait_idle(url)  # type: ignore[attr-defined]
    assert lt.model_state(stats) == lt.model_state(app["start"]), stats  # type: ignore[attr-defined]
    assert all(m["hooks"] == 0 and m["grads"] == 0 for m in stats["models"].values()), stats


@pytest.mark.slow
def test_cancelled_request_leaves_models_clean(app: dict[str, object], load_images: list[Path],
                                               references: dict[str, dict[str, object]]) -> None:
    from gradio_client import Client, handle_file

    url = str(app["url"])
    client = Client(url, verbose=False)
    job = client.submit(handle_file(str(load_images[0])), api_name="/analyze")
    deadline = time.monotonic() + 180
    while not job.outputs() and time.monotonic() < deadline:  # the heatmaps arrived: probes are running
        time.sleep(0.2)
    assert job.outputs() and not job.done(), "the first partial result never arrived"
    lt._cancel(job)  # type: ignore[attr-defined]
    stats = lt.wait_idle(url)  # type: ignore[attr-defined]
    assert lt.model_state(stats) == lt.model_state(app["start"]), stats  # type: ignore[attr-defined]
    again = lt.fingerprint(lt.analyze(url, load_images[0]))  # type: ignore[attr-defined]
    assert lt.differences(references[str(load_images[0])], again) == []  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_shows_our_message_for_a_bad_upload(app: dict[str, object], corpus_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(str(app["url"]))
            page.wait_for_selector("#analyse-button", timeout=60_000)
            page.set_input_files("#image-input input[type=file]", str(corpus_dir / "notes.png"))
            page.wait_for_timeout(1500)
            page.click("#analyse-button")
            toast = page.locator(".toast-body", has_text="notes.png")
            toast.first.wait_for(timeout=30_000)
            text = toast.first.inner_text()
            assert re.search("not a picture", text, re.IGNORECASE) and "Traceback" not in text, text

            # The gallery takes a picture without an extension and names what it skips.
            page.get_by_role("tab", name="Class correlation").click()
            page.set_input_files("#correlation-files input[type=file]",
                                 [str(corpus_dir / n) for n in ("photo", "grey16.png", "notes.png")])
            page.get_by_label("Labels (optional", exact=False).fill("a\nb\nc")
            page.wait_for_timeout(1500)
            page.click("#correlate-button")
            page.wait_for_selector("#correlation-matrices img", timeout=120_000)
            body = page.inner_text("body")
            assert "Skipped" in body and "notes.png" in body
        finally:
            browser.close()
