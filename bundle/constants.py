"""Values that several modules and scripts must agree on, written once."""

from __future__ import annotations

# ImageNet normalisation, for networks pre-trained on ImageNet (Inception-v3, timm ViTs without their own config)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# a datalist names a structure's mask file in the column "mask_<structure>"; outputs drop the prefix
MASK_COLUMN_PREFIX = "mask_"

# the structures with masks in the JSRT set (jsrt/masks/<structure>/ of docs/data.md)
JSRT_STRUCTURES = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
JSRT_MASK_COLUMNS = tuple(MASK_COLUMN_PREFIX + s for s in JSRT_STRUCTURES)
LUNG_MASK_COLUMNS = JSRT_MASK_COLUMNS[:2]

# the chest radiographs that ship with the bundle (NIH ChestX-ray14, 128 px), relative to the repository root:
# train/ is the default training set, val/ the held-out images the first run's report compares against
DEFAULT_DATA_DIR = "bundle/default_data/nih_cxr"

# image files MONAI picks a reader for by their suffix (PIL, NIfTI, ...); any other file may be DICOM (whose files
# often have no suffix) and is read with pydicom first
NON_DICOM_SUFFIXES = (".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".tif", ".tiff", ".bmp", ".npy", ".nrrd", ".mha")
