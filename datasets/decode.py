"""Decoding one image file with bounded memory and no stray native output (issue 28).

- The pixel cap: Pillow reads only the header (`Image.open` is lazy), and an image of more than
  MAX_IMAGE_PIXELS pixels is refused before cv2 decodes any of it. An all-zero 20000x20000 PNG
  is 389 KB on disk and 1.2 GB decoded. The cap is Pillow's own decompression-bomb limit
  (python-pillow/Pillow src/PIL/Image.py: `MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)`,
  a 24-bit image of 256 MiB); at the cap, decoding (BGR, then RGB) takes about 0.5 GB.
  Bytes whose size Pillow cannot read are refused too: nothing would bound their decode.
  (Pillow comes with diffusers, which lists it in its install_requires.)
- cv2 decodes, as before: the same decoder, so pixels and dataset versions are unchanged.
- libpng and OpenCV write their own lines to the process's stderr (fd 2), e.g. "libpng error:
  PNG input buffer is incomplete". Fd 2 is captured while cv2 decodes: a failed decode puts that
  text into its one-line error, and a decode that worked passes it on to stderr unchanged.
  Another thread's stderr written in that instant is passed on too, after the decode.
"""
from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import warnings
from typing import Callable

import cv2
import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 89_478_485  # = Pillow's default Image.MAX_IMAGE_PIXELS (see above)
UNDECODABLE = "cannot be decoded; fix or remove it"


class DecodeError(ValueError):
    """Why an image's bytes cannot be used, as the tail of a one-line error ("is ...; fix")."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; DecodeError over MAX_IMAGE_PIXELS or when unreadable."""
    try:
        with warnings.catch_warnings():  # DecompressionBombWarning: the cap below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: "Image size (N pixels) exceeds ..."
        count = re.search(r"\((\d+) pixels\)", str(e))
        raise DecodeError(f"is {f'{int(count[1]):,} pixels, ' if count else ''}over the decode cap of {MAX_IMAGE_PIXELS:,} "
                          "(Pillow's decompression-bomb limit); downscale it or remove its entry") from None
    except Exception:  # noqa: BLE001 - Pillow raises several kinds for bytes it cannot identify
        raise DecodeError(UNDECODABLE) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise DecodeError(f"is {width}x{height} = {width * height:,} pixels, over the decode cap of "
                          f"{MAX_IMAGE_PIXELS:,} (Pillow's decompression-bomb limit); downscale it or remove its entry")
    return width, height


def decode_rgb(data: bytes) -> np.ndarray:
    """An image file's bytes -> HxWx3 uint8 RGB, within the pixel cap; DecodeError otherwise."""
    if not data:
        raise DecodeError(UNDECODABLE)
    image_size(data)
    image, native = _capturing_stderr(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    if image is None:
        said = [line.strip() for line in native.decode("utf-8", "replace").splitlines() if line.strip()]
        raise DecodeError(f"cannot be decoded ({said[-1][:200]}); fix or remove it" if said else UNDECODABLE)
    if native:
        os.write(2, native)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _capturing_stderr(call: Callable[[], object]) -> tuple[object, bytes]:
    """``call()`` with fd 2 sent to a temp file; returns its result and what was written there."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to capture
        return call(), b""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            result = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        return result, sink.read()
