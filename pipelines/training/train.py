"""Stage `train`: RA-CM3 or vanilla CM3 trained with Lightning on the packed token store (§3.3, §4.1).

The plain `model.transformer.Transformer` is wrapped by `CM3Module` (loss L_main + alpha L_retr,
Adam, warm-up + linear decay). Training reads `pack`'s memory-mapped token store. Checkpoints and
logs live in `<root>/train/<name>/<fingerprint>/` (name = train.name, default the variant), so a
re-run after an interruption resumes from `last.ckpt` at the exact next batch (the stream state is
in the checkpoint); the finished model is committed as `<root>/train/<name>.pt` and the manifest
records the lineage (codebook, index, token digests). Every load is weights-only, and data-root
files are reached only through fsspec (an object-store root trains in a local work dir, synced).

GPU settings (checked in TrainConfig): precision bf16-mixed (auto on GPUs that have it; on CPU
opt-in, e.g. the demo preset);
attention is torch SDPA, which takes the flash kernel for plain causal attention
(train.block_mask=false) and the memory-efficient kernel with the block-diagonal mask;
strategy ddp or fsdp (fsdp needs accelerator gpu); train.activation_checkpointing recomputes each
block in backward; train.ce_chunk > 0 computes the loss ce_chunk tokens at a time, so float32
logits never exist for the whole batch (B x T x V at the paper's 4096 x 2 x 65k would be 2 GB).
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader

from model.transformer import Transformer, TransformerConfig, preset
from pipelines.core.config import StageConfig
from pipelines.core.liblogs import route_lightning_logs
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.training.checkpoints import save_model
from pipelines.training.objective import lr_lambda, sequence_losses
from pipelines.training.resume import StreamCheckpoint
from pipelines.training.sequences import (
    AssemblyConfig,
    DocSource,
    SequenceStream,
    check_pins,
    collate,
    longest_unit,
)
from pipelines.training.steplog import StepLog
from pipelines.training.token_store import open_store
from pipelines.training.workdir import WorkDir
from storage.fs import DataRoot
from storage.manifest import combined_digest, list_manifests, upstream_ref

log = logging.getLogger(__name__)

VARIANTS = ("ra-cm3", "vanilla")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "single_device")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is left intact."""


DEFAULT_THREADS = torch.get_num_threads()  # captured at import, before any stage pins threads

@dataclass(frozen=True)
class TrainConfig(StageConfig, AssemblyConfig):
    """Section [train]: what to train (variant, model) and how (optimizer, devices); the data
    assembly fields (k_max, alpha, mask_prob, max_spans, max_span_frac, random_neighbours,
    overlong, caption_dropout, caption_span_prob) are `AssemblyConfig`'s, declared there once."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"accelerator", "devices", "strategy", "num_workers", "threads", "checkpoint_every",
         "log_every", "progress_bar", "activation_checkpointing", "ce_chunk", "work_dir"})

    variant: str = "ra-cm3"  # "ra-cm3" (K ~ U{0..k_max} retrieved docs) or "vanilla" (K = 0)
    name: str = ""  # output shard id: train/<name>.pt ("" = the variant); one per ablation run
    block_mask: bool = True  # packed examples cannot attend to each other (false: the old way)
    model: str = "demo"  # model preset in model.transformer.PRESETS ("demo" | "paper")
    n_layer: int = 0  # decoder blocks (0 = the preset's); model-size ablations, smoke runs
    d_model: int = 0  # residual width (0 = the preset's)
    n_head: int = 0  # attention heads (0 = the preset's)
    dropout: float = 0.0  # residual/attention dropout of the decoder
    seq_len: int = 0  # tokens per packed sequence; 0 = (k_max + 1) longest documents, masked (AssemblyConfig's, automatic here)
    batch_size: int = 16  # sequences per optimizer step (per device)
    max_steps: int = 600  # optimizer steps; the same for both variants = equal compute
    lr: float = 3e-3  # peak learning rate (paper 1e-4; the demo model wants more)
    warmup_steps: int = 60  # linear warm-up steps (paper 1500), then linear decay to 0
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.98  # Adam beta2
    grad_clip: float = 1.0  # gradient norm clipping
    holdout_fraction: float = 0.0  # documents (stable by key) never trained on, for held-out ppl
    # Lightning precision; auto = bf16/fp16 mixed on GPU, 32-true on CPU. "bf16-mixed" on CPU is
    # bf16 autocast (matmuls bf16 on AVX-512 bf16 / AMX, attention and weights float32): "32-true"
    # turns it off. Checkpoints hold float32 weights either way.
    precision: str = "auto"
    seed: int = 0  # model init and data order
    pin_codebook: str = ""  # refuse token shards from another codebook ("" = no pin)
    pin_index: str = ""  # refuse neighbour shards from another index ("" = no pin)
    accelerator: str = "auto"  # Lightning accelerator ("cpu", "gpu", "auto")
    devices: str = "auto"  # Lightning devices ("auto", "1", "0,1")
    strategy: str = "auto"  # Lightning strategy ("auto", "ddp", "fsdp")
    num_workers: int = 0  # data loader worker processes (0: assemble in the training process)
    threads: int = 0  # torch CPU threads; 0 = torch's start-up default (1 avoids stalls on shared cores)
    checkpoint_every: int = 100  # steps between checkpoints (last.ckpt is overwritten)
    log_every: int = 10  # steps between logged rows
    progress_bar: bool = True  # Lightning's bar on a terminal (a log line every 10 s either way)
    activation_checkpointing: bool = False  # recompute each block in backward (memory for time)
    ce_chunk: int = 0  # tokens per chunk of the loss's output projection (0 = all at once)
    work_dir: str = ""  # local dir for checkpoints/logs when the data root is not local

    def __post_init__(self) -> None:
        self.check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}")
        self.check(self.name == "" or (self.name.replace("-", "").replace("_", "").replace(".", "")
                                       .isalnum() and not self.name.startswith(".")),
                   "name", "must be letters, digits, '-', '_' or '.' (a file name)")
        self.check(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}")
        self.check(self.strategy != "fsdp" or self.accelerator in ("gpu", "cuda", "auto"),
                   "strategy", "fsdp needs accelerator gpu (Lightning has no CPU FSDP)")
        self.check(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        self.check(not (self.precision.startswith("bf16") and self.accelerator == "cpu"
                        and self.strategy == "fsdp"), "precision", "bf16 FSDP needs a GPU")
        self.check(self.ce_chunk >= 0, "ce_chunk", "must be >= 0 (0 = plain cross-entropy)")
        self.check(self.num_workers >= 0, "num_workers", "must be >= 0")
        self.check(min(self.n_layer, self.d_model, self.n_head) >= 0, "d_model",
                   "model sizes must be >= 0 (0 = the preset's)")
        self.check(self.model in ("demo", "paper"), "model", "must be a model preset: demo, paper")
        self.check(self.seq_len >= 0, "seq_len", "must be >= 0 (0 = automatic)")
        self.check(self.batch_size > 0 and self.max_steps > 0, "max_steps", "steps/batch must be > 0")
        self.check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self.check(self.k_max >= 0, "k_max", "must be >= 0")
        self.check(self.alpha >= 0, "alpha", "must be >= 0 (0 = main-document loss only)")
        self.check(0 <= self.mask_prob <= 1, "mask_prob", "must be in [0, 1]")
        self.check(self.max_spans >= 1, "max_spans", "must be >= 1")
        self.check(0 < self.max_span_frac <= 1, "max_span_frac", "must be in (0, 1]")
        self.check(0 <= self.caption_span_prob <= 1, "caption_span_prob", "must be in [0, 1]")
        self.check(self.overlong in ("truncate", "drop"), "overlong", "must be truncate or drop")
        self.check(0 <= self.holdout_fraction < 1, "holdout_fraction", "must be in [0, 1)")
        self.check(0 <= self.caption_dropout < 1, "caption_dropout", "must be in [0, 1)")
        self.check(self.checkpoint_every > 0, "checkpoint_every", "must be > 0")
        heads = self.n_head or preset(self.model, 1).n_head
        width = self.d_model or preset(self.model, 1).d_model
        self.check(width % heads == 0 and (width // heads) % 2 == 0, "d_model",
                   f"d_model {width} must split into {heads} heads of even size")

    def model_config(self, vocab_size: int, seq_len: int) -> TransformerConfig:
        """The decoder: the preset, with any size overridden, long enough for seq_len."""
        sizes = {k: v for k, v in (("n_layer", self.n_layer), ("d_model", self.d_model),
                                   ("n_head", self.n_head)) if v}
        return preset(self.model, vocab_size, dropout=self.dropout,
                      max_seq_len=max(seq_len, preset(self.model, 1).max_seq_len), **sizes)

    @property
    def out_name(self) -> str:
        """The output shard id and checkpoint file name: train/<out_name>.pt."""
        return self.name or self.variant

    @property
    def uses_neighbours(self) -> bool:
        return self.variant == "ra-cm3" and not self.random_neighbours and self.k_max > 0

    def assembly(self, seq_len: int) -> TrainConfig:
        """This config as the stream assembles with it: seq_len resolved, K = 0 for vanilla."""
        return replace(self, seq_len=seq_len, k_max=self.k_max if self.variant == "ra-cm3" else 0)

    def resolve_seq_len(self, corpus: DocSource) -> int:
        """Explicit seq_len, or room for k_max + 1 documents (the same for both variants, so
        vanilla packs more main documents into the same tokens per step)."""
        return self.seq_len or longest_unit(corpus, self)


# ---------------------------------------------------------------------------- Lightning


class CM3Module(L.LightningModule):
    """The plain decoder plus its objective and optimizer; nothing model-specific lives here."""

    def __init__(self, model_config: TransformerConfig, train: TrainConfig):
        super().__init__()
        # plain data in the Lightning checkpoint (resume loads it weights-only)
        self.save_hyperparameters({"model_config": model_config.to_dict(),
                                   "train": {**train.params(), "ce_chunk": train.ce_chunk}})
        self.model = Transformer(model_config)
        self.train_cfg = train

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        t = self.train_cfg
        losses = sequence_losses(self.model, batch, t.block_mask, t.ce_chunk)
        if not torch.isfinite(losses["loss"]):
            raise NonFiniteLossError(
                f"loss is {losses['loss'].item()} at step {self.global_step}, batch {batch_idx} "
                f"(main documents {batch['keys'][:4]}...); the last good checkpoint is kept. "
                f"Lower train.lr or check the tokens of those documents")
        bs = batch["ids"].shape[0]
        self.log("loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log_dict({k: losses[k] for k in ("l_main", "l_retr", "l_text", "l_image")},
                      prog_bar=False, batch_size=bs)
        self.log("tokens", losses["tokens"].float(), reduce_fx="sum", batch_size=bs)
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.trainer.precision == "16-mixed":
            return  # the fp16 grad scaler skips non-finite steps itself
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        if norms and not torch.isfinite(torch.stack(norms)).all():
            raise NonFiniteLossError(f"non-finite gradient at step {self.global_step}; "
                                     f"the last good checkpoint is kept. Lower train.lr")

    def configure_optimizers(self) -> Any:
        t = self.train_cfg
        opt = torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, t.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"  # CPU: bf16-mixed is opt-in (a CPU without AVX-512 bf16 / AMX emulates it)


def loggers(workdir: str) -> list[Any]:
    """CSV logs always; TensorBoard too when it is installed."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    out: list[Any] = [CSVLogger(workdir, name="logs")]
    try:
        import tensorboard  # noqa: F401

        out.append(TensorBoardLogger(workdir, name="tensorboard"))
    except ImportError:
        pass
    return out


def make_trainer(cfg: TrainConfig, workdir: str, checkpoint_dir: str,
                 callbacks: list[Any]) -> L.Trainer:
    """Logs under the local `workdir`, checkpoints under `checkpoint_dir` (any fsspec URL)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0,
                           every_n_train_steps=cfg.checkpoint_every)
    devices: Any = int(cfg.devices) if cfg.devices.isdigit() else cfg.devices
    precision: Any = resolve_precision(cfg.precision)  # a string Lightning validates itself
    route_lightning_logs()  # its tips and banners through racm3's console filters
    return L.Trainer(
        max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=devices,
        strategy=cfg.strategy, precision=precision,
        gradient_clip_val=cfg.grad_clip, logger=loggers(workdir),
        callbacks=[ckpt, LearningRateMonitor("step"), StepLog(f"train/{cfg.out_name}", cfg.max_steps),
                   *callbacks],
        log_every_n_steps=cfg.log_every, enable_progress_bar=cfg.progress_bar and sys.stdout.isatty(),
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=workdir, deterministic=False)


# ---------------------------------------------------------------------------- run


@dataclass
class TrainResult:
    """What one training run produced, for the manifest."""

    steps: int
    seconds: float
    seq_len: int
    counts: Counter
    lineage: dict[str, Any]
    last_losses: dict[str, float]
    resumed_from: int
    tokens_per_s: float  # sequence tokens (padding included) through the model per second
    precision: str = "32-true"  # the Lightning precision the run used (auto resolved)
    global_zero: bool = True  # False on DDP ranks other than 0


def resume_step(root: DataRoot, ckpt_url: str | None) -> int:
    """The step a checkpoint was taken at (weights-only: a data-root file is never unpickled)."""
    if ckpt_url is None:
        return 0
    with root.fs.open(root.fs._strip_protocol(ckpt_url), "rb") as f:
        return int(torch.load(f, map_location="cpu", weights_only=True)["global_step"])


def train(root: DataRoot, cfg: TrainConfig, workdir: str, out_path: str | None = None,
          callbacks: list[Any] | None = None) -> TrainResult:
    """Train (or resume) with checkpoints under `workdir` (a data-root path); save the plain model
    to `out_path` (a data-root path) when finished. On a non-local root the run happens in a local
    work dir whose checkpoints are uploaded as they are written (and downloaded to resume)."""
    pins = {"codebook": cfg.pin_codebook, "index_fingerprint": cfg.pin_index}
    corpus = open_store(root, cfg.uses_neighbours, cfg.holdout_fraction,
                        cache_dir=os.path.join(cfg.work_dir, "pack") if cfg.work_dir else None)
    check_pins(corpus.lineage, pins)
    seq_len = cfg.resolve_seq_len(corpus)
    mcfg = cfg.model_config(corpus.vocab.size, seq_len)
    sync = WorkDir(root, workdir, cfg.work_dir)
    write_run_record(root, workdir, cfg, corpus, seq_len)
    ckpt_path = sync.fetch_last()
    start = resume_step(root, ckpt_path)
    if ckpt_path:
        log.info("train/%s: resuming from %s at step %d", cfg.out_name, ckpt_path, start)
    # 0 = torch's default as it was at start-up: earlier stages in the same process (fit-clip,
    # tokenize under `racm3 demo`) pin 1 thread, which would otherwise halve training speed.
    torch.set_num_threads(cfg.threads if cfg.threads > 0 else DEFAULT_THREADS)
    L.seed_everything(cfg.seed, verbose=False)
    module = CM3Module(mcfg, cfg)
    module.model.activation_checkpointing = cfg.activation_checkpointing
    # start_epoch only matters for a checkpoint without stream state (older code)
    stream = SequenceStream(corpus, cfg.assembly(seq_len), seed=cfg.seed, start_epoch=start)
    loader = DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate,
                        num_workers=cfg.num_workers)
    trainer = make_trainer(cfg, sync.local, sync.checkpoint_dir,
                           [StreamCheckpoint(stream), *(callbacks or [])])
    t0 = time.time()
    trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True)
    if out_path is not None and trainer.is_global_zero:
        save_model(root, out_path, module.model, corpus.vocab, corpus.lineage, cfg.params())
    sync.finish()
    seconds = time.time() - t0
    losses = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # every rank trains on its own batch_size sequences per step
    tokens = (trainer.global_step - start) * cfg.batch_size * seq_len * trainer.world_size
    return TrainResult(steps=trainer.global_step, seconds=seconds, seq_len=seq_len,
                       counts=stream.counts, lineage=dict(corpus.lineage), last_losses=losses,
                       resumed_from=start, tokens_per_s=tokens / max(seconds, 1e-9),
                       precision=str(trainer.precision),
                       global_zero=trainer.is_global_zero)


def write_run_record(root: DataRoot, workdir: str, cfg: TrainConfig, corpus: DocSource,
                     seq_len: int) -> None:
    """`run.json` beside the checkpoints: what they were trained on, before any step is taken."""
    record = {"variant": cfg.variant, "name": cfg.out_name, "params": cfg.params(),
              "seq_len": seq_len, "lineage": dict(corpus.lineage)}
    root.write_bytes_atomic(posixpath.join(workdir, "run.json"),
                            json.dumps(record, indent=2, default=str).encode())


# ---------------------------------------------------------------------------- the stage


class TrainStage(Stage):
    """One shard per train.name (default the variant); its inputs are the token store's parts
    (neighbour parts too for RA-CM3), which must be packed from the current tokenize shards."""

    name = "train"
    version = "3"  # 3: packed token store, exact resume, block-diagonal mask between examples
    config = TrainConfig
    engine = "local"
    description = "train RA-CM3 or vanilla CM3 (Lightning) on the packed token store"

    def __init__(self, callbacks: list[Any] | None = None):
        self.callbacks = callbacks or []  # extra Lightning callbacks (monitoring, tests)

    def plan(self, root: DataRoot, cfg: TrainConfig) -> list[ShardSpec]:
        check_packed(root, "tokenize", "t-")
        if cfg.uses_neighbours:
            check_packed(root, "retrieve", "n-")
        parts = sorted(m.shard_id for m in list_manifests(root, "pack")
                       if m.shard_id.startswith("t-") or (cfg.uses_neighbours
                                                           and m.shard_id.startswith("n-")))
        inputs = [upstream_ref(root, "pack", i) for i in parts]
        return [ShardSpec(self.name, cfg.out_name, tuple(inputs))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: TrainConfig = ctx.cfg
        fp = self.fingerprint(cfg, ctx.spec)
        workdir = ctx.root.join("train", cfg.out_name, fp)  # kept across interruptions
        res = train(ctx.root, cfg, workdir, ctx.output_path("pt"), self.callbacks)
        if not res.global_zero:  # a DDP worker rank (Lightning re-ran this command): rank 0
            raise SystemExit(0)  # commits the model and the manifest, the others just stop
        return ShardResult(rows_in=sum(res.counts[f"k{k}"] for k in range(cfg.k_max + 1)),
                           rows_out=res.steps, dropped=dropped(res.counts),
                           metrics={**run_metrics(res, ctx.root, workdir, cfg.uses_neighbours),
                                    "decontaminated_by_split": decontaminated(ctx.root)})


def decontaminated(root: DataRoot) -> dict[str, int]:
    """Documents kept out of training because they copy an evaluation set, per set (tokenize)."""
    out: dict[str, int] = {}
    for m in list_manifests(root, "tokenize"):
        for split, n in m.metrics.get("decontaminated_by_split", {}).items():
            out[split] = out.get(split, 0) + int(n)
    return out


def check_packed(root: DataRoot, stage: str, prefix: str) -> None:
    """Every `stage` shard has a current pack part (else training would read stale tokens)."""
    ups = {m.shard_id: m.output_digest for m in list_manifests(root, stage)}
    if not ups:
        raise FileNotFoundError(f"no {stage} shards under {root.join(stage)}: "
                                f"run `racm3 run {stage}` first")
    packed = {m.shard_id[len(prefix):]: m.inputs[0].digest for m in list_manifests(root, "pack")
              if m.shard_id.startswith(prefix) and m.inputs}
    stale = sorted(i for i, d in ups.items() if packed.get(i) != d)
    if stale:
        raise FileNotFoundError(f"{len(stale)} {stage} shard(s) not packed or packed from older "
                                f"content ({stale[0]}, ...): run `racm3 run pack` first")


def dropped(counts: Counter) -> dict[str, int]:
    keys = ("main_truncated", "main_dropped_overlong", "retrieved_dropped_overlong",
            "neighbour_missing_tokens", "neighbour_held_out", "no_neighbour_row")
    return {k: int(counts[k]) for k in keys if counts[k]}


def run_metrics(res: TrainResult, root: DataRoot, workdir: str,
                neighbours: bool) -> dict[str, Any]:
    def digest(stage: str) -> str | None:
        refs = {m.shard_id: m.output_digest for m in list_manifests(root, stage)}
        return combined_digest(refs) if refs else None

    assembled = int(res.counts["sequences"]) * res.seq_len
    return {**res.lineage, "tokens_digest": digest("tokenize"),
            "neighbours_digest": digest("retrieve") if neighbours else None, "steps": res.steps,
            "resumed_from_step": res.resumed_from, "seq_len": res.seq_len,
            "train_seconds": round(res.seconds, 1), "sequences": int(res.counts["sequences"]),
            "main_docs": int(res.counts["main_docs"]),
            "retrieved_docs": int(res.counts["retrieved_docs"]),
            "pad_fraction": round(res.counts["pad_tokens"] / max(1, assembled), 4),
            "tokens_per_s": round(res.tokens_per_s), "precision": res.precision,
            "checkpoints": root.rel(workdir),
            **{k: (v if math.isfinite(v) else None) for k, v in res.last_losses.items()}}
