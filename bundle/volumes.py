"""CT and MRI volumes as 2D training slices: reading NIfTI files and DICOM series, orienting them to RAS, naming
HU windows, and expanding a datalist of volumes into one row per usable slice.

A slice row keeps its volume: ``image`` is the volume (a NIfTI file or a DICOM series folder), ``slice_axis`` and
``slice_index`` say which slice, so caches, manifests and writers can name where every training item came from.
Slices are returned in the display convention of radiology: axial and coronal slices with the patient's right on
the image's left, anterior (axial) or superior (coronal, sagittal) at the top.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .errors import BundleInputError

logger = logging.getLogger(__name__)

# name -> (level, width) in Hounsfield units
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def window_range(name: str) -> tuple[float, float]:
    """``(lowest, highest)`` HU of a named window."""
    if name not in WINDOWS:
        raise BundleInputError(f"CT window '{name}' is not known: choose one of {sorted(WINDOWS)}.")
    level, width = WINDOWS[name]
    return level - width / 2, level + width / 2


def is_volume_source(path: str | os.PathLike) -> bool:
    """A NIfTI file or a folder (a DICOM series)."""
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith(NIFTI_SUFFIXES)


def _reorient(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` and ``affine`` turned to RAS axis order and directions (no resampling)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    return np.ascontiguousarray(apply_orientation(data, transform)), affine @ inv_ornt_aff(transform, data.shape)


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        raise BundleInputError(f"'{path}' cannot be read as NIfTI ({type(error).__name__}: {error}).") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BundleInputError(f"'{path}' has shape {data.shape}: a {data.ndim}D image, but a volume config takes 3D "
                               "volumes (split 4D series into 3D files; give 2D images to the cxr modality).")
    return data, np.asarray(image.affine, dtype=np.float64), {"modality": None}


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One DICOM series folder -> ``(data (X, Y, Z) float32 in stored units after RescaleSlope/Intercept, RAS
    affine, info)``; slices ordered along the slice normal by ImagePositionPatient."""
    import pydicom

    folder = Path(folder)
    headers = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            headers.append((path, pydicom.dcmread(str(path), stop_before_pixels=True)))
        except Exception:
            continue  # not a DICOM file
    if not headers:
        raise BundleInputError(f"'{folder}' holds no DICOM files: a volume is a NIfTI file or a DICOM series folder.")
    series = sorted({str(h.get("SeriesInstanceUID", "")) for _, h in headers})
    if len(series) > 1:
        raise BundleInputError(f"'{folder}' holds {len(series)} DICOM series ({', '.join(s[-12:] for s in series)}): "
                               "put each series in its own folder.")
    if len(headers) < 2:
        raise BundleInputError(f"'{folder}' holds a single DICOM slice: a series needs at least two.")
    missing = [p.name for p, h in headers if "ImagePositionPatient" not in h or "ImageOrientationPatient" not in h]
    if missing:
        raise BundleInputError(f"DICOM files {missing[:3]} in '{folder}' have no ImagePositionPatient/Orientation: "
                               "they cannot be stacked into a volume.")
    orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for _, h in headers])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise BundleInputError(f"The DICOM series in '{folder}' mixes slice orientations: export one orientation.")
    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for _, h in headers])
    order = np.argsort(positions @ normal)
    along = (positions @ normal)[order]
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        raise BundleInputError(f"The DICOM series in '{folder}' has two slices at one position: remove duplicates.")
    if np.any(steps > 1.5 * np.median(steps)):
        gap = int(np.argmax(steps))
        raise BundleInputError(f"The DICOM series in '{folder}' is missing slices: a gap of {steps[gap]:.2f} mm after "
                               f"slice {gap + 1} where the others are {np.median(steps):.2f} mm apart.")
    slices = []
    for i in order:
        ds = pydicom.dcmread(str(headers[i][0]))
        pixels = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) \
            + float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(pixels.T)  # DICOM rows are y, columns x: store (x, y)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise BundleInputError(f"The DICOM series in '{folder}' has slices of different sizes {sorted(shapes)}.")
    first = headers[order[0]][1]
    spacing_rows, spacing_cols = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = row * spacing_cols  # x: along a row, one column to the next
    affine[:3, 1] = col * spacing_rows  # y: down a column, one row to the next
    affine[:3, 2] = normal * float(np.median(steps))
    affine[:3, 3] = positions[order[0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM patient space is LPS; NIfTI's is RAS
    return np.stack(slices, axis=-1), affine, {"modality": str(first.get("Modality", "")) or None,
                                               "series": series[0], "slices": len(slices)}


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A NIfTI file or DICOM series folder as ``(data (X, Y, Z) float32, RAS affine, info)`` in RAS order, checked
    for non-finite values and for being constant."""
    p = Path(path)
    if not p.exists():
        raise BundleInputError(f"Volume '{path}' does not exist.")
    if p.is_dir():
        data, affine, info = read_dicom_series(p)
    elif p.name.lower().endswith(NIFTI_SUFFIXES):
        data, affine, info = read_nifti(p)
    else:
        raise BundleInputError(f"'{path}' is not a volume (a .nii/.nii.gz file or a DICOM series folder): a 2D image "
                               "goes with the cxr modality.")
    if not np.isfinite(data).all():
        raise BundleInputError(f"Volume '{path}' has NaN or infinite voxels: fix or mask them before training.")
    if float(data.max()) == float(data.min()):
        raise BundleInputError(f"Volume '{path}' is constant ({float(data.min())}): it carries nothing to learn.")
    data, affine = _reorient(data, affine)
    return data, affine, info


def display_slice(data: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a RAS volume, as ``(x, y)`` in the radiological display convention."""
    if axis == 2:
        return data[::-1, ::-1, index]  # axial: patient right on the left, anterior at the top
    if axis == 1:
        return data[::-1, index, ::-1]  # coronal: right on the left, superior at the top
    if axis == 0:
        return data[index, ::-1, ::-1]  # sagittal: anterior on the left, superior at the top
    raise BundleInputError(f"slice_axis {axis} is not 0 (sagittal), 1 (coronal) or 2 (axial).")


def axis_number(axis: int | str) -> int:
    if isinstance(axis, str) and axis in AXES:
        return AXES[axis]
    try:
        value = int(axis)
    except (TypeError, ValueError):
        value = -1
    if value not in (0, 1, 2):
        raise BundleInputError(f"slice_axis '{axis}' is not known: choose axial, coronal, sagittal or 0, 1, 2.")
    return value


def slice_rows(rows: Sequence[Mapping[str, Any]], axis: int | str = "axial", stride: int = 1,
               span: Sequence[float] = (0.0, 1.0), foreground_threshold: float | None = None,
               min_foreground: float = 0.0) -> list[dict[str, Any]]:
    """Each volume row expanded into one row per kept slice (``slice_axis``, ``slice_index``, ``volume``).

    Kept: every ``stride``-th slice within the fraction ``span`` of the axis, whose fraction of voxels above
    ``foreground_threshold`` (in the volume's units, e.g. HU; ``None``: the volume's 5th percentile) is at least
    ``min_foreground``. A row that is not a volume is refused (volume configs take volumes only).
    """
    axis = axis_number(axis)
    if int(stride) < 1:
        raise BundleInputError(f"slice_stride {stride} must be at least 1.")
    if not (0.0 <= float(span[0]) < float(span[1]) <= 1.0):
        raise BundleInputError(f"slice_range {list(span)} must be two fractions 0 <= start < stop <= 1.")
    out = []
    for row in rows:
        source = str(row["image"])
        if not is_volume_source(source):
            raise BundleInputError(f"'{source}' is a 2D image, but this modality config takes volumes (NIfTI files or "
                                   "DICOM series folders): use --modality cxr for 2D images.")
        data, _, _ = read_volume(source)
        count = data.shape[axis]
        threshold = float(np.percentile(data, 5)) if foreground_threshold is None else float(foreground_threshold)
        moved = np.moveaxis(data, axis, 0).reshape(count, -1)
        foreground = (moved > threshold).mean(axis=1)
        first, last = int(np.floor(span[0] * count)), int(np.ceil(span[1] * count))
        kept = [k for k in range(first, min(last, count), int(stride)) if foreground[k] >= min_foreground]
        if not kept:
            raise BundleInputError(f"No slice of '{source}' has at least {min_foreground:.0%} of its voxels above "
                                   f"{threshold:g}: lower min_foreground or check the volume.")
        logger.info("%s: %d of %d slices along axis %d kept.", source, len(kept), count, axis)
        out += [{**row, "image": source, "volume": source, "slice_axis": axis, "slice_index": k} for k in kept]
    return out


class LoadSliced(MapTransform):
    """Load one slice of a volume row (``image`` = the volume, ``slice_axis``, ``slice_index``) as a ``(1, X, Y)``
    MetaTensor in the volume's units; the last ``cache_volumes`` volumes stay in memory, so slicing a volume
    reads it once. ``spacing`` (mm) resamples the slice to square pixels of that size; ``"min"`` (default) to the
    finer of its two pixel sizes, so that a coronal slice of 1.5 mm axial slices is not squashed; ``None`` keeps
    the voxel grid."""

    def __init__(self, keys: KeysCollection = "image", cache_volumes: int = 2, spacing: float | str | None = "min",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cache_volumes, self.spacing = int(cache_volumes), spacing
        self._volumes: OrderedDict[str, tuple[np.ndarray, np.ndarray, dict]] = OrderedDict()

    def volume(self, source: str) -> tuple[np.ndarray, np.ndarray, dict]:
        if source not in self._volumes:
            self._volumes[source] = read_volume(source)
            while len(self._volumes) > self.cache_volumes:
                self._volumes.popitem(last=False)
        self._volumes.move_to_end(source)
        return self._volumes[source]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        if "slice_index" not in d or d.get("slice_index") in (None, ""):
            raise BundleInputError(f"'{d.get('image')}' has no slice_index: volume datalists are expanded into slices "
                                   "first (bundle.volumes.slice_rows).")
        axis, index = axis_number(d.get("slice_axis", 2)), int(d["slice_index"])
        for key in self.key_iterator(d):
            source = str(d[key])
            volume, affine, info = self.volume(source)
            if not 0 <= index < volume.shape[axis]:
                raise BundleInputError(f"slice_index {index} is outside '{source}' ({volume.shape[axis]} slices along "
                                       f"axis {axis}).")
            plane = torch.from_numpy(np.ascontiguousarray(display_slice(volume, axis, index)))[None]
            sizes = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
            in_plane = [sizes[a] for a in range(3) if a != axis]
            if self.spacing is not None:
                target = min(in_plane) if self.spacing == "min" else float(self.spacing)
                shape = [max(1, int(round(n * s / target))) for n, s in zip(plane.shape[1:], in_plane)]
                if shape != list(plane.shape[1:]):
                    plane = torch.nn.functional.interpolate(plane[None], size=shape, mode="bilinear",
                                                            align_corners=False)[0]
            d[key] = MetaTensor(plane, meta={
                "filename_or_obj": source, "slice_axis": axis, "slice_index": index, "volume_affine": affine,
                "pixel_spacing": in_plane if self.spacing is None else [target, target],
                "source_modality": info.get("modality")})
        return d


def volume_geometry(source: str) -> tuple[tuple[int, int, int], np.ndarray, str | None]:
    """``(shape, RAS affine, DICOM modality)`` of a volume, read once per file state (cached)."""
    p = Path(source)
    stamp = (p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None
    return _volume_geometry(str(p), stamp)


@functools.lru_cache(maxsize=4)
def _volume_geometry(source: str, stamp: Any) -> tuple[tuple[int, int, int], np.ndarray, str | None]:
    data, affine, info = read_volume(source)
    return tuple(int(n) for n in data.shape), affine, info.get("modality")


def output_affine(row: Mapping[str, Any], size: Sequence[int]) -> np.ndarray:
    """The RAS affine of an output image of ``size`` (x, y) made from a slice row: where its pixels lie in the
    source volume's world space, assuming the slice filled the image along its longer side and was centred along
    the other (the modality configs' resize-longest-then-pad), so a synthetic slice overlays its source."""
    shape, affine, _ = volume_geometry(str(row["image"]))
    axis, index = axis_number(row.get("slice_axis", 2)), int(row["slice_index"])
    in_plane = [a for a in range(3) if a != axis]  # volume axes shown along output x and y
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    extent = [shape[a] * sizes[a] for a in in_plane]  # mm along output x and y
    pixel = max(extent) / max(size)  # mm per output pixel (square pixels, longest side fills the image)
    voxel_to_output = np.zeros((4, 4))
    voxel_to_output[3, 3] = 1.0
    voxel_to_output[axis, 3] = index
    for out_axis, vol_axis in enumerate(in_plane):  # display_slice flips both shown axes
        step = pixel / sizes[vol_axis]  # voxels per output pixel
        offset = (size[out_axis] - extent[out_axis] / pixel) / 2  # padding before the content, in output pixels
        # output pixel centre p -> voxel centre (p + 0.5 - offset) * step - 0.5, counted from the far end
        voxel_to_output[vol_axis, out_axis] = -step
        voxel_to_output[vol_axis, 3] = shape[vol_axis] - 1 - ((0.5 - offset) * step - 0.5)
    voxel_to_output[axis, 2] = 1.0  # a one-voxel-thick slab along the slice axis
    return affine @ voxel_to_output


def source_modality(row: Mapping[str, Any]) -> str | None:
    """The DICOM Modality of a slice row's volume (a DICOM series), else None."""
    if row.get("slice_index") in (None, ""):
        return None
    return volume_geometry(str(row["image"]))[2]
