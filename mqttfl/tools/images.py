"""Reading image files for ``mqttfl data`` without an image library: PNG and binary PGM/PPM in numpy + zlib.

PNG (8 or 16 bits per sample; gray, gray + alpha, RGB, RGBA and 8-bit palette; not interlaced) and the binary
netpbm formats cover what data sets and ``convert``/``ffmpeg`` exports use, and need nothing beyond the standard
library. Anything else (JPEG above all) is read with Pillow when it is installed (``pip install pillow``);
without it such a file is refused with that hint. Devices never read images: the data tool turns a folder into
shards once, on any machine.

Every reader returns an (H, W, C) array scaled to [0, 1] as float32, C = 1 (gray) or 3 (colour, alpha dropped).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

BUILTIN = (".png", ".pgm", ".ppm", ".pnm")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


class ImageError(ValueError):
    """A file that is not an image we can read; the message names the file."""


def read_image(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    data = path.read_bytes()
    try:
        if suffix == ".png" or data.startswith(PNG_SIGNATURE):
            return _finish(*_png(data))
        if suffix in (".pgm", ".ppm", ".pnm") or data[:2] in (b"P5", b"P6"):
            return _finish(*_netpbm(data))
    except (ValueError, IndexError, zlib.error, struct.error) as e:
        raise ImageError(f"{path}: {e}") from None
    return _pillow(path)


def _finish(arr: np.ndarray, maxval: int) -> np.ndarray:
    """(H, W, C) float32 in [0, 1]; alpha dropped."""
    if arr.shape[2] in (2, 4):
        arr = arr[:, :, :-1]
    return (arr.astype(np.float32) / maxval).astype(np.float32)


def _pillow(path: Path) -> np.ndarray:
    try:
        from PIL import Image  # optional: only for formats the built-in readers do not cover
    except ImportError:
        raise ImageError(f"{path}: only PNG and PGM/PPM are read without Pillow; install it (pip install pillow) "
                         "for other formats such as JPEG") from None
    try:
        with Image.open(path) as im:
            im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            arr = np.asarray(im)
    except OSError as e:
        raise ImageError(f"{path}: {e}") from None
    return _finish(arr.reshape(arr.shape[0], arr.shape[1], -1), 255)


def _netpbm(data: bytes) -> tuple[np.ndarray, int]:
    magic = data[:2]
    if magic not in (b"P5", b"P6"):
        raise ValueError("only binary PGM (P5) and PPM (P6) are supported")
    fields: list[int] = []
    pos = 2
    while len(fields) < 3:
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end : end + 1].isspace():
            end += 1
        fields.append(int(data[pos:end]))
        pos = end
    width, height, maxval = fields
    pos += 1  # the single whitespace after maxval
    channels = 1 if magic == b"P5" else 3
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
    count = width * height * channels
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
    return arr.reshape(height, width, channels), maxval


def _png(data: bytes) -> tuple[np.ndarray, int]:
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    pos, idat, palette = 8, bytearray(), None
    width = height = depth = ctype = interlace = -1
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"PLTE":
            palette = np.frombuffer(chunk, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    if ctype not in _CHANNELS or depth not in (8, 16) or (ctype == 3 and depth != 8):
        raise ValueError(f"PNG colour type {ctype} at {depth} bits is not supported (8 or 16 bits; palette 8 bits)")
    if interlace:
        raise ValueError("interlaced PNG is not supported (install Pillow to read it)")
    samples = _CHANNELS[ctype]
    bpp = samples * depth // 8  # bytes per pixel, the filters' unit
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(bytes(idat)), np.uint8)
    if raw.size != height * (stride + 1):
        raise ValueError("PNG image data has the wrong size")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        out[y] = prev = _unfilter(int(rows[y, 0]), rows[y, 1:], prev, bpp)
    if depth == 16:
        arr = out.view(">u2").reshape(height, width, samples)
        return arr, 65535
    arr = out.reshape(height, width, samples)
    if ctype == 3:
        if palette is None:
            raise ValueError("palette PNG without a PLTE chunk")
        return palette[arr[:, :, 0]], 255
    return arr, 255


def _unfilter(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """Undo one scanline's PNG filter (RFC 2083, 6): None, Sub, Up, Average, Paeth."""
    if kind == 0:
        return line.copy()
    if kind == 2:
        return (line + prev).astype(np.uint8)
    if kind == 1:
        # Sub: each byte adds the reconstructed byte one pixel to the left: a running sum per byte lane.
        return (line.astype(np.int64).reshape(-1, bpp).cumsum(axis=0).reshape(-1) % 256).astype(np.uint8)
    if kind not in (3, 4):
        raise ValueError(f"unknown PNG filter {kind}")
    # Average and Paeth depend on the byte just reconstructed: a loop, on Python ints (numpy scalars are slower).
    cur, up = line.tolist(), prev.tolist()
    out = [0] * len(cur)
    for i, c in enumerate(cur):
        left = out[i - bpp] if i >= bpp else 0
        if kind == 3:
            out[i] = (c + ((left + up[i]) >> 1)) & 255
            continue
        upleft = up[i - bpp] if i >= bpp else 0
        p = left + up[i] - upleft
        pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upleft)
        out[i] = (c + (left if pa <= pb and pa <= pc else up[i] if pb <= pc else upleft)) & 255
    return np.array(out, np.uint8)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Gray or colour as asked: gray is repeated to three channels, colour becomes luminance (ITU-R 601)."""
    if img.shape[2] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=2)
    return (img @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None].astype(np.float32)
