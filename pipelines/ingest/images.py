"""Image checks and resizing for download: dimensions from the header first, then img2dataset's resize.

The resize is img2dataset's Resizer (same OpenCV decode, albumentations transforms and JPEG
encode, so the bytes match) without its per-image dup2 of /dev/null over fds 1 and 2: that swap
is process-wide, so two threads resizing at once restore each other's saved fds and can leave the
process writing to /dev/null for good. Without it, resizing needs no lock and runs in every download
thread (OpenCV releases the GIL), and libjpeg's rare warnings reach stderr instead.

Decode cost is bounded before decoding, from the header: pixels (`max_image_pixels`), decoded
bytes = pixels x channels x bytes per sample (`max_decode_bytes`), and for JPEG the number of
scans (`max_jpeg_scans`: a progressive JPEG is decoded once per scan, so 5,000 cheap scans cost
minutes of CPU in one C call that no timeout can stop). Images of more than 8 bits per sample are
decoded straight to 8 bits (PIL) and the alpha matting is integer arithmetic, so no 16-bit or
float64 copy of a large image is ever made.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.ingest.fetch import Refused

# PIL warns (and at 2x raises) on big images at open; we judge the size ourselves, below its limit.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# The next marker after entropy-coded data: 0xFF not followed by a stuffed 0x00, RSTn or fill 0xFF.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass(frozen=True)
class HeaderInfo:
    """What the header says decoding will cost."""

    width: int
    height: int
    channels: int  # as decoded (palette with transparency: 4)
    bytes_per_sample: int  # 2 for 16-bit PNG/TIFF
    scans: int  # JPEG scans (SOS markers); 1 for other formats

    @property
    def decoded_bytes(self) -> int:
        return self.width * self.height * self.channels * self.bytes_per_sample


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header without decoding pixels (PIL's open is lazy)."""
    info = inspect_header(data, max_scans=1 << 30)
    return info.width, info.height


def inspect_header(data: bytes, max_scans: int) -> HeaderInfo:
    """Size, channels, sample size and JPEG scan count, without decoding pixels; raises Refused."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            bands, mode = im.getbands(), im.mode
            alpha = "A" in bands or "transparency" in im.info
            grey = mode in ("1", "L", "I", "F") or mode.startswith("I;")
            rawmode = str(im.tile[0][3]) if im.tile else ""
            wide = ";16" in rawmode or mode.startswith("I;16") or mode in ("I", "F")
            scans = jpeg_scans(data, max_scans) if im.format == "JPEG" else 1
            return HeaderInfo(im.size[0], im.size[1], 4 if alpha else (1 if grey else 3),
                              (4 if mode in ("I", "F") else 2) if wide else 1, scans)
    except Image.DecompressionBombError as e:  # over 2x PIL's own cap: too big whatever ours is
        raise Refused("too_many_pixels", f"too_many_pixels: {e}") from e
    except Image.UnidentifiedImageError as e:  # its message names a BytesIO address: not stable
        raise Refused("failed_to_resize", "not an image: format not recognised") from e
    except Exception as e:  # noqa: BLE001 - anything PIL cannot parse is not an image to us
        raise Refused("failed_to_resize", f"not an image: {type(e).__name__}: {e}") from e


def jpeg_scans(data: bytes, limit: int) -> int:
    """Scans (SOS segments) in a JPEG, read from its markers; counting stops past `limit`."""
    i, n, scans = 2, len(data), 0
    while i + 4 <= n and data[i] == 0xFF and scans <= limit:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            scans += 1
            nxt = _NEXT_MARKER.search(data, i)
            if nxt is None:
                break
            i = nxt.start()
    return scans


@dataclass(frozen=True)
class ImageResizer:
    """img2dataset's Resizer (jpg output, resize_only_if_bigger=False) with a pixel cap first."""

    image_size: int = 256
    resize_mode: str = "center_crop"
    min_image_size: int = 0
    encode_quality: int = 95
    max_image_pixels: int = 40_000_000
    max_decode_bytes: int = 160_000_000
    max_jpeg_scans: int = 32

    def __call__(self, data: bytes) -> tuple[bytes, int, int, int, int]:
        """(jpeg bytes, width, height, original width, original height) or raises Refused."""
        info = self.check(data)
        return self._resize(data, info)

    def check(self, data: bytes) -> HeaderInfo:
        """The header's account of the decode, refused (a status and a reason) when over a limit."""
        info = inspect_header(data, self.max_jpeg_scans)
        w, h = info.width, info.height
        if w * h > self.max_image_pixels:
            raise Refused("too_many_pixels",
                          f"too_many_pixels: {w}x{h} = {w * h} > {self.max_image_pixels} (header)")
        if info.decoded_bytes > self.max_decode_bytes:
            raise Refused("too_costly", f"too_costly: decodes to {info.decoded_bytes} bytes "
                          f"({w}x{h}x{info.channels}x{info.bytes_per_sample}) > {self.max_decode_bytes}")
        if info.scans > self.max_jpeg_scans:
            raise Refused("too_costly", f"too_costly: JPEG of over {self.max_jpeg_scans} scans "
                          "(each one decodes the whole image again)")
        return info

    def _resize(self, data: bytes, info: HeaderInfo) -> tuple[bytes, int, int, int, int]:
        import albumentations as A
        import cv2

        img = decode_8bit(data) if info.bytes_per_sample > 1 else cv2.imdecode(
            np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None or img.dtype != np.uint8:
            raise Refused("failed_to_resize", "Image decoding error")
        if img.ndim == 3 and img.shape[-1] == 4:  # alpha matting on white, as img2dataset
            img = matte_on_white(img)
        oh, ow = img.shape[:2]
        if oh * ow > self.max_image_pixels:  # a header that lied about the size
            raise Refused("too_many_pixels", f"too_many_pixels: {ow}x{oh} decoded")
        if min(oh, ow) < self.min_image_size:
            raise Refused("failed_to_resize", "image too small")
        mode, size = self.resize_mode, self.image_size
        if mode in ("keep_ratio", "center_crop"):
            interp = cv2.INTER_AREA if min(ow, oh) > size else cv2.INTER_LANCZOS4
            img = A.SmallestMaxSize(max_size=size, interpolation=interp, p=1.0)(image=img)["image"]
            if mode == "center_crop":
                img = A.CenterCrop(height=size, width=size)(image=img)["image"]
        elif mode in ("border", "keep_ratio_largest"):
            interp = cv2.INTER_AREA if max(ow, oh) > size else cv2.INTER_LANCZOS4
            img = A.LongestMaxSize(max_size=size, interpolation=interp, p=1.0)(image=img)["image"]
            if mode == "border":
                img = A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT,
                                    value=[255, 255, 255], p=1.0)(image=img)["image"]
        ok, buf = cv2.imencode(".jpg", img, params=[int(cv2.IMWRITE_JPEG_QUALITY), self.encode_quality])
        if not ok:
            raise Refused("failed_to_resize", "JPEG encoding error")
        h2, w2 = img.shape[:2]
        return buf.tobytes(), w2, h2, ow, oh


def matte_on_white(img: np.ndarray) -> np.ndarray:
    """BGRA -> BGR on white, rounded as img2dataset's float64 formula (no exact halves exist:
    (c*a + 255*(255-a)) / 255 is never k + 1/2), in uint16: 3 bytes a pixel of scratch, not 48."""
    alpha = img[:, :, 3:4].astype(np.uint16)  # (H, W, 1)
    out = img[:, :, :3].astype(np.uint16)  # (H, W, 3); c*a + 255*(255-a) <= 65025 fits
    out *= alpha
    np.subtract(255, alpha, out=alpha)
    alpha *= 255
    out += alpha
    out += 127
    out //= 255
    return out.astype(np.uint8)


def decode_8bit(data: bytes) -> np.ndarray | None:
    """An image of more than 8 bits per sample as 8-bit BGR(A), decoded by PIL at 8 bits."""
    import cv2

    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I", "F") or im.mode.startswith("I;"):
            grey = np.asarray(im, dtype=np.uint32) if im.mode != "F" else None
            return None if grey is None else (grey >> 8).clip(0, 255).astype(np.uint8)
        alpha = "A" in im.getbands() or "transparency" in im.info
        rgb = np.asarray(im.convert("RGBA" if alpha else "RGB"))
    return cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA if alpha else cv2.COLOR_RGB2BGR)
