"""Loss options: the chunked cross-entropy equals the plain one (values and gradients), the
block mask flag (false = the old unmasked packing), and the GPU settings' config checks."""

from itertools import islice

import pytest
import torch

from model.transformer import Transformer, TransformerConfig
from pipelines.core.config import ConfigError
from pipelines.training.objective import chunked_nll, sequence_losses
from pipelines.training.sequences import AssemblyConfig, SequenceStream, collate
from pipelines.training.token_store import open_store
from pipelines.training.train import TrainConfig
from storage.fs import DataRoot
from tests.pipelines.training.corpus_factory import make_corpus


@pytest.fixture(scope="module")
def batch_and_vocab(tmp_path_factory):
    root = DataRoot(str(tmp_path_factory.mktemp("loss")))
    make_corpus(root, n=12, shards=2, packed=True)
    corpus = open_store(root, with_neighbours=True)
    stream = SequenceStream(corpus, AssemblyConfig(seq_len=120, k_max=2), seed=0)
    return collate(list(islice(iter(stream), 3))), corpus.vocab.size


def model_of(vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32))


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_cross_entropy_equals_plain(batch_and_vocab, chunk):
    batch, vocab = batch_and_vocab
    grads, outs = [], []
    for ce_chunk in (0, chunk):
        m = model_of(vocab)
        out = sequence_losses(m, batch, ce_chunk=ce_chunk)
        out["loss"].backward()
        outs.append(out)
        grads.append([p.grad for p in m.parameters()])
    assert torch.allclose(outs[0]["loss"], outs[1]["loss"], rtol=1e-5)
    for k in ("l_main", "l_retr", "l_text", "l_image"):
        assert torch.allclose(outs[0][k], outs[1][k], rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_chunked_nll_keeps_only_hidden_states_for_backward():
    """What autograd saves is O(tokens x width), never O(tokens x vocab): the logits of each
    chunk are recomputed in backward."""
    h = torch.randn(2, 50, 4, requires_grad=True)
    w = torch.randn(1000, 4, requires_grad=True)
    t = torch.randint(0, 1000, (2, 50))
    saved: list[int] = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        nll = chunked_nll(h, w, t, chunk=10)
    assert nll.shape == (2, 50) and saved
    assert max(saved) <= w.numel() < 10 * 1000  # not even one chunk's logits (10 x 1000) kept
    nll.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_block_mask_false_is_the_old_unmasked_loss(batch_and_vocab):
    batch, vocab = batch_and_vocab
    m = model_of(vocab)
    assert batch["segments"].max() > 0  # several examples per row, else nothing to mask
    old = sequence_losses(m, {k: v for k, v in batch.items() if k != "segments"})
    unmasked = sequence_losses(m, batch, block_mask=False)
    masked = sequence_losses(m, batch, block_mask=True)
    assert torch.equal(old["loss"], unmasked["loss"])
    assert not torch.allclose(masked["loss"], unmasked["loss"])


@pytest.mark.parametrize("fields,bad", [
    (dict(strategy="fsdp", accelerator="cpu"), "train.strategy"),
    (dict(strategy="horovod"), "train.strategy"),
    (dict(precision="bf17"), "train.precision"),
    (dict(ce_chunk=-1), "train.ce_chunk"),
    (dict(name="../x"), "train.name"),
    # checks that once sat after a `return` and never ran
    (dict(k_max=-1), "train.k_max"),
    (dict(mask_prob=1.5), "train.mask_prob"),
    (dict(overlong="wrap"), "train.overlong"),
    (dict(checkpoint_every=0), "train.checkpoint_every"),
    (dict(model="huge"), "train.model"),
])
def test_gpu_settings_are_checked(fields, bad):
    TrainConfig.SECTION = "train"
    with pytest.raises(ConfigError, match=bad.replace(".", r"\.")):
        TrainConfig(**fields)


def test_gpu_settings_accepted():
    cfg = TrainConfig(strategy="fsdp", accelerator="gpu", precision="bf16-mixed",
                      activation_checkpointing=True, ce_chunk=4096, name="ra-alpha0.3")
    assert cfg.out_name == "ra-alpha0.3" and "ce_chunk" not in cfg.params()  # execution only
    assert TrainConfig(variant="vanilla").out_name == "vanilla"
