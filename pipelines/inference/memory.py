"""A memory is data, not a place: a data root's index, key map and token shards, with the encoder
and tokenizer fingerprints they were made with; another root's memory can be swapped in."""

from __future__ import annotations

from pipelines.core.config import ConfigError
from pipelines.retrieval.encoders import index_encoder
from pipelines.training.lineage import TOKEN_LINEAGE, same_lineage
from storage.fs import DataRoot
from storage.manifest import list_manifests
from storage.shards import read_table

# what a memory must share with the models that read it, and how to make it so
FINGERPRINTS = {
    "encoder": "re-run `racm3 run embed` and `racm3 run index` on it with this root's CLIP "
               "(embed.checkpoint)",
    "codebook": "re-run `racm3 run tokenize` on it with this root's VQGAN (tokenize.checkpoint)",
    "text_tokenizer": "re-run `racm3 run tokenize` on it with this root's BPE "
                      "(tokenize.text_tokenizer)",
}


def open_memory(root: DataRoot, where: str, field: str = "memory") -> DataRoot:
    """The data root whose memory is used: `where` ("" = `root` itself; relative to `root`, or
    absolute, or a URL)."""
    if not where:
        return root
    mem = DataRoot(root.url(root.resolve(where)))
    if mem.uri == root.uri:
        return root
    if not list_manifests(mem, "tokenize"):
        raise ConfigError(field, f"{mem.uri} has no token shards (tokenize/): build the memory "
                                    f"with `racm3 run tokenize`, `embed` and `index` there first")
    return mem


def fingerprints(root: DataRoot) -> dict[str, str]:
    """encoder (the index's), codebook and text_tokenizer (the token shards') of a root's memory."""
    tokens = same_lineage(sorted(list_manifests(root, "tokenize"), key=lambda m: m.shard_id),
                          TOKEN_LINEAGE)
    return {"encoder": str(index_encoder(root)["fingerprint"]), "codebook": str(tokens["codebook"]),
            "text_tokenizer": str(tokens["text_tokenizer"])}


def check_memory(memory: DataRoot, want: dict[str, str], field: str = "memory") -> None:
    """Refuse a memory whose encoder, codebook or text tokenizer differs from `want` (the models'),
    naming the first that differs and how to rebuild the memory."""
    try:
        have = fingerprints(memory)
    except FileNotFoundError as e:
        raise ConfigError(field, f"{memory.uri} is not a complete memory: {e}") from e
    for name, fix in FINGERPRINTS.items():
        if name in want and have[name] != want[name]:
            raise ConfigError(field, f"{memory.uri} was made with {name} {have[name]!r} but "
                                        f"the models here use {want[name]!r}: {fix}")


def memory_captions(root: DataRoot) -> dict[str, str]:
    """Memory key -> caption text ("" when a document has none)."""
    out: dict[str, str] = {}
    for m in list_manifests(root, "tokenize"):
        t = read_table(root, root.artifact("tokenize", m.shard_id, "parquet"), ["key", "caption"])
        out.update(zip(t["key"].to_pylist(), (c or "" for c in t["caption"].to_pylist()), strict=True))
    return out
