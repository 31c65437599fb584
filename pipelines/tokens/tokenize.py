"""tokenize (Beam): per download shard, caption BPE ids and VQGAN image codes, under the shard contract.

Output `<root>/tokenize/<shard_id>.parquet` (TOKEN_SHARD); the manifest records the codebook and text
tokenizer fingerprints, n_text, n_image and grid, so readers build the Vocab and refuse mixtures.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from model.document import Vocab
from model.images import load_image, to_tensor
from model.text_tokenizer import OPENCLIP
from model.vqgan import PRESETS, VQGAN, state_fingerprint
from pipelines.core.config import StageConfig
from pipelines.core.stage import ShardContext, ShardResult, ShardSpec, Stage
from pipelines.tokens.tokenizers import Tokenizers, load_tokenizers, load_vqgan, vqgan_config_path
from storage.fs import DataRoot, file_digest
from storage.manifest import InputRef, list_manifests, read_manifest, upstream_ref
from storage.schemas import BPE_SHARD, SUCCESS, VQGAN_SHARD
from storage.shards import read_table

log = logging.getLogger(__name__)

FITTED = ""  # config value: use the fit-vqgan stage's artifact in this data root
TOKEN_SHARD = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("caption_ids", pa.list_(pa.int32())),  # raw text-tokenizer ids (Vocab adds text_offset)
    ("image_codes", pa.list_(pa.uint16())),  # raw codebook indices, row-major grid
])


@dataclass(frozen=True)
class TokenizeConfig(StageConfig):
    """Which VQGAN and text tokenizer, and what the checkpoint must agree with."""

    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "threads"})
    checkpoint: str = FITTED  # "" = fit-vqgan's checkpoint in this data root; else a taming .ckpt / LlamaGen .pt
    vqgan_config: str = ""  # taming yaml with the architecture ("" = <checkpoint>.yaml beside it, if any)
    arch: str = "demo"  # VQGAN preset, only for checkpoints that say their architecture nowhere
    image_size: int = 32  # the 256x256 download JPEG is resized to this side before encoding
    factor: int = 4  # expected downsampling factor; a checkpoint with another is refused
    codebook_size: int = 64  # expected codebook size; a checkpoint with another is refused
    text_tokenizer: str = FITTED  # "" = fit-vqgan's BPE; "openclip" = open_clip's BPE; else a JSON path
    max_caption_tokens: int = 64  # longer captions are truncated (counted in the manifest)
    allow_pickle: bool = False  # load checkpoints that need full unpickling (only files you trust)
    batch_size: int = 64  # images per VQGAN forward pass
    threads: int = 1  # torch CPU threads per worker

    def __post_init__(self) -> None:
        self.check(self.arch in PRESETS, "arch", f"unknown preset; choose one of {', '.join(PRESETS)}")
        self.check(self.factor >= 1 and self.factor & (self.factor - 1) == 0, "factor",
                   "must be a power of two")
        self.check(self.image_size % self.factor == 0, "image_size", "must be a multiple of factor")
        self.check(2 <= self.codebook_size <= 65536, "codebook_size", "must fit uint16 codes")
        self.check(self.max_caption_tokens >= 1, "max_caption_tokens", "must be >= 1")
        self.check(self.batch_size >= 1, "batch_size", "must be >= 1")

    @property
    def grid(self) -> int:
        return self.image_size // self.factor


def encode_images(vqgan: VQGAN, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, R, R, 3) uint8 -> (N, g*g) uint16 codes, batched."""
    out = [vqgan.encode(to_tensor(images[s:s + batch_size])).flatten(1)
           for s in range(0, len(images), batch_size)]  # each (B, g*g)
    return torch.cat(out).numpy().astype(np.uint16) if out else np.zeros((0, 0), np.uint16)


def decode_rows(t: dict[str, list], size: int) -> tuple[list[int], list[np.ndarray], dict[str, int]]:
    """(indices of usable rows, their images, drop counts): failed downloads and bad JPEGs are counted."""
    keep, images, dropped = [], [], {"failed_download": 0, "undecodable_image": 0}
    for i, (status, jpg) in enumerate(zip(t["status"], t["jpg"], strict=True)):
        if status != SUCCESS or jpg is None:
            dropped["failed_download"] += 1
            continue
        try:
            images.append(load_image(jpg, size))
            keep.append(i)
        except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes; counted, never fatal
            dropped["undecodable_image"] += 1
    return keep, images, {k: v for k, v in dropped.items() if v}


def tokenize_table(t: dict[str, list], tok: Tokenizers, cfg: TokenizeConfig) -> tuple[pa.Table, dict, dict]:
    """A download shard's columns -> (token table, dropped counts, metrics)."""
    keep, images, dropped = decode_rows(t, cfg.image_size)
    t0 = time.time()
    codes = encode_images(tok.vqgan, np.stack(images) if images else np.zeros((0,)), cfg.batch_size)
    seconds = time.time() - t0
    captions = [t["caption"][i] or "" for i in keep]
    ids = [tok.text.encode(c) for c in captions]
    truncated = sum(len(x) > cfg.max_caption_tokens for x in ids)
    table = pa.Table.from_pydict({
        "key": [t["key"][i] for i in keep], "caption": captions,
        "caption_ids": [x[:cfg.max_caption_tokens] for x in ids],
        "image_codes": [row for row in codes]}, schema=TOKEN_SHARD)
    metrics = {"truncated_captions": truncated, "codes_used": int(len(np.unique(codes))),
               "encode_images_per_s": round(len(keep) / seconds, 1) if seconds > 0 else None}
    return table, dropped, metrics


class TokenizeStage(Stage):
    name = "tokenize"
    version = "1"
    config = TokenizeConfig
    engine = "beam"
    description = "caption BPE ids and VQGAN image codes per download shard"

    def plan(self, root: DataRoot, cfg: TokenizeConfig) -> list[ShardSpec]:
        ids = sorted(m.shard_id for m in list_manifests(root, "download"))
        models = self.model_inputs(root, cfg) if ids else ()
        if ids:
            load_vqgan(root, cfg)  # a bad checkpoint or yaml stops here (exit 2), before any shard
        # decontaminate (when it has run) names the documents that copy an evaluation set: they
        # are left out of the tokens, hence out of training and of the memory's documents
        clean = {m.shard_id: (upstream_ref(root, "decontaminate", m.shard_id),)
                 for m in list_manifests(root, "decontaminate")}
        return [ShardSpec(self.name, sid, (upstream_ref(root, "download", sid), *models,
                                           *clean.get(sid, ()))) for sid in ids]

    def model_inputs(self, root: DataRoot, cfg: TokenizeConfig) -> tuple[InputRef, ...]:
        """The weights as inputs, so new weights re-tokenize every shard (tokens never mix)."""
        refs = []
        for spec, shard in ((cfg.checkpoint, VQGAN_SHARD), (cfg.text_tokenizer, BPE_SHARD)):
            if spec == FITTED:
                refs.append(upstream_ref(root, "fit-vqgan", shard))
            elif spec != OPENCLIP:  # open_clip's vocabulary is pinned by the package version
                refs.append(external_ref(spec, "tokenize.checkpoint" if shard == VQGAN_SHARD
                                         else "tokenize.text_tokenizer"))
        yaml_path = vqgan_config_path(cfg)
        if yaml_path:  # a changed architecture file re-tokenizes too
            refs.append(external_ref(yaml_path, "tokenize.vqgan_config"))
        return tuple(refs)

    def load(self, cfg: TokenizeConfig) -> WorkerModels:
        return WorkerModels()

    def run_shard(self, ctx: ShardContext, resources: WorkerModels | None) -> ShardResult:
        tok = (resources or WorkerModels()).get(ctx.root, ctx.cfg)
        t = ctx.read_input(0, ["key", "caption", "status", "jpg"]).to_pydict()
        n_in = len(t["key"])
        t, by_split = without_contaminated(ctx, t)
        table, dropped, metrics = tokenize_table(t, tok, ctx.cfg)
        if any(r.stage == "decontaminate" for r in ctx.spec.inputs):
            if n_in > len(t["key"]):
                dropped["decontaminated"] = n_in - len(t["key"])
            metrics["decontaminated_by_split"] = by_split
        ctx.write_table(table)
        metrics |= {"codebook": tok.codebook, "text_tokenizer": tok.text_fp,
                    "n_text": tok.text.vocab_size, "n_image": tok.vqgan.cfg.n_embed,
                    "grid": ctx.cfg.grid, "image_size": ctx.cfg.image_size,
                    "vocab": tok.vocab().fingerprint()}
        return ShardResult(rows_in=n_in, rows_out=table.num_rows, dropped=dropped,
                           metrics=metrics)


def without_contaminated(ctx: ShardContext, t: dict[str, list]) -> tuple[dict[str, list],
                                                                         dict[str, int]]:
    """The download rows minus those the decontaminate input names; dropped counts per split."""
    refs = [i for i, r in enumerate(ctx.spec.inputs) if r.stage == "decontaminate"]
    if not refs:
        return t, {}
    bad = ctx.read_input(refs[0], ["key", "split"]).to_pydict()
    by_key = dict(zip(bad["key"], bad["split"], strict=True))
    keep = [k not in by_key for k in t["key"]]
    by_split: dict[str, int] = {}
    for k in t["key"]:
        if k in by_key:
            by_split[by_key[k]] = by_split.get(by_key[k], 0) + 1
    return {c: [v for v, ok in zip(vals, keep, strict=True) if ok] for c, vals in t.items()}, by_split

def external_ref(path: str, field: str) -> InputRef:
    from storage.fs import open_url

    fs, p = open_url(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{field} = {path!r} does not exist; supply that file or fix the config")
    return InputRef(path=path, digest=file_digest(fs, p))


class WorkerModels:
    """Per-worker resources: loads the models once, on the first shard (`load` gets no data root,
    and the default checkpoint lives in the data root)."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.tok: Tokenizers | None = None

    def get(self, root: DataRoot, cfg: TokenizeConfig) -> Tokenizers:
        key = (root.uri, repr(cfg))
        if self.tok is None or key != self.key:
            self.key, self.tok = key, load_tokenizers(root, cfg)
        return self.tok


@dataclass(frozen=True)
class TokenMeta:
    """What every token shard agrees on; training builds its Vocab from this."""

    vocab: Vocab
    codebook: str  # VQGAN fingerprint
    text_tokenizer: str  # text tokenizer fingerprint
    grid: int  # image tokens per side
    shard_ids: tuple[str, ...]


META_FIELDS = ("codebook", "text_tokenizer", "n_text", "n_image", "grid")


def read_token_meta(root: DataRoot) -> TokenMeta:
    """The token shards' shared vocabulary; refuses shards written with different tokenizers."""
    ms = sorted(list_manifests(root, "tokenize"), key=lambda m: m.shard_id)
    if not ms:
        raise FileNotFoundError("no token shards: run `racm3 run tokenize` first")
    first = {f: ms[0].metrics.get(f) for f in META_FIELDS}
    for m in ms[1:]:
        diff = [f for f in META_FIELDS if m.metrics.get(f) != first[f]]
        if diff:
            raise ValueError(f"token shards disagree on {diff[0]}: tokenize/{ms[0].shard_id} has "
                             f"{first[diff[0]]!r}, tokenize/{m.shard_id} has {m.metrics.get(diff[0])!r}; "
                             "tokens from different codebooks never mix: re-run `racm3 run tokenize`")
    f: dict[str, Any] = first  # values come from JSON manifests written by this stage
    return TokenMeta(Vocab(int(f["n_text"]), int(f["n_image"])), str(f["codebook"]),
                     str(f["text_tokenizer"]), int(f["grid"]), tuple(m.shard_id for m in ms))


def find_token_row(root: DataRoot, key: str) -> tuple[str, dict]:
    """(shard id, row) of document `key` in the token shards."""
    for m in sorted(list_manifests(root, "tokenize"), key=lambda m: m.shard_id):
        path = root.artifact("tokenize", m.shard_id, "parquet")
        keys = read_table(root, path, ["key"])["key"]
        hit = pc.index(keys, key).as_py()
        if hit >= 0:
            return m.shard_id, read_table(root, path).slice(hit, 1).to_pylist()[0]
    raise KeyError(f"document {key!r} is in no token shard (failed download, or not tokenized yet)")


def decode_key(root: DataRoot, cfgs: dict, key: str, out: str, scale: int = 8) -> str:
    """`racm3 decode KEY`: write original | reconstruction of a document side by side to a PNG."""
    cfg: TokenizeConfig = cfgs["tokenize"]
    shard_id, row = find_token_row(root, key)
    m = read_manifest(root, "tokenize", shard_id)
    vqgan = load_vqgan(root, cfg)
    if m is not None and m.metrics.get("codebook") != state_fingerprint(vqgan):
        raise ValueError(f"tokenize/{shard_id} was written with another VQGAN than the configured one; "
                         "re-run `racm3 run tokenize` or point tokenize.checkpoint at the one it used")
    g = int(np.sqrt(len(row["image_codes"])))
    codes = torch.tensor(row["image_codes"], dtype=torch.long).view(1, g, g)
    recon = ((vqgan.decode(codes)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    panels = [original_image(root, shard_id, key, recon.shape[0]), recon]
    img = Image.fromarray(np.concatenate([p for p in panels if p is not None], axis=1))
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(out, "PNG")
    log.info("decoded %s (%d codes, caption %r) to %s", key, g * g, row["caption"], out)
    return out


def original_image(root: DataRoot, shard_id: str, key: str, size: int) -> np.ndarray | None:
    """The downloaded image at the tokenizer's resolution, or None when its shard is gone."""
    path = root.artifact("download", shard_id, "parquet")
    if not root.exists(path):
        return None
    t = read_table(root, path, ["key", "jpg"])
    hit = pc.index(t["key"], key).as_py()
    return load_image(t["jpg"][hit].as_py(), size) if hit >= 0 else None
