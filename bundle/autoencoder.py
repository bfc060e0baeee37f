"""Stage 1: the AutoencoderKL, its adversarial training step and the latent scale factor that goes with it."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys
from torch import nn

from .distributed import average_gradients
from .errors import BundleInputError
from .performance import GradScalers, autocast, autocast_dtype, step


class LatentCodec(nn.Module):
    """An AutoencoderKL together with the scale factor that makes its latents unit-variance.

    The scale factor is fitted on the training images after stage 1 and saved in the same file as the
    weights, so every later stage (cache, diffusion training, sampling) encodes and decodes with the same one.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (the posterior mean: deterministic, so a cache is reproducible)."""
        z_mu, _ = self.autoencoder.encode(images)
        return z_mu * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents / self.scale_factor)

    @torch.no_grad()
    def fit_scale_factor(self, images: torch.Tensor, batch_size: int = 16) -> LatentCodec:
        """Set the scale factor to 1 / std of the unscaled latents of ``images`` (``(N, 1, H, W)``)."""
        device = self.scale_factor.device
        was_training = self.autoencoder.training
        self.autoencoder.eval()
        latents = [self.autoencoder.encode(images[i : i + batch_size].float().to(device))[0] for i in
                   range(0, len(images), batch_size)]
        self.autoencoder.train(was_training)
        std = torch.cat(latents).std()
        if not torch.isfinite(std) or std <= 0:
            raise BundleInputError(f"The autoencoder's latents have std {float(std)}: stage 1 diverged; retrain it.")
        self.scale_factor.fill_(1.0 / std)
        return self

    def save(self, path: str | os.PathLike, record: dict[str, Any]) -> None:
        """The autoencoder's weights (MONAI's ``AutoencoderKL`` state dict) and, beside them, the record of settings
        with the latent scale factor (bundle/models.py); :func:`bundle.models.load_codec` reads them back."""
        from .model_files import save_model

        save_model(self.autoencoder.state_dict(), record, path, scale_factor=float(self.scale_factor))


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of the posterior from N(0, I), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


class AutoencoderKLIteration:
    """One stage-1 step for MONAI's ``SupervisedTrainer(iteration_update=...)``.

    The trainer's ``network``/``optimizer``/``loss_function`` are the autoencoder, its optimiser and the
    reconstruction loss; this step adds the KL term, an optional perceptual term and, after
    ``adv_warmup_epochs``, a least-squares patch-GAN term with its own discriminator update.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        kl_weight: float = 1e-6,
        adv_weight: float = 0.01,
        adv_warmup_epochs: int = 5,
        perceptual_loss: Callable | None = None,
        perceptual_weight: float = 0.0,
        amp: str | None = None,
    ) -> None:
        self.discriminator, self.d_optimizer, self.amp = discriminator, d_optimizer, amp
        self.kl_weight, self.adv_weight, self.adv_warmup_epochs = kl_weight, adv_weight, adv_warmup_epochs
        self.perceptual_loss, self.perceptual_weight = perceptual_loss, perceptual_weight
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self._scalers = GradScalers()

    def __call__(self, engine, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        images = batchdata[CommonKeys.IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
        network, optimizer = engine.network, engine.optimizer
        adversarial = self.adv_weight > 0 and engine.state.epoch > self.adv_warmup_epochs
        dtype = autocast_dtype(self.amp, engine.state.device)
        network.train()

        optimizer.zero_grad(set_to_none=True)
        with autocast(engine.state.device, dtype):
            reconstruction, z_mu, z_sigma = network(images)
            recon = engine.loss_function(reconstruction.float(), images)
            kl = kl_loss(z_mu.float(), z_sigma.float())
            loss = recon + self.kl_weight * kl
            out = {"recon_loss": recon.item(), "kl_loss": kl.item()}
            if self.perceptual_loss is not None and self.perceptual_weight > 0:
                perceptual = self.perceptual_loss(reconstruction.float(), images)
                loss = loss + self.perceptual_weight * perceptual
                out["perceptual_loss"] = perceptual.item()
            if adversarial:
                logits_fake = self.discriminator(reconstruction.contiguous())[-1].float()
                g_adv = self.adv_loss(logits_fake, target_is_real=True, for_discriminator=False)
                loss = loss + self.adv_weight * g_adv
                out["g_adv_loss"] = g_adv.item()
        step(loss, optimizer, self._scalers.get_for("autoencoder", dtype, engine.state.device))

        if adversarial:
            self.discriminator.train()
            self.d_optimizer.zero_grad(set_to_none=True)
            with autocast(engine.state.device, dtype):
                logits_fake = self.discriminator(reconstruction.detach().contiguous())[-1].float()
                logits_real = self.discriminator(images.contiguous())[-1].float()
                d_loss = 0.5 * (self.adv_loss(logits_fake, target_is_real=False, for_discriminator=True)
                                + self.adv_loss(logits_real, target_is_real=True, for_discriminator=True))
            # averaged over the processes of a multi-GPU run by hand: DDP refuses the two forward passes before one backward
            step(self.adv_weight * d_loss, self.d_optimizer,
                 self._scalers.get_for("discriminator", dtype, engine.state.device),
                 before_step=lambda: average_gradients(self.discriminator))
            out["d_loss"] = d_loss.item()

        # float32 for the handlers: under bf16 autocast the decoder's output is bf16, which numpy (image writers) refuses
        out.update({CommonKeys.IMAGE: images, CommonKeys.PRED: reconstruction.detach().float(), CommonKeys.LOSS: loss.detach()})
        return out
