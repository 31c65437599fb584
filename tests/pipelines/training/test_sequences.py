"""Sequence assembly: K in {0..k_max}, order m1..mK then x, masking only inside x, loss weights,
packing counts, per-document positions, and refusal of mixed lineage."""

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from model.cm3.format import mask_spans
from model.document import EOS, IMG_OPEN, IMG_SRC, INFILL, Vocab, positions
from pipelines.training.sequences import (
    ROLE_MAIN,
    ROLE_PAD,
    ROLE_RETRIEVED,
    AssemblyConfig,
    Corpus,
    LineageError,
    Packer,
    SequenceStream,
    assemble,
    collate,
    draw_spans,
    draw_unit,
    load_corpus,
)
from storage.fs import DataRoot
from tests.pipelines.training.corpus_factory import (
    make_corpus,
    make_neighbour_shard,
    make_token_shard,
)


def pack(units, seq_len: int, counts: Counter, lookahead: int = 16):
    """Every sequence `Packer` makes from a list of units."""
    it = iter(units)
    packer = Packer(lambda: next(it, None), seq_len, counts, lookahead)
    while (seq := packer.next()) is not None:
        yield seq


@pytest.fixture
def root(tmp_path):
    r = DataRoot(str(tmp_path))
    make_corpus(r, n=16, shards=2)
    return r


def doc_bounds(unit):
    """Start offsets of each document in a unit (positions restart at 0 there, and again at the
    image marker, which is not a document start)."""
    return list(np.flatnonzero((unit.positions == 0) & (unit.ids != IMG_SRC)))


def test_load_corpus_reads_tokens_and_neighbours(root):
    c = load_corpus(root, with_neighbours=True)
    assert len(c.docs) == 16 and c.lineage["codebook"] == "cb-1"
    assert c.lineage["index_fingerprint"] == "ix-1"
    d = c.docs["0005"]
    assert d[0] == IMG_OPEN and d[-1] == EOS and c.vocab.decode(d)[0] == [1, 2, 11]
    assert set(c.neighbours["0005"]) == {(q, v) for q in ("text", "image") for v in range(3)}


def test_k_drawn_uniformly_and_documents_in_order(root):
    c = load_corpus(root, with_neighbours=True)
    cfg = AssemblyConfig(seq_len=400, k_max=2, mask_prob=0.0)
    rng, counts = np.random.default_rng(0), Counter()
    seen = Counter()
    for i in range(300):
        key = f"{i % 16:04d}"
        u = draw_unit(rng, key, c, cfg, counts)
        starts = doc_bounds(u)
        seen[len(starts) - 1] += 1
        main = u.ids[starts[-1]:]
        assert np.array_equal(main, c.docs[key])  # x comes last, unmasked with mask_prob 0
        for s, e in zip(starts[:-1], starts[1:], strict=True):  # each m_i is another doc of x's entity
            m = u.ids[s:e]
            assert any(np.array_equal(m, c.docs[o]) for o in c.docs if int(o) % 4 == int(key) % 4
                       and o != key)
            assert (u.roles[s:e] == ROLE_RETRIEVED).all()
        assert (u.roles[starts[-1]:] == ROLE_MAIN).all()
    assert set(seen) == {0, 1, 2} and min(seen.values()) > 70  # ~100 each
    assert counts["k0"] + counts["k1"] + counts["k2"] == 300


def test_retrieved_order_is_best_first(root):
    c = load_corpus(root, with_neighbours=True)
    c.neighbours = {"0000": {("text", 1): ["0004", "0008"]}}
    u = draw_unit(np.random.default_rng(0), "0000", c, AssemblyConfig(k_max=2, mask_prob=0), Counter())
    k = len(doc_bounds(u)) - 1
    expect = np.concatenate([c.docs[x] for x in ["0004", "0008"][:k]] + [c.docs["0000"]])
    assert np.array_equal(u.ids, expect)


def test_vanilla_has_no_retrieved_documents(root):
    c = load_corpus(root, with_neighbours=False)
    cfg = AssemblyConfig(k_max=0, mask_prob=0.5)
    rng = np.random.default_rng(1)
    for i in range(50):
        u = draw_unit(rng, f"{i % 16:04d}", c, cfg, Counter())
        assert (u.roles == ROLE_MAIN).all() and (u.weights == 1).all()


@pytest.mark.parametrize("alpha", [0.1, 0.0])
def test_loss_weight_alpha_exactly_on_retrieved_tokens(root, alpha):
    c = load_corpus(root, with_neighbours=True)
    cfg = AssemblyConfig(seq_len=200, k_max=2, alpha=alpha, mask_prob=0.5)
    stream = SequenceStream(c, cfg, seed=3)
    for seq in islice(iter(stream), 20):
        w, r = seq["weights"], seq["roles"]
        assert np.all(w[r == ROLE_RETRIEVED] == np.float32(alpha))
        assert np.all(w[r == ROLE_MAIN] == 1.0) and np.all(w[r == ROLE_PAD] == 0.0)
        assert len(seq["ids"]) == 200


def test_masked_spans_only_inside_main_document(root):
    c = load_corpus(root, with_neighbours=True)
    v = c.vocab
    cfg = AssemblyConfig(seq_len=400, k_max=2, mask_prob=1.0, max_spans=3)
    rng = np.random.default_rng(2)
    for i in range(100):
        key = f"{i % 16:04d}"
        u = draw_unit(rng, key, c, cfg, Counter())
        sentinels = (u.ids >= v.mask(0)) & (u.ids < v.text_offset)
        assert sentinels.any() and (u.roles[sentinels] == ROLE_MAIN).all()
        assert ((u.ids == INFILL) <= (u.roles == ROLE_MAIN)).all()
        main = u.ids[doc_bounds(u)[-1]:]
        assert sorted(main.tolist()) != [] and unmask(main, v) == c.docs[key].tolist()


def unmask(masked: np.ndarray, v: Vocab) -> list[int]:
    """Invert CM3 masking: put each span after <infill> back in place of its sentinel."""
    ids = masked.tolist()
    cut = ids.index(INFILL)
    head, tail = ids[:cut], ids[cut + 1:-1]
    spans, cur = {}, None
    for t in tail:
        if v.mask(0) <= t < v.text_offset:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in head:
        out += spans[t] if t in spans else [t]
    return out + [EOS]


def test_mask_spans_format():
    v = Vocab(n_text=10, n_image=10)
    doc = np.array(v.encode([1, 2, 3], [4, 5]))  # IMG_OPEN t t t SRC i i CLOSE EOS
    out = mask_spans(doc, [(0, 2), (4, 5)], v).tolist()
    body = doc[1:-1].tolist()
    assert out == [IMG_OPEN, v.mask(0), *body[2:4], v.mask(1), *body[5:], INFILL,
                   v.mask(0), *body[0:2], v.mask(1), body[4], EOS]
    spans = draw_spans(np.random.default_rng(0), 20, 4, 0.3)
    assert all(0 <= s < e <= 20 for s, e in spans)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))


def test_packing_counts_and_overlong_rules(root):
    c = load_corpus(root, with_neighbours=False)
    doc_len = len(c.docs["0000"])  # 23 tokens
    counts = Counter()
    cfg = AssemblyConfig(seq_len=3 * doc_len + 5, k_max=0, mask_prob=0)
    rng = np.random.default_rng(0)
    units = [draw_unit(rng, k, c, cfg, counts) for k in sorted(c.docs)]
    seqs = list(pack(units, cfg.seq_len, counts))
    assert counts["sequences"] == len(seqs) == 6 and counts["main_docs"] == 16  # 3 docs each
    assert counts["pad_tokens"] == 6 * cfg.seq_len - 16 * doc_len
    assert all(len(s["ids"]) == cfg.seq_len for s in seqs)
    # positions restart in every document (and at its image marker)
    first = seqs[0]["ids"][:doc_len]
    assert np.array_equal(seqs[0]["positions"][:doc_len + 2], [*positions(first), 0, 1])
    short = AssemblyConfig(seq_len=10, k_max=2, mask_prob=0)
    c2 = load_corpus(root, with_neighbours=True)
    counts = Counter()
    u = draw_unit(rng, "0001", c2, short, counts)
    assert len(u) == 10 and counts["main_truncated"] == 1
    counts = Counter()
    assert draw_unit(rng, "0001", c2, AssemblyConfig(seq_len=10, overlong="drop"), counts) is None
    assert counts["main_dropped_overlong"] == 1
    counts = Counter()
    for _ in range(20):
        draw_unit(rng, "0001", c2, AssemblyConfig(seq_len=2 * doc_len, mask_prob=0), counts)
    assert counts["retrieved_dropped_overlong"] == counts["k2"] > 0  # the second doesn't fit


def test_missing_neighbour_keys_are_counted_and_skipped(root):
    c = load_corpus(root, with_neighbours=True)
    c.neighbours["0000"] = {("image", 1): ["gone", "0004", "0008"]}
    counts = Counter()
    rng = np.random.default_rng(0)
    for _ in range(30):
        u = draw_unit(rng, "0000", c, AssemblyConfig(seq_len=400, mask_prob=0), counts)
        assert (u.roles == ROLE_RETRIEVED).sum() in (0, len(c.docs["0004"]), 2 * len(c.docs["0004"]))
    assert counts["neighbour_missing_tokens"] == counts["k1"] + counts["k2"] > 0


def test_random_documents_ablation(root):
    c = load_corpus(root, with_neighbours=False)
    c = Corpus(c.vocab, c.docs)
    cfg = AssemblyConfig(seq_len=400, random_neighbours=True, mask_prob=0)
    rng, counts = np.random.default_rng(0), Counter()
    ks = [len(doc_bounds(draw_unit(rng, "0003", c, cfg, counts))) - 1 for _ in range(60)]
    assert set(ks) == {0, 1, 2} and counts["no_neighbour_row"] == 0


def test_collate_and_modality(root):
    c = load_corpus(root, with_neighbours=True)
    stream = SequenceStream(c, AssemblyConfig(seq_len=100), seed=0)
    batch = collate(list(islice(iter(stream), 4)))
    assert batch["ids"].shape == (4, 100) and len(batch["keys"]) == 4
    ids, mod = batch["ids"].numpy(), batch["modality"].numpy()
    assert np.array_equal(mod, c.vocab.modality(ids))


def test_mixed_codebooks_are_refused(tmp_path):
    root = DataRoot(str(tmp_path))
    make_token_shard(root, "00000", ["0000", "0001"], codebook="cb-1")
    make_token_shard(root, "00001", ["0002", "0003"], codebook="cb-2")
    with pytest.raises(LineageError, match="codebook"):
        load_corpus(root, with_neighbours=False)


def test_mixed_indexes_and_pins_are_refused(tmp_path):
    root = DataRoot(str(tmp_path))
    keys = ["0000", "0001", "0002", "0003"]
    make_token_shard(root, "00000", keys)
    make_neighbour_shard(root, "00000", keys[:2], keys, index="ix-1")
    make_neighbour_shard(root, "00001", keys[2:], keys, index="ix-2")
    with pytest.raises(LineageError, match="index_fingerprint"):
        load_corpus(root, with_neighbours=True)
    with pytest.raises(LineageError, match="codebook"):
        load_corpus(root, with_neighbours=False, pins={"codebook": "other"})


def test_held_out_documents_are_never_trained_on(root):
    c = load_corpus(root, with_neighbours=True, holdout_fraction=0.3)
    assert 0 < len(c.held_out) < 16 and c.lineage["held_out_docs"] == len(c.held_out)
    assert c.held_out == load_corpus(root, False, holdout_fraction=0.3).held_out  # stable split
    stream = SequenceStream(c, AssemblyConfig(seq_len=200, k_max=2, mask_prob=0), seed=0)
    trained = [c.docs[k] for k in c.train_keys()]
    held = [c.docs[k] for k in c.held_out  # content-unique ones: entity docs can coincide
            if not any(np.array_equal(c.docs[k], t) for t in trained)]
    assert held
    for seq in islice(iter(stream), 40):
        assert not set(seq["keys"]) & c.held_out
        ids = seq["ids"].tolist()
        for starts in [np.flatnonzero(seq["positions"] == 0)]:
            for s, e in zip(starts, [*starts[1:], len(ids)], strict=True):
                assert not any(np.array_equal(ids[s:e], h) for h in held)
    assert stream.counts["neighbour_held_out"] > 0


def test_first_fit_packing_fills_gaps_from_the_lookahead_pool():
    def unit(n, key):
        return assemble([], np.full(n, 7), 0.1, key)

    units = [unit(150, "a"), unit(150, "b"), unit(90, "c"), unit(90, "d")]
    greedy = list(pack(units, 240, Counter(), lookahead=1))
    assert [s["keys"] for s in greedy] == [["a"], ["b", "c"], ["d"]]
    counts = Counter()
    packed = list(pack(units, 240, counts, lookahead=4))
    assert [s["keys"] for s in packed] == [["a", "c"], ["b", "d"]]
    assert counts["pad_tokens"] == 0 and counts["main_docs"] == 4
