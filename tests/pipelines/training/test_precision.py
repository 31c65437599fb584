"""train.precision on CPU: bf16-mixed runs the matmuls in bf16 (attention float32), weights and
the saved model stay float32, the manifest records it, and a bad value is refused."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from model.transformer import attend
from pipelines.core.config import ConfigError
from pipelines.core.stage import execute_shard
from pipelines.training.checkpoints import load_trained
from pipelines.training.objective import sequence_losses
from pipelines.training.train import TrainConfig, TrainStage
from storage.fs import DataRoot
from tests.pipelines.training.corpus_factory import make_corpus
from tests.pipelines.training.test_train import batch_from

FAST = dict(batch_size=4, seq_len=72, progress_bar=False, log_every=1, warmup_steps=2,
            accelerator="cpu", lr=1e-2, n_layer=1, d_model=32, n_head=2)


def train(root: DataRoot, cfg: TrainConfig, seen: L.Callback):
    stage = TrainStage([seen])
    return execute_shard(stage, root, cfg, stage.plan(root, cfg)[0])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Dtypes(L.Callback):
    """Records the dtype of the output head's logits and of the weights at every step, and the loss."""

    def __init__(self):
        self.logits: set[torch.dtype] = set()
        self.weights: set[torch.dtype] = set()
        self.losses: list[float] = []

    def on_train_start(self, trainer, module):
        module.model.head.register_forward_hook(lambda m, i, out: self.logits.add(out.dtype))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights |= {p.dtype for p in module.parameters()}
        self.losses.append(float(outputs["loss"]))


def test_bf16_mixed_trains_with_bf16_matmuls_and_saves_float32(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    make_corpus(root, n=12, shards=2, packed=True)
    seen = Dtypes()
    cfg = TrainConfig(max_steps=16, precision="bf16-mixed", **FAST)
    m = train(root, cfg, seen)
    assert seen.logits == {torch.bfloat16} and seen.weights == {torch.float32}
    first, last = sum(seen.losses[:4]) / 4, sum(seen.losses[-4:]) / 4
    assert last < 0.8 * first, seen.losses  # it trains
    assert m.metrics["precision"] == "bf16-mixed" and m.metrics["steps"] == 16
    model, _, rec = load_trained(root)  # evaluation loads float32 weights, no autocast
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert rec["train"]["precision"] == "bf16-mixed"
    batch, _ = batch_from(root, 4, seq_len=72)
    with torch.no_grad():
        assert sequence_losses(model, batch)["loss"].dtype == torch.float32
        assert sequence_losses(model, batch)["loss"] < 0.8 * first


def test_auto_precision_is_fp32_on_cpu(tmp_path):
    root = DataRoot(str(tmp_path / "data"))
    make_corpus(root, n=12, shards=2, packed=True)
    seen = Dtypes()
    cfg = TrainConfig(max_steps=2, **FAST)
    assert train(root, cfg, seen).metrics["precision"] == "32-true"
    assert seen.logits == {torch.float32}


def test_cpu_autocast_keeps_attention_float32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16).bfloat16() for _ in range(3))
    seg = torch.tensor([[0] * 25 + [1] * 15] * 2)
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(40, 40, dtype=torch.bool).tril())[:, None]
    for m in (mask, None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = attend(q, k, v, m, 0.0)
            in_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None)
        fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                              is_causal=m is None)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, fp32.bfloat16())  # computed in float32, rounded once
        assert not torch.equal(in_bf16, fp32.bfloat16())  # (the bf16 kernel would differ)


@pytest.mark.parametrize("value", ["bf17", "fp8", ""])
def test_bad_precision_is_refused(value):
    TrainConfig.SECTION = "train"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        TrainConfig(precision=value)
