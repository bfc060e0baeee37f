"""DINO self-distillation (Caron et al., ICCV 2021) on the user's own unlabelled images.

A student ViT with a projection head learns to match, on every crop of an image, the centred and sharpened
output of an EMA teacher that sees only the two global crops. The teacher backbone is exported in timm's
format, so ``--dino_weights PATH`` loads it into the conditioning extractor exactly like downloaded weights.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandFlipd, RandGaussianSmoothd,
                              RandScaleCropd, RandScaleIntensityd, Resized)
from torch import nn

from .compat import ensure_torchvision_importable
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .io import atomic_path, atomic_write_json
from .performance import GradScalers, autocast, autocast_dtype, step


class DinoHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (the DINO projection head)."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DinoNetwork(nn.Module):
    """A timm ViT backbone (CLS output) plus a DINO head; crops of different sizes are run size by size."""

    def __init__(self, model_name: str, image_size: int, model_kwargs: dict[str, Any] | None = None,
                 out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 init_weights: str | None = None) -> None:
        super().__init__()
        ensure_torchvision_importable()
        import timm

        self.model_name, self.image_size = model_name, int(image_size)
        self.model_kwargs = dict(model_kwargs or {})
        self.backbone = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=self.image_size,
                                          dynamic_img_size=True, **self.model_kwargs)
        self.head = DinoHead(self.backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim)
        cfg = self.backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1), False)
        if init_weights not in (None, "", "random"):
            load_backbone_weights(self, init_weights)

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        outputs = []
        for size in dict.fromkeys(c.shape[-1] for c in crops):  # group crops of one size into one batch
            batch = torch.cat([c for c in crops if c.shape[-1] == size])
            x = (batch.expand(-1, 3, -1, -1) - self.mean) / self.std
            outputs.append((size, self.head(self.backbone(x))))
        # restore the crop order: all crops of the first size come first, as they were given
        return torch.cat([o for _, o in outputs])


def load_backbone_weights(network: DinoNetwork, path: str | os.PathLike) -> None:
    """Start from existing timm weights ("hub" or a local file) instead of random initialisation."""
    from .dino import DinoFeatures

    features = DinoFeatures(network.model_name, weights=str(path), input_size=network.image_size,
                            model_kwargs={**network.model_kwargs, "dynamic_img_size": True})
    network.backbone.load_state_dict(features.vit.state_dict())


class DinoLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher output of each global crop and the student
    output of every other crop.

    ``centering="ema"`` subtracts an EMA of teacher outputs (DINO); ``"sinkhorn"`` turns the teacher outputs
    into targets with three Sinkhorn-Knopp iterations, which spreads the batch over the prototypes (DINOv2).
    Radiographs all look alike, so a randomly initialised teacher gives nearly the same output for every
    image; the EMA centre then makes the targets uniform and training collapses (loss stuck at log(out_dim)).
    Sinkhorn centring cannot give every image the same target, which avoids that collapse.
    ``koleo_weight`` adds DINOv2's KoLeo term on the student's global-crop outputs, which pushes the
    nearest neighbours in a batch apart.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "ema", koleo_weight: float = 0.0) -> None:
        super().__init__()
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering '{centering}' is not known: use 'ema' or 'sinkhorn'.")
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.centering, self.koleo_weight = centering, koleo_weight
        self.register_buffer("center", torch.zeros(1, out_dim))

    def targets(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        if self.centering == "ema":
            return F.softmax((teacher_out - self.center) / teacher_temp, dim=-1)
        return sinkhorn_knopp(teacher_out / teacher_temp)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, num_crops: int,
                teacher_temp: float) -> torch.Tensor:
        student = (student_out / self.student_temp).chunk(num_crops)
        teacher = self.targets(teacher_out.float(), teacher_temp).detach().chunk(2)
        total, terms = 0.0, 0
        for t_index, t in enumerate(teacher):
            for s_index, s in enumerate(student):
                if s_index == t_index:
                    continue
                total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_out)
        loss = total / terms
        if self.koleo_weight > 0:
            loss = loss + self.koleo_weight * sum(koleo(x) for x in student_out.chunk(num_crops)[:2]) / 2
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.mean(dim=0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center /= torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Targets ``(B, K)`` whose rows sum to 1 and whose columns are used equally across the batch."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        if distributed:
            torch.distributed.all_reduce(t)
        return t

    q = torch.exp(logits.double() - logits.max()).T  # (K, B); one shift for all entries cancels out
    k, b = q.shape
    b *= torch.distributed.get_world_size() if distributed else 1
    q /= all_sum(q.sum())
    for _ in range(iterations):
        q /= all_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).T.float()


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate (negated): -mean log distance to the nearest other sample."""
    x = F.normalize(x.float(), dim=-1)
    distances = torch.cdist(x, x) + torch.eye(len(x), device=x.device) * 1e3
    return -torch.log(distances.min(dim=1).values + eps).mean()


def cosine(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


class DinoIteration:
    """One DINO step for MONAI's ``SupervisedTrainer(iteration_update=...)``.

    The trainer's ``network`` is the student and ``optimizer`` its AdamW. Learning rate (linear warm-up then
    cosine), weight decay (cosine up), teacher momentum (cosine to 1) and teacher temperature (linear
    warm-up) follow the DINO schedules over the trainer's total iterations.
    """

    def __init__(
        self,
        teacher: DinoNetwork,
        loss: DinoLoss,
        lr: float = 5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: int = 10,
        weight_decay: tuple[float, float] = (0.04, 0.4),
        teacher_momentum: tuple[float, float] = (0.996, 1.0),
        teacher_temp: tuple[float, float] = (0.04, 0.07),
        teacher_temp_warmup_epochs: int = 30,
        freeze_last_layer_epochs: int = 1,
        clip_grad: float = 3.0,
        amp: str | None = None,
    ) -> None:
        self.teacher, self.loss, self.amp = teacher, loss, amp
        self.lr, self.min_lr, self.warmup_epochs = lr, min_lr, warmup_epochs
        self.weight_decay, self.teacher_momentum, self.teacher_temp = weight_decay, teacher_momentum, teacher_temp
        self.teacher_temp_warmup_epochs = teacher_temp_warmup_epochs
        self.freeze_last_layer_epochs, self.clip_grad = freeze_last_layer_epochs, clip_grad
        self._scalers = GradScalers()

    def schedules(self, iteration: int, epoch_length: int, max_epochs: int) -> dict[str, float]:
        """Every scheduled value at (0-based) ``iteration``."""
        total = max(1, epoch_length * max_epochs)
        # warm-ups take at most 10% (lr) and 30% (temperature) of the run, the DINO paper's ratios for 100 epochs,
        # so that a short or time-budgeted run still spends most of its iterations in the cosine phase
        warmup = max(1, min(self.warmup_epochs * epoch_length, total // 10))
        if iteration < warmup:
            lr = self.lr * (iteration + 1) / warmup
        else:
            lr = cosine(self.lr, self.min_lr, (iteration - warmup) / max(1, total - warmup))
        temp_warmup = min(self.teacher_temp_warmup_epochs * epoch_length, total * 3 // 10)
        temp = self.teacher_temp[1] if iteration >= temp_warmup else (
            self.teacher_temp[0] + (self.teacher_temp[1] - self.teacher_temp[0]) * iteration / max(1, temp_warmup))
        return {"lr": lr, "weight_decay": cosine(*self.weight_decay, iteration / total),
                "teacher_momentum": cosine(*self.teacher_momentum, iteration / total), "teacher_temp": temp}

    def __call__(self, engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        student, optimizer = engine.network, engine.optimizer
        device = engine.state.device
        crop_keys = sorted((k for k in batchdata if k.startswith("crop_")), key=lambda k: int(k.split("_")[1]))
        crops = [batchdata[k].to(device, non_blocking=engine.non_blocking).float() for k in crop_keys]
        s = self.schedules(engine.state.iteration - 1, engine.state.epoch_length, engine.state.max_epochs)
        for group in optimizer.param_groups:
            group["lr"] = s["lr"]
            group["weight_decay"] = s["weight_decay"] if group.get("decay", True) else 0.0

        dtype = autocast_dtype(self.amp, device)
        student.train()
        with autocast(device, dtype):
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = student(crops)
            loss = self.loss(student_out.float(), teacher_out.float(), len(crops), s["teacher_temp"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DINO loss is {loss.item()} at iteration {engine.state.iteration}: lower dino_lr.")
        optimizer.zero_grad(set_to_none=True)

        def clip_and_freeze() -> None:
            if self.clip_grad:
                nn.utils.clip_grad_norm_(student.parameters(), self.clip_grad)
            if engine.state.epoch <= self.freeze_last_layer_epochs:
                for p in student.head.last_layer.parameters():
                    p.grad = None

        step(loss, optimizer, self._scalers.get_for("student", dtype, device), before_step=clip_and_freeze)
        update_teacher(self.teacher, student, s["teacher_momentum"])
        return {"loss": loss.detach(), **{k: torch.tensor(v) for k, v in s.items()}}


def make_teacher(student: DinoNetwork) -> DinoNetwork:
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


def parameter_groups(network: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only, not on biases, norms or position/class tokens (as in DINO)."""
    decay, no_decay = [], []
    for name, p in network.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")) else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "decay": False}]


def local_crop_size(global_size: int, model_name: str, model_kwargs: dict | None = None) -> int:
    """Side of the local crops: about 3/7 of the global crop (at least 32 px), rounded to a whole number of the
    ViT's patches, which its patch embedding needs (112 px global crops of a ViT-S/14 give 42 px, 224 px give 98)."""
    patch = (model_kwargs or {}).get("patch_size")
    if patch is None:
        found = re.search(r"patch(\d+)", model_name)
        patch = int(found.group(1)) if found else 16
    size = max(32, int(global_size) * 3 // 7)
    return max(int(patch), round(size / patch) * int(patch))


def multi_crop(global_size: int, local_size: int, num_local: int, global_scale: Sequence[float] = (0.4, 1.0),
               local_scale: Sequence[float] = (0.05, 0.4), flip_prob: float = 0.0, source_key: str = "image") -> Compose:
    """2 global + ``num_local`` local random-resized crops of a preprocessed ``(1, H, W)`` image in [0, 1].

    Augmentations suit grey radiographs: random resized crop, small affine, contrast (gamma) and intensity
    jitter, Gaussian blur. Horizontal flips are off by default: they swap the heart's side.
    """
    from monai.transforms import CopyItemsd, DeleteItemsd, EnsureTyped

    names = [f"crop_{i}" for i in range(2 + num_local)]
    transforms: list = [CopyItemsd(keys=source_key, times=len(names), names=names)]
    for i, name in enumerate(names):
        size, scale = (global_size, global_scale) if i < 2 else (local_size, local_scale)
        transforms += [
            # random resized crop: each side a random fraction in [sqrt(min area), sqrt(max area)] of the image
            RandScaleCropd(keys=name, roi_scale=math.sqrt(scale[0]), max_roi_scale=math.sqrt(scale[1]),
                           random_size=True),
            Resized(keys=name, spatial_size=(size, size), mode="area"),
            RandFlipd(keys=name, prob=flip_prob, spatial_axis=0),
            RandAffined(keys=name, prob=0.5, rotate_range=0.1, scale_range=0.05, padding_mode="border"),
            RandAdjustContrastd(keys=name, prob=0.8, gamma=(0.6, 1.6)),
            RandScaleIntensityd(keys=name, prob=0.8, factors=0.2),
            RandGaussianSmoothd(keys=name, prob=1.0 if i == 0 else (0.1 if i == 1 else 0.5),
                                sigma_x=(0.1, 1.5), sigma_y=(0.1, 1.5)),
            EnsureTyped(keys=name, dtype=torch.float32, track_meta=False),
        ]
    transforms.append(DeleteItemsd(keys=[k for k in (source_key, "source") if k]))
    return Compose(transforms)


def export_teacher(teacher: DinoNetwork, path: str | os.PathLike) -> None:
    """Save the teacher backbone as timm-format safetensors, with ``<path>.json`` naming model and size."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in teacher.backbone.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp)
    info = {"model_name": teacher.model_name, "img_size": teacher.image_size, "model_kwargs": teacher.model_kwargs,
            "weights": path.name}
    atomic_write_json(path.with_name(path.name + ".json"), info)
