"""Image infilling and editing (paper §5.2): a box of the token grid is masked and the model fills
it in, conditioned on the caption, the rest of the image and the in-context documents.

CM3's infilling form (`model.cm3.format.infilling_prompt`, as training masks spans): the raster span from the box's
first to its last token becomes `<mask:0>`, and the model writes that span after `<infill> <mask:0>`.
Tokens of the span that lie outside the box (the row remainders between the box's rows) are fed
as known tokens rather than sampled, so every token outside the box is kept exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.cm3.format import Doc, infilling_prompt, with_context
from model.document import Vocab
from model.sampling import sample
from model.transformer import Transformer
from pipelines.inference.sampling import Sampling


@dataclass(frozen=True)
class Box:
    """[x0, x1) x [y0, y1) in token-grid cells (x = column, y = row)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def parse(cls, text: str) -> Box:
        """`x0,y0,x1,y1` (end-exclusive)."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"a box is x0,y0,x1,y1 in token-grid cells, got {text!r}")
        return cls(*(int(p) for p in parts))

    def check(self, grid: int) -> None:
        if not (0 <= self.x0 < self.x1 <= grid and 0 <= self.y0 < self.y1 <= grid):
            raise ValueError(f"box {self} must satisfy 0 <= x0 < x1 <= {grid} and "
                             f"0 <= y0 < y1 <= {grid} (the token grid is {grid}x{grid})")

    def inside(self, grid: int) -> np.ndarray:
        """(grid*grid,) bool: which raster positions the box covers."""
        m = np.zeros((grid, grid), bool)
        m[self.y0:self.y1, self.x0:self.x1] = True
        return m.reshape(-1)

    def span(self, grid: int) -> tuple[int, int]:
        """[start, end) of the raster span from the box's first cell to its last."""
        return self.y0 * grid + self.x0, (self.y1 - 1) * grid + self.x1


def infill_prompt(vocab: Vocab, caption_ids: Sequence[int], codes: Sequence[int], grid: int,
                  box: Box, context: Sequence[Doc] = ()) -> tuple[list[int], list[int], list[int]]:
    """(ids, positions, forced) of m1..mK then the masked document up to `<infill> <mask:0>`;
    forced[t] is the known image id at span step t (-1 inside the box: to sample)."""
    box.check(grid)
    if len(codes) != grid * grid:
        raise ValueError(f"expected {grid * grid} image codes, got {len(codes)}")
    doc = np.asarray(vocab.encode(caption_ids, codes), dtype=np.int64)
    s, e = box.span(grid)
    offset = len(caption_ids) + 1  # body index of image code 0: caption, then `" src="`
    ids, positions = with_context(context, infilling_prompt(doc, (offset + s, offset + e), vocab))  # type: ignore[arg-type]
    inside = box.inside(grid)[s:e]
    known = np.asarray(codes[s:e], dtype=np.int64) + vocab.image_offset
    forced = np.where(inside, -1, known)
    return ids, positions, forced.tolist()


def infill_images(model: Transformer, vocab: Vocab, caption_ids: Sequence[int],
                  codes: Sequence[int], grid: int, box: Box, n: int,
                  context: Sequence[Doc] = (), params: Sampling = Sampling(),
                  generator: torch.Generator | None = None) -> np.ndarray:
    """(n, grid*grid) raw codes: `codes` with the box filled in by the model; every code outside
    the box is the input's."""
    ids, pos, forced = infill_prompt(vocab, caption_ids, codes, grid, box, context)
    device = next(model.parameters()).device
    prompt = torch.tensor([ids] * n, device=device)
    positions = torch.tensor([pos] * n, device=device)
    span = sample(model, prompt, positions, len(forced), params.temperature, params.top_k,
                  params.top_p, allowed=range(vocab.image_offset, vocab.size),
                  generator=generator, forced=forced)  # (n, span)
    s, e = box.span(grid)
    out = np.tile(np.asarray(codes, dtype=np.int64), (n, 1))
    out[:, s:e] = span.cpu().numpy() - vocab.image_offset
    return out
