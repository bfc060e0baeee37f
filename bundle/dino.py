"""A frozen DINO ViT (timm) turning radiographs into the cross-attention context of the diffusion UNet."""

from __future__ import annotations

import json
import os
import socket
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from .compat import ensure_torchvision_importable
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .data import hash_file, hash_json
from .errors import BundleInputError

TOKEN_MODES = ("cls", "cls+patch", "patch")


class WeightsPlan(NamedTuple):
    """Where the DINO weights of a training run come from, decided before any stage starts."""

    weights: str  # what DinoFeatures loads: 'hub', 'random' or a file (the in-domain teacher when pretrain)
    pretrain: bool  # pre-train an in-domain DINO on the training images first (run ID train_dino)
    reason: str  # one line for the log


def _hub_source(model_name: str) -> tuple[str | None, str | None]:
    """``(hf_hub_id, url)`` of timm's pretrained weights for ``model_name`` (``None`` where there are none)."""
    ensure_torchvision_importable()
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:
        return None, None
    if cfg is None:
        return None, None
    return getattr(cfg, "hf_hub_id", None) or None, getattr(cfg, "url", None) or None


def _hub_cached(hf_hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(hf_hub_id, name), str) for name in names)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the host of ``url`` opens (offline machines fail in milliseconds)."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except (OSError, TypeError, ValueError):
        return False


def embed_dim(model_name: str, model_kwargs: dict[str, Any] | None = None) -> int:
    """Width of the tokens ``model_name`` produces, without loading any weights (the UNet's cross-attention dim)."""
    ensure_torchvision_importable()
    import timm

    try:
        with torch.device("meta"):
            return int(timm.create_model(model_name, pretrained=False, num_classes=0, **dict(model_kwargs or {})).embed_dim)
    except Exception as err:
        raise BundleInputError(f"dino_model '{model_name}' with {model_kwargs or {}} cannot be built by timm "
                               f"({type(err).__name__}: {err}): give a timm ViT name.") from None


def plan_weights(weights: str | None, model_name: str, pretrained_path: str | os.PathLike) -> WeightsPlan:
    """Resolve ``dino_weights`` for training.

    ``'auto'``: an in-domain DINO already trained in this work dir, else the hub weights of ``model_name`` when
    they are in the local cache or the hub answers, else pre-train one on the training images first (so the
    default works offline). ``'pretrain'``: always pre-train in-domain. ``'hub'``, ``'random'`` and a file
    are used as given.
    """
    value = str(weights) if weights not in (None, "") else "auto"
    pretrained = str(pretrained_path)
    if value == "pretrain":
        return WeightsPlan(pretrained, True, f"DINO: pre-training {model_name} on the training images first "
                                              "(dino_weights pretrain).")
    if value != "auto":
        return WeightsPlan(value, False, f"DINO: {model_name} with dino_weights '{value}'.")
    if os.path.isfile(pretrained):
        return WeightsPlan(pretrained, True, f"DINO (auto): the in-domain {model_name} already trained in this work "
                                             f"dir ({pretrained}).")
    from huggingface_hub import constants

    hf_hub_id, url = _hub_source(model_name)
    if hf_hub_id and _hub_cached(hf_hub_id):
        return WeightsPlan("hub", False, f"DINO (auto): hub weights of {model_name}, found in the local cache.")
    if hf_hub_id and _reachable(constants.ENDPOINT) or not hf_hub_id and url and _reachable(url):
        return WeightsPlan("hub", False, f"DINO (auto): hub weights of {model_name} (downloaded now, before training).")
    why = "no hub weights exist for it" if not (hf_hub_id or url) else "the hub cannot be reached and they are not cached"
    return WeightsPlan(pretrained, True, f"DINO (auto): pre-training {model_name} on the training images first, "
                                         f"because {why}; pass --dino_weights FILE to use weights you have.")


def _file_keys(path: str) -> set[str]:
    """Tensor names in a weights file (safetensors or a torch pickle, possibly nested under state_dict/model)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return set(state) if isinstance(state, dict) else set()


def _check_sidecar(path: str, model_name: str, model_kwargs: dict[str, Any]) -> None:
    """Weights exported by DINO pre-training carry ``<file>.json`` naming their architecture: check it."""
    sidecar = path + ".json"
    if not os.path.isfile(sidecar):
        return
    with open(sidecar) as f:
        info = json.load(f)
    saved = (info.get("model_name"), info.get("model_kwargs", {}))
    if saved != (model_name, model_kwargs):
        raise BundleInputError(
            f"dino_weights '{path}' was trained as {saved[0]} with {saved[1]}, but the config asks for {model_name} "
            f"with {model_kwargs}: pass --dino_model {saved[0]} --dino_kwargs \"{json.dumps(saved[1])}\"."
        )


def _model_keys(timm, model_name: str, kwargs: dict[str, Any]) -> set[str]:
    with torch.device("meta"):
        return set(timm.create_model(model_name, pretrained=False, **kwargs).state_dict())


class DinoFeatures(nn.Module):
    """Frozen timm ViT: ``(B, 1, H, W)`` images in [0, 1] -> context tokens ``(B, T, embed_dim)``.

    Args:
        model_name: any timm ViT, e.g. ``vit_small_patch14_dinov2.lvd142m`` (DINOv2) or
            ``vit_small_patch16_224.dino`` (DINOv1).
        weights: ``"hub"`` downloads the model's pretrained weights; a path loads a local weights file
            (.safetensors/.pth/.bin, as timm saves them); ``"random"`` is a seeded random initialisation,
            only for tests and for runs that say so.
        tokens: ``"cls"`` (one token, as in DiNO-Diffusion), ``"cls+patch"`` or ``"patch"``. With a single
            context token cross-attention weights are all 1 and carry no spatial information; patch tokens
            give the UNet a spatial condition.
        input_size: side of the square image the ViT sees (grey images are replicated to 3 channels, resized
            and normalised with the model's own mean and std).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``depth`` for a tiny test model).
        seed: the seed of a ``"random"`` initialisation, so the same weights come back at sampling time.
    """

    def __init__(
        self,
        model_name: str = "vit_small_patch14_dinov2.lvd142m",
        weights: str = "hub",
        tokens: str = "cls",
        input_size: int = 224,
        model_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if tokens not in TOKEN_MODES:
            raise BundleInputError(f"dino_tokens '{tokens}' is not one of {TOKEN_MODES}: choose one of those.")
        self.model_name, self.weights, self.tokens, self.input_size = model_name, str(weights), tokens, int(input_size)
        self.model_kwargs = dict(model_kwargs or {})
        self.seed = int(seed)
        self.vit = self._create()
        self.vit.requires_grad_(False)
        self.vit.eval()
        cfg = self.vit.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1), False)

    def _create(self) -> nn.Module:
        ensure_torchvision_importable()
        import timm

        kwargs = {"num_classes": 0, "img_size": self.input_size, **self.model_kwargs}
        if self.weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                return timm.create_model(self.model_name, pretrained=False, **kwargs)
        if self.weights == "hub":
            try:
                return timm.create_model(self.model_name, pretrained=True, **kwargs)
            except Exception as err:
                raise BundleInputError(
                    f"DINO weights for '{self.model_name}' could not be downloaded ({type(err).__name__}: {err}); "
                    "offline, pass --dino_weights PATH to a local weights file (or --dino_weights random for tests)."
                ) from None
        if not os.path.isfile(self.weights):
            raise BundleInputError(
                f"dino_weights '{self.weights}' is not a file: give a local timm weights file, 'hub' or 'random' "
                "(an in-domain DINO is written to models/dino/ by run ID train_dino, or by the whole training run)."
            )
        _check_sidecar(self.weights, self.model_name, self.model_kwargs)
        try:
            file_keys = _file_keys(self.weights)
        except Exception as err:
            raise BundleInputError(
                f"dino_weights '{self.weights}' is not a readable weights file ({type(err).__name__}): give a "
                ".safetensors or .pth file saved from a timm ViT."
            ) from None
        missing = sorted(k for k in _model_keys(timm, self.model_name, kwargs) - file_keys if not k.startswith("head"))
        if missing:
            raise BundleInputError(
                f"dino_weights '{self.weights}' does not load into '{self.model_name}': {len(missing)} of its weights "
                f"are missing from the file (e.g. {missing[:3]}); check that dino_model names the architecture the "
                "file was saved from (timm names)."
            )
        return timm.create_model(
            self.model_name, pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(self.weights)}, **kwargs
        )

    def train(self, mode: bool = True) -> DinoFeatures:
        """The ViT stays in eval mode: it is a frozen feature extractor."""
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def num_tokens(self) -> int:
        num_patches = int(self.vit.patch_embed.num_patches)
        return {"cls": 1, "cls+patch": 1 + num_patches, "patch": num_patches}[self.tokens]

    def fingerprint(self) -> str:
        """Changes whenever the tokens this extractor produces could change."""
        weights = self.weights
        if weights not in ("hub", "random"):
            weights = hash_file(weights)
        return hash_json([self.model_name, weights, self.tokens, self.input_size, self.model_kwargs,
                          self.seed if self.weights == "random" else None])

    def record(self, model_file: str | os.PathLike | None = None) -> dict[str, Any]:
        """What a diffusion model records about its condition, to rebuild and check this extractor at sampling; the
        weights path relative to the work dir of ``model_file`` (the diffusion model) when the file lies in it."""
        from .model_files import portable_path

        weights = self.weights if not os.path.isfile(self.weights) else (
            portable_path(self.weights, model_file) if model_file is not None else os.path.abspath(self.weights))
        return {"model_name": self.model_name, "weights": weights, "tokens": self.tokens, "input_size": self.input_size,
                "model_kwargs": self.model_kwargs, "seed": self.seed, "fingerprint": self.fingerprint()}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise BundleInputError(f"DINO input has shape {tuple(images.shape)}; expected (B, 1 or 3, H, W).")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        tokens = self.vit.forward_features(x)
        prefix = int(getattr(self.vit, "num_prefix_tokens", 1))
        if self.tokens == "cls":
            return tokens[:, :1].float()
        if self.tokens == "patch":
            return tokens[:, prefix:].float()
        return torch.cat([tokens[:, :1], tokens[:, prefix:]], dim=1).float()
