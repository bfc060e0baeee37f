"""DiNO-Diffusion MONAI bundle: the parts that configs cannot express."""

from .compat import ensure_torchvision_importable
from .errors import BundleInputError, install_excepthook

ensure_torchvision_importable()
install_excepthook()

from . import autoencoder, cache, data, diffusion, dino, dino_pretrain, sampling, transforms, workflow, writers  # noqa: E402,F401

__version__ = "0.1.0"
