"""The head networks: a diffusion UNet at timestep 0 with a new output layer, built on the pre-trained
denoiser, and saved with what inference needs to rebuild it."""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BundleInputError
from ..model_files import read_record, save_model
from ..models import load_weights

MASK_PRIOR_BIAS = -4.595  # log(0.01 / 0.99): every mask channel starts out predicting "absent" (RetinaNet's prior)
TASKS = ("landmarks", "segmentation")


def new_output(last: nn.Module, out_channels: int, initial_bias: float = 0.0) -> nn.Conv2d:
    """A fresh 1x1 convolution in place of a UNet's output layer, its bias set to ``initial_bias``.

    Sigmoid mask heads start from :data:`MASK_PRIOR_BIAS`: from a bias of 0 every pixel starts at 0.5, and
    on JSRT at 64 px the left clavicle (35 of 4096 pixels) stayed stuck predicting about half the image
    (Dice 0.01-0.07) in all ten seed-0 runs of the image-space head.
    """
    if not isinstance(last, nn.Conv2d) and hasattr(last, "conv"):
        last = last.conv
    conv = nn.Conv2d(last.in_channels, out_channels, kernel_size=1)
    nn.init.constant_(conv.bias, float(initial_bias))
    return conv


class DenseHead(nn.Module):
    """A diffusion UNet with its time embedding fixed to step 0 and a new 1x1 output convolution.

    Images arrive in [0, 1] and are scaled to [-1, 1], the range the denoiser was pre-trained on.
    """

    def __init__(self, unet: nn.Module, out_channels: int, initial_bias: float = 0.0) -> None:
        super().__init__()
        unet.out[-1] = new_output(unet.out[-1], out_channels, initial_bias)
        self.unet = unet

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        return self.unet(images * 2 - 1, timesteps)


class LatentDenseHead(nn.Module):
    """The main pipeline's latent diffusion UNet as a dense head, for comparison with :class:`DenseHead`.

    Images go through the frozen autoencoder's encoder, the UNet runs at timestep 0 with the null
    condition (the zero context it saw under condition dropout), a new 1x1 convolution gives one map per
    channel at latent resolution, and the maps are upsampled bilinearly to the image size.
    """

    def __init__(self, codec: nn.Module, unet: nn.Module, out_channels: int, context_shape: Sequence[int],
                 initial_bias: float = 0.0) -> None:
        super().__init__()
        unet.out[-1] = new_output(unet.out[-1], out_channels, initial_bias)
        unet.requires_grad_(True)
        self.codec, self.unet = codec.requires_grad_(False).eval(), unet
        self.register_buffer("context", torch.zeros(1, *context_shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.codec.encode(images)
        timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        maps = self.unet(latents, timesteps, context=self.context.expand(images.shape[0], -1, -1))
        return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)


def load_denoiser(unet: nn.Module, path: str | os.PathLike, remedy: str = "") -> nn.Module:
    """The label-free denoiser's weights into ``unet`` (eval mode)."""
    load_weights(unet, path, "denoiser", f"pre-train it first (configs/heads/pretrain.json) {remedy}".strip())
    return unet.eval()


def build_head(unet: nn.Module, out_channels: int, pretrained_path: str | os.PathLike | None = None,
               initial_bias: float = 0.0) -> DenseHead:
    """``unet`` with the pre-trained denoiser's weights (or its random initialisation when no path), as a head."""
    if pretrained_path:
        load_denoiser(unet, pretrained_path, "or pass --pretrained_path null to train from scratch")
    return DenseHead(unet, out_channels, initial_bias)


def save_head(head: nn.Module, path: str | os.PathLike, task: str, names: Sequence, image_size: int,
              **metadata) -> None:
    """Write a fine-tuned head with what inference needs: the task, its channel names (landmark groups with
    counts, or mask structures) and the image size it was trained at."""
    if task not in TASKS:
        raise BundleInputError(f"Head task '{task}' is not known: use one of {TASKS}.")
    record = {"task": task, "names": list(names), "image_size": int(image_size), **metadata}
    # the record (bundle/models.py) lets a re-run tell whether this head was trained with the same settings
    save_model(head.state_dict(), record, path)


def load_head(unet: nn.Module, path: str | os.PathLike, task: str, image_size: int) -> tuple[nn.Module, dict]:
    """A head saved by :func:`save_head` on a freshly built ``unet`` (the same denoiser definition), or, for a head
    whose record names an ``encoder`` (:func:`bundle.heads.encoders.encoder_record`), on that encoder."""
    saved = read_record(path, "head", "fine-tune it (run ID training of configs/heads/), or pass the right --head_path")
    saved = {**saved["record"], **saved}
    if saved.get("task") != task:
        raise BundleInputError(f"'{path}' is a {saved.get('task')} head, not a {task} head: use the matching config.")
    if saved["image_size"] != int(image_size):
        raise BundleInputError(f"Head '{path}' was trained at image_size {saved['image_size']}, not {image_size}: "
                               f"pass --image_size {saved['image_size']}.")
    names = saved["names"]
    channels = sum(n for _, n in names) if task == "landmarks" else len(names)
    if saved.get("encoder"):  # an encoder head (bundle/heads/encoders.py): rebuilt from its record, weights below
        from .encoders import build_encoder_head

        head = build_encoder_head(saved["encoder"], channels, pretrained=False)
    else:
        head = DenseHead(unet, channels)
    try:
        head.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise BundleInputError(f"Head '{path}' does not fit this network ({str(err).splitlines()[0]}): pass the "
                               "denoiser_channels/denoiser_head_channels it was trained with.") from None
    return head.eval(), saved
