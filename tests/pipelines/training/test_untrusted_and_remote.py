"""Training and model loads trust no data-root file (weights-only: a crafted pickle is refused,
never run), train runs on a non-local fsspec root (memory://, no local open/os.path/torch.save on
data-root paths), and each train.name (ablation variant) trains to its own checkpoint path."""

import uuid

import lightning as L
import pytest
import torch

from pipelines.core.stage import execute_shard
from pipelines.training.checkpoints import load_trained
from pipelines.training.train import TrainConfig, TrainStage
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.training.corpus_factory import make_corpus

FAST = dict(batch_size=3, seq_len=72, progress_bar=False, log_every=1, warmup_steps=2,
            accelerator="cpu", threads=1)


class Evil:
    """Unpickling this creates a file: proof that a load executed code from the data root."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Stop(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("interrupted")


@pytest.fixture
def root(tmp_path):
    r = DataRoot(str(tmp_path / "data"))
    make_corpus(r, n=12, shards=2, packed=True)
    return r


def run(root: DataRoot, cfg: TrainConfig, callbacks=None):
    stage = TrainStage(callbacks)
    return execute_shard(stage, root, cfg, stage.plan(root, cfg)[0])


def test_crafted_model_file_is_refused(root, tmp_path):
    marker = tmp_path / "pwned"
    root.makedirs(root.join("train"))
    torch.save({"model": Evil(str(marker))}, root.artifact("train", "ra-cm3", "pt"))
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        load_trained(root, "ra-cm3")
    assert not marker.exists()


def test_crafted_resume_checkpoint_is_refused(root, tmp_path):
    cfg = TrainConfig(max_steps=4, checkpoint_every=2, **FAST)
    stage = TrainStage()
    spec = stage.plan(root, cfg)[0]
    ckpt = root.join("train", "ra-cm3", stage.fingerprint(cfg, spec), "checkpoints", "last.ckpt")
    root.makedirs(ckpt.rsplit("/", 1)[0])
    marker = tmp_path / "pwned"
    torch.save({"global_step": 2, "state_dict": Evil(str(marker))}, ckpt)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        execute_shard(stage, root, cfg, spec)
    assert not marker.exists() and read_manifest(root, "train", "ra-cm3") is None


def test_each_train_name_has_its_own_checkpoint(root):
    for name, alpha in (("ra-alpha0", 0.0), ("ra-alpha1", 1.0)):
        m = run(root, TrainConfig(name=name, alpha=alpha, max_steps=2, **FAST))
        assert m.shard_id == name and m.params["alpha"] == alpha
    a, _, rec_a = load_trained(root, "ra-alpha0")
    b, _, rec_b = load_trained(root, "ra-alpha1")
    assert rec_a["train"]["alpha"] == 0.0 and rec_b["train"]["alpha"] == 1.0
    assert not root.exists(root.artifact("train", "ra-cm3", "pt"))  # the default name untouched
    assert root.exists(root.join("train", "ra-alpha0")) and root.exists(root.join("train", "ra-alpha1"))


def test_train_on_a_remote_fsspec_root_resumes_and_commits():
    root = DataRoot(f"memory://racm3-{uuid.uuid4().hex[:8]}/data")
    assert not root.is_local
    make_corpus(root, n=12, shards=2, packed=True)  # pack builds locally, uploads via fsspec
    cfg = TrainConfig(max_steps=6, checkpoint_every=2, **FAST)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(root, cfg, [Stop(5)])
    fp = TrainStage().fingerprint(cfg, TrainStage().plan(root, cfg)[0])
    assert root.exists(root.join("train", "ra-cm3", fp, "checkpoints", "last.ckpt"))
    m = run(root, cfg)
    assert m.metrics["resumed_from_step"] == 4 and m.metrics["steps"] == 6
    model, vocab, rec = load_trained(root, "ra-cm3")
    assert rec["lineage"]["codebook"] == "cb-1"
    logs = root.fs.find(root.join("train", "ra-cm3", fp, "logs"))
    assert any(p.endswith("metrics.csv") for p in logs)  # local logs copied to the root
