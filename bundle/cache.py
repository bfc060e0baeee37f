"""Encode every training image once: its scaled latent and its DINO tokens, cached on disk for stage 2."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .data import hash_file, load_or_build

logger = logging.getLogger(__name__)


@torch.no_grad()
def encode_images(images: torch.Tensor, codec: nn.Module, dino: nn.Module, device, batch_size: int = 16):
    """``(N, 1, H, W)`` images -> (scaled latents, DINO tokens), batch by batch on ``device``."""
    latents, tokens = [], []
    logger.info("encoding %d images into latents + DINO tokens.", len(images))
    for start in tqdm(range(0, len(images), batch_size), desc="encode latents + DINO", leave=False, dynamic_ncols=True,
                      disable=None):
        batch = images[start : start + batch_size].float().to(device)
        latents.append(codec.encode(batch).cpu())
        tokens.append(dino(batch).cpu())
    return torch.cat(latents), torch.cat(tokens)


def latent_cache(
    image_cache: dict[str, Any],
    codec: nn.Module,
    dino: nn.Module,
    autoencoder_path: str | os.PathLike,
    cache_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> dict[str, Any]:
    """The stage-2 cache, rebuilt whenever the images, preprocessing, autoencoder or DINO model changed."""
    key = {**image_cache["key"], "autoencoder": hash_file(autoencoder_path), "dino": dino.fingerprint()}

    def build() -> dict[str, Any]:
        latents, tokens = encode_images(image_cache["images"], codec.to(device), dino.to(device), device, batch_size)
        # tokens are stored in half precision: they are a frozen network's output and dominate the cache size
        return {"latents": latents, "tokens": tokens.half(), "rows": image_cache["rows"]}

    return load_or_build(cache_path, key, build, "latent")


def latent_items(cache: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Stage-2 dataset items: ``image`` is the scaled latent (the name MONAI's prepare-batch reads)."""
    return [{"image": z, "context": c.float()} for z, c in zip(cache["latents"], cache["tokens"])]
