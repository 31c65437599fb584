"""Mixed-modal CLIP document encoder (paper §3.2, Fig 1b) on open_clip, with seeded query dropout."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "clip_configs"
_registered = False


def register_configs() -> None:
    """Add the project's open_clip model configs (e.g. `racm3-tiny`) to open_clip's registry."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


# Share of an image's shorter side a model sees, centred, before open_clip's own resize and crop.
# The demo CLIP sees the object and little of its surroundings, so a rendering on a background
# its memory never shows still retrieves the same entity (chosen on dev; docs/demo-design.md).
CENTRE_CROP: dict[str, float] = {"racm3-demo": 0.75}


def centre_crop(model_name: str) -> float:
    """The share of the shorter side `model_name` sees (1.0: the whole image)."""
    return CENTRE_CROP.get(model_name, 1.0)


class CentreCrop:
    """Keep the centred `fraction` of the shorter side (a square), then apply `then`."""

    def __init__(self, fraction: float, then: Any):
        self.fraction, self.then = fraction, then

    def __call__(self, img: Image.Image) -> Any:
        w, h = img.size
        side = max(1, round(min(w, h) * self.fraction))
        left, top = (w - side) // 2, (h - side) // 2
        return self.then(img.crop((left, top, left + side, top + side)))


def check_model_name(name: str) -> None:
    register_configs()
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model config {name!r}: use one of open_clip.list_models() "
            f"(e.g. ViT-L-14, racm3-tiny) or add a JSON config under {CONFIG_DIR}"
        )


def encoder_fingerprint(model_name: str, checkpoint_digest: str) -> str:
    """Identity of an encoder: model config name + checkpoint content digest (+ its centre crop,
    which changes every embedding as much as the weights do)."""
    crop = centre_crop(model_name)
    suffix = f"+crop{crop:g}" if crop < 1.0 else ""
    return f"{model_name}@{checkpoint_digest.removeprefix('sha256:')[:16]}{suffix}"


def stable_seed(*parts: Any) -> int:
    """A seed that is the same on every machine and process (unlike hash())."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF


def l2_normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def mix(text: np.ndarray, image: np.ndarray, has_text: np.ndarray,
        has_image: np.ndarray) -> np.ndarray:
    """Document embedding: normalize(mean of the present normalized parts), Fig 1b.

    text, image: (N, D), rows of a missing part are ignored; has_*: (N,) bool. A one-part
    document gets its one part; a row with no part gets zeros (callers drop those).
    """
    t = l2_normalize(text) * has_text[:, None]
    i = l2_normalize(image) * has_image[:, None]
    count = np.maximum(has_text.astype(np.float32) + has_image, 1.0)[:, None]
    out = l2_normalize((t + i) / count)
    return np.where((has_text | has_image)[:, None], out, 0.0).astype(np.float32)


def decode_image(data: bytes | None, min_side: int | None = None) -> Image.Image | None:
    """RGB image from encoded bytes, or None when the bytes are missing or undecodable.

    With min_side, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides >= min_side: the model resizes to its input size anyway, and this halves embed time.
    """
    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        if min_side and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class SeededPatchDrop(nn.Module):
    """Keeps the patch tokens listed in `keep` (B, n_keep) and the class token; identity when None.

    Replaces open_clip's random PatchDropout so a query-dropout variant is reproducible.
    """

    def __init__(self) -> None:
        super().__init__()
        self.keep: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1 + P, W)
        if self.keep is None:
            return x
        cls, patches = x[:, :1], x[:, 1:]
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        return torch.cat([cls, patches[rows, self.keep.to(x.device)]], dim=1)  # (B, 1 + K, W)


def keep_indices(n: int, drop: float, seed: int) -> np.ndarray:
    """Sorted indices of the n - round(drop * n) items kept (at least one dropped when drop > 0)."""
    n_drop = int(round(drop * n))
    if drop > 0 and n >= 2:
        n_drop = min(max(n_drop, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_drop:])


HUB_CONFIG = "open_clip_config.json"  # an open_clip hub folder: this + its weights file
# The weights open_clip's hub folders ship, in the order open_clip itself prefers them.
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def checkpoint_form(path: str) -> str:
    """`hub-folder`, `torchscript` (OpenAI's `ViT-L-14.pt`), `safetensors` or `state-dict`."""
    if os.path.isdir(path):
        weights = [w for w in HUB_WEIGHTS if os.path.isfile(os.path.join(path, w))]
        if not os.path.isfile(os.path.join(path, HUB_CONFIG)) or not weights:
            raise FileNotFoundError(f"CLIP checkpoint folder {path} needs {HUB_CONFIG} and one of "
                                    f"{', '.join(HUB_WEIGHTS)} (an open_clip hub folder)")
        if weights[0].endswith(".safetensors"):
            check_safetensors(os.path.join(path, weights[0]))
        return "hub-folder"
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP checkpoint {path} not found: supply an open_clip hub folder, a .safetensors or "
            f"state-dict file, or OpenAI's TorchScript .pt (paper preset: ViT-L-14; demo: run "
            f"`racm3 run fit-clip` first), or point the config's `checkpoint` at it")
    if path.endswith(".safetensors"):
        check_safetensors(path)
        return "safetensors"
    return "torchscript" if is_torchscript(path) else "state-dict"


def check_safetensors(path: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            for k in f.keys():  # reading each tensor finds a file cut short after its header
                f.get_slice(k)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"CLIP checkpoint {path} is not a readable safetensors file "
                         f"(truncated?): {e}") from e


def is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip with compiled `code/`; a torch.save zip has none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def create_clip(model_name: str, checkpoint: str | None = None,
                device: str = "cpu") -> tuple[Any, Any, Any, Any]:
    """(model, train transform, eval transform, tokenizer); random init when no checkpoint.

    `checkpoint` is any form open_clip's models ship in (`checkpoint_form`); `model_name` names
    the architecture and must agree with a hub folder's or TorchScript file's own."""
    check_model_name(model_name)
    form = checkpoint_form(checkpoint) if checkpoint is not None else "random"
    try:
        model, train_tf, eval_tf = LOADERS[form](model_name, checkpoint, device)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint} does not fit model config {model_name!r}: {e}") from e
    check_embed_dim(model, model_name, checkpoint)
    crop = centre_crop(model_name)
    if crop < 1.0:  # every path (fit, embed, queries, judges) preprocesses through these
        train_tf, eval_tf = CentreCrop(crop, train_tf), CentreCrop(crop, eval_tf)
    tok_name = f"local-dir:{checkpoint}" if form == "hub-folder" else model_name
    return model, train_tf, eval_tf, open_clip.get_tokenizer(tok_name)


def _registry_model(model_name: str, checkpoint: str | None, device: str) -> tuple[Any, Any, Any]:
    quiet = _DropRandomInit() if checkpoint is None else None  # random init is asked for here
    if quiet:
        logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model_and_transforms(model_name, pretrained=checkpoint, device=device,
                                                     weights_only=True)
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)


def _hub_folder(model_name: str, folder: str | None, device: str) -> tuple[Any, Any, Any]:
    """open_clip's own offline reader of a hub folder (config + preprocessing + weights)."""
    return open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device, weights_only=True)


def _torchscript(model_name: str, path: str | None, device: str) -> tuple[Any, Any, Any]:
    """OpenAI's JIT archive, rebuilt as an eager model by open_clip's OpenAI builder (what
    `open_clip.load_openai_model` does, without its download lookup)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import build_model_from_openai_state_dict

    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    state.pop("attn_mask", None)  # a causal-mask buffer some archives carry; open_clip builds its own
    model = build_model_from_openai_state_dict(state, cast_dtype=None).float().to(device)  # (fp16 in the file)
    side = model.visual.image_size
    return model, *(open_clip.image_transform(side, is_train=t, mean=OPENAI_DATASET_MEAN,
                                              std=OPENAI_DATASET_STD) for t in (True, False))


LOADERS = {"random": _registry_model, "state-dict": _registry_model, "safetensors": _registry_model,
           "hub-folder": _hub_folder, "torchscript": _torchscript}


def check_embed_dim(model: Any, model_name: str, checkpoint: str | None) -> None:
    """A folder or TorchScript file brings its own architecture: its width must be embed.model's."""
    want = int(open_clip.get_model_config(model_name)["embed_dim"])
    proj = getattr(model, "text_projection", None)
    have = proj.shape[-1] if isinstance(proj, torch.Tensor) else None
    if have is not None and have != want:
        raise ValueError(f"CLIP checkpoint {checkpoint} has embedding width {have} but model config "
                         f"{model_name!r} (embed.model) has {want}; name the checkpoint's architecture")


class _DropRandomInit(logging.Filter):
    """open_clip warns (on the root logger) that a model without weights is random: fit-clip's point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in str(record.msg)


@dataclass
class EncoderInfo:
    """What identifies an encoder in manifests: config name, checkpoint and fingerprint."""

    model: str
    checkpoint: str
    fingerprint: str
    dim: int


class DocEncoder:
    """Encodes captions, images and mixed documents into L2-normalised CLIP embeddings."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, info: EncoderInfo,
                 device: str = "cpu", batch_size: int = 64):
        self.model: Any = model.eval()  # an open_clip CLIP (attributes mypy cannot see)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.info, self.device, self.batch_size = info, device, batch_size
        self._patch_drop = self._install_patch_drop()

    @classmethod
    def load(cls, model_name: str, checkpoint: str, fingerprint: str = "", device: str = "cpu",
             batch_size: int = 64) -> DocEncoder:
        device = resolve_device(device)
        model, _, eval_tf, tok = create_clip(model_name, checkpoint, device)
        dim = int(open_clip.get_model_config(model_name)["embed_dim"])
        info = EncoderInfo(model_name, checkpoint, fingerprint, dim)
        log.info("loaded CLIP %s from %s on %s (dim %d)", model_name, checkpoint, device, info.dim)
        return cls(model, eval_tf, tok, info, device, batch_size)

    def _install_patch_drop(self) -> SeededPatchDrop | None:
        visual = getattr(self.model, "visual", None)
        if visual is None or not hasattr(visual, "patch_dropout"):
            return None  # not an open_clip ViT: image query dropout is unavailable
        visual.patch_dropout = SeededPatchDrop()
        return visual.patch_dropout

    @property
    def image_side(self) -> int | None:
        """Longer side of the model's input images (what decode_image may shrink JPEGs to)."""
        size = getattr(getattr(self.model, "visual", None), "image_size", None)
        return max(size) if isinstance(size, tuple | list) else size

    @property
    def n_patches(self) -> int:
        gh, gw = self.model.visual.grid_size
        return gh * gw

    def tokenize(self, captions: list[str], drop: float = 0.0,
                 seeds: list[int] | None = None) -> torch.Tensor:
        """(N, context) token ids; with drop > 0, that fraction of each caption's tokens removed."""
        tokens = self.tokenizer(captions)  # (N, C): [sot, t1..tn, eot, 0...]
        if drop <= 0:
            return tokens
        assert seeds is not None and len(seeds) == len(captions), "one seed per caption"
        out = torch.zeros_like(tokens)
        for r, seed in enumerate(seeds):
            row = tokens[r]
            eot = int(row.argmax())  # eot has the largest id in open_clip's BPE vocab
            body = row[1:eot]
            kept = body[torch.from_numpy(keep_indices(len(body), drop, seed))]
            seq = torch.cat([row[:1], kept, row[eot:eot + 1]])
            out[r, : len(seq)] = seq
        return out

    @torch.no_grad()
    def encode_text(self, captions: list[str], drop: float = 0.0,
                    seeds: list[int] | None = None) -> np.ndarray:
        """(N, D) float32, L2-normalised."""
        outs = []
        for s in range(0, len(captions), self.batch_size):
            sl = slice(s, s + self.batch_size)
            toks = self.tokenize(captions[sl], drop, seeds[sl] if seeds else None)
            outs.append(self.model.encode_text(toks.to(self.device), normalize=True).float().cpu())
        return torch.cat(outs).numpy() if outs else np.zeros((0, self.info.dim), np.float32)

    @torch.no_grad()
    def encode_image(self, images: list[Image.Image], drop: float = 0.0,
                     seeds: list[int] | None = None) -> np.ndarray:
        """(N, D) float32, L2-normalised; with drop > 0 that fraction of ViT patches is dropped."""
        if drop > 0 and self._patch_drop is None:
            raise ValueError(f"image query dropout needs an open_clip ViT; {self.info.model} is not")
        outs = []
        for s in range(0, len(images), self.batch_size):
            sl = slice(s, s + self.batch_size)
            batch = torch.stack([self.preprocess(im) for im in images[sl]]).to(self.device)
            if drop > 0:
                keep = [keep_indices(self.n_patches, drop, sd) for sd in seeds[sl]]  # type: ignore[index]
                self._patch_drop.keep = torch.from_numpy(np.stack(keep))  # type: ignore[union-attr]
            try:
                outs.append(self.model.encode_image(batch, normalize=True).float().cpu())
            finally:
                if self._patch_drop is not None:
                    self._patch_drop.keep = None
        return torch.cat(outs).numpy() if outs else np.zeros((0, self.info.dim), np.float32)

    def encode_docs(self, captions: list[str | None],
                    images: list[Image.Image | None]) -> dict[str, np.ndarray]:
        """text_emb, image_emb (zeros where the part is missing), doc_emb, has_text, has_image."""
        n = len(captions)
        has_text = np.array([bool(c and c.strip()) for c in captions], dtype=bool)
        has_image = np.array([im is not None for im in images], dtype=bool)
        text = np.zeros((n, self.info.dim), np.float32)
        image = np.zeros((n, self.info.dim), np.float32)
        if has_text.any():
            text[has_text] = self.encode_text([c for c, h in zip(captions, has_text, strict=True) if h])  # type: ignore[misc]
        if has_image.any():
            image[has_image] = self.encode_image([im for im in images if im is not None])
        return {"text_emb": text, "image_emb": image, "doc_emb": mix(text, image, has_text, has_image),
                "has_text": has_text, "has_image": has_image}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device

