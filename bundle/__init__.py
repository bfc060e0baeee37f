"""DiNO-Diffusion MONAI bundle: the parts that configs cannot express."""

from .compat import ensure_torchvision_importable, quiet_optional_decoder_notices
from .errors import BundleInputError, install_excepthook

ensure_torchvision_importable()
quiet_optional_decoder_notices()
install_excepthook()

from . import (  # noqa: E402,F401
    autoencoder, cache, concepts, data, diffusion, dino, dino_pretrain, evaluation, heads, manifold, model_files, models,
    report, sampling, transforms, validation, volumes, workflow, writers, zero_shot,
)

__version__ = "0.5.0"  # configs/metadata.json's version
