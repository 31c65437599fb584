"""Arrow schemas of the shards that stages exchange (the columns later stages rely on)."""

from __future__ import annotations

import pyarrow as pa

# filter: one row per kept metadata row; `key` is the row's stable id in the metadata table.
URL_SHARD = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("pwatermark", pa.float32()),
    ("punsafe", pa.float32()),
    ("similarity", pa.float32()),
])

# download: one row per URL, successes and failures alike (status + error_message).
IMAGE_SHARD = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),  # "success" or img2dataset's failure status
    ("error_message", pa.string()),
    ("jpg", pa.binary()),  # resized JPEG bytes, null on failure
    ("width", pa.int64()),  # of the stored image
    ("height", pa.int64()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
    ("sha256", pa.string()),  # of the downloaded bytes (exact-duplicate detection)
    ("pwatermark", pa.float32()),
    ("punsafe", pa.float32()),
    ("similarity", pa.float32()),
    ("nsfw_score", pa.float32()),  # open_nsfw P(NSFW) of the stored image; null = not scored (download.nsfw_model)
])

SUCCESS = "success"

# fit-vqgan's two artifacts: fit-vqgan/vqgan.ckpt (taming-layout VQGAN) and fit-vqgan/bpe.json.
VQGAN_SHARD, BPE_SHARD = "vqgan", "bpe"
VQGAN_SUFFIX, BPE_SUFFIX = "ckpt", "json"
