"""Speed settings of a profile: mixed precision, channels-last memory layout and ``torch.compile``.

Measured on two AVX2 CPU cores (docs/results/performance.md) none of them speeds up a training step, so the CPU
profile leaves them off; the GPU profiles switch them on. Every setting keeps the weights and their names as
they are, so checkpoints and exported models do not depend on it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

from .errors import BundleInputError

logger = logging.getLogger(__name__)

_WARNED: set = set()
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting: ``none`` (float32), ``bf16`` or ``fp16``."""
    key = "none" if amp in (None, False) else str(amp).strip().lower()
    if key not in AMP_DTYPES:
        raise BundleInputError(f"amp '{amp}' is not known: choose none, bf16 or fp16.")
    return AMP_DTYPES[key]


def amp_enabled(amp: str | None, device: Any) -> bool:
    """Whether the trainers run under autocast: only on a GPU. MONAI's trainers autocast CUDA only, and a CPU
    without bf16 units (this one) is slower in reduced precision, so on a CPU the setting is said and ignored."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return False
    if torch.device(device).type != "cuda":
        if amp not in _WARNED:
            _WARNED.add(amp)
            logger.warning("amp '%s' is a GPU setting: on %s the trainers run in float32.", amp, device)
        return False
    return True


def amp_kwargs(amp: str | None) -> dict[str, Any]:
    """The ``amp_kwargs`` of MONAI's trainers (passed to ``torch.autocast``)."""
    dtype = amp_dtype(amp)
    return {} if dtype is None else {"dtype": dtype}


def channels_last(network: nn.Module, enabled: bool = False) -> nn.Module:
    """The network itself, converted in place to the channels-last memory layout when ``enabled``."""
    from .workflow import flag

    return network.to(memory_format=torch.channels_last) if flag(enabled) else network


def compiled(network: nn.Module, enabled: bool = False) -> nn.Module:
    """``torch.compile(network)`` for a trainer to run, or the network itself.

    The compiled wrapper shares the parameters; checkpoints, EMA copies and exports keep using the plain
    network, so their weights and key names do not depend on the setting. A backend that cannot compile (no
    C++ compiler, an unsupported operation) falls back to eager execution with a warning instead of stopping.
    """
    from .workflow import flag

    if not flag(enabled):
        return network
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return torch.compile(network)


@contextlib.contextmanager
def autocast(engine: Any) -> Iterator[None]:
    """Autocast for the bundle's own iteration functions, as MONAI's trainers do it: on when the trainer's
    ``amp`` is, with its ``amp_kwargs``, on the trainer's device."""
    if getattr(engine, "amp", False):
        with torch.autocast(torch.device(engine.state.device).type, **(engine.amp_kwargs or {})):
            yield
    else:
        yield


def step(engine: Any, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any = None,
         before_step: Any = None) -> None:
    """Backward and optimiser step, through ``scaler`` (a ``GradScaler``, for fp16) when one is given;
    ``before_step`` runs on unscaled gradients (clipping)."""
    if scaler is None:
        loss.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if before_step is not None:
        before_step()
    scaler.step(optimizer)
    scaler.update()


def grad_scaler(engine: Any) -> Any:
    """A gradient scaler for fp16 training on the engine's device (None otherwise: bf16 and float32 need none)."""
    if not getattr(engine, "amp", False) or (engine.amp_kwargs or {}).get("dtype") is not torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(engine.state.device).type)
