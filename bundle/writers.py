"""Writing generated images. Arrays arrive in MONAI's (x, y) orientation and values in [0, 1]."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .io import atomic_path


def to_display(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(1, H, W)`` or ``(H, W)`` in MONAI's (x, y) order -> row-major ``(rows, cols)`` float array in [0, 1]."""
    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    array = array.reshape(array.shape[-2:])
    return np.clip(array.T, 0.0, 1.0)


def write_png(image: torch.Tensor | np.ndarray, path: str | os.PathLike, bit_depth: int = 8) -> None:
    from PIL import Image

    rows = to_display(image)
    if bit_depth == 8:
        pil = Image.fromarray(np.round(rows * 255).astype(np.uint8))
    elif bit_depth == 16:
        pil = Image.fromarray(np.round(rows * 65535).astype(np.uint16))
    else:
        raise ValueError(f"PNG bit depth {bit_depth} is not supported: use 8 or 16.")
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def save_dicom(ds: Any, path: str | os.PathLike) -> None:
    """Write a pydicom dataset as a conformant DICOM file (preamble and file meta) with pydicom 3 or 2; pydicom 2 is
    what MONAI Label's DICOM-SEG library needs beside this bundle."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), enforce_file_format=True)
    else:
        ds.save_as(str(path), write_like_original=False)


def write_nifti(image: torch.Tensor | np.ndarray, path: str | os.PathLike, affine: np.ndarray | None = None) -> None:
    """A 2D NIfTI in MONAI's own (x, y) order, so ``LoadImage`` reads back exactly the array written; ``affine``
    places it in world space (a slice of a volume overlays its source, bundle.volumes.output_affine)."""
    import nibabel as nib

    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    array = np.clip(array.reshape(array.shape[-2:]), 0.0, 1.0)
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else np.asarray(affine, np.float64)), tmp + ".nii.gz")
        os.replace(tmp + ".nii.gz", tmp)


def dicom_uid(*parts: object) -> str:
    """A DICOM UID derived from ``parts``, so that re-running a generation gives the same UIDs."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_dicom(
    image: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_uid: str | None = None,
    instance_number: int = 1,
    description: str = "synthetic image",
    modality: str | None = None,
) -> None:
    """A 16-bit MONOCHROME2 DICOM Secondary Capture marked as synthetic; ``modality`` (default OT) is the source's
    (CT, MR) for slices of volumes.

    ``ConversionType`` SYN (synthetic image), ``ImageType`` DERIVED\\SECONDARY and "synthetic" in the series
    description; the patient is "SYNTHETIC" and nothing from the source images' headers is copied.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage

    if "synthetic" not in description.lower():
        description = f"synthetic {description}"
    rows = np.round(to_display(image) * 65535).astype(np.uint16)
    instance_uid = instance_uid or dicom_uid(os.path.abspath(path))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, instance_uid
    ds.StudyInstanceUID = study_uid or dicom_uid("study", instance_uid)
    ds.SeriesInstanceUID = series_uid or dicom_uid("series", instance_uid)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SYNTHETIC", "SYNTHETIC", "", ""
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "", "", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = (modality or "OT")[:16], 1, int(instance_number)
    ds.SeriesDescription = description[:64]
    ds.ConversionType = "SYN"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.PatientOrientation = ""
    ds.SecondaryCaptureDeviceManufacturer = "MONAI DiNO-Diffusion bundle"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = rows.tobytes()
    with atomic_path(path) as tmp:
        save_dicom(ds, tmp)


FORMATS = {"png": ".png", "png16": ".png", "nifti": ".nii.gz", "dicom": ".dcm"}


def write_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike, fmt: str, affine: np.ndarray | None = None,
                **dicom: object) -> None:
    """Write ``image`` in one of :data:`FORMATS`; ``affine`` places a NIfTI output, ``dicom`` keywords (UIDs,
    description, modality) go to the DICOM writer."""
    if fmt == "png":
        write_png(image, path)
    elif fmt == "png16":
        write_png(image, path, bit_depth=16)
    elif fmt == "nifti":
        write_nifti(image, path, affine)
    elif fmt == "dicom":
        write_dicom(image, path, **dicom)
    else:
        raise ValueError(f"Output format '{fmt}' is not supported: choose from {sorted(FORMATS)}.")
