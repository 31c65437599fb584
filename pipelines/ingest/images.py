"""Image checks and resizing for download: dimensions from the header first, then img2dataset's resize.

The resize is img2dataset's Resizer (same OpenCV decode, albumentations transforms and JPEG
encode, so the bytes match) without its per-image dup2 of /dev/null over fds 1 and 2: that swap
is process-wide, so two threads resizing at once restore each other's saved fds and can leave the
process writing to /dev/null for good. Without it, resizing needs no lock and runs in every download
thread (OpenCV releases the GIL), and libjpeg's rare warnings reach stderr instead.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.ingest.fetch import Refused

# PIL warns (and at 2x raises) on big images at open; we judge the size ourselves, below its limit.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header without decoding pixels (PIL's open is lazy)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as e:  # over 2x PIL's own cap: too big whatever ours is
        raise Refused("too_many_pixels", f"too_many_pixels: {e}") from e
    except Image.UnidentifiedImageError as e:  # its message names a BytesIO address: not stable
        raise Refused("failed_to_resize", "not an image: format not recognised") from e
    except Exception as e:  # noqa: BLE001 - anything PIL cannot parse is not an image to us
        raise Refused("failed_to_resize", f"not an image: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class ImageResizer:
    """img2dataset's Resizer (jpg output, resize_only_if_bigger=False) with a pixel cap first."""

    image_size: int = 256
    resize_mode: str = "center_crop"
    min_image_size: int = 0
    encode_quality: int = 95
    max_image_pixels: int = 40_000_000

    def __call__(self, data: bytes) -> tuple[bytes, int, int, int, int]:
        """(jpeg bytes, width, height, original width, original height) or raises Refused."""
        w, h = header_size(data)
        if w * h > self.max_image_pixels:
            raise Refused("too_many_pixels",
                          f"too_many_pixels: {w}x{h} = {w * h} > {self.max_image_pixels} (header)")
        return self._resize(data)

    def _resize(self, data: bytes) -> tuple[bytes, int, int, int, int]:
        import albumentations as A
        import cv2

        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise Refused("failed_to_resize", "Image decoding error")
        if img.ndim == 3 and img.shape[-1] == 4:  # alpha matting on white, as img2dataset
            alpha = img[:, :, 3, np.newaxis]
            img = np.rint((alpha / 255 * img[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)
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
