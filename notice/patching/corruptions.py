"""Corruptions that are not a different input: Gaussian noise on the image embeddings (docs/method.md, §4).

Each is a deterministic function of the embeddings (`hooks.ImageFn`: the same noise on every call, so
the corrupt run and every patched run see the same corrupt image), applied by
`hooks.image_embeddings_replaced`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from notice.patching.hooks import ImageFn


def _seeded_normal(shape: torch.Size, seed: int) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same noise on every device.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def multiplicative_noise(nu: float, seed: int) -> ImageFn:
    """Palit et al.: embeddings × ε, ε ~ N(1, ν²) elementwise (ν is the standard deviation; they use 5)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x * (1 + nu * _seeded_normal(x.shape, seed)).to(x.device, x.dtype)

    return apply


def additive_noise(scale: float, seed: int, sigma: float | None = None) -> ImageFn:
    """ROME-style: embeddings + N(0, (scale·σ)²), σ given or else the std of the embeddings themselves."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        std = float(x.float().std()) if sigma is None else sigma
        return x + (scale * std * _seeded_normal(x.shape, seed)).to(x.device, x.dtype)

    return apply


def corrupt_image_fn(corruption: str, settings: Mapping, noise_seed: int) -> ImageFn | None:
    """The image-embedding corruption of a Gaussian-noise pair (None for SIP / STR); `settings` holds the
    corruption's scale (config: `nu` of gn_mult, `sigma_multiplier` of gn_add)."""
    if corruption == "gn_mult":
        return multiplicative_noise(float(settings["nu"]), noise_seed)
    if corruption == "gn_add":
        return additive_noise(float(settings["sigma_multiplier"]), noise_seed)
    return None
