"""DiNO-Diffusion MONAI bundle: the parts that configs cannot express."""

from .compat import ensure_torchvision_importable
from .errors import BundleInputError, install_excepthook

ensure_torchvision_importable()
install_excepthook()

from . import (  # noqa: E402,F401
    augmentation, autoencoder, cache, data, diffusion, dino, dino_pretrain, evaluation, heads, manifold, sampling,
    transforms, workflow, writers, zero_shot,
)

__version__ = "0.3.0"
