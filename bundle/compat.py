"""Import-time compatibility for the CPU torch wheel paired with PyPI's CUDA torchvision.

PyPI's torchvision 0.28.0 is a CUDA build. Beside the CPU build of torch 2.13.0 its import fails with
"operator torchvision::nms does not exist", which also breaks ``import timm``. Declaring the two missing
operator schemas lets torchvision import; nothing in this project calls them. The shim is applied only
when that exact failure happens, so a matching torch/torchvision pair (any GPU install) is untouched.
"""

from __future__ import annotations

import importlib
import sys

_LIBRARY = None  # keeps the torch.library registration alive for the life of the process


def ensure_torchvision_importable() -> None:
    global _LIBRARY
    if "torchvision" in sys.modules:
        return
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    importlib.import_module("torchvision")


def quiet_optional_decoder_notices() -> None:
    """Silence MONAI's notice, repeated at every image load, that the optional GPU DICOM decoder (nvImageCodec)
    is not installed: the pydicom decoders it falls back to are the ones this bundle uses anyway."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
