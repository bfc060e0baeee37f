"""Speed settings: mixed precision, channels-last, compile and fused attention, the GPU profile's code path
run on the CPU, and the DPM-Solver++ sampler against an exactly known denoiser."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bundle.autoencoder import AutoencoderKLIteration
from bundle.diffusion import make_sampler
from bundle.errors import BundleInputError
from bundle.performance import (Autocast, amp_dtype, amp_enabled, amp_kwargs, autocast_dtype, compiled, cpu_has_bf16,
                                grad_scaler, step, training_network)

from bundle.workflow import load_profile
from bundle.zero_shot import SelfAttentionRecorder

from .conftest import ROOT, SCHEDULE, tiny_settings, workflow


def test_amp_settings_name_their_dtype_and_stay_off_on_a_cpu(caplog, monkeypatch):
    import bundle.performance

    monkeypatch.setattr(bundle.performance, "_WARNED", set())  # the warning is said once per process
    assert amp_dtype("none") is None and amp_dtype("BF16") is torch.bfloat16 and amp_dtype("fp16") is torch.float16
    assert amp_kwargs("bf16") == {"dtype": torch.bfloat16} and amp_kwargs("none") == {}
    with pytest.raises(BundleInputError, match="--amp 'fp8' is not a precision: choose auto"):
        amp_dtype("fp8")
    with caplog.at_level(logging.WARNING):
        assert autocast_dtype("fp16", "cpu") is None
    assert "amp 'fp16' cannot run on cpu" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert autocast_dtype("fp16", "cpu") is None
    assert not caplog.records, "once per process is enough"
    assert amp_enabled("bf16", "cpu") is False, "MONAI's trainers autocast CUDA only: the bundle does it on a CPU"
    assert autocast_dtype("bf16", "cpu") is (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype("fp16", "cuda") is torch.float16 and amp_enabled("bf16", "cuda")
    network = torch.nn.Linear(4, 4)
    assert training_network(network, "none", "cpu") is network


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_bf16_is_said_only_of_a_cpu_with_bf16_instructions():
    # oneDNN calls every AVX-512 CPU bf16-capable and emulates it there, 1.9x slower than float32 for a 128-px UNet
    # step: the bundle must read the instructions themselves
    flags = set(re.findall(r"\S+", " ".join(re.findall(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M))))
    if not flags:
        pytest.skip("/proc/cpuinfo names no flags on this CPU")
    assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"}), sorted(f for f in flags if "512" in f or "amx" in f)


def test_amp_auto_is_bf16_where_the_device_has_bf16_arithmetic_and_float32_elsewhere(caplog, monkeypatch):
    import bundle.performance

    monkeypatch.setattr(bundle.performance, "_WARNED", set())
    assert amp_dtype("auto", "cpu") is (torch.bfloat16 if cpu_has_bf16() else None)
    assert amp_kwargs("auto", "cpu") == ({"dtype": torch.bfloat16} if cpu_has_bf16() else {})
    monkeypatch.setattr(bundle.performance, "cpu_has_bf16", lambda: True)
    with caplog.at_level(logging.INFO):
        assert autocast_dtype("AUTO", "cpu") is torch.bfloat16 and amp_enabled("auto", "cpu") is False
    assert "Precision (amp auto) on cpu: bf16." in caplog.text
    caplog.clear()
    monkeypatch.setattr(bundle.performance, "_WARNED", set())
    monkeypatch.setattr(bundle.performance, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.INFO):
        assert autocast_dtype("auto", "cpu") is None and amp_kwargs("auto", "cpu") == {}
        assert autocast_dtype("auto", "cpu") is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        "auto without bf16 instructions is float32 by design, not a setting ignored"
    said = [r.getMessage() for r in caplog.records if "amp auto" in r.getMessage()]
    assert said == ["Precision (amp auto) on cpu: float32, because this CPU has no bf16 instructions (where it has "
                    "them, bf16 runs about 1.5x faster; docs/results/performance.md)."], "said once, with the reason"
    network = torch.nn.Linear(4, 4)
    assert training_network(network, "auto", "cpu") is network
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert autocast_dtype("auto", "cuda") is (torch.bfloat16 if supported else None)
        assert amp_enabled("auto", "cuda") is supported


def test_autocast_wrapper_runs_bf16_inside_and_returns_float32():
    network = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    wrapped = Autocast(network, torch.bfloat16)
    seen = []
    network[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = wrapped(torch.randn(2, 8))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert getattr(wrapped, "0") is network[0], "attributes the wrapper lacks come from the network"
    assert list(wrapped.parameters()) == list(network.parameters())


def test_fp16_gradient_scaler_steps_and_skips_non_finite_gradients():
    assert grad_scaler(torch.bfloat16, "cpu") is None and grad_scaler(None, "cpu") is None
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = grad_scaler(torch.float16, "cpu")
    step((weight * 2).sum(), optimizer, scaler)
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.8))  # unscaled gradient 2, lr 0.1
    optimizer.zero_grad()
    step((weight * float("inf")).sum(), optimizer, scaler)
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.8)), "an overflowing step is skipped"


def profile_settings(profile, tmp_path, tiny_dataset, **extra) -> dict:
    """A profile's code path with its networks shrunk to run on the CPU in seconds: its speed settings and attention
    levels as they are, tiny widths and sizes; DINO is the tiny ViT of the other tests."""
    tiny = tiny_settings(tmp_path, tiny_dataset)
    keep = ("dataset_dir", "work_dir", "dino_model", "dino_weights", "dino_kwargs", "num_inference_steps")
    levels = len(load_profile(ROOT, profile)["autoencoder_channels"])  # the profile's latent downsampling
    return {**{k: tiny[k] for k in keep}, "profile": profile, "image_size": 32, "dino_input_size": 32,
            "autoencoder_channels": [8] * levels, "latent_channels": 4, "unet_channels": [8, 16, 16],
            "unet_head_channels": 8, "unet_res_blocks": 1, "ae_batch_size": 4, "diffusion_batch_size": 4,
            "dino_batch_size": 4, "compile": False, "preview_interval": 0, **extra}


def one_iteration(trainer) -> dict:
    trainer.state.max_epochs, trainer.state.epoch_length = 1, 1
    trainer.run()
    return trainer.state.output


# what each profile's code path must show besides training, at 32 px: (amp, channels-last, data workers, the grids
# of its self-attention maps: gpu256 has 4x4 latents and attention below the first level, cpu128 8x8 and everywhere)
PROFILE_PATHS = {"gpu256": ("bf16", True, 1, [2, 1]), "cpu128": ("auto", False, 0, [8, 4, 2])}


@pytest.mark.parametrize("profile", sorted(PROFILE_PATHS))
def test_profile_code_path_runs_a_step_of_every_stage_on_cpu(tmp_path, tiny_dataset, profile):
    amp, layout, workers, grids = PROFILE_PATHS[profile]
    settings = profile_settings(profile, tmp_path, tiny_dataset, adv_warmup_epochs=0,
                                **({"num_workers": workers} if workers else {}))
    wf = workflow("train.json", "cache", settings)
    get = wf.parser.get_parsed_content
    assert get("amp") == amp and get("amp_on") is False  # MONAI's trainer autocasts CUDA only
    unet, autoencoder = get("unet"), get("autoencoder")
    assert any(m.use_flash_attention for m in unet.modules() if hasattr(m, "use_flash_attention"))
    with SelfAttentionRecorder(unet) as recorder:
        unet(torch.randn(1, *get("latent_shape")), torch.tensor([300]), context=torch.zeros(1, 1, 192))
    assert sorted({round(m.shape[-1] ** 0.5) for m in recorder.maps}, reverse=True) == grids, "self-attention grids"
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == layout
    assert get("ae_loader").num_workers == workers and get("ae_loader").persistent_workers == bool(workers)

    before = {k: v.clone() for k, v in autoencoder.state_dict().items()}
    out = one_iteration(get("ae_trainer"))
    assert torch.isfinite(out["loss"]) and "d_loss" in out
    assert any(not torch.equal(before[k], v) for k, v in autoencoder.state_dict().items())

    get("ae_export")()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainer = get("diffusion_trainer")
    assert isinstance(trainer.network, Autocast) == cpu_has_bf16(), "on a bf16 CPU the bundle autocasts the UNet"
    out = one_iteration(trainer)
    assert torch.isfinite(out["loss"])
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())

    dino = workflow("train.json", "train_dino", {**settings, "dino_batch_size": 4})
    out = one_iteration(dino.parser.get_parsed_content("dino_trainer"))
    assert torch.isfinite(out["loss"])


def test_compiled_and_eager_training_steps_agree(tmp_path, tiny_dataset):
    """torch.compile (inductor, this machine's C++ compiler) against eager on the configured UNet: the same
    loss and the same updated weights from the same start and batch."""
    wf = workflow("train.json", "cache", profile_settings("gpu256", tmp_path, tiny_dataset))
    get = wf.parser.get_parsed_content
    unet = get("unet")
    twin = copy.deepcopy(unet)
    torch.manual_seed(0)
    x, t, context = torch.randn(4, 4, 4, 4), torch.randint(0, 1000, (4,)), torch.randn(4, 1, 192)
    target = torch.randn(4, 4, 4, 4)
    results = []
    for network, runner in ((unet, compiled(unet, True)), (twin, compiled(twin, False))):
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
        loss = torch.nn.functional.mse_loss(runner(x, t, context=context), target)
        loss.backward()
        optimizer.step()
        results.append((loss.item(), network.state_dict()))
    assert type(compiled(unet, True)).__name__ == "OptimizedModule" and compiled(unet, False) is unet
    (loss_c, state_c), (loss_e, state_e) = results
    assert loss_c == pytest.approx(loss_e, rel=1e-4)
    assert list(state_c) == list(state_e), "compiling keeps the weights' names"
    for key in state_e:
        torch.testing.assert_close(state_c[key], state_e[key], rtol=1e-3, atol=1e-4)


def test_autoencoder_step_under_bf16_autocast_trains(tmp_path):
    """The bundle's own stage-1 iteration under bf16 autocast, as a CPU with bf16 instructions runs it."""
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions: bf16 autocast is off on it")
    from monai.networks.nets import AutoencoderKL, PatchDiscriminator

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 8], latent_channels=2,
                                num_res_blocks=1, norm_num_groups=8, attention_levels=[False, False],
                                with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    discriminator = PatchDiscriminator(spatial_dims=2, num_layers_d=2, channels=8, in_channels=1, out_channels=1)
    d_optimizer = torch.optim.Adam(discriminator.parameters(), 1e-3)
    iteration = AutoencoderKLIteration(discriminator, d_optimizer, adv_warmup_epochs=0, amp="bf16")
    engine = SimpleNamespace(network=autoencoder, optimizer=torch.optim.Adam(autoencoder.parameters(), 1e-3),
                             loss_function=torch.nn.L1Loss(), non_blocking=False,
                             state=SimpleNamespace(device=torch.device("cpu"), epoch=1))
    images = torch.rand(2, 1, 16, 16)
    seen = []
    autoencoder.decoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    discriminator.register_forward_hook(lambda m, i, o: seen.append(o[-1].dtype))
    before = copy.deepcopy(autoencoder.state_dict())
    out = iteration(engine, {"image": images})
    assert seen[0] == torch.bfloat16 and set(seen) == {torch.bfloat16}, "every forward ran under bf16 autocast"
    assert iteration._scalers == {"autoencoder": None, "discriminator": None}, "bf16 needs no gradient scaler"
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32 and out["pred"].shape == images.shape
    assert any(not torch.equal(before[k], v) for k, v in autoencoder.state_dict().items())
    # the image handlers convert the reconstruction with numpy, which has no bf16
    assert out["pred"].dtype == torch.float32 and out["pred"].numpy().shape == (2, 1, 16, 16)


def gaussian_sample(sampler: str, steps: int, prediction_type: str, std: float = 0.5, mean: float = 0.3):
    """Sample N(mean, std^2) data with the exact denoiser of that Gaussian (known in closed form)."""
    scheduler = make_sampler(sampler, prediction_type=prediction_type, **SCHEDULE)
    scheduler.set_timesteps(steps)
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        alpha_bar = scheduler.alphas_cumprod[int(t)].double()
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        clean = mean + a * std**2 / (a**2 * std**2 + s**2) * (x - a * mean)
        eps = (x - a * clean) / s
        output = eps if prediction_type == "epsilon" else a * eps - s * clean
        x = scheduler.step(output.float(), t, x.float())[0].double()
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_reaches_the_converged_trajectory_in_ten_steps(prediction_type):
    reference = gaussian_sample("ddim", 1000, prediction_type)
    assert reference.std().item() == pytest.approx(0.5, abs=0.01) and reference.mean().item() == pytest.approx(0.3, abs=0.02)
    dpm = (gaussian_sample("dpmpp_2m", 10, prediction_type) - reference).abs().mean().item()
    ddim = (gaussian_sample("ddim", 10, prediction_type) - reference).abs().mean().item()
    assert dpm < 0.01 and ddim > 0.03, (dpm, ddim)


def test_dpm_solver_timesteps_and_bad_use():
    scheduler = make_sampler("dpmpp_2m", prediction_type="epsilon", **SCHEDULE)
    scheduler.set_timesteps(20)
    steps = scheduler.timesteps.tolist()
    assert len(steps) == 20 and steps[0] == 999 and steps == sorted(steps, reverse=True) and steps[-1] > 0
    with pytest.raises(ValueError, match="timestep 500 is not one of this scheduler's timesteps"):
        scheduler.step(torch.zeros(1), 500, torch.zeros(1))
    with pytest.raises(ValueError, match="num_inference_steps 0 must be between 1 and 1000"):
        scheduler.set_timesteps(0)


def test_augmentations_run_without_metadata_tracking_and_restore_it():
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import RandAffined

    from bundle.dino_pretrain import multi_crop
    from bundle.transforms import WithoutMeta

    image = MetaTensor(torch.rand(1, 32, 32))
    crops = WithoutMeta(multi_crop(32, 16, 2))({"image": image, "source": "x.png"})
    assert sorted(crops) == ["crop_0", "crop_1", "crop_2", "crop_3"]
    assert all(type(c) is torch.Tensor for c in crops.values()) and crops["crop_3"].shape == (1, 16, 16)
    assert get_track_meta() is True, "tracking is back on for whatever runs next"
    affine = RandAffined(keys="image", prob=1.0, rotate_range=0.5)
    assert isinstance(affine({"image": image})["image"], MetaTensor)
    assert type(WithoutMeta(affine)({"image": image})["image"]) is torch.Tensor

    def failing(_):
        raise RuntimeError("bad crop")

    with pytest.raises(RuntimeError, match="bad crop"):
        WithoutMeta(failing)({})
    assert get_track_meta() is True
