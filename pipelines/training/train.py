"""Stage `train`: RA-CM3 or vanilla CM3 trained with Lightning on token + neighbour shards (§3.3, §4.1).

The plain `model.transformer.Transformer` is wrapped by `CM3Module` (loss L_main + alpha L_retr,
Adam, warm-up + linear decay). Checkpoints and logs live in `<root>/train/<variant>/<fingerprint>/`
so a re-run after an interruption resumes from `last.ckpt`; the finished model is committed as
`<root>/train/<variant>.pt` and the manifest records the lineage (codebook, index, token digests).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from model.transformer import Transformer, TransformerConfig, preset
from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.training.checkpoints import save_model
from pipelines.training.sequences import (
    ROLE_MAIN,
    ROLE_RETRIEVED,
    AssemblyConfig,
    Corpus,
    SequenceStream,
    collate,
    load_corpus,
    longest_unit,
)
from storage.fs import DataRoot
from storage.manifest import combined_digest, list_manifests, upstream_ref

log = logging.getLogger(__name__)

VARIANTS = ("ra-cm3", "vanilla")
TEXT, IMAGE = 1, 2  # modality codes (model.document)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is left intact."""


DEFAULT_THREADS = torch.get_num_threads()  # captured at import, before any stage pins threads

@dataclass(frozen=True)
class TrainConfig(StageConfig):
    """Section [train]: what to train (variant, model, data assembly) and how (optimizer, devices)."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"accelerator", "devices", "strategy", "num_workers", "threads", "checkpoint_every",
         "log_every", "progress_bar"})

    variant: str = "ra-cm3"  # "ra-cm3" (K ~ U{0..k_max} retrieved docs) or "vanilla" (K = 0)
    model: str = "demo"  # model preset in model.transformer.PRESETS ("demo" | "paper")
    dropout: float = 0.0  # residual/attention dropout of the decoder
    seq_len: int = 0  # tokens per packed sequence; 0 = (k_max + 1) longest documents, masked
    batch_size: int = 16  # sequences per optimizer step (per device)
    max_steps: int = 600  # optimizer steps; the same for both variants = equal compute
    lr: float = 3e-3  # peak learning rate (paper 1e-4; the demo model wants more)
    warmup_steps: int = 60  # linear warm-up steps (paper 1500), then linear decay to 0
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.98  # Adam beta2
    grad_clip: float = 1.0  # gradient norm clipping
    k_max: int = 2  # retrieved documents per main document ~ U{0..k_max} (ra-cm3 only)
    alpha: float = 0.1  # weight of the retrieved documents' loss L_retr (Eq. 2); 0 allowed
    mask_prob: float = 0.5  # probability of CM3 causal masking of a main document
    max_spans: int = 1  # masked spans per masked document
    max_span_frac: float = 0.5  # longest masked span as a fraction of the document
    random_neighbours: bool = False  # ablation: random documents instead of retrieved ones
    overlong: str = "truncate"  # a main document longer than seq_len: "truncate" or "drop"
    holdout_fraction: float = 0.0  # documents (stable by key) never trained on, for held-out ppl
    precision: str = "auto"  # Lightning precision; auto = bf16/fp16 mixed on GPU, fp32 on CPU
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
    progress_bar: bool = True  # show Lightning's progress bar

    def __post_init__(self) -> None:
        self.check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}")
        self.check(self.model in ("demo", "paper"), "model", "must be a model preset: demo, paper")
        self.check(self.seq_len >= 0, "seq_len", "must be >= 0 (0 = automatic)")
        self.check(self.batch_size > 0 and self.max_steps > 0, "max_steps", "steps/batch must be > 0")
        self.check(0 <= self.warmup_steps < self.max_steps, "warmup_steps", "must be < max_steps")
        self.check(self.k_max >= 0, "k_max", "must be >= 0")
        self.check(self.alpha >= 0, "alpha", "must be >= 0 (0 = main-document loss only)")
        self.check(0 <= self.mask_prob <= 1, "mask_prob", "must be in [0, 1]")
        self.check(self.max_spans >= 1, "max_spans", "must be >= 1")
        self.check(0 < self.max_span_frac <= 1, "max_span_frac", "must be in (0, 1]")
        self.check(self.overlong in ("truncate", "drop"), "overlong", "must be truncate or drop")
        self.check(0 <= self.holdout_fraction < 1, "holdout_fraction", "must be in [0, 1)")
        self.check(self.checkpoint_every > 0, "checkpoint_every", "must be > 0")

    @property
    def uses_neighbours(self) -> bool:
        return self.variant == "ra-cm3" and not self.random_neighbours and self.k_max > 0

    def assembly(self, seq_len: int) -> AssemblyConfig:
        k = self.k_max if self.variant == "ra-cm3" else 0
        return AssemblyConfig(seq_len=seq_len, k_max=k, alpha=self.alpha, mask_prob=self.mask_prob,
                              max_spans=self.max_spans, max_span_frac=self.max_span_frac,
                              random_neighbours=self.random_neighbours, overlong=self.overlong)

    def resolve_seq_len(self, corpus: Corpus) -> int:
        """Explicit seq_len, or room for k_max + 1 documents (the same for both variants, so
        vanilla packs more main documents into the same tokens per step)."""
        auto = AssemblyConfig(k_max=self.k_max, max_spans=self.max_spans)
        return self.seq_len or longest_unit(corpus, auto)


# ---------------------------------------------------------------------------- loss


def sequence_losses(model: Transformer, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """L = (sum over main tokens of NLL + alpha * sum over retrieved tokens) / main tokens (Eq. 2-3),
    plus the detached terms to log: L_main, L_retr, text and image NLL of the main documents."""
    logits, _ = model(batch["ids"][:, :-1], batch["positions"][:, :-1])  # (B, T-1, V)
    target = batch["ids"][:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")  # (B, T-1)
    weights, roles, modality = (batch[k][:, 1:] for k in ("weights", "roles", "modality"))
    main = roles == ROLE_MAIN
    out = {"loss": (nll * weights).sum() / main.sum().clamp(min=1)}
    d = nll.detach()
    for name, sel in (("l_main", main), ("l_retr", roles == ROLE_RETRIEVED),
                      ("l_text", main & (modality == TEXT)), ("l_image", main & (modality == IMAGE))):
        out[name] = d[sel].mean() if sel.any() else d.new_tensor(float("nan"))
    out["tokens"] = (roles > 0).sum()
    return out


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak, then linear decay to 0 at `total` steps (§4.1)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


# ---------------------------------------------------------------------------- Lightning


class CM3Module(L.LightningModule):
    """The plain decoder plus its objective and optimizer; nothing model-specific lives here."""

    def __init__(self, model_config: dict[str, Any], train: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters()
        self.model = Transformer(TransformerConfig(**model_config))
        self.train_cfg = train

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = sequence_losses(self.model, batch)
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
        opt = torch.optim.Adam(self.model.parameters(), lr=t["lr"], betas=(t["beta1"], t["beta2"]))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t["warmup_steps"], t["max_steps"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"  # bf16 autocast was slower than fp32 for the tiny demo model on CPU


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


def make_trainer(cfg: TrainConfig, workdir: str, callbacks: list[Any]) -> L.Trainer:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=f"{workdir}/checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=cfg.checkpoint_every)
    devices: Any = int(cfg.devices) if cfg.devices.isdigit() else cfg.devices
    precision: Any = resolve_precision(cfg.precision)  # a string Lightning validates itself
    return L.Trainer(
        max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=devices,
        strategy=cfg.strategy, precision=precision,
        gradient_clip_val=cfg.grad_clip, logger=loggers(workdir),
        callbacks=[ckpt, LearningRateMonitor("step"), *callbacks],
        log_every_n_steps=cfg.log_every, enable_progress_bar=cfg.progress_bar,
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


def resume_step(ckpt_path: str | None) -> int:
    if ckpt_path is None:
        return 0
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=False)["global_step"])


def train(root: DataRoot, cfg: TrainConfig, workdir: str, out_path: str | None = None,
          callbacks: list[Any] | None = None) -> TrainResult:
    """Train (or resume) in `workdir`; save the plain model to `out_path` when finished."""
    pins = {"codebook": cfg.pin_codebook, "index_fingerprint": cfg.pin_index}
    corpus = load_corpus(root, cfg.uses_neighbours, pins, cfg.holdout_fraction)
    seq_len = cfg.resolve_seq_len(corpus)
    mcfg = preset(cfg.model, corpus.vocab.size, dropout=cfg.dropout,
                  max_seq_len=max(seq_len, preset(cfg.model, 1).max_seq_len))
    write_run_record(workdir, cfg, corpus, seq_len)
    last = f"{workdir}/checkpoints/last.ckpt"
    ckpt_path = last if root.fs.exists(last) else None
    start = resume_step(ckpt_path)
    if ckpt_path:
        log.info("train/%s: resuming from %s at step %d", cfg.variant, last, start)
    # 0 = torch's default as it was at start-up: earlier stages in the same process (fit-clip,
    # tokenize under `racm3 demo`) pin 1 thread, which would otherwise halve training speed.
    torch.set_num_threads(cfg.threads if cfg.threads > 0 else DEFAULT_THREADS)
    L.seed_everything(cfg.seed, verbose=False)
    module = CM3Module(mcfg.to_dict(), cfg.params())
    stream = SequenceStream(corpus, cfg.assembly(seq_len), seed=cfg.seed, start_epoch=start)
    loader = DataLoader(stream, batch_size=cfg.batch_size, collate_fn=collate,
                        num_workers=cfg.num_workers)
    trainer = make_trainer(cfg, workdir, callbacks or [])
    t0 = time.time()
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    if out_path is not None:
        save_model(out_path, module.model, corpus.vocab, corpus.lineage, cfg.params())
    seconds = time.time() - t0
    losses = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tokens = (trainer.global_step - start) * cfg.batch_size * seq_len
    return TrainResult(steps=trainer.global_step, seconds=seconds, seq_len=seq_len,
                       counts=stream.counts, lineage=dict(corpus.lineage), last_losses=losses,
                       resumed_from=start, tokens_per_s=tokens / max(seconds, 1e-9))


def write_run_record(workdir: str, cfg: TrainConfig, corpus: Corpus, seq_len: int) -> None:
    """`run.json` beside the checkpoints: what they were trained on, before any step is taken."""
    import os

    os.makedirs(workdir, exist_ok=True)
    record = {"variant": cfg.variant, "params": cfg.params(), "seq_len": seq_len,
              "lineage": dict(corpus.lineage)}
    with open(f"{workdir}/run.json", "w") as f:
        json.dump(record, f, indent=2, default=str)


# ---------------------------------------------------------------------------- the stage


class TrainStage(Stage):
    """One shard per variant; its inputs are every token shard (and neighbour shard for RA-CM3)."""

    name = "train"
    version = "2"  # 2: positions restart at the image marker too (model.document.positions)
    config = TrainConfig
    engine = "local"
    description = "train RA-CM3 or vanilla CM3 (Lightning) on token and neighbour shards"

    def __init__(self, callbacks: list[Any] | None = None):
        self.callbacks = callbacks or []  # extra Lightning callbacks (monitoring, tests)

    def plan(self, root: DataRoot, cfg: TrainConfig) -> list[ShardSpec]:
        stages = ["tokenize"] + (["retrieve"] if cfg.uses_neighbours else [])
        inputs = []
        for stage in stages:
            ids = sorted(m.shard_id for m in list_manifests(root, stage))
            if not ids:
                raise FileNotFoundError(f"no {stage} shards under {root.join(stage)}: "
                                        f"run `racm3 run {stage}` first")
            inputs += [upstream_ref(root, stage, i) for i in ids]
        return [ShardSpec(self.name, cfg.variant, tuple(inputs))]

    def run_shard(self, ctx: ShardContext, resources: Any) -> ShardResult:
        cfg: TrainConfig = ctx.cfg
        fp = self.fingerprint(cfg, ctx.spec)
        workdir = ctx.root.join("train", cfg.variant, fp)  # kept across interruptions
        res = train(ctx.root, cfg, workdir, ctx.output_path("pt"), self.callbacks)
        return ShardResult(rows_in=sum(res.counts[f"k{k}"] for k in range(cfg.k_max + 1)),
                           rows_out=res.steps, dropped=dropped(res.counts),
                           metrics=run_metrics(res, ctx.spec, workdir, ctx.root))


def dropped(counts: Counter) -> dict[str, int]:
    keys = ("main_truncated", "main_dropped_overlong", "retrieved_dropped_overlong",
            "neighbour_missing_tokens", "neighbour_held_out", "no_neighbour_row")
    return {k: int(counts[k]) for k in keys if counts[k]}


def run_metrics(res: TrainResult, spec: ShardSpec, workdir: str, root: DataRoot) -> dict[str, Any]:
    def digest(stage: str) -> str | None:
        refs = {i.path: i.digest for i in spec.inputs if i.stage == stage}
        return combined_digest(refs) if refs else None

    assembled = int(res.counts["sequences"]) * res.seq_len
    return {**res.lineage, "tokens_digest": digest("tokenize"),
            "neighbours_digest": digest("retrieve"), "steps": res.steps,
            "resumed_from_step": res.resumed_from, "seq_len": res.seq_len,
            "train_seconds": round(res.seconds, 1), "sequences": int(res.counts["sequences"]),
            "pad_fraction": round(res.counts["pad_tokens"] / max(1, assembled), 4),
            "tokens_per_s": round(res.tokens_per_s),
            "checkpoints": root.rel(workdir),
            **{k: (v if math.isfinite(v) else None) for k, v in res.last_losses.items()}}
