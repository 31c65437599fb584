"""Stage `fit-clip`: fit a tiny open_clip model contrastively on the download shards (demo bootstrap).

No pretrained CLIP exists offline, so the demo fits `racm3-demo` with open_clip's ClipLoss for a
fixed number of steps from the seed: the same seed gives a byte-identical model whatever the
machine's load (`seconds` is only a safety stop, and reaching it FAILS the stage). Real runs skip
this stage and point `embed.checkpoint` at real weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from model.clip_encoder import DocEncoder, EncoderInfo, create_clip, decode_image
from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.demo.clip_objective import caption_labels, multi_positive_loss, reword
from pipelines.retrieval.recall_metrics import table4
from storage.coco import CocoSplit, coco_ref, load_coco
from storage.fs import DataRoot
from storage.manifest import list_manifests, upstream_ref
from storage.schemas import SUCCESS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitClipConfig(StageConfig):
    """Contrastive fit of a small open_clip model: exactly max_steps steps from the seed."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"threads"})
    model: str = "racm3-tiny"  # open_clip model config (model/clip_configs/*.json or built-in)
    seconds: float = 1800.0  # safety stop: a fit still running after this FAILS (never a normal end)
    max_steps: int = 3000  # steps run, always all of them (deterministic from the seed)
    batch_size: int = 128  # contrastive batch (more negatives per step)
    lr: float = 1e-3  # AdamW peak learning rate (2e-3 generalised worse on the demo)
    token_lr: float = 0.1  # SparseAdam peak lr of the token embedding table (0 = keep it frozen)
    weight_decay: float = 0.1  # AdamW weight decay
    warmup_steps: int = 30  # linear warm-up, then cosine over max_steps
    seed: int = 0  # init, batching and hold-out draw
    holdout_fraction: float = 0.1  # docs held out for recall when there is no COCO split
    coco: str = "demo/laion.coco/captions_dev.json"  # held-out split for recall (optional): dev, it guides choices
    # With both (dev, seed 0, 400 steps, same cost per step): caption-query same-entity hit@1
    # 56.5 -> 100 %, image query 74.5 -> 94.5 % (pipelines/demo/clip_objective.py).
    entity_positives: bool = True  # every caption naming the same entity is a positive (clip_objective)
    reword: float = 0.5  # share of demo captions re-worded per step: random template and background
    threads: int = 1  # torch CPU threads (1 is fastest on a shared laptop: no OpenMP spinning)

    def __post_init__(self) -> None:
        self.check(self.seconds > 0, "seconds", "must be > 0")
        self.check(self.max_steps >= 1, "max_steps", "must be >= 1")
        self.check(self.batch_size >= 2, "batch_size", "contrastive loss needs >= 2 per batch")
        self.check(self.token_lr >= 0, "token_lr", "must be >= 0 (0 = frozen token embeddings)")
        self.check(0 < self.holdout_fraction < 1, "holdout_fraction", "must be in (0, 1)")
        self.check(0 <= self.reword <= 1, "reword", "must be in [0, 1]")


@dataclass
class Corpus:
    """Preprocessed training pairs: images (N, 3, S, S) and token ids (N, C)."""

    images: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]
    jpgs: list[bytes]
    tokenizer: Any = None  # to tokenize re-worded captions (None: never re-word)


def read_pairs(ctx: ShardContext) -> tuple[list[str], list[bytes], dict[str, int]]:
    """Usable (caption, jpg) pairs from every download shard, with drop counts by reason."""
    caps, jpgs, dropped = [], [], {"failed_download": 0, "empty_caption": 0, "undecodable_image": 0}
    for i in range(len(ctx.spec.inputs)):
        if ctx.spec.inputs[i].stage != "download":
            continue
        t = ctx.read_input(i, ["caption", "status", "jpg"]).to_pylist()
        for r in t:
            if r["status"] != SUCCESS or not r["jpg"]:
                dropped["failed_download"] += 1
            elif not (r["caption"] or "").strip():
                dropped["empty_caption"] += 1
            else:
                caps.append(r["caption"])
                jpgs.append(r["jpg"])
    return caps, jpgs, dropped


def build_corpus(caps: list[str], jpgs: list[bytes], preprocess: Any, tokenizer: Any,
                 dropped: dict[str, int], side: int | None = None) -> Corpus:
    keep, ims = [], []
    for i, b in enumerate(jpgs):
        im = decode_image(b, side)  # same DCT-scaled decode as embed
        if im is None:
            dropped["undecodable_image"] += 1
            continue
        keep.append(i)
        ims.append(preprocess(im))
    caps, jpgs = [caps[i] for i in keep], [jpgs[i] for i in keep]
    return Corpus(torch.stack(ims), tokenizer(caps), caps, jpgs, tokenizer)


def lr_scale(step: int, cfg: FitClipConfig) -> float:
    """Linear warm-up, then cosine decay over max_steps: a factor on each optimizer's peak lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def optimizers(model: Any, cfg: FitClipConfig) -> list[torch.optim.Optimizer]:
    """AdamW for the towers; the token table is trained sparsely (SparseAdam) or frozen.

    A dense update of the 49408 x width BPE table would cost every step more than the towers; a
    sparse gradient touches only the few hundred tokens a batch uses. Learned rows let the text
    tower tell the demo's pseudo-word entity names apart; they need a high lr (measured on the
    demo, 450 steps: text-query entity hit@1 51.5 at token_lr 0.01, 62 at 0.1).
    """
    emb = model.token_embedding
    if cfg.token_lr <= 0:
        emb.requires_grad_(False)
    else:
        emb.sparse = True  # nn.Embedding then yields sparse gradients
    rest = [p for p in model.parameters() if p.requires_grad and p is not emb.weight]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(rest, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if cfg.token_lr > 0:
        opts.append(torch.optim.SparseAdam([emb.weight], lr=cfg.token_lr))
    return opts


def train(model: Any, data: Corpus, cfg: FitClipConfig) -> dict[str, Any]:
    """Exactly cfg.max_steps contrastive steps; raises TimeoutError past cfg.seconds (a safety
    stop: a model cut short by the machine's load would differ from run to run)."""
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2])  # re-wording draws
    opts = optimizers(model, cfg)
    peaks = [o.param_groups[0]["lr"] for o in opts]
    n = len(data.captions)
    lab = caption_labels(data.captions)
    labels = torch.as_tensor(lab.labels if cfg.entity_positives else np.arange(n))
    do_reword = cfg.reword > 0 and data.tokenizer is not None and any(lab.names)
    bs = min(cfg.batch_size, n)
    model.train()
    t0, step, losses = time.time(), 0, []
    while step < cfg.max_steps:
        if time.time() - t0 > cfg.seconds:
            raise TimeoutError(f"fit-clip: {step}/{cfg.max_steps} steps after {cfg.seconds:.0f} s "
                               f"(fit_clip.seconds, a safety stop): raise it or lower max_steps")
        idx = torch.randperm(n, generator=g)[:bs]
        for opt, peak in zip(opts, peaks, strict=True):
            opt.param_groups[0]["lr"] = peak * lr_scale(step, cfg)
        if do_reword:
            rows = idx.tolist()
            tokens = data.tokenizer(reword([data.captions[i] for i in rows],
                                           [lab.names[i] for i in rows], rng, cfg.reword))
        else:
            tokens = data.tokens[idx]
        img_f = model.encode_image(data.images[idx], normalize=True)  # (B, D)
        txt_f = model.encode_text(tokens, normalize=True)  # (B, D)
        loss = multi_positive_loss(img_f, txt_f, labels[idx], model.logit_scale.exp())
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop does
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            log.info("fit-clip step %d loss %.3f (%.0fs)", step, np.mean(losses[-50:]), time.time() - t0)
    model.token_embedding.sparse = False
    model.eval()
    return {"steps": step, "train_seconds": round(time.time() - t0, 1),
            "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
            "entities_parsed": int(sum(nm is not None for nm in lab.names))}


def holdout(caps: list[str], jpgs: list[bytes], cfg: FitClipConfig) -> tuple[list[int], CocoSplit]:
    """(training indices, a held-out split of single-caption docs) when there is no COCO split."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(caps))
    n_out = max(2, int(len(caps) * cfg.holdout_fraction))
    out = order[:n_out]
    # Two copies of the caption: Table 4's mixture docs use caption 0, text queries the rest.
    split = CocoSplit([jpgs[i] for i in out], [[caps[i], caps[i]] for i in out])
    return sorted(order[n_out:].tolist()), split


class FitClipStage(Stage):
    """One shard `model`: `fit-clip/model.pt` (an open_clip state dict) + recall in the manifest."""

    name = "fit-clip"
    version = "4"  # 3: centre crop (model.clip_encoder.CENTRE_CROP); 4: same-entity positives, re-worded captions
    config = FitClipConfig
    description = "fit a tiny CLIP on the downloaded demo docs (demo bootstrap)"

    def plan(self, root: DataRoot, cfg: FitClipConfig) -> list[ShardSpec]:
        shards = sorted(m.shard_id for m in list_manifests(root, "download"))
        if not shards:
            raise FileNotFoundError("fit-clip needs download shards: run `racm3 run download` first")
        inputs = [upstream_ref(root, "download", s) for s in shards]
        if root.exists(root.resolve(cfg.coco)):
            inputs.append(coco_ref(root, cfg.coco))
        return [ShardSpec(self.name, "model", tuple(inputs))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: FitClipConfig = ctx.cfg
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        model, _, eval_tf, tok = create_clip(cfg.model)
        caps, jpgs, dropped = read_pairs(ctx)
        rows_in = len(caps) + sum(dropped.values())
        has_coco = ctx.root.exists(ctx.root.resolve(cfg.coco))
        if has_coco:
            split = load_coco(ctx.root, cfg.coco, min_captions=2)  # Table 4 queries a second caption
        else:
            train_idx, split = holdout(caps, jpgs, cfg)
            caps, jpgs = [caps[i] for i in train_idx], [jpgs[i] for i in train_idx]
        data = build_corpus(caps, jpgs, eval_tf, tok, dropped, max(model.visual.image_size))
        if len(data.captions) < 2:
            raise ValueError("fit-clip found fewer than 2 usable (caption, image) pairs")
        stats = train(model, data, cfg)
        torch.save(model.state_dict(), ctx.local_path("pt"))
        info = EncoderInfo(cfg.model, "", "", int(model.text_projection.shape[-1]))
        res = table4(DocEncoder(model, eval_tf, tok, info), split, (1, 5))
        metrics = stats | {
            "heldout": "coco" if has_coco else "docs", "n_train": len(data.captions),
            "recall_t2i@1": res["text_to_image"]["R@1"], "recall_t2i@5": res["text_to_image"]["R@5"],
            "chance@1": res["chance"]["R@1"], "n_eval_images": res["n_images"]}
        log.info("fit-clip: %s", metrics)
        return ShardResult(rows_in=rows_in, rows_out=len(data.captions), dropped=dropped,
                           metrics=metrics)


def checkpoint_path(root: DataRoot) -> str:
    """Where fit-clip writes its checkpoint (what the demo preset's `embed.checkpoint` names)."""
    return root.artifact("fit-clip", "model", "pt")
