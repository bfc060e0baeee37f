"""Every user-set number is checked here, before any work starts, with one sentence naming the setting, the
value and what to give instead. Strategy parameters are checked by their strategy (bundle/strategies.py)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from .errors import BundleInputError


def number(name: str, value: Any, kind: type = float, minimum: float | None = None, example: Any = None,
           strictly: bool = False) -> Any:
    """``value`` as ``kind`` (``int`` or ``float``), finite and at least (or, ``strictly``, above) ``minimum``."""
    example = example if example is not None else kind(1)
    try:
        out = kind(float(value)) if kind is int else kind(value)
        finite = math.isfinite(float(value))
    except (TypeError, ValueError):
        raise BundleInputError(f"--{name} '{value}' is not a number: give e.g. {example}.") from None
    if not finite:
        raise BundleInputError(f"--{name} {value} is not finite: give e.g. {example}.")
    if kind is int and out != float(value):
        raise BundleInputError(f"--{name} {value} is not a whole number: give e.g. {example}.")
    if minimum is not None and (out <= minimum if strictly else out < minimum):
        bound = f"above {minimum}" if strictly else f"at least {minimum}"
        raise BundleInputError(f"--{name} {value} must be {bound}: give e.g. {example}.")
    return out


def check_image_size(image_size: Any, downsampling: Sequence[int] = ()) -> int:
    """``image_size`` as a whole number that every network's halvings divide (``downsampling``: levels - 1 each)."""
    size = number("image_size", image_size, int, minimum=1, example=64)
    multiple = 2 ** sum(int(d) for d in downsampling)
    if size % multiple:
        raise BundleInputError(f"--image_size {size} cannot be halved {sum(downsampling)} times (autoencoder, then UNet): "
                               f"give a multiple of {multiple}, e.g. {max(multiple, size // multiple * multiple)}.")
    return size


def check_sampling_values(num_inference_steps: Any, guidance_scale: Any, batch_size: Any = 1,
                          num_train_timesteps: int | None = None) -> None:
    """Refuse sampling settings that cannot work, before the pool is encoded or anything is written."""
    steps = number("num_inference_steps", num_inference_steps, int, minimum=1, example=50)
    if num_train_timesteps is not None and steps > int(num_train_timesteps):
        raise BundleInputError(f"--num_inference_steps {steps} is more than the {num_train_timesteps} training steps: "
                               "give e.g. 50.")
    number("guidance_scale", guidance_scale, float, minimum=0.0,
           example="0 (unconditional), 1 (conditional, no guidance) or 3")
    number("sample_batch_size", batch_size, int, minimum=1, example=8)


def flag(value: Any) -> bool:
    """A yes/no setting as configs and the command line give it (``true``/``false``, ``yes``/``no``, ``1``/``0``).

    The command line passes ``--use_ema false`` as the string "false", which Python would take as true.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1", "1.0"):
        return True
    if text in ("false", "no", "off", "0", "0.0", "none", "null", ""):
        return False
    raise BundleInputError(f"'{value}' is not a yes/no value: use true or false.")


def optional_path(value: Any) -> str | None:
    """A path setting that may be switched off: ``None``, or the command line's ``null``/``none``/empty string."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    return str(value)
