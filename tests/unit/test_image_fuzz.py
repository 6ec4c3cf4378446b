"""Fuzzing the one image decoder every client byte goes through (bmcell.images).

Whatever the bytes (mutated PNG, JPEG and TIFF seeds: bit flips, truncation, chunk
splicing; crafted multi-page, 16-bit, tiled, CMYK TIFFs; huge IFD counts and
dimensions), :func:`bmcell.images.decode_rgb` answers either a bmcell
``InvalidArgument`` or an 8-bit RGB image within the pixel cap.

Time and memory are bounded by bounding the work, not by timing it: the hypothesis
runs execute under an address-space limit (``RLIMIT_AS``) a little above what the
process already holds, so a decode that allocated beyond the caps would fail with
MemoryError (which the decoder never turns into InvalidArgument); the crafted bombs
run in a child process under ``RLIMIT_AS`` and ``RLIMIT_CPU``, where a decode
that inflated a 10^10-pixel header or walked a million IFDs would be killed.
"""

from __future__ import annotations

import io
import resource
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bmcell import images
from bmcell.errors import InvalidArgument

# Pillow warns on many broken files it still parses; those are expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
LIMITS = images.Limits(max_bytes=1 << 20, max_pixels=250_000, max_frames=1)
HEADROOM = 512 << 20  # address space the decoder may take beyond what the process holds


# --- seeds ---------------------------------------------------------------------------


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _field(w: int = 40, h: int = 30) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _seeds() -> dict[str, bytes]:
    rgb = _field()
    grey16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    return {
        "png": _saved(rgb, "PNG"),
        "png-palette": _saved(rgb.convert("P"), "PNG"),
        "png-la": _saved(rgb.convert("LA"), "PNG"),
        "png-16": _saved(grey16, "PNG"),
        "jpeg": _saved(rgb, "JPEG", quality=80),
        "jpeg-progressive": _saved(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": _saved(rgb.convert("CMYK"), "JPEG"),
        "tiff": _saved(rgb, "TIFF"),
        "tiff-lzw": _saved(rgb, "TIFF", compression="tiff_lzw"),
        "tiff-deflate": _saved(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-cmyk": _saved(rgb.convert("CMYK"), "TIFF"),
        "tiff-16": _saved(grey16, "TIFF"),
        "tiff-tiled": tiled_tiff(32, 32, tile=16),
        "tiff-pages": _saved(rgb, "TIFF", save_all=True, append_images=[rgb, rgb]),
    }


# --- crafted TIFFs -------------------------------------------------------------------

_SHORT, _LONG = 3, 4


def _ifd(entries: list[tuple[int, int, list[int]]], next_offset: int, at: int) -> bytes:
    """One little-endian IFD placed at ``at``; values longer than 4 bytes follow it."""
    entries = sorted(entries)
    size = 2 + 12 * len(entries) + 4
    body, extra = [struct.pack("<H", len(entries))], b""
    for tag, typ, values in entries:
        fmt = "<H" if typ == _SHORT else "<I"
        packed = b"".join(struct.pack(fmt, v) for v in values)
        if len(packed) <= 4:
            body.append(struct.pack("<HHI", tag, typ, len(values)) + packed.ljust(4, b"\0"))
        else:
            body.append(struct.pack("<HHII", tag, typ, len(values), at + size + len(extra)))
            extra += packed
    body.append(struct.pack("<I", next_offset))
    return b"".join(body) + extra


def crafted_tiff(width: int, height: int, pixels: bytes, *, tags=(), pages: int = 1) -> bytes:
    """An uncompressed 8-bit RGB TIFF whose header says ``width`` x ``height``; ``pages``
    IFDs chained one after another, all pointing at the same strip."""
    out = bytearray(b"II*\0" + struct.pack("<I", 0))
    strip = len(out)
    out += pixels
    base = [
        (256, _LONG, [width]),
        (257, _LONG, [height]),
        (258, _SHORT, [8, 8, 8]),
        (259, _SHORT, [1]),
        (262, _SHORT, [2]),
        (273, _LONG, [strip]),
        (277, _SHORT, [3]),
        (278, _LONG, [height]),
        (279, _LONG, [len(pixels)]),
        *tags,
    ]
    first = len(out)
    struct.pack_into("<I", out, 4, first)
    one = len(_ifd(base, 0, 0))
    for page in range(pages):
        at = len(out)
        assert at == first + page * one
        out += _ifd(base, at + one if page + 1 < pages else 0, at)
    return bytes(out)


def tiled_tiff(width: int, height: int, *, tile: int) -> bytes:
    rgb = np.asarray(_field(width, height))
    tiles = [
        rgb[y : y + tile, x : x + tile].tobytes()
        for y in range(0, height, tile)
        for x in range(0, width, tile)
    ]
    out = bytearray(b"II*\0" + struct.pack("<I", 0))
    offsets = []
    for t in tiles:
        offsets.append(len(out))
        out += t
    entries = [
        (256, _LONG, [width]),
        (257, _LONG, [height]),
        (258, _SHORT, [8, 8, 8]),
        (259, _SHORT, [1]),
        (262, _SHORT, [2]),
        (277, _SHORT, [3]),
        (322, _LONG, [tile]),
        (323, _LONG, [tile]),
        (324, _LONG, offsets),
        (325, _LONG, [len(t) for t in tiles]),
    ]
    at = len(out)
    struct.pack_into("<I", out, 4, at)
    return bytes(out + _ifd(entries, 0, at))


SEEDS = _seeds()


# --- the property --------------------------------------------------------------------


@contextmanager
def address_space_limit(headroom: int = HEADROOM) -> Iterator[None]:
    """Cap this process's address space at what it maps now plus ``headroom``."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + headroom if hard == resource.RLIM_INFINITY else min(hard, vm + headroom)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check(data: bytes, limits: images.Limits = LIMITS) -> str:
    """The property: a clear refusal or a valid RGB image. Returns which, for the tests."""
    try:
        out = images.decode_rgb(data, limits)
    except InvalidArgument as exc:
        assert exc.field == "image" and exc.message
        return "refused"
    assert out.rgb.dtype == np.uint8 and out.rgb.ndim == 3 and out.rgb.shape[2] == 3
    assert out.width * out.height <= limits.max_pixels
    assert out.format in ("PNG", "JPEG", "TIFF")
    return "decoded"


seed_names = st.sampled_from(sorted(SEEDS))


@st.composite
def bit_flips(draw) -> bytes:
    data = bytearray(SEEDS[draw(seed_names)])
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@st.composite
def byte_rewrites(draw) -> bytes:
    """Header fields overwritten with extreme values: sizes, counts, offsets."""
    data = bytearray(SEEDS[draw(seed_names)])
    i = draw(st.integers(0, min(len(data), 400) - 4))
    value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
    width = draw(st.sampled_from([2, 4]))
    order = draw(st.sampled_from(["<", ">"]))
    data[i : i + width] = struct.pack(
        order + ("H" if width == 2 else "I"), value & (0xFFFF if width == 2 else 0xFFFFFFFF)
    )
    return bytes(data)


@st.composite
def truncations(draw) -> bytes:
    data = SEEDS[draw(seed_names)]
    return data[: draw(st.integers(0, len(data) - 1))]


@st.composite
def splices(draw) -> bytes:
    """The start of one file with the end of another (or of itself, shifted)."""
    a, b = SEEDS[draw(seed_names)], SEEDS[draw(seed_names)]
    return a[: draw(st.integers(8, len(a)))] + b[draw(st.integers(0, len(b) - 1)) :]


@st.composite
def insertions(draw) -> bytes:
    data = SEEDS[draw(seed_names)]
    i = draw(st.integers(8, len(data)))
    return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:]


mutations = st.one_of(bit_flips(), byte_rewrites(), truncations(), splices(), insertions())
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(mutations)
def test_mutated_images_are_refused_clearly_or_decoded_within_the_caps(data: bytes) -> None:
    with address_space_limit():
        check(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_decodes_or_is_refused_for_its_frames(name: str) -> None:
    # The seeds themselves are valid: each decodes, except the multi-page one, whose
    # refusal names the frame limit and its setting.
    if name == "tiff-pages":
        with pytest.raises(InvalidArgument, match=r"more than 1 frame.*BMCELL_MAX_IMAGE_FRAMES"):
            images.decode_rgb(SEEDS[name], LIMITS)
        three = images.Limits(LIMITS.max_bytes, LIMITS.max_pixels, max_frames=3)
        assert images.decode_rgb(SEEDS[name], three).rgb.shape == (30, 40, 3)
        return
    assert check(SEEDS[name]) == "decoded"


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    grey = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    for fmt in ("PNG", "TIFF"):
        out = images.decode_rgb(_saved(Image.fromarray(grey), fmt), LIMITS).rgb
        assert out[0, :, 0].tolist() == [0, 100, 255], fmt
        assert (out[..., 0] == out[..., 2]).all()


def test_cmyk_and_tiles_decode_to_the_right_pixels() -> None:
    rgb = np.asarray(_field(32, 32))
    tiled = images.decode_rgb(SEEDS["tiff-tiled"], LIMITS).rgb
    assert np.array_equal(tiled, rgb)
    cmyk = images.decode_rgb(SEEDS["tiff-cmyk"], LIMITS).rgb
    expected = np.asarray(_field().convert("CMYK").convert("RGB"))
    assert np.array_equal(cmyk, expected)


def test_unsupported_modes_and_formats_are_named() -> None:
    floats = _saved(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF")
    with pytest.raises(InvalidArgument, match="pixel mode F is not supported"):
        images.decode_rgb(floats, LIMITS)
    with pytest.raises(InvalidArgument, match="only PNG, JPEG and TIFF"):
        images.decode_rgb(_saved(_field(), "GIF"), LIMITS)
    with pytest.raises(
        InvalidArgument, match=r"1048584 bytes, the limit is 1048576 \(BMCELL_MAX_IMAGE_BYTES\)"
    ):
        images.decode_rgb(b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20), LIMITS)


# --- crafted bombs, in a child under hard limits -------------------------------------

_CHILD = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
    from tests.unit import test_image_fuzz as t
    crafted = list(t.bombs())
    # Import costs paid, cap what decoding may add: a 10^10-pixel decode needs 30 GB.
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
    from bmcell.errors import InvalidArgument
    from bmcell import images
    for name, data in crafted:
        try:
            images.decode_rgb(data, t.LIMITS)
        except InvalidArgument as exc:
            print(name, "refused:", exc.message)
        else:
            print(name, "DECODED")
    """
)


def bombs() -> Iterator[tuple[str, bytes]]:
    """Headers that promise far more than the bytes hold, or more than anyone may ask."""
    rgb = np.asarray(_field(8, 8)).tobytes()
    yield "tiff-100000x100000", crafted_tiff(100_000, 100_000, rgb)
    yield "tiff-1x4000000000", crafted_tiff(1, 4_000_000_000, rgb)
    yield "tiff-8000-pages", crafted_tiff(8, 8, rgb, pages=8000)  # just under 1 MiB
    yield "tiff-loop", _looping_tiff(rgb)
    yield "png-100000x100000", _png(100_000, 100_000, b"")
    yield "png-zip-bomb", _png(12_000, 12_000, bytes(12_001) * 12_000)  # 144 MB in ~140 KB
    jpeg = bytearray(SEEDS["jpeg"])
    sof = jpeg.index(b"\xff\xc0")
    struct.pack_into(">HH", jpeg, sof + 5, 65_000, 65_000)
    yield "jpeg-65000x65000", bytes(jpeg)


def _png(width: int, height: int, raw: bytes) -> bytes:
    """A greyscale PNG of ``raw`` scanlines (filter byte + pixels), compressed hard."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _looping_tiff(pixels: bytes) -> bytes:
    """Two IFDs, the second pointing back at the first."""
    one = crafted_tiff(8, 8, pixels, pages=2)
    first = struct.unpack_from("<I", one, 4)[0]
    entries = struct.unpack_from("<H", one, first)[0]
    second = first + 2 + 12 * entries + 4 + 6  # the first IFD plus its out-of-line 3 shorts
    out = bytearray(one)
    next_of_second = second + 2 + 12 * entries
    struct.pack_into("<I", out, next_of_second, first)
    return bytes(out)


def test_bombs_are_refused_before_they_inflate_under_hard_limits() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert set(lines) == {name for name, _ in bombs()}, proc.stdout
    for name in (
        "tiff-100000x100000",
        "tiff-1x4000000000",
        "png-100000x100000",
        "png-zip-bomb",
        "jpeg-65000x65000",
    ):
        assert "beyond the limit of 250000 pixels (BMCELL_MAX_IMAGE_PIXELS)" in lines[name], (
            name,
            lines[name],
        )
    assert "BMCELL_MAX_IMAGE_FRAMES" in lines["tiff-8000-pages"]
    # A loop of IFDs is two frames, not an endless walk.
    assert "BMCELL_MAX_IMAGE_FRAMES" in lines["tiff-loop"]
