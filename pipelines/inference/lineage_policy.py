"""The one lineage policy at inference: a checkpoint is used only with the tokenizers, vocabulary
and index it was trained on (refused with a fix otherwise)."""

from __future__ import annotations

from typing import Any

from model.document import Vocab
from pipelines.tokens.tokenizers import Tokenizers
from pipelines.training.lineage import LineageError


def check_checkpoint(role: str, rec: dict[str, Any], vocab: Vocab, tok: Tokenizers,
                     memory_vocab: Vocab, memory_lineage: dict[str, Any]) -> None:
    """Refuse a checkpoint trained on another codebook or text tokenizer than the data root's
    tokenizers, or whose vocabulary differs from the memory's token shards."""
    lineage = rec.get("lineage", {})
    for name, want in (("codebook", tok.codebook), ("text_tokenizer", tok.text_fp)):
        if lineage.get(name) != want:
            raise LineageError(
                f"the {role} checkpoint was trained with {name} {lineage.get(name)!r} but the "
                f"data root's tokenizers have {want!r}: re-run `racm3 run train` on the current "
                f"tokens, or use the data root the checkpoint was trained in")
    if vocab != memory_vocab or memory_lineage.get("codebook") != tok.codebook:
        raise LineageError(f"the {role} checkpoint's vocabulary {vocab} differs from the token "
                           f"shards' {memory_vocab}: re-run tokenize and train together")


def check_index(role: str, rec: dict[str, Any], index_digest: str) -> None:
    """Refuse a checkpoint trained with neighbours from another index. A model trained with
    retrieved neighbours (RA-CM3) must name its index; one trained with random neighbours (the
    relevance ablation) or none (vanilla) has no index lineage, and any other index is fine."""
    lineage = rec.get("lineage", {})
    train = rec.get("train", {})
    retrieved = train.get("variant", role) == "ra-cm3" and not train.get("random_neighbours")
    if ("index_fingerprint" in lineage or retrieved) and lineage.get("index_fingerprint") != index_digest:
        raise LineageError(
            f"the {role} checkpoint was trained with index_fingerprint "
            f"{lineage.get('index_fingerprint')!r} but the memory's index has {index_digest!r}: "
            f"re-run `racm3 run train --set train.variant={train.get('variant', role)}` on the "
            f"current tokens and index, or use the data root the checkpoint was trained in")
