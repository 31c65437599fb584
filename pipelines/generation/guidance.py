"""Classifier-free guidance, re-exported for older imports: it lives in the inference layer
(`pipelines.inference.guidance`), which evaluation and generation both stand on."""

from pipelines.inference.guidance import Guidance, guidance_branches, guided_images

__all__ = ["Guidance", "guidance_branches", "guided_images"]
