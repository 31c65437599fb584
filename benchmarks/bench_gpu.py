"""GPU benchmark (a few minutes on one CUDA device): embed images/s, tokenize images/s, training
tokens/s and MFU (bf16 autocast, fused SDPA attention), FAISS GPU search, beside the anchors.

    python benchmarks/bench_gpu.py [--quick]

Exits 0 with a message when there is no CUDA device (so `make bench` passes on CPU machines).
Anchors: clip-retrieval embeds 1,400-1,500 images/s (ViT-B/32) on one RTX 3080; the paper trains
on A100s. Weights are random (speed does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

import torch  # noqa: E402

ANCHOR_EMBED = 1400.0  # images/s, clip-retrieval ViT-B/32 on one RTX 3080


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call, synchronised."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak(dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 5)


@torch.no_grad()
def embed_rate(batch: int, repeats: int) -> float:
    from model.clip_encoder import create_clip

    model = create_clip("ViT-B-32", "")[0].cuda().eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return batch / timed(lambda: model.encode_image(x, normalize=True), repeats)


@torch.no_grad()
def tokenize_rate(batch: int, repeats: int) -> float:
    from model.vqgan import VQGAN, VQGANConfig

    model = VQGAN(VQGANConfig()).cuda().eval()
    size = VQGANConfig().resolution
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return batch / timed(lambda: model.encode(x), repeats)


def train_rate(d_model: int, layers: int, seq: int, batch: int, repeats: int,
               bf16: bool) -> tuple[float, float]:
    """(tokens/s, model FLOP/s) of forward+backward+Adam on random tokens (6N + attention)."""
    from model.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(n_layer=layers, n_head=max(1, d_model // 64), d_model=d_model,
                            max_seq_len=seq, vocab_size=16384)
    model = Transformer(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    pos = torch.arange(seq, device="cuda").expand(batch, seq)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids, pos)[0]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    secs = timed(step, repeats)
    flops_per_token = 6 * model.num_params() + 6 * layers * seq * d_model  # + causal attention
    tokens = batch * seq
    return tokens / secs, flops_per_token * tokens / secs


def faiss_gpu_rate(n: int, dim: int, queries: int) -> str:
    import faiss
    import numpy as np

    if not hasattr(faiss, "StandardGpuResources"):
        return "FAISS GPU search: this faiss build has no GPU support (faiss-cpu); skipped"
    x = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(dim))
    index.add(x)
    t0 = time.perf_counter()
    index.search(x[:queries], 10)
    return f"FAISS GPU flat search: {queries / (time.perf_counter() - t0):,.0f} queries/s " \
           f"over {n:,} x {dim}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); nothing to "
              "measure. Run it on a machine with a GPU: make bench-gpu")
        return 0
    reps = 3 if args.quick else 10
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak (8192^2): fp32 {peak32 / 1e12:.1f} TFLOP/s, bf16 {peak16 / 1e12:.1f} TFLOP/s")
    emb = embed_rate(256, reps)
    print(f"embed (ViT-B/32, bf16, batch 256): {emb:,.0f} images/s = {emb / ANCHOR_EMBED:.2f}x "
          f"clip-retrieval's {ANCHOR_EMBED:,.0f}/s on an RTX 3080")
    print(f"tokenize (VQGAN encode, bf16, batch 64): {tokenize_rate(64, reps):,.0f} images/s")
    sizes = [(128, 4, 1024, 32)] + ([] if args.quick else [(1024, 12, 2048, 16)])
    for d, layers, seq, batch in sizes:
        for bf16 in (False, True):
            tps, flops = train_rate(d, layers, seq, batch, reps, bf16)
            peak = peak16 if bf16 else peak32
            print(f"train d{d} x{layers} seq {seq} {'bf16' if bf16 else 'fp32'} (SDPA): "
                  f"{tps:,.0f} tokens/s, MFU {flops / peak:.1%} of the measured "
                  f"{'bf16' if bf16 else 'fp32'} matmul peak")
    print(faiss_gpu_rate(100_000 if args.quick else 1_000_000, 128, 10_000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
