"""Sequence assembly: K in {0..k_max}, order m1..mK then x, masking only inside x, loss weights,
packing counts, per-document positions, and refusal of mixed lineage; all drawn from the token
store stage `pack` builds (what training reads), documents addressed by integer id."""

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from model.cm3.format import mask_spans
from model.document import EOS, IMG_OPEN, IMG_SRC, INFILL, Vocab, positions
from pipelines.training.lineage import check_pins
from pipelines.training.sequences import (
    ROLE_MAIN,
    ROLE_PAD,
    ROLE_RETRIEVED,
    AssemblyConfig,
    LineageError,
    Packer,
    SequenceStream,
    assemble,
    collate,
    draw_spans,
    draw_unit,
    maybe_mask,
)
from pipelines.training.token_store import open_store
from storage.fs import DataRoot
from tests.pipelines.training.corpus_factory import (
    docs_by_key,
    make_corpus,
    make_neighbour_shard,
    make_token_shard,
    oracle_lists,
    pack_corpus,
)

KEYS = [f"{i:04d}" for i in range(16)]


def pack(units, seq_len: int, counts: Counter, lookahead: int = 16):
    """Every sequence `Packer` makes from a list of units."""
    it = iter(units)
    packer = Packer(lambda: next(it, None), seq_len, counts, lookahead)
    while (seq := packer.next()) is not None:
        yield seq


@pytest.fixture
def root(tmp_path):
    r = DataRoot(str(tmp_path))
    make_corpus(r, n=16, shards=2, packed=True)
    return r


def with_lists(tmp_path, lists) -> DataRoot:
    """The fixture's 16 documents, packed with exactly these neighbour lists (one retrieve shard)."""
    r = DataRoot(str(tmp_path / "lists"))
    make_corpus(r, n=16, shards=2, neighbours=False)
    make_neighbour_shard(r, "00000", KEYS, KEYS, lists=lists)
    pack_corpus(r)
    return r


def doc_bounds(unit):
    """Start offsets of each document in a unit (positions restart at 0 there, and again at the
    image marker, which is not a document start)."""
    return list(np.flatnonzero((unit.positions == 0) & (unit.ids != IMG_SRC)))


def test_store_reads_tokens_and_neighbours(root):
    c = open_store(root, with_neighbours=True)
    assert c.n_items() == 16 and c.lineage["codebook"] == "cb-1"
    assert c.lineage["index_fingerprint"] == "ix-1"
    d = c.doc(c.key_to_id("0005"))
    assert d[0] == IMG_OPEN and d[-1] == EOS and c.vocab.decode(d)[0] == [1, 2, 11]
    lists = c.neighbour_lists(c.key_to_id("0005"))
    assert set(lists) == {(q, v) for q in ("text", "image") for v in range(3)}


def test_k_drawn_uniformly_and_documents_in_order(root):
    c = open_store(root, with_neighbours=True)
    docs = docs_by_key(c)
    cfg = AssemblyConfig(seq_len=400, k_max=2, mask_prob=0.0)
    rng, counts = np.random.default_rng(0), Counter()
    seen = Counter()
    for i in range(300):
        key = f"{i % 16:04d}"
        u = draw_unit(rng, c.key_to_id(key), c, cfg, counts)
        assert u.key == key
        starts = doc_bounds(u)
        seen[len(starts) - 1] += 1
        main = u.ids[starts[-1]:]
        assert np.array_equal(main, docs[key])  # x comes last, unmasked with mask_prob 0
        for s, e in zip(starts[:-1], starts[1:], strict=True):  # each m_i is another doc of x's entity
            m = u.ids[s:e]
            assert any(np.array_equal(m, docs[o]) for o in docs if int(o) % 4 == int(key) % 4
                       and o != key)
            assert (u.roles[s:e] == ROLE_RETRIEVED).all()
        assert (u.roles[starts[-1]:] == ROLE_MAIN).all()
    assert set(seen) == {0, 1, 2} and min(seen.values()) > 70  # ~100 each
    assert counts["k0"] + counts["k1"] + counts["k2"] == 300


def test_retrieved_order_is_best_first(tmp_path):
    c = open_store(with_lists(tmp_path, {"0000": {("text", 1): ["0004", "0008"]}}), True)
    docs = docs_by_key(c)
    u = draw_unit(np.random.default_rng(0), c.key_to_id("0000"), c,
                  AssemblyConfig(k_max=2, mask_prob=0), Counter())
    k = len(doc_bounds(u)) - 1
    expect = np.concatenate([docs[x] for x in ["0004", "0008"][:k]] + [docs["0000"]])
    assert np.array_equal(u.ids, expect)


def test_vanilla_has_no_retrieved_documents(root):
    c = open_store(root, with_neighbours=False)
    cfg = AssemblyConfig(k_max=0, mask_prob=0.5)
    rng = np.random.default_rng(1)
    for i in range(50):
        u = draw_unit(rng, c.key_to_id(f"{i % 16:04d}"), c, cfg, Counter())
        assert (u.roles == ROLE_MAIN).all() and (u.weights == 1).all()


@pytest.mark.parametrize("alpha", [0.1, 0.0])
def test_loss_weight_alpha_exactly_on_retrieved_tokens(root, alpha):
    c = open_store(root, with_neighbours=True)
    cfg = AssemblyConfig(seq_len=200, k_max=2, alpha=alpha, mask_prob=0.5)
    stream = SequenceStream(c, cfg, seed=3)
    for seq in islice(iter(stream), 20):
        w, r = seq["weights"], seq["roles"]
        assert np.all(w[r == ROLE_RETRIEVED] == np.float32(alpha))
        assert np.all(w[r == ROLE_MAIN] == 1.0) and np.all(w[r == ROLE_PAD] == 0.0)
        assert len(seq["ids"]) == 200


def test_masked_spans_only_inside_main_document(root):
    c = open_store(root, with_neighbours=True)
    v, docs = c.vocab, docs_by_key(c)
    cfg = AssemblyConfig(seq_len=400, k_max=2, mask_prob=1.0, max_spans=3)
    rng = np.random.default_rng(2)
    for i in range(100):
        key = f"{i % 16:04d}"
        u = draw_unit(rng, c.key_to_id(key), c, cfg, Counter())
        sentinels = (u.ids >= v.mask(0)) & (u.ids < v.text_offset)
        assert sentinels.any() and (u.roles[sentinels] == ROLE_MAIN).all()
        assert ((u.ids == INFILL) <= (u.roles == ROLE_MAIN)).all()
        main = u.ids[doc_bounds(u)[-1]:]
        assert sorted(main.tolist()) != [] and unmask(main, v) == docs[key].tolist()


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


def test_caption_span_masks_the_whole_caption_in_the_prompt_form():
    """caption_span_prob = 1: every masked document is `<img alt="` <mask:0> `" src="` image
    `">` <infill> <mask:0> caption <eos>, the form image->caption generation prompts with."""
    from model.cm3.format import image_to_text_prompt

    v = Vocab(n_text=10, n_image=10)
    doc = np.array(v.encode([1, 2, 3], [4, 5]))
    cfg = AssemblyConfig(mask_prob=1.0, caption_span_prob=1.0)
    out = maybe_mask(np.random.default_rng(0), doc, v, cfg).tolist()
    prompt, _ = image_to_text_prompt(v, [4, 5])
    assert out[: len(prompt)] == prompt
    assert out[len(prompt):] == [*doc[1:4].tolist(), EOS]
    # at rate 0 the random spans keep their stream: the same rng draws give the same masking
    a = maybe_mask(np.random.default_rng(3), doc, v, AssemblyConfig(mask_prob=1.0)).tolist()
    b = maybe_mask(np.random.default_rng(3), doc, v, AssemblyConfig(mask_prob=1.0, caption_span_prob=0.0)).tolist()
    assert a == b


def test_packing_counts_and_overlong_rules(root):
    c = open_store(root, with_neighbours=False)
    doc_len = len(c.doc(c.key_to_id("0000")))  # 23 tokens
    counts = Counter()
    cfg = AssemblyConfig(seq_len=3 * doc_len + 5, k_max=0, mask_prob=0)
    rng = np.random.default_rng(0)
    units = [draw_unit(rng, c.key_to_id(k), c, cfg, counts) for k in KEYS]
    seqs = list(pack(units, cfg.seq_len, counts))
    assert counts["sequences"] == len(seqs) == 6 and counts["main_docs"] == 16  # 3 docs each
    assert counts["pad_tokens"] == 6 * cfg.seq_len - 16 * doc_len
    assert all(len(s["ids"]) == cfg.seq_len for s in seqs)
    # positions restart in every document (and at its image marker)
    first = seqs[0]["ids"][:doc_len]
    assert np.array_equal(seqs[0]["positions"][:doc_len + 2], [*positions(first), 0, 1])
    short = AssemblyConfig(seq_len=10, k_max=2, mask_prob=0)
    c2 = open_store(root, with_neighbours=True)
    one = c2.key_to_id("0001")
    counts = Counter()
    u = draw_unit(rng, one, c2, short, counts)
    assert len(u) == 10 and counts["main_truncated"] == 1
    counts = Counter()
    assert draw_unit(rng, one, c2, AssemblyConfig(seq_len=10, overlong="drop"), counts) is None
    assert counts["main_dropped_overlong"] == 1
    counts = Counter()
    for _ in range(20):
        draw_unit(rng, one, c2, AssemblyConfig(seq_len=2 * doc_len, mask_prob=0), counts)
    assert counts["retrieved_dropped_overlong"] == counts["k2"] > 0  # the second doesn't fit


def test_missing_neighbour_keys_are_counted_and_skipped(tmp_path):
    lists = oracle_lists(KEYS, KEYS)
    lists["0000"] = {("image", 1): ["gone", "0004", "0008"]}  # "gone" has no tokens: id -1
    c = open_store(with_lists(tmp_path, lists), with_neighbours=True)
    n = len(c.doc(c.key_to_id("0004")))
    counts = Counter()
    rng = np.random.default_rng(0)
    for _ in range(30):
        u = draw_unit(rng, c.key_to_id("0000"), c, AssemblyConfig(seq_len=400, mask_prob=0), counts)
        assert (u.roles == ROLE_RETRIEVED).sum() in (0, n, 2 * n)
    assert counts["neighbour_missing_tokens"] == counts["k1"] + counts["k2"] > 0


def test_random_documents_ablation(root):
    c = open_store(root, with_neighbours=False)  # no neighbour lists at all
    cfg = AssemblyConfig(seq_len=400, random_neighbours=True, mask_prob=0)
    rng, counts = np.random.default_rng(0), Counter()
    three = c.key_to_id("0003")
    ks = [len(doc_bounds(draw_unit(rng, three, c, cfg, counts))) - 1 for _ in range(60)]
    assert set(ks) == {0, 1, 2} and counts["no_neighbour_row"] == 0


def test_collate_and_modality(root):
    c = open_store(root, with_neighbours=True)
    stream = SequenceStream(c, AssemblyConfig(seq_len=100), seed=0)
    batch = collate(list(islice(iter(stream), 4)))
    assert batch["ids"].shape == (4, 100) and len(batch["keys"]) == 4
    ids, mod = batch["ids"].numpy(), batch["modality"].numpy()
    assert np.array_equal(mod, c.vocab.modality(ids))


def test_mixed_codebooks_are_refused(tmp_path):
    root = DataRoot(str(tmp_path))
    make_token_shard(root, "00000", ["0000", "0001"], codebook="cb-1")
    make_token_shard(root, "00001", ["0002", "0003"], codebook="cb-2")
    pack_corpus(root)  # each part packs alone; opening them together is refused
    with pytest.raises(LineageError, match="codebook"):
        open_store(root, with_neighbours=False)


def test_mixed_indexes_and_pins_are_refused(tmp_path):
    root = DataRoot(str(tmp_path))
    keys = ["0000", "0001", "0002", "0003"]
    make_token_shard(root, "00000", keys)
    make_neighbour_shard(root, "00000", keys[:2], keys, index="ix-1")
    make_neighbour_shard(root, "00001", keys[2:], keys, index="ix-2")
    pack_corpus(root)
    with pytest.raises(LineageError, match="index_fingerprint"):
        open_store(root, with_neighbours=True)
    with pytest.raises(LineageError, match="codebook"):  # as training checks its pins
        check_pins(open_store(root, with_neighbours=False).lineage, {"codebook": "other"})


def test_held_out_documents_are_never_trained_on(root):
    c = open_store(root, with_neighbours=True, holdout_fraction=0.3)
    held_out = {c.label(i) for i in range(c.n_items()) if c.is_held(i)}
    assert 0 < len(held_out) < 16 and c.lineage["held_out_docs"] == len(held_out)
    other = open_store(root, False, holdout_fraction=0.3)
    assert held_out == {other.label(i) for i in range(16) if other.is_held(i)}  # stable split
    stream = SequenceStream(c, AssemblyConfig(seq_len=200, k_max=2, mask_prob=0), seed=0)
    docs = docs_by_key(c)
    trained = [d for k, d in docs.items() if k not in held_out]
    held = [docs[k] for k in held_out  # content-unique ones: entity docs can coincide
            if not any(np.array_equal(docs[k], t) for t in trained)]
    assert held
    for seq in islice(iter(stream), 40):
        assert not set(seq["keys"]) & held_out
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
