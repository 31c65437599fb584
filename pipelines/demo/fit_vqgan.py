"""fit-vqgan: fit the demo's tokenizers on the downloaded images and captions (no pretrained VQGAN offline).

Two artifact shards with their own fingerprints: `vqgan` (a tiny VQGAN fitted with Lightning for a
fixed number of steps from the seed, byte-identical across runs whatever the load; `max_seconds` is
a safety stop that FAILS the stage; its manifest records held-out PSNR and codebook usage) and `bpe` (a small BPE on
the captions). Real runs skip this stage and point `tokenize.checkpoint` at a taming checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from model.images import load_image, to_tensor
from model.text_tokenizer import train_bpe
from model.vqgan import VQGAN, VQGANConfig, save_checkpoint
from pipelines.core.config import StageConfig
from pipelines.core.liblogs import route_lightning_logs
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.training.steplog import StepLog
from storage.fs import DataRoot
from storage.manifest import list_manifests, upstream_ref
from storage.schemas import BPE_SHARD, BPE_SUFFIX, SUCCESS, VQGAN_SHARD, VQGAN_SUFFIX

log = logging.getLogger(__name__)

BPE_FIELDS = ("bpe_vocab_size",)


@dataclass(frozen=True)
class FitVQGANConfig(StageConfig):
    """The tiny demo VQGAN and caption BPE; sizes follow docs/demo-design.md (coarse 8x8 grid)."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"threads"})
    image_size: int = 32  # training resolution (downloads are resized to it)
    factor: int = 4  # downsampling factor: image_size / factor tokens per side
    codebook_size: int = 64  # codes; coarse keeps retrieved tokens predictive of new renderings
    channels: int = 16  # base channel width (tiny: the fit has ~100 s of shared CPU)
    res_blocks: int = 0  # residual blocks per level; 0 keeps only the mid blocks (3x the steps/s of 1)
    embed_dim: int = 16  # codebook vector size
    kmeans_codes: int = 32  # k-means clusters that become codes (0 or > codebook_size: all); 0.96 vs 0.84 of
    # flag cells keep their code across renderings at 32 vs 64 (docs/demo-design.md: coarse helps)
    kmeans_iters: int = 20  # k-means iterations over training patches that fix each token's target code
    kmeans_patches: int = 50000  # patches sampled for k-means (all are assigned afterwards)
    code_weight: float = 1.0  # weight of the code cross-entropy against the reconstruction loss
    max_seconds: float = 1800.0  # safety stop: a fit still running after this FAILS (never a normal end)
    max_steps: int = 1200  # steps run, always all of them (~75 s on an idle core)
    batch_size: int = 32  # images per step
    lr: float = 6e-3  # Adam learning rate (after warm-up); 6e-3 beat 3e-3 and 1e-2 at 500 steps
    warmup_steps: int = 50  # linear learning-rate warm-up
    holdout_fraction: float = 0.05  # images kept out of training to measure PSNR and usage
    max_images: int = 8000  # cap on images read (memory)
    seed: int = 0
    bpe_vocab_size: int = 512  # caption BPE size; small keeps the demo model's embedding cheap
    threads: int = 1  # torch CPU threads (1 is fastest on a shared 2-core laptop: 2 measured 8x slower)

    def __post_init__(self) -> None:
        self.check(self.factor >= 1 and self.factor & (self.factor - 1) == 0, "factor",
                   "must be a power of two")
        self.check(self.image_size % self.factor == 0, "image_size", "must be a multiple of factor")
        self.check(2 <= self.codebook_size <= 65536, "codebook_size", "must be in [2, 65536] (uint16 codes)")
        self.check(self.channels % 8 == 0, "channels", "must be a multiple of 8 (GroupNorm)")
        self.check(self.max_seconds > 0 and self.max_steps > 0, "max_seconds", "budget must be > 0")
        self.check(0 < self.holdout_fraction < 0.5, "holdout_fraction", "must be in (0, 0.5)")
        self.check(self.bpe_vocab_size >= 64, "bpe_vocab_size", "must be >= 64")
        self.check(self.res_blocks >= 0, "res_blocks", "must be >= 0")
        self.check(self.kmeans_iters >= 1, "kmeans_iters", "must be >= 1")
        self.check(self.kmeans_codes >= 0, "kmeans_codes", "must be >= 0 (0 = all codes)")

    def vqgan(self) -> VQGANConfig:
        levels = int(math.log2(self.factor)) + 1
        # Without level blocks nothing can widen the channels, so the width stays constant.
        last = 2 if self.res_blocks else 1
        return VQGANConfig(resolution=self.image_size, ch=self.channels,
                           ch_mult=(1,) * (levels - 1) + (last,), num_res_blocks=self.res_blocks,
                           attn_resolutions=(), z_channels=last * self.channels,
                           embed_dim=self.embed_dim, n_embed=self.codebook_size, norm_groups=8)


def is_holdout(key: str, fraction: float) -> bool:
    """Stable split by key hash, so held-out images stay held out across re-runs and shard counts."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    return h < fraction * 2**32


def read_downloads(ctx: ShardContext, cfg: FitVQGANConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(train images, held-out images, undecodable count) from every input download shard."""
    train: list[np.ndarray] = []
    held: list[np.ndarray] = []
    bad = 0
    for i in range(len(ctx.spec.inputs)):
        t = ctx.read_input(i, ["key", "status", "jpg"]).to_pydict()
        for key, status, jpg in zip(t["key"], t["status"], t["jpg"], strict=True):
            if status != SUCCESS or jpg is None or len(train) + len(held) >= cfg.max_images:
                continue
            try:
                img = load_image(jpg, cfg.image_size)
            except Exception:  # noqa: BLE001 - any undecodable image is counted and skipped
                bad += 1
                continue
            (held if is_holdout(key, cfg.holdout_fraction) else train).append(img)
    if len(train) < 2 or not held:
        raise ValueError(f"fit-vqgan needs decodable images to train and hold out; got "
                         f"{len(train)} train, {len(held)} held out: run `racm3 run download` first")
    return np.stack(train), np.stack(held), bad


def read_captions(ctx: ShardContext) -> list[str]:
    caps = []
    for i in range(len(ctx.spec.inputs)):
        t = ctx.read_input(i, ["caption", "status"]).to_pydict()
        caps += [c for c, s in zip(t["caption"], t["status"], strict=True) if s == SUCCESS and c]
    return caps


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1], measured on the [0, 1] scale."""
    mse = F.mse_loss((a + 1) / 2, (b + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


@torch.no_grad()
def evaluate(model: VQGAN, images: np.ndarray, batch: int = 256) -> dict[str, Any]:
    """Held-out reconstruction PSNR and codebook usage (fraction of codes used, perplexity)."""
    model.eval()
    recon, codes = [], []
    for s in range(0, len(images), batch):
        x = to_tensor(images[s:s + batch])
        c = model.encode(x)  # (B, g, g)
        recon.append(model.decode(c))
        codes.append(c.flatten())
    x, r, c = to_tensor(images), torch.cat(recon), torch.cat(codes)
    p = torch.bincount(c, minlength=model.cfg.n_embed).float() / c.numel()
    perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
    return {"heldout_psnr_db": round(psnr(x, r), 3), "heldout_images": len(images),
            "codebook_used": int((p > 0).sum()), "codebook_usage": round(float((p > 0).float().mean()), 4),
            "code_perplexity": round(perplexity, 2)}


def patches(x: torch.Tensor, f: int) -> torch.Tensor:
    """(B, 3, R, R) -> (B*g*g, 3*f*f) non-overlapping f x f patches, one per token, row-major."""
    b, c, r, _ = x.shape
    g = r // f
    return x.reshape(b, c, g, f, g, f).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, c * f * f)


def nearest(v: torch.Tensor, centres: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N, P), (K, P) -> (N,) index of the nearest centre, in chunks to bound memory."""
    return torch.cat([torch.cdist(v[s:s + chunk], centres).argmin(1) for s in range(0, len(v), chunk)])


def kmeans(v: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """(N, P) -> (k, P) Lloyd's k-means; an emptied cluster is re-seeded with a random point."""
    centres = v[torch.randperm(len(v), generator=gen)[:k]].clone()
    for _ in range(iters):
        lab = nearest(v, centres)
        n = torch.bincount(lab, minlength=k).float()[:, None]  # (k, 1)
        sums = torch.zeros_like(centres).index_add_(0, lab, v)
        spare = v[torch.randint(0, len(v), (k,), generator=gen)]
        centres = torch.where(n > 0, sums / n.clamp(min=1), spare)
    return centres


def token_patches(images: np.ndarray, f: int) -> torch.Tensor:
    """(N, R, R, 3) uint8 -> (N*g*g, 3*f*f) patches in [-1, 1], converted 1024 images at a time."""
    return torch.cat([patches(to_tensor(images[s:s + 1024]), f) for s in range(0, len(images), 1024)])


def patch_centres(images: np.ndarray, cfg: FitVQGANConfig) -> torch.Tensor:
    """(N, R, R, 3) uint8 training images -> (k, 3*f*f) k-means centres of their token patches.

    Every demo token is close to one solid colour, so clustering the patches themselves gives codes
    that mean the same colour in every rendering (what retrieval needs); the network learns to
    predict and decode these codes instead of discovering them, which takes far longer on 2 cores.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    v = token_patches(images, cfg.factor)
    sample = v[torch.randperm(len(v), generator=gen)[:cfg.kmeans_patches]]
    k = min(cfg.kmeans_codes or cfg.codebook_size, cfg.codebook_size, len(sample))
    return kmeans(sample, k, cfg.kmeans_iters, gen)


def assign(images: np.ndarray, centres: torch.Tensor, f: int) -> torch.Tensor:
    """(N, R, R, 3) uint8 -> (N, g, g) int64 index of each token's nearest patch centre."""
    g = images.shape[1] // f
    return nearest(token_patches(images, f), centres).view(len(images), g, g)


@torch.no_grad()
def code_match(model: VQGAN, images: np.ndarray, centres: torch.Tensor) -> float:
    """Share of tokens whose VQGAN code is their nearest patch centre (held-out: learned, not copied)."""
    codes = torch.cat([model.encode(to_tensor(images[s:s + 256])) for s in range(0, len(images), 256)])
    return round(float((codes == assign(images, centres, model.cfg.factor)).float().mean()), 4)


class VQGANModule(L.LightningModule):
    """Reconstruction (L1 + MSE) from each token's target code, plus cross-entropy of the code.

    Codebook distances act as logits: the encoder and codebook learn to put each latent nearest its
    target code (so `encode` = argmin distance returns it), and the decoder learns to draw the
    image from the target codes. No perceptual or adversarial term: LPIPS weights cannot be fetched
    offline, and flat flag colours need neither.
    """

    def __init__(self, model: VQGAN, cfg: FitVQGANConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, target = to_tensor(batch[0].numpy()), batch[1]  # (B, 3, R, R), (B, g, g)
        z = self.model.latents(x)  # (B, D, g, g)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*g*g, D)
        logits = -torch.cdist(flat, self.model.quantize.embedding.weight).pow(2)  # (B*g*g, K)
        code_loss = F.cross_entropy(logits, target.flatten())
        recon = self.model.decode_latents(self.model.quantize.lookup(target))  # (B, 3, R, R)
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + self.cfg.code_weight * code_loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, betas=(0.9, 0.99))
        warm = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / max(1, self.cfg.warmup_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}


class SafetyStop(L.Callback):
    """Fails the fit past `seconds` (a stopped-early model would depend on the machine's load)."""

    def __init__(self, seconds: float, steps: int):
        self.seconds, self.steps, self.t0 = seconds, steps, time.time()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if time.time() - self.t0 > self.seconds and trainer.global_step < self.steps:
            raise TimeoutError(f"fit-vqgan: {trainer.global_step}/{self.steps} steps after "
                               f"{self.seconds:.0f} s (fit_vqgan.max_seconds, a safety stop): "
                               f"raise it or lower max_steps")


def fit(model: VQGAN, images: np.ndarray, cfg: FitVQGANConfig,
        centres: torch.Tensor) -> tuple[VQGAN, int]:
    """Train exactly cfg.max_steps steps towards the patch centres' codes (batches drawn from a
    generator seeded by cfg.seed); TimeoutError past cfg.max_seconds."""
    targets = assign(images, centres, cfg.factor)  # (N, g, g)
    data = torch.utils.data.TensorDataset(torch.from_numpy(images), targets)  # uint8: converted per batch
    loader = torch.utils.data.DataLoader(data, batch_size=min(cfg.batch_size, len(images)),
                                         shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    route_lightning_logs()  # its tips and banners through racm3's console filters
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.max_steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[SafetyStop(cfg.max_seconds, cfg.max_steps),
                                   StepLog("fit-vqgan", cfg.max_steps)])
    module = VQGANModule(model, cfg)
    trainer.fit(module, loader)
    return module.model.eval(), trainer.global_step


class FitVQGANStage(Stage):
    name = "fit-vqgan"
    version = "3"
    config = FitVQGANConfig
    engine = "local"
    description = "fit the demo's tiny VQGAN and caption BPE on the downloaded images"

    def plan(self, root: DataRoot, cfg: FitVQGANConfig) -> list[ShardSpec]:
        ids = sorted(m.shard_id for m in list_manifests(root, "download"))
        if not ids:
            return []
        inputs = tuple(upstream_ref(root, "download", sid) for sid in ids)
        return [ShardSpec(self.name, VQGAN_SHARD, inputs), ShardSpec(self.name, BPE_SHARD, inputs)]

    def shard_params(self, cfg: FitVQGANConfig, shard_id: str) -> dict[str, Any]:
        """Each artifact depends only on its own fields: a new BPE size never refits the VQGAN."""
        p = cfg.params()
        keep = BPE_FIELDS if shard_id == BPE_SHARD else [k for k in p if k not in BPE_FIELDS]
        return {k: p[k] for k in keep}

    def fingerprint(self, cfg: FitVQGANConfig, spec: ShardSpec) -> str:
        from storage.manifest import fingerprint, params_hash

        return fingerprint(self.version, params_hash(self.shard_params(cfg, spec.shard_id)),
                           list(spec.inputs))

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        if ctx.spec.shard_id == BPE_SHARD:
            return fit_bpe_shard(ctx, ctx.cfg)
        return fit_vqgan_shard(ctx, ctx.cfg)


def fit_bpe_shard(ctx: ShardContext, cfg: FitVQGANConfig) -> ShardResult:
    caps = read_captions(ctx)
    tok = train_bpe(caps, cfg.bpe_vocab_size, ctx.local_path(BPE_SUFFIX))
    lens = [len(tok.encode(c)) for c in caps[:2000]]
    return ShardResult(rows_in=len(caps), rows_out=1, metrics={
        "text_tokenizer": tok.fingerprint(), "n_text": tok.vocab_size,
        "mean_caption_tokens": round(float(np.mean(lens)), 2) if lens else 0.0})


def fit_vqgan_shard(ctx: ShardContext, cfg: FitVQGANConfig) -> ShardResult:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train, held, bad = read_downloads(ctx, cfg)
    t0 = time.time()
    centres = patch_centres(train, cfg)  # (k, 3*f*f), from training images only
    model, steps = fit(VQGAN(cfg.vqgan()), train, cfg, centres)
    seconds = time.time() - t0
    metrics = {"train_images": len(train), "steps": steps, "fit_seconds": round(seconds, 1),
               "steps_per_second": round(steps / seconds, 2), "grid": cfg.image_size // cfg.factor,
               "kmeans_codes": len(centres), "heldout_code_match": code_match(model, held, centres),
               **evaluate(model, held)}
    save_checkpoint(model, ctx.local_path(VQGAN_SUFFIX))
    log.info("fit-vqgan: %s", metrics)
    return ShardResult(rows_in=len(train) + len(held) + bad, rows_out=1,
                       dropped={"undecodable_image": bad} if bad else {}, metrics=metrics)
