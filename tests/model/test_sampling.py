"""Sampling: the padding-aware forward equals the decoder's own, forced ids are kept, and
guidance weight 0 gives exactly the unguided distribution while sharing one batch."""

import pytest
import torch

from model.sampling import guide, left_pad, masked_forward, sample, sample_guided
from model.transformer import Transformer, TransformerConfig

V = 40


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32)).eval()


def prompt(n: int, offset: int = 0) -> tuple[list[int], list[int]]:
    return [(7 * i + offset) % V for i in range(n)], list(range(n))


@torch.no_grad()
def test_left_padded_rows_match_their_unpadded_forward(model):
    long, short = prompt(12), prompt(5, offset=3)
    ids, pos, valid = left_pad([long, short], torch.device("cpu"))
    logits, cache = masked_forward(model, ids, pos, valid)
    want_long, _ = model(torch.tensor([long[0]]), torch.tensor([long[1]]))
    want_short, short_cache = model(torch.tensor([short[0]]), torch.tensor([short[1]]))
    assert torch.allclose(logits[0], want_long[0], atol=1e-5)
    assert torch.allclose(logits[1, -5:], want_short[0], atol=1e-5)
    # one cached step further: still the same as the unpadded decoder
    nxt, npos = torch.tensor([[9], [9]]), torch.tensor([[12], [5]])
    valid = torch.cat([valid, valid.new_ones(2, 1)], 1)
    step, _ = masked_forward(model, nxt, npos, valid, cache)
    want, _ = model(torch.tensor([[9]]), torch.tensor([[5]]), short_cache)
    assert torch.allclose(step[1], want[0], atol=1e-5)


def test_forced_ids_are_fed_where_given(model):
    ids, pos = prompt(6)
    forced = [-1, 11, -1, 12, 13]
    out = sample(model, torch.tensor([ids] * 3), torch.tensor([pos] * 3), 5, forced=forced,
                 allowed=range(20, 30), generator=torch.Generator().manual_seed(0))
    assert (out[:, [1, 3, 4]] == torch.tensor([11, 12, 13])).all()
    assert ((out[:, [0, 2]] >= 20) & (out[:, [0, 2]] < 30)).all()  # sampled ones obey `allowed`


def test_guide_combines_branches_and_weight_zero_is_the_conditional():
    logp = torch.randn(3, 2, V).log_softmax(-1)
    assert torch.equal(guide(logp, [0.0, 0.0]), logp[0])
    want = logp[0] + 2.0 * (logp[0] - logp[1]) + 0.5 * (logp[0] - logp[2])
    assert torch.allclose(guide(logp, [2.0, 0.5]), want)


@torch.no_grad()
def test_weight_zero_samples_exactly_the_unguided_distribution(model):
    cond, uncond = prompt(10), prompt(4, offset=5)  # the unguided branch is shorter: padded
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = sample(model, torch.tensor([cond[0]] * 4), torch.tensor([cond[1]] * 4), 8,
                   allowed=range(10, 30), generator=gen())
    guided = sample_guided(model, [cond, uncond], [0.0], n=4, max_new=8, allowed=range(10, 30),
                           generator=gen())
    assert torch.equal(plain, guided)
    # and a real weight changes the distribution
    strong = sample_guided(model, [cond, uncond], [8.0], n=4, max_new=8, allowed=range(10, 30),
                           generator=gen())
    assert not torch.equal(plain, strong)
    assert ((strong >= 10) & (strong < 30)).all()


def test_stop_is_refused_before_min_new_tokens(model):
    """Greedy decoding that would stop at once (stop = its argmax) runs min_new tokens first."""
    ids, pos = prompt(6)
    p, q = torch.tensor([ids]), torch.tensor([pos])
    first = int(sample(model, p, q, 1, temperature=0)[0, 0])  # what greedy emits first
    assert sample(model, p, q, 5, temperature=0, stop=first).shape[1] == 1  # stops at once
    out = sample(model, p, q, 5, temperature=0, stop=first, min_new=3)
    assert out.shape[1] >= 3 and (out[0, :3] != first).all()
