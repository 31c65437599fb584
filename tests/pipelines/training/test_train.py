"""Training: the loss is wired right (overfit), alpha weighting, resume after a kill, NaN stop,
lineage refusal, the stage manifest, and held-out perplexity with and without retrieval."""

import json
from itertools import islice

import lightning as L
import pytest
import torch

from model.transformer import Transformer, TransformerConfig
from pipelines.core.runconfig import RunConfig
from pipelines.core.runner import run_stage
from pipelines.core.stage import execute_shard
from pipelines.evaluation.perplexity import compare_variants
from pipelines.inference.scoring import HeldOutExample, heldout_perplexity
from pipelines.training.checkpoints import load_trained
from pipelines.training.sequences import (
    ROLE_MAIN,
    ROLE_RETRIEVED,
    AssemblyConfig,
    LineageError,
    SequenceStream,
    collate,
)
from pipelines.training.token_store import open_store
from pipelines.training.train import (
    NonFiniteLossError,
    TrainConfig,
    TrainStage,
    lr_lambda,
    sequence_losses,
)
from storage.fs import DataRoot
from storage.manifest import read_manifest
from tests.pipelines.training.corpus_factory import (
    docs_by_key,
    make_corpus,
    make_token_shard,
    pack_corpus,
)

FAST = dict(batch_size=4, seq_len=72, progress_bar=False, log_every=1, warmup_steps=2,
            accelerator="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def root(tmp_path):
    r = DataRoot(str(tmp_path / "data"))
    make_corpus(r, n=12, shards=2, packed=True)
    return r


def small_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=vocab_size, n_layer=2, n_head=4, d_model=64))


def batch_from(root, n_seqs: int, **asm) -> tuple[dict, int]:
    corpus = open_store(root, with_neighbours=True)
    stream = SequenceStream(corpus, AssemblyConfig(**asm), seed=0)
    return collate(list(islice(iter(stream), n_seqs))), corpus.vocab.size


@pytest.mark.parametrize("block_mask,final", [(False, 0.05), (True, 0.1)])
def test_overfits_a_handful_of_documents(tmp_path, block_mask, final):
    """With the block mask a unit cannot copy from the units packed before it: a caption's
    entity word is then unknowable for a unit without retrieved documents (text loss stays up),
    which is the leak the mask closes; the image tokens are still learnt."""
    root = DataRoot(str(tmp_path))
    make_corpus(root, n=4, shards=1, packed=True)
    batch, vocab = batch_from(root, 1, seq_len=96, k_max=1, mask_prob=0.5)
    model = small_model(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(100):
        losses = sequence_losses(model, batch, block_mask=block_mask)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first if first is not None else losses["loss"].item()
    assert first > 3.0 and losses["loss"].item() < final
    assert losses["l_image"].item() < final
    assert (losses["l_text"].item() < final) != block_mask


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_loss_is_main_plus_alpha_retrieved(root, alpha):
    batch, vocab = batch_from(root, 4, seq_len=120, k_max=2, alpha=alpha)
    out = sequence_losses(small_model(vocab), batch)
    roles = batch["roles"][:, 1:]
    n_main, n_retr = (roles == ROLE_MAIN).sum(), (roles == ROLE_RETRIEVED).sum()
    assert n_retr > 0
    expect = out["l_main"] + alpha * out["l_retr"] * n_retr / n_main
    assert torch.allclose(out["loss"], expect, rtol=1e-4)


def test_lr_warmup_then_linear_decay():
    f = lr_lambda(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(60) == pytest.approx(0.5)
    assert f(110) == 0.0


def test_stage_trains_both_variants_with_equal_tokens_per_step(root):
    cfgs = {"run": RunConfig(retries=0)}
    for variant in ("ra-cm3", "vanilla"):
        cfgs["train"] = TrainConfig(variant=variant, max_steps=3, **FAST)
        report = run_stage("train", root, cfgs)
        assert report.ok, report.failed
        m = read_manifest(root, "train", variant)
        assert m.metrics["codebook"] == "cb-1" and m.metrics["steps"] == 3
        assert m.metrics["seq_len"] == 72 and m.metrics["tokens_digest"].startswith("sha256:")
        assert (m.metrics.get("index_fingerprint") == "ix-1") == (variant == "ra-cm3")
        assert any(i.shard_id.startswith("n-") for i in m.inputs) == (variant == "ra-cm3")
        assert all(i.stage == "pack" for i in m.inputs)
        model, vocab, rec = load_trained(root, variant)
        assert rec["lineage"]["codebook"] == "cb-1" and vocab.n_image == 16
        run = json.loads(open(root.join("train", variant, m.fingerprint, "run.json")).read())
        assert run["lineage"]["codebook"] == "cb-1"
        assert root.exists(root.join("train", variant, m.fingerprint, "logs"))
    again = run_stage("train", root, cfgs)
    assert again.skipped == ["vanilla"] and not again.ran


class Kill(L.Callback):
    """Simulates an interruption: raises at the start of a given step."""

    def __init__(self, step: int, nan: bool = False):
        self.step, self.nan = step, nan

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            if not self.nan:
                raise RuntimeError("simulated kill")
            with torch.no_grad():
                module.model.embed.weight.fill_(float("nan"))


def spec_of(root, cfg):
    return TrainStage().plan(root, cfg)[0]


def test_resume_after_interruption(root):
    cfg = TrainConfig(max_steps=10, checkpoint_every=3, **FAST)
    spec = spec_of(root, cfg)
    with pytest.raises(RuntimeError, match="simulated kill"):
        execute_shard(TrainStage([Kill(7)]), root, cfg, spec)
    assert read_manifest(root, "train", "ra-cm3") is None  # no manifest: the shard is not done
    m = execute_shard(TrainStage(), root, cfg, spec)
    assert m.metrics["resumed_from_step"] == 6 and m.metrics["steps"] == 10


def test_nan_loss_stops_and_keeps_last_good_checkpoint(root):
    cfg = TrainConfig(max_steps=10, checkpoint_every=2, **FAST)
    spec = spec_of(root, cfg)
    with pytest.raises(NonFiniteLossError, match=r"step 5, batch 5 \(main documents"):
        execute_shard(TrainStage([Kill(5, nan=True)]), root, cfg, spec)
    ckpt = torch.load(root.join("train", "ra-cm3", TrainStage().fingerprint(cfg, spec),
                                "checkpoints", "last.ckpt"), weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not root.exists(root.artifact("train", "ra-cm3", "pt"))


def test_mismatched_codebook_refused_before_training(tmp_path):
    root = DataRoot(str(tmp_path))
    make_corpus(root, n=8, shards=1)
    make_token_shard(root, "00001", ["0100", "0101"], codebook="cb-other")
    pack_corpus(root)
    cfg = TrainConfig(max_steps=3, **FAST)
    with pytest.raises(LineageError, match="codebook"):
        execute_shard(TrainStage(), root, cfg, spec_of(root, cfg))
    assert not root.exists(root.join("train", "ra-cm3"))  # nothing started


def test_pinned_index_refused(root):
    cfg = TrainConfig(max_steps=3, pin_index="ix-9", **FAST)
    with pytest.raises(LineageError, match="index_fingerprint"):
        execute_shard(TrainStage(), root, cfg, spec_of(root, cfg))


def test_heldout_perplexity_with_and_without_retrieval(root):
    corpus = open_store(root, with_neighbours=True)
    model = small_model(corpus.vocab.size).eval()
    d = docs_by_key(corpus)
    examples = [HeldOutExample(d["0000"], by_caption=[d["0004"]], by_image=[d["0008"], d["0004"]]),
                HeldOutExample(d["0001"], by_caption=[d["0005"]], by_image=[d["0009"]])]
    with_r = heldout_perplexity(model, corpus.vocab, examples, with_retrieval=True)
    without = heldout_perplexity(model, corpus.vocab, examples, with_retrieval=False)
    assert with_r["image_tokens"] == without["image_tokens"] == 2 * 16
    assert with_r["text_tokens"] == 2 * 3
    assert 1 < without["image_ppl"] < 2 * corpus.vocab.size
    assert with_r["image_ppl"] != without["image_ppl"]


def test_compare_variants_on_held_out_documents(root):
    cfgs = {"run": RunConfig(retries=0)}
    for variant in ("ra-cm3", "vanilla"):
        cfgs["train"] = TrainConfig(variant=variant, max_steps=3, holdout_fraction=0.3, **FAST)
        assert run_stage("train", root, cfgs).ok
    out = compare_variants(root)
    assert out["examples"]["n"] > 0
    for name in ("ra-cm3 (retrieval)", "ra-cm3 (no retrieval)", "vanilla"):
        assert 1 < out[name]["image_ppl"] < 1e3 and out[name]["text_tokens"] > 0
    assert out["ra-cm3 (retrieval)"]["image_ppl"] != out["ra-cm3 (no retrieval)"]["image_ppl"]
