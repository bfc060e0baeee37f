"""Speed settings of a profile: mixed precision, channels-last memory layout and ``torch.compile``.

Measured on two CPU cores (docs/results/performance.md), channels-last, compile and fused attention did not speed
up a training step; bf16 autocast did, on a CPU with bf16 instructions. Every setting keeps the weights and
their names as they are, so checkpoints and exported models do not depend on it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator

import torch
from torch import nn

from .errors import BundleInputError
from .validation import flag, number, optional_path

logger = logging.getLogger(__name__)

_WARNED: set = set()
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # as outputs record it


def precision_name(dtype: torch.dtype | None) -> str:
    """How results and manifests record an autocast dtype: ``float32`` (None), ``bf16`` or ``fp16``."""
    return PRECISION_NAMES.get(dtype, str(dtype))


def amp_dtype(amp: str | None, device: Any = "cpu") -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting: ``none`` (float32), ``bf16``, ``fp16``, or ``auto`` (bf16 where
    ``device`` has bf16 arithmetic, a GPU that supports it or a CPU with bf16 instructions; float32 elsewhere)."""
    key = checked_amp(amp)
    if key == "auto":
        return torch.bfloat16 if device_has_bf16(device) else None
    return AMP_DTYPES[key]


def checked_amp(amp: str | None, setting: str = "amp") -> str:
    """``amp`` as a precision setting's name (``auto``, ``none``, ``bf16``, ``fp16``), or one sentence naming
    ``setting`` when it is none of them."""
    key = "none" if amp in (None, False) else str(amp).strip().lower()
    if key != "auto" and key not in AMP_DTYPES:
        raise BundleInputError(f"--{setting} {amp!r} is not a precision: choose auto (bf16 where the device has it), "
                               "none (float32), bf16 or fp16.")
    return key


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) for oneDNN's bf16 convolutions and GEMMs.

    Not oneDNN's own ``_is_mkldnn_bf16_supported``: that is true on any AVX-512 CPU, where bf16 is emulated and a
    128-px diffusion training step took 1.9x as long as in float32 (docs/results/performance.md)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def device_has_bf16(device: Any) -> bool:
    """Whether ``device`` computes in bf16 natively (a CUDA GPU that supports it, or a CPU with bf16 instructions)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.device(device).type == "cpu" and cpu_has_bf16()


def autocast_dtype(amp: str | None, device: Any) -> torch.dtype | None:
    """The dtype training autocasts to on ``device``, or None (float32): any amp setting on a GPU; bf16 on a CPU
    with bf16 instructions; ``auto`` as :func:`amp_dtype` says; otherwise the setting is said once in the log and
    ignored."""
    dtype = amp_dtype(amp, device)
    kind = torch.device(device).type
    if checked_amp(amp) == "auto" and ("auto", kind) not in _WARNED:
        _WARNED.add(("auto", kind))
        logger.info("Precision (amp auto) on %s: %s.", kind, precision_name(dtype) if dtype is not None or kind != "cpu"
                    else "float32, because this CPU has no bf16 instructions (where it has them, bf16 runs about "
                    "1.5x faster; docs/results/performance.md)")
    if dtype is None or kind == "cuda" or (kind == "cpu" and dtype is torch.bfloat16 and cpu_has_bf16()):
        return dtype
    if amp not in _WARNED:
        _WARNED.add(amp)
        logger.warning("amp '%s' cannot run on %s (fp16 is a GPU setting; bf16 needs a GPU or a CPU with bf16 "
                       "instructions): running in float32.", amp, device)
    return None


def amp_enabled(amp: str | None, device: Any) -> bool:
    """MONAI's trainer flag: its trainers autocast CUDA only (and add a gradient scaler); on a CPU the bundle
    autocasts the network itself (:func:`training_network`)."""
    return torch.device(device).type == "cuda" and autocast_dtype(amp, device) is not None


def amp_kwargs(amp: str | None, device: Any = "cpu") -> dict[str, Any]:
    """The ``amp_kwargs`` of MONAI's trainers (passed to ``torch.autocast``)."""
    dtype = amp_dtype(amp, device)
    return {} if dtype is None else {"dtype": dtype}


def channels_last(network: nn.Module, enabled: bool = False) -> nn.Module:
    """The network itself, converted in place to the channels-last memory layout when ``enabled``."""
    return network.to(memory_format=torch.channels_last) if flag(enabled) else network


def compiled(network: nn.Module, enabled: bool = False) -> nn.Module:
    """``torch.compile(network)`` for a trainer to run, or the network itself.

    The compiled wrapper shares the parameters; checkpoints, EMA copies and exports keep using the plain
    network, so their weights and key names do not depend on the setting. A backend that cannot compile (no
    C++ compiler, an unsupported operation) falls back to eager execution with a warning instead of stopping.
    """
    if not flag(enabled):
        return network
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return torch.compile(network)


@contextlib.contextmanager
def autocast(device: Any, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device`` to ``dtype``; nothing when ``dtype`` is None."""
    if dtype is None:
        yield
    else:
        with torch.autocast(torch.device(device).type, dtype=dtype):
            yield


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float(v) for v in value)
    return value


class Autocast(nn.Module):
    """``module`` run under autocast to ``dtype``, its floating outputs returned in float32 (losses stay float32).
    Attributes the wrapper lacks are looked up on ``module``."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        device = next(self.module.parameters()).device
        with torch.autocast(device.type, dtype=self.dtype):
            return _to_float(self.module(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def training_network(network: nn.Module, amp: str | None, device: Any, compile: bool = False) -> nn.Module:
    """The network as a MONAI trainer runs it: under bf16 autocast on a CPU that has bf16 (on a GPU, MONAI's
    trainer autocasts), then compiled when asked. It shares the parameters of ``network``, which checkpoints,
    EMA and export keep using."""
    dtype = autocast_dtype(amp, device)
    if dtype is not None and torch.device(device).type != "cuda":
        network = Autocast(network, dtype)
    return compiled(network, compile)


def step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any = None, before_step: Any = None) -> None:
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


def grad_scaler(dtype: torch.dtype | None, device: Any) -> Any:
    """A gradient scaler for fp16 training on ``device`` (None otherwise: bf16 and float32 need none)."""
    return torch.amp.GradScaler(torch.device(device).type) if dtype is torch.float16 else None


class GradScalers(dict):
    """One gradient scaler per optimiser of an iteration function, made on its first step (None unless fp16)."""

    def get_for(self, name: str, dtype: torch.dtype | None, device: Any) -> Any:
        if name not in self:
            self[name] = grad_scaler(dtype, device)
        return self[name]


def set_threads(threads: int | str | None) -> None:
    """CPU threads for this process (``None`` keeps torch's default of all cores)."""
    value = optional_path(threads)
    if value is None:
        return
    torch.set_num_threads(number("torch_threads", value, int, 1, "1, 2 or null"))
