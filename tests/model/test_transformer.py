"""The decoder: shapes, causality, per-document rotary positions, KV cache equivalence, sampling."""

import torch

from model.sampling import filter_logits, sample
from model.transformer import PRESETS, Transformer, TransformerConfig, preset


def tiny(vocab: int = 50) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32)).eval()


def test_forward_shapes_and_causality():
    m = tiny()
    ids = torch.randint(0, 50, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    logits, cache = m(ids, pos)
    assert logits.shape == (2, 10, 50) and len(cache) == 2
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 50
    logits2, _ = m(changed, pos)
    assert torch.allclose(logits[:, :7], logits2[:, :7], atol=1e-5)  # the past ignores the future
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:])


def test_rotary_positions_restart_make_documents_shift_invariant():
    """Attention scores depend on relative position only: a document read after another one,
    with positions restarting at 0, gets the same logits for its first token as read alone."""
    m = tiny()
    doc = torch.randint(0, 50, (1, 6))
    alone, _ = m(doc, torch.arange(6)[None])
    pos_shift = torch.arange(6)[None] + 13
    shifted, _ = m(doc, pos_shift)
    assert torch.allclose(alone, shifted, atol=1e-4)


def test_kv_cache_matches_full_forward():
    m = tiny()
    ids = torch.randint(0, 50, (3, 12))
    pos = torch.arange(12).expand(3, 12)
    full, _ = m(ids, pos)
    part, cache = m(ids[:, :5], pos[:, :5])
    rest, cache = m(ids[:, 5:9], pos[:, 5:9], cache)  # several tokens at once against a cache
    last = [m(ids[:, i:i + 1], pos[:, i:i + 1], cache)[0] for i in range(9, 10)]
    assert torch.allclose(full[:, :5], part, atol=1e-5)
    assert torch.allclose(full[:, 5:9], rest, atol=1e-5)
    assert torch.allclose(full[:, 9:10], last[0], atol=1e-5)
    assert cache[0][0].shape[2] == 9


def test_presets_sizes():
    assert 0.5e6 < Transformer(preset("demo", 600)).num_params() < 2e6
    paper = preset("paper", 8192 + 50000)
    assert paper.max_seq_len == 4096 and paper.d_model == 2560 and "paper" in PRESETS


def test_filter_logits_top_k_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.5))
    assert kept.tolist() == [[True, False, False, False]]


def test_sample_greedy_matches_argmax_and_respects_allowed_and_stop():
    m = tiny()
    prompt = torch.randint(0, 50, (2, 4))
    pos = torch.arange(4).expand(2, 4)
    out = sample(m, prompt, pos, max_new=5, temperature=0)
    logits, _ = m(prompt, pos)
    assert out.shape == (2, 5) and torch.equal(out[:, 0], logits[:, -1].argmax(-1))
    seq = torch.cat([prompt, out[:, :1]], 1)
    logits2, _ = m(seq, torch.arange(5).expand(2, 5))
    assert torch.equal(out[:, 1], logits2[:, -1].argmax(-1))  # cached step == full recompute
    g = torch.Generator().manual_seed(0)
    out = sample(m, prompt, pos, max_new=8, top_k=5, top_p=0.9, allowed=range(10, 20), generator=g)
    assert ((out >= 10) & (out < 20)).all()
    out = sample(m, prompt, pos, max_new=30, allowed=[3], stop=3)
    assert out.shape == (2, 1)


def test_block_mask_separates_packed_examples():
    """Two examples packed in one row: with segments, example 2's logits do not depend on
    example 1's tokens and equal example 2 read alone (positions restart per example);
    without segments (the old behaviour) they do depend on them."""
    m = tiny()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 5))
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    seg = torch.tensor([[0] * 7 + [1] * 5])
    changed = ids.clone()
    changed[0, :7] = (changed[0, :7] + 3) % 50  # every token of example 1
    masked, _ = m(ids, pos, segments=seg)
    masked2, _ = m(changed, pos, segments=seg)
    alone, _ = m(b, torch.arange(5)[None])
    assert torch.allclose(masked[:, 7:], masked2[:, 7:], atol=1e-5)
    assert torch.allclose(masked[:, 7:], alone, atol=1e-4)
    assert not torch.allclose(masked[:, :7], masked2[:, :7])  # example 1 itself did change
    plain, _ = m(ids, pos)
    plain2, _ = m(changed, pos)
    assert not torch.allclose(plain[:, 7:], plain2[:, 7:], atol=1e-3)
    assert torch.allclose(plain[:, :7], masked[:, :7], atol=1e-5)  # the first example: same


def test_activation_checkpointing_gives_the_same_gradients():
    m = tiny().train()
    ids, pos = torch.randint(0, 50, (2, 9)), torch.arange(9).expand(2, 9)
    seg = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    grads = []
    for flag in (False, True):
        m.zero_grad()
        m.activation_checkpointing = flag
        logits, _ = m(ids, pos, segments=seg)
        logits.square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(g0, g1, atol=1e-6) for g0, g1 in zip(*grads, strict=True))


def test_rotate_is_rope_in_half_split_form():
    """Channel pair (i, i + Dh/2) of every head of q and k turns by position x base^(-i / (Dh/2)):
    the layout every checkpoint was trained with, checked against complex multiplication."""
    from model.transformer import rope, rotate

    torch.manual_seed(0)
    B, T, H, Dh = 2, 5, 3, 8
    x = torch.randn(B, T, 2, H, Dh)
    pos = torch.randint(0, 40, (B, T))
    got = rotate(x, rope(pos, Dh, 10000.0))
    half = Dh // 2
    theta = pos.double()[:, :, None, None, None] * 10000.0 ** (-torch.arange(half).double() / half)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(theta), theta)
    want = torch.cat([z.real, z.imag], dim=-1).float()
    assert torch.allclose(got, want, atol=1e-5)
