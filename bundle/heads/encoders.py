"""Pre-trained image encoders as dense heads: the initialisations the diffusion-pre-trained denoiser is compared with.

Any timm backbone that gives feature maps (``features_only``) becomes a landmark or segmentation head with the same
light decoder: each feature map projected to ``width`` channels, resized to the finest one and summed (an FPN without
its top-down convolutions), then one upsampling block per factor of two up to the image size (bilinear x2, 3x3
convolution, group norm, GELU, width halving down to 16) and a new 1x1 output convolution. The whole network is
fine-tuned. Two uses:

- the bundle's own self-supervised pre-training: the DINO ViT that ``train_dino`` writes (same unlabelled films as
  the denoiser), read through its ``.json`` sidecar (:func:`dino_encoder_spec`), run at the head's image size on
  its patch tokens (timm's ``dynamic_img_size`` interpolates the position embedding);
- a supervised (e.g. ImageNet) initialisation from a local weights file: ``encoder_model`` a timm name (e.g.
  ``resnet50``), ``weights`` the file (``.safetensors``/``.pth`` saved from that timm model). Nothing is downloaded
  unless ``weights`` is ``"hub"``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import ensure_torchvision_importable
from ..errors import BundleInputError

VIT_DEFAULTS = {"dynamic_img_size": True, "out_indices": [-1]}  # patch tokens of the last block, any input size


def _is_vit(model_name: str) -> bool:
    """Whether timm defines ``model_name`` (``name.tag`` allowed) among its vision transformers."""
    ensure_torchvision_importable()
    import timm

    try:
        module = timm.models.model_entrypoint(model_name.split(".")[0]).__module__
    except Exception:  # an unknown name: build_encoder says so in timm's words
        return False
    return module.rsplit(".", 1)[-1] in ("vision_transformer", "deit", "eva")


def encoder_kwargs(model_name: str, model_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``timm.create_model`` arguments of an encoder: the given ones, plus, for a ViT, patch tokens of the last
    block at any input size (:data:`VIT_DEFAULTS`), unless given."""
    kwargs = dict(model_kwargs or {})
    if _is_vit(model_name):
        kwargs = {**VIT_DEFAULTS, **kwargs}
    return kwargs


def _check_file(timm: Any, model_name: str, path: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The pretrained-config overlay that loads ``path`` into ``model_name``, after checking that the file holds every
    weight of the backbone (timm loads feature extractors leniently, so a file of another architecture would
    otherwise leave layers at random without a word)."""
    from ..dino import _file_keys, _model_keys

    try:
        keys = _file_keys(path)
    except Exception as err:
        raise BundleInputError(f"Encoder weights '{path}' is not a readable weights file ({type(err).__name__}): give "
                               "a .safetensors or .pth file saved from a timm model.") from None
    cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    heads = tuple(classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else [])
    plain = {k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices", "dynamic_img_size")}
    needed = {k for k in _model_keys(timm, model_name, plain) if not k.startswith(heads or ("head",))}
    needed = {k for k in needed if not (k.startswith("pos_embed") or k.endswith("num_batches_tracked"))}
    missing = sorted(needed - keys)
    if missing:
        raise BundleInputError(f"Encoder weights '{path}' do not load into '{model_name}': {len(missing)} of its weights "
                               f"are missing from the file (e.g. {missing[:3]}); name the timm model the file was "
                               "saved from.")
    overlay: dict[str, Any] = {"file": os.path.abspath(path)}
    if not any(f"{h}.weight" in keys for h in heads):
        overlay["num_classes"] = 0  # a backbone saved without its classifier (e.g. the bundle's DINO teacher)
    return overlay


def build_encoder(model_name: str, weights: str | os.PathLike = "random", model_kwargs: Mapping[str, Any] | None = None,
                  seed: int = 0) -> nn.Module:
    """A timm backbone giving feature maps (``features_only``): ``weights`` ``"random"`` (seeded), a local weights file
    saved from the same timm architecture, or ``"hub"`` (timm's own download, for users with the internet)."""
    ensure_torchvision_importable()
    import timm

    kwargs = {"features_only": True, **encoder_kwargs(model_name, model_kwargs)}
    weights = str(weights)
    try:
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return timm.create_model(model_name, pretrained=False, **kwargs)
        if weights == "hub":
            return timm.create_model(model_name, pretrained=True, **kwargs)
        if not os.path.isfile(weights):
            raise BundleInputError(f"Encoder weights '{weights}' is not a file: give a local weights file saved from "
                                   f"the timm model '{model_name}', 'hub' (downloads) or 'random'.")
        overlay = _check_file(timm, model_name, weights, kwargs)
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except BundleInputError:
        raise
    except Exception as err:  # timm's own errors: unknown name, weights of another architecture, no network
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise BundleInputError(f"Encoder '{model_name}' with weights '{weights}' could not be built ({first}): check "
                               "that the name is a timm model and the file was saved from it.") from None


def dino_encoder_spec(weights: str | os.PathLike) -> dict[str, Any]:
    """``{"model": name, "weights": file, "kwargs": ..., "input_size": ...}`` of a DINO ViT written by ``train_dino``,
    from the ``.json`` sidecar beside its weights (its architecture, and the image size it was trained at, which a
    head does not need but a DINO feature space does)."""
    sidecar = Path(f"{weights}.json")
    if not sidecar.is_file():
        raise BundleInputError(f"'{weights}' has no sidecar '{sidecar.name}' naming its architecture: give a DINO file "
                               "written by run ID train_dino, or name the model with encoder_model.")
    info = json.loads(sidecar.read_text())
    return {"model": info["model_name"], "weights": str(weights), "kwargs": dict(info.get("model_kwargs") or {}),
            "input_size": info.get("img_size")}


def _block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.GroupNorm(math.gcd(8, channels_out),
                         channels_out), nn.GELU())


class EncoderDenseHead(nn.Module):
    """A feature-map encoder (:func:`build_encoder`) with the light decoder of this module's docstring.

    Images arrive as ``(B, 1, H, W)`` in [0, 1]; a three-channel encoder sees the grey image three times, normalised
    with the mean and std of its pre-training (timm's ``pretrained_cfg``). Output: ``out_channels`` maps at H x W.
    """

    def __init__(self, encoder: nn.Module, out_channels: int, width: int = 64, initial_bias: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        channels, reductions = encoder.feature_info.channels(), encoder.feature_info.reduction()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        blocks, current = [], width
        for _ in range(max(0, int(round(math.log2(min(reductions)))))):
            following = max(16, current // 2)
            blocks += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _block(current, following)]
            current = following
        self.decoder = nn.Sequential(_block(width, width), *blocks)
        self.out = nn.Conv2d(current, out_channels, 1)
        nn.init.constant_(self.out.bias, float(initial_bias))
        cfg = getattr(encoder, "pretrained_cfg", None) or {}
        self.in_chans = int(getattr(encoder, "in_chans", None) or cfg.get("input_size", (3,))[0] or 3)
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))[: self.in_chans]).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))[: self.in_chans]).view(1, -1, 1, 1), False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.expand(-1, self.in_chans, -1, -1) if images.shape[1] == 1 else images
        features = self.encoder((x - self.mean) / self.std)
        finest = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        top = sum(F.interpolate(conv(f), size=finest, mode="bilinear", align_corners=False) if f.shape[-2:] != finest
                  else conv(f) for conv, f in zip(self.lateral, features))
        maps = self.decoder(top)
        if maps.shape[-2:] != images.shape[-2:]:
            maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(maps)


def build_encoder_head(spec: Mapping[str, Any], out_channels: int, initial_bias: float = 0.0,
                       pretrained: bool = True) -> EncoderDenseHead:
    """An :class:`EncoderDenseHead` from ``spec`` = ``{"model", "weights", "kwargs", "width"}``; ``pretrained`` False
    builds the same network with random weights (the encoder's own from-scratch baseline, or to load a saved head)."""
    weights = spec.get("weights", "random") if pretrained else "random"
    encoder = build_encoder(spec["model"], weights, spec.get("kwargs"))
    return EncoderDenseHead(encoder, out_channels, int(spec.get("width", 64)), initial_bias)


def encoder_record(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a saved head records to rebuild its encoder without the weights file (its weights are in the head)."""
    return {"model": spec["model"], "kwargs": dict(spec.get("kwargs") or {}), "width": int(spec.get("width", 64))}


__all__: Sequence[str] = ("EncoderDenseHead", "build_encoder", "build_encoder_head", "dino_encoder_spec",
                          "encoder_kwargs", "encoder_record")
