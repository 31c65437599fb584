"""Decode cost is bounded before decoding: JPEG scans, decoded bytes; >8-bit images decode at 8 bits."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pipelines.ingest.downloader import DownloadLimits, ShardDownloader
from pipelines.ingest.fetch import FetchLimits, Refused
from pipelines.ingest.images import ImageResizer, jpeg_scans
from pipelines.ingest.netpolicy import NetPolicy
from tests.pipelines.ingest.hostile_server import (
    hostile_servers,
    jpeg,
    png_rgba16,
    progressive_jpeg,
)

pytestmark = pytest.mark.timeout(120)


def test_scan_count_is_read_from_the_markers():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG", progressive=True)
    assert jpeg_scans(buf.getvalue(), 1000) == buf.getvalue().count(b"\xff\xda") > 1
    assert jpeg_scans(jpeg(), 1000) == 1  # baseline
    assert jpeg_scans(progressive_jpeg(256, 256, 3000), 1000) == 1001  # counting stops past the limit


def test_a_progressive_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    data = progressive_jpeg(1024, 1024, 2000)  # ~60 kB; decoding it costs seconds of CPU
    t0 = time.process_time()
    with pytest.raises(Refused) as e:
        ImageResizer(min_image_size=0)(data)
    assert e.value.status == "too_costly" and "scans" in str(e.value)
    assert time.process_time() - t0 < 0.5
    normal = progressive_jpeg(1024, 1024, 12)  # an ordinary progressive JPEG still decodes
    assert ImageResizer(min_image_size=0)(normal)[1:] == (256, 256, 1024, 1024)


def test_decoded_bytes_count_channels_and_bit_depth():
    data = png_rgba16(3000, 3000)  # 9 MP: under the pixel limit, 72 MB as 16-bit RGBA
    with pytest.raises(Refused) as e:
        ImageResizer(min_image_size=0, max_decode_bytes=50_000_000)(data)
    assert e.value.status == "too_costly" and "3000x3000x4x2" in str(e.value)


RSS = """
import resource, sys
from pipelines.ingest.images import ImageResizer
from tests.pipelines.ingest.hostile_server import jpeg, png_rgba16
data = png_rgba16(3000, 3000)
ImageResizer(min_image_size=0)(jpeg())  # warm up cv2 and albumentations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
jpg, *_ = ImageResizer(min_image_size=0)(data)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_a_16_bit_rgba_png_decodes_at_8_bits_in_bounded_memory():
    out = subprocess.run([sys.executable, "-c", RSS], capture_output=True, text=True, check=True)
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    # 3000x3000: 36 MB as 8-bit RGBA plus uint16 matting scratch; a 16-bit decode with a float64
    # blend peaks near 480 MB
    assert growth_mb < 200, f"peak RSS grew {growth_mb:.0f} MB"
    jpg, *_ = ImageResizer(min_image_size=0)(png_rgba16(300, 300))
    rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))[128, 128].astype(int)
    # BGR (30000, 40000, 50000) / 257 at alpha 1/2, matted on white: RGB (225, 205, 186)
    assert np.abs(rgb - (225, 205, 186)).max() <= 3, rgb


def test_8_bit_rgba_matting_matches_img2dataset_bytes():
    from img2dataset.resizer import Resizer

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 420, 4), dtype=np.uint8), "RGBA").save(buf, "PNG")
    data = buf.getvalue()
    ours = ImageResizer(256, "center_crop", 0, 95)(data)
    theirs = Resizer(256, "center_crop", False, encode_quality=95)(io.BytesIO(data))
    assert ours == tuple(theirs[:5])


def test_every_costly_image_is_a_row_with_its_reason():
    files = {"/ok.jpg": jpeg(), "/scans.jpg": progressive_jpeg(1024, 1024, 2000),
             "/deep.png": png_rgba16(3000, 3000)}
    with hostile_servers(files) as (base, _):
        dl = ShardDownloader(NetPolicy(("127.0.0.1",)), FetchLimits(),
                             ImageResizer(min_image_size=0, max_decode_bytes=50_000_000),
                             DownloadLimits(url_timeout_s=10), threads=2)
        rows = [dl.one({"key": str(i), "url": base + p, "caption": "c", "pwatermark": 0.1,
                        "punsafe": 0.1, "similarity": 0.3}, time.monotonic() + 60)
                for i, p in enumerate(files)]
        dl.close()
    assert [r["status"] for r in rows] == ["success", "too_costly", "too_costly"]
    assert all(r["error_message"] for r in rows[1:])
