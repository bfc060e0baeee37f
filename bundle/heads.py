"""Few-shot heads on a diffusion-pre-trained UNet: landmark heatmaps and multi-label segmentation.

After Di Via et al. (arXiv 2407.18125): the denoising UNet, pre-trained without labels, is fine-tuned as
a dense regressor. Its time embedding is switched off (every call uses timestep 0, so the embedding is a
constant the fine-tuning can absorb) and its output convolution is replaced by a new 1x1 convolution with
one channel per landmark (Gaussian heatmaps) or per structure (mask logits).

Coordinates follow MONAI's array order: an image array is ``(C, X, Y)`` with X to the right and Y down,
and a landmark is ``(x, y)`` in pixels of that array, the same convention as the JSRT landmark files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import BundleInputError

SDR_THRESHOLDS_PX = (2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 10.0)


MASK_PRIOR_BIAS = -4.595  # log(0.01 / 0.99): every mask channel starts out predicting "absent" (RetinaNet's prior)


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
        import torch.nn.functional as F

        latents = self.codec.encode(images)
        timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        maps = self.unet(latents, timesteps, context=self.context.expand(images.shape[0], -1, -1))
        return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_head(unet: nn.Module, out_channels: int, pretrained_path: str | os.PathLike | None = None,
               initial_bias: float = 0.0) -> DenseHead:
    """``unet`` with the pre-trained denoiser's weights (or its random initialisation when no path), as a head."""
    if pretrained_path:
        load_denoiser(unet, pretrained_path, "or pass --pretrained_path null to train from scratch")
    return DenseHead(unet, out_channels, initial_bias)


def load_denoiser(unet: nn.Module, path: str | os.PathLike, remedy: str = "") -> nn.Module:
    """The label-free denoiser's weights into ``unet`` (eval mode)."""
    from .autoencoder import load_state

    load_state(unet, path, "denoiser", f"pre-train it first (configs/heads/pretrain.json) {remedy}".strip())
    return unet.eval()


class Frame:
    """The geometry between an original image and its preprocessed square (longest side resized, centred pad)."""

    def __init__(self, original_size: Sequence[int], size: int) -> None:
        self.original = np.asarray(original_size[:2], dtype=np.float64)
        self.scale = size / self.original.max()
        self.pad = (size - np.round(self.original * self.scale)) // 2

    def to_image(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) + 0.5) * self.scale - 0.5 + self.pad

    def to_original(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.pad + 0.5) / self.scale - 0.5

    def maps_to_original(self, maps: torch.Tensor) -> torch.Tensor:
        """``(C, S, S)`` maps on the preprocessed square -> ``(C, X, Y)`` on the original image (padding cut,
        bilinear resize)."""
        import torch.nn.functional as F

        start = self.pad.astype(int)
        stop = start + np.round(self.original * self.scale).astype(int)
        inner = maps[:, start[0] : stop[0], start[1] : stop[1]].float()
        return F.interpolate(inner[None], size=tuple(int(v) for v in self.original), mode="bilinear",
                             align_corners=False)[0]


def original_size(path: str) -> tuple[int, int]:
    """``(X, Y)`` of an image file as MONAI loads it (header only where the reader allows)."""
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True)(path)
    return tuple(int(v) for v in image.shape[:2])


def landmark_items(rows: Sequence[dict], preprocessing, size: int, groups: Sequence[str] | None, sigma: float,
                   column: str = "landmark_file") -> list[dict]:
    """Dataset items ``{"image", "label": heatmaps (L, S, S), "points": (L, 2) in the image frame, "frame"}``."""
    from .data import apply_to_file

    items = []
    for row in rows:
        if not row.get(column):
            raise BundleInputError(f"Row for '{row['image']}' has no '{column}': give every image a landmark JSON file.")
        frame = Frame(original_size(str(row["image"])), size)
        points = frame.to_image(load_landmarks(row[column], groups))
        image = torch.as_tensor(np.asarray(apply_to_file(preprocessing, dict(row))["image"])).float()
        items.append({"image": image, "label": gaussian_heatmaps(torch.as_tensor(points), (size, size), sigma),
                      "points": points, "frame": frame, "source": str(row["image"])})
    return items


def mask_items(rows: Sequence[dict], preprocessing, size: int, columns: Sequence[str]) -> list[dict]:
    """Dataset items ``{"image", "label": masks (C, S, S)}`` with one binary mask file per structure column."""
    from .data import apply_to_file, read_mask

    items = []
    for row in rows:
        missing = [c for c in columns if not row.get(c)]
        if missing:
            raise BundleInputError(f"Row for '{row['image']}' has no mask in column(s) {missing}.")
        image = torch.as_tensor(np.asarray(apply_to_file(preprocessing, dict(row))["image"])).float()
        masks = torch.cat([read_mask(str(row[c]), (size, size)) for c in columns])
        items.append({"image": image, "label": masks, "source": str(row["image"])})
    return items


def fixed_iteration_loader(items: Sequence[dict], iterations: int, batch_size: int = 8, seed: int = 0):
    """A loader of exactly ``iterations`` batches of ``min(batch_size, len(items))`` image/label pairs drawn
    with replacement (seeded): one "epoch" is the whole fine-tuning budget, whatever N is."""
    from monai.data import DataLoader, Dataset
    from torch.utils.data import RandomSampler

    if not items:
        raise BundleInputError("No labelled images to fine-tune on: give at least one (num_labelled >= 1).")
    data = [{"image": it["image"], "label": it["label"]} for it in items]
    batch = min(int(batch_size), len(data))
    sampler = RandomSampler(data, replacement=True, num_samples=int(iterations) * batch,
                            generator=torch.Generator().manual_seed(int(seed)))
    return DataLoader(Dataset(data), batch_size=batch, sampler=sampler, num_workers=0)


def labelled_rows(datalist: str | os.PathLike | None, num_labelled: int | str | None, columns: Sequence[str]) -> list[dict]:
    """The first ``num_labelled`` rows (``all``/``None``: every row) of a datalist that has every label column."""
    from .data import read_datalist
    from .workflow import optional_path

    if optional_path(datalist) is None:
        raise BundleInputError(f"No labelled data: pass --labelled_dir, a CSV/JSON datalist with an image column and "
                               f"the label column(s) {list(columns)}.")
    rows = read_datalist(datalist)
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise BundleInputError(f"Datalist '{datalist}' has no column(s) {missing}: add them (label files per image).")
    if num_labelled not in (None, "all"):
        if int(num_labelled) < 1:
            raise BundleInputError(f"num_labelled is {num_labelled}: fine-tuning needs at least one labelled image.")
        rows = rows[: int(num_labelled)]
    return rows


def fine_tune(head: nn.Module, items: Sequence[dict], loss: nn.Module, iterations: int = 300, batch_size: int = 8,
              lr: float = 1e-4, seed: int = 0, device: torch.device | str = "cpu") -> list[float]:
    """Train ``head`` for exactly ``iterations`` steps on ``items`` (sampled with replacement) with MONAI's
    ``SupervisedTrainer``; returns the loss of every iteration."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    torch.manual_seed(seed)
    loader = fixed_iteration_loader(items, iterations, batch_size, seed)
    head = head.to(device)
    trainer = SupervisedTrainer(device=torch.device(device), max_epochs=1, train_data_loader=loader, network=head,
                                optimizer=torch.optim.AdamW(head.parameters(), lr=lr), loss_function=loss,
                                decollate=False)
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    head.eval()
    return losses


@torch.no_grad()
def predict(head: nn.Module, images: torch.Tensor, batch_size: int = 16, device: torch.device | str = "cpu") -> torch.Tensor:
    head = head.to(device).eval()
    return torch.cat([head(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def _landmark_groups(path: str | os.PathLike, groups: Sequence[str] | None = None) -> dict[str, list]:
    """``{group: [[x, y], ...]}`` of a landmark JSON file, in the order of ``groups`` (default: the file's)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BundleInputError(f"Landmark file '{path}' could not be read ({type(err).__name__}): give a JSON file "
                               'of {"group": [[x, y], ...]} pixel coordinates.') from None
    groups = list(groups or data)
    missing = [g for g in groups if g not in data]
    if missing:
        raise BundleInputError(f"Landmark file '{path}' has no group(s) {missing} (it has {sorted(data)}).")
    return {g: data[g] for g in groups}


def load_landmarks(path: str | os.PathLike, groups: Sequence[str] | None = None) -> np.ndarray:
    """``(L, 2)`` pixel coordinates from a JSON file of ``{"group": [[x, y], ...], ...}`` (the JSRT layout)."""
    return np.asarray([p for points in _landmark_groups(path, groups).values() for p in points], dtype=np.float64)


def gaussian_heatmaps(points: torch.Tensor, size: Sequence[int], sigma: float) -> torch.Tensor:
    """``(L, X, Y)`` heatmaps with peak 1 at each ``(x, y)`` point; points outside the image give all-zero maps."""
    xs = torch.arange(size[0], dtype=torch.float32).view(1, -1, 1)
    ys = torch.arange(size[1], dtype=torch.float32).view(1, 1, -1)
    px, py = points[:, 0].float().view(-1, 1, 1), points[:, 1].float().view(-1, 1, 1)
    maps = torch.exp(-((xs - px) ** 2 + (ys - py) ** 2) / (2 * sigma**2))
    inside = (px >= 0) & (px <= size[0] - 1) & (py >= 0) & (py <= size[1] - 1)
    return maps * inside


def decode_heatmaps(heatmaps: torch.Tensor, method: str = "argmax", temperature: float = 0.05) -> torch.Tensor:
    """``(..., L, X, Y)`` heatmaps -> ``(..., L, 2)`` ``(x, y)`` coordinates.

    ``argmax`` returns the hottest pixel; ``soft`` the expectation under a softmax of the heatmap divided by
    ``temperature`` (sub-pixel, differentiable).
    """
    *lead, x_size, y_size = heatmaps.shape
    flat = heatmaps.reshape(-1, x_size * y_size).float()
    if method == "argmax":
        index = flat.argmax(dim=1)
        coords = torch.stack([index // y_size, index % y_size], dim=1).float()
    elif method == "soft":
        weights = torch.softmax(flat / temperature, dim=1).view(-1, x_size, y_size)
        xs = torch.arange(x_size, dtype=torch.float32, device=heatmaps.device)
        ys = torch.arange(y_size, dtype=torch.float32, device=heatmaps.device)
        coords = torch.stack([(weights.sum(2) * xs).sum(1), (weights.sum(1) * ys).sum(1)], dim=1)
    else:
        raise BundleInputError(f"Heatmap decoding '{method}' is not known: use 'argmax' or 'soft'.")
    return coords.view(*lead, 2)


class HeatmapCrossEntropy(nn.Module):
    """Each landmark's output map as a distribution over pixels (softmax) against its normalised Gaussian.

    Plain MSE on small Gaussian heatmaps is minimised early by predicting zeros everywhere (on JSRT at 64 px,
    200 iterations left every landmark at a corner, MRE about 310 px in the 512-pixel frame); a
    per-landmark spatial softmax cannot vanish, so every step moves mass towards the landmark.
    """

    def forward(self, logits: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.flatten(2).float(), dim=-1)
        target = heatmaps.flatten(2).float()
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-8)
        return -(target * log_p).sum(-1).mean()


def landmark_metrics(predicted: np.ndarray, true: np.ndarray, thresholds: Sequence[float] = SDR_THRESHOLDS_PX,
                     pixel_spacing: float | None = None) -> dict[str, float]:
    """Mean radial error and success detection rates (share of landmarks within each threshold), in pixels
    and, when ``pixel_spacing`` (mm per pixel) is given, the MRE in millimetres too."""
    predicted, true = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if predicted.shape != true.shape or predicted.shape[-1] != 2:
        raise BundleInputError(f"Landmark arrays of shapes {predicted.shape} and {true.shape} do not match (..., 2).")
    errors = np.linalg.norm(predicted - true, axis=-1)
    result = {"mre_px": float(errors.mean()), "mre_px_std": float(errors.std())}
    result.update({f"sdr_{t:g}px": float((errors <= t).mean()) for t in thresholds})
    if pixel_spacing is not None:
        result["mre_mm"] = float(errors.mean() * pixel_spacing)
    return result


def dice_and_hausdorff(predicted: torch.Tensor, true: torch.Tensor, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-structure Dice and 95th-percentile Hausdorff distance (pixels) of ``(B, C, X, Y)`` binary masks."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if predicted.shape != true.shape:
        raise BundleInputError(f"Mask shapes {tuple(predicted.shape)} and {tuple(true.shape)} differ.")
    dice = DiceMetric(include_background=True, reduction="none")(predicted.float(), true.float())
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(predicted.float(), true.float())
    return {name: {"dice": float(dice[:, c].nanmean()), "hd95_px": float(hd[:, c].nanmean())} for c, name in enumerate(names)}


def resize_points(points: np.ndarray, from_size: Sequence[int], to_size: Sequence[int]) -> np.ndarray:
    """Pixel coordinates scaled between two frames of the same field of view (pixel centres kept aligned)."""
    scale = np.asarray(to_size, dtype=np.float64) / np.asarray(from_size, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5


# ---- trained heads on disk, and inference for a folder ---------------------------------------------------------

TASKS = ("landmarks", "segmentation")


def landmark_layout(path: str | os.PathLike, groups: Sequence[str] | None = None) -> list[list]:
    """``[[group, count], ...]`` of a landmark file: how the head's channels map back to named groups."""
    return [[g, len(points)] for g, points in _landmark_groups(path, groups).items()]


def save_head(head: nn.Module, path: str | os.PathLike, task: str, names: Sequence, image_size: int,
              **metadata) -> None:
    """Write a fine-tuned head with what inference needs: the task, its channel names (landmark groups with
    counts, or mask structures) and the image size it was trained at."""
    from .io import atomic_torch_save

    if task not in TASKS:
        raise BundleInputError(f"Head task '{task}' is not known: use one of {TASKS}.")
    atomic_torch_save({"state_dict": head.state_dict(), "task": task, "names": list(names), "image_size": int(image_size),
                       **metadata}, path)


def load_head(unet: nn.Module, path: str | os.PathLike, task: str, image_size: int) -> tuple[DenseHead, dict]:
    """A head saved by :func:`save_head` on a freshly built ``unet`` (the same denoiser definition)."""
    if not os.path.isfile(path):
        raise BundleInputError(f"Head '{path}' does not exist: fine-tune it first (run ID training) or pass --head_path.")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("task") != task:
        raise BundleInputError(f"'{path}' is a {saved.get('task')} head, not a {task} head: use the matching config.")
    if saved["image_size"] != int(image_size):
        raise BundleInputError(f"Head '{path}' was trained at image_size {saved['image_size']}, not {image_size}: "
                               f"pass --image_size {saved['image_size']}.")
    names = saved["names"]
    channels = sum(n for _, n in names) if task == "landmarks" else len(names)
    head = DenseHead(unet, channels)
    try:
        head.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise BundleInputError(f"Head '{path}' does not fit this network ({str(err).splitlines()[0]}): pass the "
                               "denoiser_channels/denoiser_head_channels it was trained with.") from None
    return head.eval(), saved


def mask_suffix(mask_format: str) -> str:
    """The file suffix of a mask format, refusing formats that are not for masks."""
    if mask_format not in ("png", "nifti"):
        raise BundleInputError(f"Mask format '{mask_format}' is not supported: use 'png' or 'nifti'.")
    from .writers import FORMATS

    return FORMATS[mask_format]


def write_masks(maps: torch.Tensor, frame: Frame, names: Sequence[str], stem: str, output_dir: str | os.PathLike,
                mask_format: str) -> torch.Tensor:
    """``(C, S, S)`` probabilities on the preprocessed square -> binary masks in the original frame, written as
    ``<output_dir>/<name>/<stem><suffix>`` (PNG 0/255 or NIfTI 0/1); returns the ``(C, X, Y)`` masks."""
    from .writers import write_image

    masks = (frame.maps_to_original(maps) > 0.5).float()
    for name, mask in zip(names, masks):
        write_image(mask[None], Path(output_dir) / name / f"{stem}{mask_suffix(mask_format)}", mask_format)
    return masks


@torch.no_grad()
def infer(head: nn.Module, saved: dict, rows: Sequence[dict], preprocessing, output_dir: str | os.PathLike,
          decode: str = "argmax", mask_format: str = "png", pixel_spacing: float | None = None,
          batch_size: int = 8, device: torch.device | str = "cpu") -> dict:
    """Run a trained head on every row and write its outputs in each image's original frame.

    Landmarks: ``<output_dir>/<stem>.json`` as ``{"group": [[x, y], ...]}`` (the layout of the training
    files). Masks: ``<output_dir>/<structure>/<stem>.png`` (0/255) or ``.nii.gz`` (0/1). Rows that carry the
    truth (``landmark_file`` or the structures' mask columns) are scored in the original frame; the scores go
    to ``<output_dir>/metrics.json``. Returns the scores (empty when no row has a truth).
    """
    from .data import output_stems, preprocessed_stack, read_mask
    from .io import atomic_write_json

    task, names, size = saved["task"], saved["names"], saved["image_size"]
    mask_suffix(mask_format)
    if not rows:
        raise BundleInputError("No images to run the head on: check input_dir.")
    out, stems = Path(output_dir), output_stems(rows)
    head = head.to(device).eval()
    scored_pred, scored_true, dice_rows = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        outputs = head(preprocessed_stack(chunk, preprocessing, desc="head").to(device)).cpu()
        for row, stem, output in zip(chunk, stems[start : start + batch_size], outputs):
            frame = Frame(original_size(str(row["image"])), size)
            if task == "landmarks":
                points = frame.to_original(decode_heatmaps(output, decode).numpy())
                grouped, i = {}, 0
                for group, count in names:
                    grouped[group] = [[round(float(x), 2), round(float(y), 2)] for x, y in points[i : i + count]]
                    i += count
                atomic_write_json(out / f"{stem}.json", grouped, indent=None)
                if row.get("landmark_file"):
                    scored_pred.append(points)
                    scored_true.append(load_landmarks(row["landmark_file"], [g for g, _ in names]))
            else:
                masks = write_masks(torch.sigmoid(output), frame, names, stem, out, mask_format)
                if all(row.get(n) for n in names):
                    truth = torch.cat([read_mask(str(row[n]), tuple(masks.shape[1:])) for n in names])
                    dice_rows.append((masks, truth))
    metrics: dict = {}
    if scored_pred:
        metrics = {"images": len(scored_pred), **landmark_metrics(np.concatenate(scored_pred), np.concatenate(scored_true),
                                                                   pixel_spacing=pixel_spacing)}
    elif dice_rows:
        per = [dice_and_hausdorff(p[None], t[None], names) for p, t in dice_rows]
        metrics = {"images": len(per), **{n: {k: float(np.nanmean([d[n][k] for d in per])) for k in ("dice", "hd95_px")}
                                           for n in names}}
    if metrics:
        atomic_write_json(out / "metrics.json", metrics)
    return metrics
