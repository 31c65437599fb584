"""Benchmark sampling on the demo decoder: (1) generated tokens/s with the KV cache
(model.sampling.sample) vs without (the whole prefix recomputed for every new token); (2) images/s
and captions/s with the KV cache, and images/s with classifier-free guidance (caption guidance:
2 branches; caption + document guidance: 3 branches, all in one batch) vs without.

    python benchmarks/bench_sampling.py [--model demo] [--batch 4] [--new 64] [--context 2] [--repeat 3]

The prompt is K retrieved documents (each a caption + grid*grid codes) then `<img alt="caption"
src="`, as caption->image generation sends it; in (1) both methods sample the same number of image
tokens greedily (same ids, checked). Everything is timed interleaved, best of --repeat.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.cm3.format import text_to_image_prompt  # noqa: E402
from model.document import Vocab  # noqa: E402
from model.sampling import guide, pick, sample  # noqa: E402
from model.transformer import Transformer, preset  # noqa: E402
from pipelines.inference.guidance import Guidance, guided_images  # noqa: E402
from pipelines.inference.sampling import Sampling, generate_captions, generate_images  # noqa: E402


@torch.no_grad()
def sample_without_cache(model: Transformer, prompt: torch.Tensor, positions: torch.Tensor,
                         max_new: int, allowed: range) -> torch.Tensor:
    """Greedy decoding that re-runs the whole sequence for each new token (the baseline)."""
    keep = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
    keep[list(allowed)] = True
    ids, pos, out = prompt, positions, []
    for _ in range(max_new):
        logits, _ = model(ids, pos)  # (B, T, V): no cache, everything recomputed
        nxt = logits[:, -1].masked_fill(~keep, float("-inf")).argmax(-1, keepdim=True)  # (B, 1)
        out.append(nxt)
        ids, pos = torch.cat([ids, nxt], 1), torch.cat([pos, pos[:, -1:] + 1], 1)
    return torch.cat(out, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="image tokens to sample (grid*grid)")
    ap.add_argument("--context", type=int, default=2, help="retrieved documents in the prompt")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = Vocab(n_text=512, n_image=64)
    torch.manual_seed(0)
    model = Transformer(preset(args.model, vocab.size)).eval()
    caption = list(range(10))
    docs = [vocab.encode(caption, [i % 64 for i in range(args.new)]) for _ in range(args.context)]
    ids, pos = text_to_image_prompt(vocab, caption, docs)
    prompt = torch.tensor([ids] * args.batch)
    positions = torch.tensor([pos] * args.batch)
    allowed = range(vocab.image_offset, vocab.size)
    runs = {"kv cache": lambda: sample(model, prompt, positions, args.new, temperature=0,
                                       allowed=allowed),
            "no cache": lambda: sample_without_cache(model, prompt, positions, args.new, allowed)}
    assert torch.equal(runs["kv cache"](), runs["no cache"]()), "cached and uncached ids differ"
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():  # interleaved: shared-machine noise hits both alike
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    n = args.batch * args.new
    print(f"model {args.model} ({model.num_params() / 1e6:.2f}M params), batch {args.batch}, "
          f"prompt {len(ids)} tokens, {args.new} new tokens per row, {args.threads} thread(s)")
    for name, t in best.items():
        print(f"  {name:9s} {n / t:9.0f} tokens/s  ({t * 1000:.0f} ms)")
    print(f"  speed-up of the KV cache: {best['no cache'] / best['kv cache']:.2f}x")
    per_second(model, vocab, caption, docs, args)


def best_of(runs: dict, repeat: int) -> dict[str, float]:
    best = {k: float("inf") for k in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@torch.no_grad()
def guided_one_after_another(model: Transformer, branches: list, weight: float, n: int,
                             max_new: int, allowed: range, gen: torch.Generator) -> torch.Tensor:
    """The peer of the shared batch: caption guidance with each branch its own forward per step."""
    keep = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
    keep[list(allowed)] = True
    state = []
    for ids, pos in branches:
        logits, cache = model(torch.tensor([ids] * n), torch.tensor([pos] * n))
        state.append([logits[:, -1], cache, torch.tensor([[pos[-1] + 1]] * n)])
    out = []
    for _ in range(max_new):
        logp = torch.stack([s[0].masked_fill(~keep, float("-inf")).log_softmax(-1) for s in state])
        mixed = guide(logp, [weight]).masked_fill(~keep, float("-inf"))
        nxt = pick(mixed, 1.0, 0, 0.9, gen)
        out.append(nxt)
        for s in state:
            logits, s[1] = model(nxt, s[2], s[1])
            s[0], s[2] = logits[:, -1], s[2] + 1
    return torch.cat(out, 1)


def per_second(model: Transformer, vocab: Vocab, caption: list[int], docs: list, args) -> None:
    """Images/s and captions/s as `racm3 generate` samples them (KV cache, top-p 0.9)."""
    grid = int(args.new ** 0.5)
    params = Sampling(1.0, 0, 0.9)
    gen = torch.Generator().manual_seed(0)
    image = [i % vocab.n_image for i in range(grid * grid)]

    def images(g: Guidance):
        return lambda: guided_images(model, vocab, caption, grid, args.batch, docs, g, params, gen)
    runs = {"images, no guidance": images(Guidance()),
            "images, caption guidance": images(Guidance(caption=3.0)),
            "images, caption + document guidance": images(Guidance(caption=3.0, documents=1.0)),
            "images, caption guidance, branches one after another": lambda: guided_one_after_another(
                model, [text_to_image_prompt(vocab, caption, docs), text_to_image_prompt(vocab, [], docs)],
                3.0, args.batch, grid * grid, range(vocab.image_offset, vocab.size), gen),
            "captions (24 tokens)": lambda: generate_captions(
                model, vocab, image, args.batch, 24, docs, params, gen)}
    assert len(generate_images(model, vocab, caption, grid, 2, docs, params, gen)) == 2
    best = best_of(runs, args.repeat)
    print(f"per output, batch {args.batch}, {grid}x{grid} image tokens, {len(docs)} documents in context:")
    for name, t in best.items():
        unit = "captions" if name.startswith("captions") else "images"
        print(f"  {name:53s} {args.batch / t:8.2f} {unit}/s")
    plain = best["images, no guidance"]
    print(f"  cost of caption guidance (2 branches, one batch): {best['images, caption guidance'] / plain:.2f}x; "
          f"caption + documents (3 branches): {best['images, caption + document guidance'] / plain:.2f}x; "
          f"caption guidance with the branches one after another (the peer): "
          f"{best['images, caption guidance, branches one after another'] / plain:.2f}x")


if __name__ == "__main__":
    main()
