"""Stage 2: latent diffusion on cached latents, conditioned on DINO tokens, with classifier-free guidance."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines import DiffusionPrepareBatch
from monai.networks.schedulers import Scheduler
from torch import nn
from tqdm import tqdm

from .errors import BundleInputError
from .performance import Autocast


def null_context(context: torch.Tensor) -> torch.Tensor:
    """The unconditional embedding: all zeros, used both for condition dropout and for guidance at sampling.

    MONAI's ``DiffusionInferer.sample(cfg=...)`` fills -1 instead, which is a point inside the continuous
    DINO space rather than "no condition"; training and sampling must share one null, and this is it.
    """
    return torch.zeros_like(context)


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """MONAI's diffusion prepare-batch for cached ``{"image": latent, "context": tokens}`` items.

    Adds what latent, conditioned training needs on top of it: each sample's context is replaced by the
    null context with probability ``condition_dropout`` (so one network learns the conditional and the
    unconditional model, as classifier-free guidance requires), and the target is the velocity when the
    scheduler predicts ``v_prediction``.
    """

    def __init__(self, scheduler: Scheduler, condition_dropout: float = 0.1, condition_name: str = "context") -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps, condition_name=condition_name)
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout {condition_dropout} is outside [0, 1]: choose a probability.")
        self.scheduler, self.condition_dropout = scheduler, condition_dropout

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.scheduler.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return noise

    def __call__(self, batchdata: dict[str, torch.Tensor], device=None, non_blocking: bool = False, **kwargs: Any):
        inputs, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        context = infer_kwargs["condition"].float()
        if self.condition_dropout > 0:
            drop = torch.rand(context.shape[0], device=context.device) < self.condition_dropout
            context = torch.where(drop.view(-1, 1, 1), null_context(context), context)
        infer_kwargs["condition"] = context
        return inputs, target, args, infer_kwargs


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++(2M) (Lu et al., 2022): deterministic second-order multistep sampling on the training noise
    schedule, which reaches with 15-25 network calls what DDIM needs about 50 for.

    Each step turns the network output (epsilon, velocity or sample) into an estimate of the clean latents and
    extrapolates from it and the previous step's estimate in log-SNR time. Timesteps are spaced evenly in log-SNR
    from the noisiest one; the last step goes to the noise level of ``t = 0``. The first step, one that does not
    follow its predecessor (img2img starting part-way) and the last step are first order (DDIM): on a Gaussian
    toy whose exact denoiser is known, this spacing and ending took the error against a 1000-step DDIM from
    0.04 (DDIM, 10-20 steps) to 0.003-0.006, where evenly spaced timesteps gave 0.06-0.08.
    It follows MONAI's scheduler interface (``set_timesteps``, ``step``, ``add_noise``), so the bundle's sampler
    and MONAI's inferers can both drive it.
    """

    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear_beta",
                 prediction_type: str = "epsilon", **schedule_args: Any) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type '{prediction_type}' is not one of epsilon, v_prediction, sample.")
        self.prediction_type = prediction_type
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps {num_inference_steps} must be between 1 and "
                             f"{self.num_train_timesteps}, the number of training timesteps.")
        self.num_inference_steps = num_inference_steps
        alpha_bar = self.alphas_cumprod.double()
        log_snr = 0.5 * torch.log(alpha_bar / (1 - alpha_bar))
        targets = torch.linspace(float(log_snr[-1]), float(log_snr[0]), num_inference_steps + 1)[:-1]
        steps = torch.unique_consecutive(torch.stack([torch.argmin((log_snr - v).abs()) for v in targets]))
        self.timesteps = steps.to(device)
        self._steps = [int(t) for t in steps]
        self._previous: tuple[int, torch.Tensor, float] | None = None

    def _alpha_sigma(self, timestep: int) -> tuple[float, float]:
        """sqrt(alpha_bar), sqrt(1 - alpha_bar) at ``timestep`` (the clean end, -1, is handled by :meth:`step`)."""
        alpha_bar = float(self.alphas_cumprod[timestep].double())
        return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = int(timestep)
        if t not in self._steps:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps: call set_timesteps first.")
        index = self._steps.index(t)
        following = self._steps[index + 1] if index + 1 < len(self._steps) else (0 if t > 0 else -1)
        alpha, sigma = self._alpha_sigma(t)
        if self.prediction_type == "epsilon":
            clean = (sample - sigma * model_output) / alpha
        elif self.prediction_type == "v_prediction":
            clean = alpha * sample - sigma * model_output
        else:
            clean = model_output
        log_snr = math.log(alpha / sigma)
        if following < 0:  # the last step lands on the clean estimate (the first-order update with sigma = 0)
            previous_sample = clean
        else:
            alpha_next, sigma_next = self._alpha_sigma(following)
            h = math.log(alpha_next / sigma_next) - log_snr
            estimate = clean
            if self._previous is not None and self._previous[0] == index - 1 and index + 1 < len(self._steps):
                _, clean_before, log_snr_before = self._previous
                half_inverse_ratio = 0.5 * h / (log_snr - log_snr_before)
                estimate = (1 + half_inverse_ratio) * clean - half_inverse_ratio * clean_before
            previous_sample = (sigma_next / sigma) * sample - alpha_next * math.expm1(-h) * estimate
        self._previous = (index, clean, log_snr)
        return previous_sample, clean


SAMPLERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
            "dpmpp_2m": "DPMSolverMultistepScheduler"}


def make_sampler(name: str, num_train_timesteps: int, schedule: str, beta_start: float, beta_end: float,
                 prediction_type: str) -> Scheduler:
    """A sampling scheduler on the noise schedule the UNet was trained with: MONAI's ``ddim``, ``ddpm`` or
    ``pndm``, or the bundle's ``dpmpp_2m`` (DPM-Solver++(2M)).

    None clips its x0 estimate (latents are not in [-1, 1]); PNDM skips the Runge-Kutta warm-up (PLMS),
    so that it can start part-way along the schedule for img2img and inpainting.
    """
    from monai.networks import schedulers

    if name not in SAMPLERS:
        raise BundleInputError(f"Sampler '{name}' is not known: choose --sampler from {sorted(SAMPLERS)}.")
    settings = dict(num_train_timesteps=num_train_timesteps, schedule=schedule, beta_start=beta_start,
                    beta_end=beta_end, prediction_type=prediction_type)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**settings)
    extra = {"ddim": {"clip_sample": False}, "ddpm": {"clip_sample": False}, "pndm": {"skip_prk_steps": True}}[name]
    return getattr(schedulers, SAMPLERS[name])(**settings, **extra)


def _step(scheduler: Scheduler, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
          generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """One reverse step; a stochastic sampler (DDPM) draws each sample's noise from that sample's generator,
    so an image does not depend on which batch it was generated in."""
    from monai.networks.schedulers import DDPMScheduler

    if generators is None or not isinstance(scheduler, DDPMScheduler):
        return scheduler.step(prediction, t, latents)[0]
    return torch.cat([scheduler.step(p[None], t, x[None], generator=g)[0]
                      for p, x, g in zip(prediction, latents, generators)])


@torch.no_grad()
def sample_latents(
    unet: nn.Module,
    scheduler: Scheduler,
    context: torch.Tensor,
    noise: torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    progress: bool = False,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` into latents conditioned on ``context`` with classifier-free guidance.

    ``dtype`` (e.g. ``torch.bfloat16``): the UNet runs under autocast to it, while the guidance arithmetic and the
    sampler's steps stay in float32 (:func:`bundle.performance.autocast_dtype` gives it from an ``amp`` setting).

    ``context`` may also be a list of contexts (each ``(B, K_i, D)``) with ``weights``: their guidance directions
    are summed, ``null + guidance_scale * sum_i w_i (prediction_i - null)`` (composable diffusion).

    ``guidance_scale`` 1 is plain conditional sampling; above 1 pushes away from the null-context prediction.
    With ``init`` latents and ``strength`` < 1 (img2img), sampling starts from ``init`` noised to the
    point that leaves the last ``strength`` of the schedule. With a ``mask`` (1 = regenerate, broadcastable
    to the latents), the latents outside it are replaced after every step by ``init`` noised to that step's
    level, and by ``init`` itself at the end, so only the inside is generated (inpainting).
    """
    if not 0.0 < strength <= 1.0:
        raise BundleInputError(f"strength {strength} is outside (0, 1]: choose the fraction of the schedule to run.")
    if (strength < 1.0 or mask is not None) and init is None:
        raise BundleInputError("img2img (strength < 1) and inpainting need the latents of a real image (init).")
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    timesteps = scheduler.timesteps
    batch = noise.shape[0]
    if strength < 1.0:
        timesteps = timesteps[min(int(round(len(timesteps) * (1.0 - strength))), len(timesteps) - 1):]
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))
    else:
        latents = noise
    composed = isinstance(context, (list, tuple))
    if composed and (weights is None or len(weights) != len(context) or not context):
        raise BundleInputError("Composed sampling needs one weight per context.")
    null = null_context(context[0][:, :1] if composed else context)
    guided = guidance_scale != 1.0

    network = unet if dtype is None else Autocast(unet, dtype)  # float32 outputs for guidance and the sampler

    steps = tqdm(timesteps, desc="sampling", leave=False, disable=None if progress else True, dynamic_ncols=True)
    for i, t in enumerate(steps):
        t_batch = torch.full((batch,), int(t), device=latents.device, dtype=torch.long)
        if composed:
            unconditional = network(latents, t_batch, context=null)
            directions = [w * (network(latents, t_batch, context=c) - unconditional) for w, c in zip(weights, context)]
            prediction = unconditional + guidance_scale * sum(directions)
        elif guided:
            both = network(torch.cat([latents, latents]), torch.cat([t_batch, t_batch]), context=torch.cat([context, null]))
            conditional, unconditional = both.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        else:
            prediction = network(latents, t_batch, context=context)
        latents = _step(scheduler, prediction, t, latents, generators)
        if mask is not None:
            if i + 1 < len(timesteps):
                known = scheduler.add_noise(init, noise, timesteps[i + 1 : i + 2].repeat(batch))
            else:
                known = init
            latents = mask * latents + (1 - mask) * known
    return latents


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """One Gaussian noise tensor per seed, drawn on the CPU so that a seed gives the same image on any device."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def export_diffusion(network: nn.Module, path: str | os.PathLike, record: dict[str, Any], ema: Any = None) -> None:
    """Write the weights used for sampling (the EMA copy when there is one) and their record, atomically.

    The record (bundle/models.py) names the network, noise schedule, DINO extractor (with its fingerprint) and
    autoencoder, so sampling rebuilds all of it and refuses anything the UNet was not trained with.
    """
    from .model_files import save_model

    weights = ema.ema_model if ema is not None else network
    save_model(weights.state_dict(), record, path, ema=ema is not None)


class SamplePreviewHandler:
    """Every ``interval`` epochs, sample one image per fixed context and log the grid to TensorBoard.

    The contexts are fixed (the first cached embeddings), as are the seeds, so successive grids show the
    model improving rather than new random draws. ``contexts`` may be a function returning them (tokens that are
    themselves being learned, as a concept's are).
    """

    def __init__(
        self,
        codec: nn.Module,
        scheduler: Scheduler,
        contexts: torch.Tensor | Callable[[], torch.Tensor],
        latent_shape: Sequence[int],
        summary_writer: Any,
        network: Callable[[], nn.Module] | nn.Module | None = None,
        interval: int = 5,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        tag: str = "samples",
    ) -> None:
        self.codec, self.scheduler, self.contexts = codec, scheduler, contexts
        self.latent_shape, self.writer, self.network = list(latent_shape), summary_writer, network
        self.interval, self.num_inference_steps, self.guidance_scale, self.tag = interval, num_inference_steps, guidance_scale, tag

    def attach(self, engine: Engine) -> None:
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        network = self.network if self.network is not None else engine.network
        was_training = network.training
        network.eval()
        device = engine.state.device
        contexts = (self.contexts() if callable(self.contexts) else self.contexts).to(device).float()
        noise = seeded_noise(range(len(contexts)), self.latent_shape, device)
        latents = sample_latents(network, self.scheduler, contexts, noise, self.num_inference_steps, self.guidance_scale)
        images = self.codec.decode(latents).clamp(0, 1).transpose(-1, -2).cpu()  # MONAI (x, y) -> display rows
        network.train(was_training)
        self.writer.add_images(self.tag, images, engine.state.epoch)
        self.writer.flush()
