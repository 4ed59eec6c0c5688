"""Fuzzing the decoding path: whatever bytes arrive, only ImageDecodeError may come out.

CI runs a bounded, derandomised number of examples (about 10 s on 2 cores). For a longer hunt:
``SANET_VIZ_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_decode_fuzz.py`` (random
seeds then; a failure prints the example and a ``@reproduce_failure`` line).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sanet_viz.preprocessing import SUPPORTED_FORMATS, DecodeLimits, ImageDecodeError, load_and_prepare

# Mutated headers make PIL warn (bad TIFF tags, declared sizes near its bomb limit): expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
EXAMPLES = int(os.environ.get("SANET_VIZ_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 300, deadline=None, derandomize=EXAMPLES is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Small limits keep each example cheap; the pixel limit is still far above every seed.
LIMITS = DecodeLimits(max_pixels=2_000_000, max_bytes=1 << 20)
NAME = "fuzzed-upload.bin"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Thousands of 224x224 tensors: one thread is fastest, and immune to a machine's other load
    (with two OpenMP threads on two busy cores each tiny op waits for the other thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seed(fmt: str, mode: str = "RGB", size: tuple[int, int] = (23, 17), **options: object) -> bytes:
    rng = np.random.default_rng(len(fmt) * 31 + len(mode))
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1, "CMYK": 4}.get(mode)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.normal(size=size[::-1]).astype(np.float32), "F")
    else:
        shape = size[::-1] + ((channels,) if channels and channels > 1 else ())
        image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode if mode != "P" else "L")
        if mode == "P":
            image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("P", (9, 7), i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def _seeds() -> list[bytes]:
    seeds = [
        _seed("PNG"), _seed("PNG", "RGBA"), _seed("PNG", "I;16"), _seed("PNG", "P", transparency=0),
        _seed("JPEG", quality=80), _seed("JPEG", "CMYK"), _seed("JPEG", progressive=True),
        _seed("GIF", "P"), _animated_gif(), _seed("BMP"), _seed("TIFF", "F"),
        _seed("TIFF", compression="tiff_lzw"), _seed("PPM"), _seed("WEBP", quality=70),
    ]
    if "AVIF" in SUPPORTED_FORMATS:
        seeds.append(_seed("AVIF", quality=50))
    return seeds


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real picture with a few byte-level mutations: flips, overwrites, inserts, cuts, splices."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "splice", "int"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos:pos + len(chunk)] = chunk
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "splice":
            other = draw(st.sampled_from(SEEDS))
            data[pos:] = other[draw(st.integers(0, len(other) - 1)):]
        elif kind == "int" and len(data) >= 4:  # a plausible header field set to an extreme value
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            fmt = draw(st.sampled_from([">I", "<I", ">H", "<H"]))
            size = struct.calcsize(fmt)
            pos = min(pos, len(data) - size)
            data[pos:pos + size] = struct.pack(fmt, value & (0xFFFF if "H" in fmt else 0xFFFFFFFF))
    return bytes(data)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


@st.composite
def png_headers(draw: st.DrawFn) -> bytes:
    """Well-formed PNG chunks around arbitrary header values and pixel data."""
    width = draw(st.integers(0, 1 << 31))
    height = draw(st.integers(0, 1 << 31))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3, 0]))
    colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, draw(st.sampled_from([0, 1])))
    raw = draw(st.binary(max_size=512))
    idat = zlib.compress(raw) if draw(st.booleans()) else raw
    extra = []
    if draw(st.booleans()):
        extra.append(_chunk(b"PLTE", draw(st.binary(max_size=96))))
    if draw(st.booleans()):
        extra.append(_chunk(b"tRNS", draw(st.binary(max_size=32))))
    if draw(st.booleans()):
        extra.append(_chunk(b"eXIf", draw(st.binary(max_size=64))))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(extra) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _check(data: bytes) -> None:
    try:
        prepared = load_and_prepare(data, limits=LIMITS, name=NAME)
    except ImageDecodeError as exc:
        assert str(exc).startswith(f"{NAME}: "), f"message does not name the file: {exc}"
        assert "Traceback" not in str(exc)
        return
    width, height = prepared.original_size
    assert 1 <= width * height <= LIMITS.max_pixels
    assert tuple(prepared.tensor.shape) == (1, 3, 224, 224)
    assert bool(prepared.tensor.isfinite().all())
    assert prepared.display.dtype == np.uint8 and prepared.display.shape == (224, 224, 3)


def test_seeds_decode() -> None:
    """The seeds are real pictures: the fuzzing starts from inputs that get deep into the decoders."""
    for data in SEEDS:
        load_and_prepare(data, limits=LIMITS, name=NAME)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.sampled_from(SEEDS).flatmap(lambda seed: st.tuples(st.just(seed[:16]), st.binary(max_size=2048))))
def test_real_headers_random_bodies(parts: tuple[bytes, bytes]) -> None:
    _check(parts[0] + parts[1])


@FUZZ
@given(mutated())
def test_mutated_pictures(data: bytes) -> None:
    _check(data)


@FUZZ
@given(png_headers())
def test_png_header_fields(data: bytes) -> None:
    _check(data)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.99])
def test_every_seed_truncated(cut: float) -> None:
    for data in SEEDS:
        _check(data[: int(len(data) * cut)])


@pytest.mark.parametrize("value", [0x00, 0xFF, None])
def test_header_byte_sweep(value: int | None) -> None:
    """Every byte of every seed's first 128 set to 0x00, 0xFF or inverted: exhaustive, deterministic."""
    for seed in SEEDS:
        for pos in range(min(len(seed), 128)):
            data = bytearray(seed)
            data[pos] = data[pos] ^ 0xFF if value is None else value
            _check(bytes(data))
