"""The sampling loop's parts without a trained network: which timesteps run, what the network is given at each
one (guidance, composition, img2img start, inpainting's known region), per-sample noise, the schedulers, and the
training-side pieces (condition dropout, EMA export, preview grids)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from bundle.diffusion import (DPMSolverMultistepScheduler, LatentDiffusionPrepareBatch, SamplePreviewHandler,
                              export_diffusion, make_sampler, sample_latents, seeded_noise)
from bundle.errors import BundleInputError
from bundle.models import read_record

from .conftest import SCHEDULE


class Recorder(torch.nn.Module):
    """A stand-in denoiser: predicts ``0.1 * x + mean(context)`` and records every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, timesteps, context):
        self.calls.append((x.clone(), timesteps.clone(), context.clone()))
        return 0.1 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(1000, clip_sample=False)


def test_img2img_runs_only_the_last_part_of_the_schedule_from_the_noised_real_latents():
    init, noise = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    context = torch.ones(2, 1, 3)
    full = scheduler()
    full.set_timesteps(10)
    for strength, first in ((0.5, 5), (0.34, 7), (0.01, 9)):
        net = Recorder()
        sample_latents(net, scheduler(), context, noise, 10, 1.0, init=init, strength=strength)
        ran = [int(c[1][0]) for c in net.calls]
        assert ran == full.timesteps[first:].tolist(), strength
        start = full.add_noise(init, noise, full.timesteps[first:first + 1].repeat(2))
        torch.testing.assert_close(net.calls[0][0], start)
    net = Recorder()
    sample_latents(net, scheduler(), context, noise, 10, 1.0)
    assert [int(c[1][0]) for c in net.calls] == full.timesteps.tolist() and torch.equal(net.calls[0][0], noise)
    assert net.calls[3][1].tolist() == [int(full.timesteps[3])] * 2 and net.calls[3][1].dtype == torch.long
    net = Recorder()
    sample_latents(net, scheduler(), context, noise, 10, 1.0, init=init, strength=1.0)
    assert torch.equal(net.calls[0][0], noise), "strength 1 starts from pure noise, whatever init is"
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(BundleInputError) as err:
            sample_latents(Recorder(), scheduler(), context, noise, 10, init=init, strength=strength)
        assert str(err.value) == f"strength {strength} is outside (0, 1]: choose the fraction of the schedule to run."
    with pytest.raises(BundleInputError) as err:
        sample_latents(Recorder(), scheduler(), context, noise, 10, strength=0.5)
    assert str(err.value) == "img2img (strength < 1) and inpainting need the latents of a real image (init)."


def test_inpainting_gives_the_network_the_real_latents_outside_the_mask_at_each_steps_noise_level():
    init, noise = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    net = Recorder()
    out = sample_latents(net, scheduler(), torch.ones(1, 1, 3), noise, 4, 1.0, init=init, mask=mask)
    s = scheduler()
    s.set_timesteps(4)
    for i in range(1, 4):  # what step i sees outside the mask is init noised to step i's level
        known = s.add_noise(init, noise, s.timesteps[i:i + 1])
        assert torch.equal(net.calls[i][0][..., 2:, :], known[..., 2:, :]), i
        assert not torch.equal(net.calls[i][0][..., :2, :], known[..., :2, :])
    assert torch.equal(out[..., 2:, :], init[..., 2:, :]) and not torch.equal(out[..., :2, :], init[..., :2, :])
    guided = sample_latents(Recorder(), scheduler(), torch.ones(1, 1, 3), noise, 4, 2.0, init=init, mask=mask)
    assert torch.equal(guided[..., 2:, :], init[..., 2:, :]) and not torch.equal(guided, out)


def test_classifier_free_guidance_uses_the_zero_null_embedding():
    context, noise = torch.full((2, 1, 4), 0.5), torch.randn(2, 1, 4, 4)
    results = {}
    for scale in (1.0, 3.0):
        net = Recorder()
        results[scale] = sample_latents(net, scheduler(), context, noise, 3, scale)
        assert len(net.calls) == 3
        if scale == 1.0:
            assert all(torch.equal(c, context) for _, _, c in net.calls)
        else:  # conditional and unconditional halves in one batch; the unconditional one is all zeros
            assert all(torch.equal(c[:2], context) and not c[2:].any() for _, _, c in net.calls)
    # the unconditional prediction (0.1 x) plus 3 times the context's part is the prediction of a context 3 times larger
    torch.testing.assert_close(results[3.0], sample_latents(Recorder(), scheduler(), context * 3, noise, 3, 1.0))


def test_composed_guidance_sums_weighted_directions_and_one_weight_is_the_single_concept():
    noise = torch.randn(2, 1, 4, 4)
    a, b = torch.full((2, 2, 3), 1.0), torch.full((2, 5, 3), -2.0)  # concepts may differ in token count
    single = sample_latents(Recorder(), scheduler(), a, noise, 3, 2.5)
    torch.testing.assert_close(sample_latents(Recorder(), scheduler(), [a, b], noise, 3, 2.5, weights=[1.0, 0.0]), single)
    net = Recorder()
    mixed = sample_latents(net, scheduler(), [a, b], noise, 3, 2.0, weights=[0.5, 0.25])
    assert len(net.calls) == 9, "per step: the null context, then each concept"
    assert net.calls[0][2].shape == (2, 1, 3) and not net.calls[0][2].any()
    assert torch.equal(net.calls[1][2], a) and torch.equal(net.calls[2][2], b)
    # direction of a is +1, of b -2 per step: 2 * (0.5 * 1 + 0.25 * -2) = 0, the unconditional prediction alone
    torch.testing.assert_close(mixed, sample_latents(Recorder(), scheduler(), torch.zeros(2, 1, 3), noise, 3, 1.0))
    for weights in (None, [1.0], [1.0, 0.5, 0.5]):
        with pytest.raises(BundleInputError) as err:
            sample_latents(Recorder(), scheduler(), [a, b], noise, 3, weights=weights)
        assert str(err.value) == "Composed sampling needs one weight per context."
    with pytest.raises(BundleInputError, match="one weight per context"):
        sample_latents(Recorder(), scheduler(), [], noise, 3, weights=[])


def test_ddpm_noise_comes_from_each_samples_own_generator():
    noise = seeded_noise([1, 2], (1, 4, 4), "cpu")
    context = torch.zeros(2, 1, 3)

    def generators(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    pair = sample_latents(Recorder(), DDPMScheduler(1000, clip_sample=False), context, noise, 5, 1.0,
                          generators=generators([10, 20]))
    alone = sample_latents(Recorder(), DDPMScheduler(1000, clip_sample=False), context[1:], noise[1:], 5, 1.0,
                           generators=generators([20]))
    torch.testing.assert_close(pair[1:], alone)
    other = sample_latents(Recorder(), DDPMScheduler(1000, clip_sample=False), context[1:], noise[1:], 5, 1.0,
                           generators=generators([21]))
    assert not torch.allclose(other, alone)
    unseeded = sample_latents(Recorder(), DDPMScheduler(1000, clip_sample=False), context, noise, 5, 1.0)
    assert unseeded.shape == noise.shape and torch.isfinite(unseeded).all()
    # a deterministic sampler ignores the generators
    torch.testing.assert_close(sample_latents(Recorder(), scheduler(), context, noise, 5, 1.0, generators=generators([1, 2])),
                               sample_latents(Recorder(), scheduler(), context, noise, 5, 1.0))


def test_seeded_noise_depends_on_the_seed_alone():
    noise = seeded_noise([7, 3], (2, 4, 4), "cpu")
    assert noise.shape == (2, 2, 4, 4) and noise.device.type == "cpu"
    assert torch.equal(noise[0], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(seeded_noise([3], (2, 4, 4), "cpu")[0], noise[1])


def test_samplers_follow_the_training_schedule_and_do_not_clip():
    reference = DDPMScheduler(**SCHEDULE)
    for name, kind in (("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler"), ("pndm", "PNDMScheduler"),
                       ("dpmpp_2m", "DPMSolverMultistepScheduler")):
        sampler = make_sampler(name, prediction_type="v_prediction", **SCHEDULE)
        assert type(sampler).__name__ == kind and sampler.prediction_type == "v_prediction"
        torch.testing.assert_close(sampler.alphas_cumprod, reference.alphas_cumprod)
    assert make_sampler("ddim", prediction_type="epsilon", **SCHEDULE).clip_sample is False
    assert make_sampler("ddpm", prediction_type="epsilon", **SCHEDULE).clip_sample is False
    assert make_sampler("pndm", prediction_type="epsilon", **SCHEDULE).skip_prk_steps is True
    with pytest.raises(BundleInputError) as err:
        make_sampler("euler", prediction_type="epsilon", **SCHEDULE)
    assert str(err.value) == "Sampler 'euler' is not known: choose --sampler from ['ddim', 'ddpm', 'dpmpp_2m', 'pndm']."


def test_dpm_solver_steps_by_hand():
    dpm = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="sample")
    assert dpm.num_inference_steps == 1000 and len(dpm.timesteps) <= 1000
    dpm.set_timesteps(3)
    t = dpm.timesteps.tolist()
    assert len(t) == 3 and t[0] == 999
    x, clean = torch.full((4,), 2.0, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    abar = dpm.alphas_cumprod.double()
    a, s = abar[t[0]].sqrt(), (1 - abar[t[0]]).sqrt()
    a1, s1 = abar[t[1]].sqrt(), (1 - abar[t[1]]).sqrt()
    h = torch.log(a1 / s1) - torch.log(a / s)
    first, estimate = dpm.step(clean, t[0], x)
    assert torch.equal(estimate, clean), "a 'sample' network output is the clean estimate itself"
    torch.testing.assert_close(first, (s1 / s) * x - a1 * torch.expm1(-h) * clean)  # first order (DDIM)
    # the second step extrapolates from this step's and the previous step's clean estimates
    clean2 = torch.full((4,), 0.7, dtype=torch.float64)
    a2, s2 = abar[t[2]].sqrt(), (1 - abar[t[2]]).sqrt()
    h2 = torch.log(a2 / s2) - torch.log(a1 / s1)
    r = 0.5 * h2 / h
    second, _ = dpm.step(clean2, t[1], first)
    torch.testing.assert_close(second, (s2 / s1) * first - a2 * torch.expm1(-h2) * ((1 + r) * clean2 - r * clean))
    last, _ = dpm.step(clean2, t[2], second)  # the last step is first order, to t = 0's noise level
    a0, s0 = abar[0].sqrt(), (1 - abar[0]).sqrt()
    h0 = torch.log(a0 / s0) - torch.log(a2 / s2)
    torch.testing.assert_close(last, (s0 / s2) * second - a0 * torch.expm1(-h0) * clean2)

    eps = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="epsilon")
    eps.set_timesteps(3)
    _, estimate = eps.step(torch.ones(4, dtype=torch.float64), t[0], x)
    torch.testing.assert_close(estimate, (x - s) / a)
    v = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="v_prediction")
    v.set_timesteps(3)
    _, estimate = v.step(torch.ones(4, dtype=torch.float64), t[0], x)
    torch.testing.assert_close(estimate, a * x - s)
    single = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="sample")
    single.set_timesteps(1)
    assert single.timesteps.tolist() == [999]
    final, _ = single.step(clean, 999, x)
    torch.testing.assert_close(final, (s0 / s) * x - a0 * torch.expm1(-(torch.log(a0 / s0) - torch.log(a / s))) * clean)
    at_zero = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="sample")
    at_zero.set_timesteps(1000)
    assert at_zero.timesteps.tolist()[-1] == 0
    assert torch.equal(at_zero.step(clean, 0, x)[0], clean), "from t = 0 the step lands on the clean estimate"
    with pytest.raises(ValueError) as err:
        DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="score")
    assert str(err.value) == "prediction_type 'score' is not one of epsilon, v_prediction, sample."
    with pytest.raises(ValueError) as err:
        dpm.set_timesteps(1001)
    assert str(err.value) == ("num_inference_steps 1001 must be between 1 and 1000, the number of training "
                              "timesteps.")


def test_img2img_with_the_dpm_solver_starts_first_order():
    """A step that does not follow its predecessor (sampling started part-way) cannot extrapolate."""
    dpm = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="sample")
    dpm.set_timesteps(4)
    t = dpm.timesteps.tolist()
    x, c1, c2 = torch.full((3,), 1.0), torch.full((3,), 0.2), torch.full((3,), 0.9)
    dpm.step(c1, t[0], x)  # a previous chain ...
    resumed, _ = dpm.step(c2, t[2], x)  # ... then a jump: no extrapolation with c1
    fresh = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="sample")
    fresh.set_timesteps(4)
    torch.testing.assert_close(resumed, fresh.step(c2, t[2], x)[0])
    follows = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="sample")
    follows.set_timesteps(4)
    follows.step(c1, t[1], x)
    assert not torch.allclose(follows.step(c2, t[2], x)[0], resumed), "a following step does extrapolate"


def test_condition_dropout_takes_probabilities_only():
    batch = {"image": torch.randn(64, 2, 4, 4), "context": torch.randn(64, 1, 8) + 5}
    _, _, _, kwargs = LatentDiffusionPrepareBatch(DDPMScheduler(1000), condition_dropout=1.0)(batch)
    assert not kwargs["condition"].any() and kwargs["condition"].dtype == torch.float32
    half = {"image": batch["image"], "context": batch["context"].half()}
    assert LatentDiffusionPrepareBatch(DDPMScheduler(1000), condition_dropout=0.0)(half)[3]["condition"].dtype == \
        torch.float32
    for p in (-0.1, 1.01):
        with pytest.raises(ValueError) as err:
            LatentDiffusionPrepareBatch(DDPMScheduler(1000), condition_dropout=p)
        assert str(err.value) == f"condition_dropout {p} is outside [0, 1]: choose a probability."


def test_export_writes_the_ema_weights_when_there_are_some(tmp_path):
    net, averaged = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    class EMA:
        ema_model = averaged

    export_diffusion(net, tmp_path / "plain.pt", {"name": "unet"})
    export_diffusion(net, tmp_path / "ema.pt", {"name": "unet"}, ema=EMA())
    plain, ema = (read_record(tmp_path / f, "diffusion", "x") for f in ("plain.pt", "ema.pt"))
    assert plain["ema"] is False and ema["ema"] is True and ema["record"] == {"name": "unet"}
    assert torch.equal(plain["state_dict"]["weight"], net.weight) and torch.equal(ema["state_dict"]["weight"], averaged.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.json", "ema.pt", "plain.json", "plain.pt"]


def test_preview_grid_is_logged_every_interval_and_leaves_the_network_training():
    class Codec(torch.nn.Module):
        def decode(self, latents):
            return latents[:, :1].repeat_interleave(2, -1).repeat_interleave(2, -2) + 2.0  # beyond 1: clamped

    class Writer:
        def __init__(self):
            self.logged, self.flushed = [], 0

        def add_images(self, tag, images, step):
            self.logged.append((tag, images, step))

        def flush(self):
            self.flushed += 1

    net, writer = Recorder(), Writer()
    net.train()
    calls = []
    contexts = torch.randn(3, 1, 4)
    handler = SamplePreviewHandler(Codec(), scheduler(), lambda: calls.append(1) or contexts, (2, 4, 6), writer,
                                   network=net, interval=2, num_inference_steps=4, guidance_scale=1.0, tag="preview")
    engine = Engine(lambda e, b: None)
    engine.state.device = "cpu"
    handler.attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(net.training))
    engine.run([0], max_epochs=5)
    assert [step for _, _, step in writer.logged] == [2, 4] and writer.flushed == 2 and calls == [1, 1]
    tag, images, _ = writer.logged[0]
    assert tag == "preview" and images.shape == (3, 1, 12, 8) and float(images.max()) == 1.0
    assert len(net.calls) == 2 * 4 and net.calls[0][0].shape == (3, 2, 4, 6)
    assert torch.equal(net.calls[0][0], seeded_noise(range(3), (2, 4, 6), "cpu")), "fixed seeds: grids comparable"
    assert net.training and all(seen)
    quiet = Engine(lambda e, b: None)
    SamplePreviewHandler(Codec(), scheduler(), contexts, (2, 4, 6), writer, network=net, interval=0).attach(quiet)
    quiet.run([0], max_epochs=2)
    assert len(writer.logged) == 2


class ContextScaled(torch.nn.Module):
    """A denoiser whose prediction depends on the latents, the timestep and the context."""

    def forward(self, x, timesteps, context):
        return 0.2 * x + 1e-3 * timesteps.view(-1, 1, 1, 1) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_the_sampling_loop_is_the_schedulers_own_steps_with_guidance_written_out(sampler):
    noise, context, scale = torch.randn(2, 1, 4, 4), torch.randn(2, 3, 5) + 1.0, 2.5
    net = ContextScaled()
    torch.manual_seed(0)  # DDPM without per-sample generators draws from the global stream
    out = sample_latents(net, make_sampler(sampler, prediction_type="epsilon", **SCHEDULE), context, noise, 6, scale)
    torch.manual_seed(0)
    s = make_sampler(sampler, prediction_type="epsilon", **SCHEDULE)
    s.set_timesteps(6)
    x = noise
    for t in s.timesteps:
        t_batch = torch.full((2,), int(t), dtype=torch.long)
        conditional, unconditional = net(x, t_batch, context), net(x, t_batch, torch.zeros_like(context))
        x = s.step(unconditional + scale * (conditional - unconditional), t, x)[0]
    torch.testing.assert_close(out, x)


def test_defaults_of_the_training_and_sampling_parts():
    dpm = DPMSolverMultistepScheduler()
    assert dpm.num_train_timesteps == 1000 and dpm.prediction_type == "epsilon"
    torch.testing.assert_close(dpm.alphas_cumprod, DDPMScheduler(1000).alphas_cumprod)
    short = make_sampler("ddim", num_train_timesteps=500, schedule="linear_beta", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon")
    assert short.num_train_timesteps == 500 and len(short.alphas_cumprod) == 500
    assert LatentDiffusionPrepareBatch(DDPMScheduler(1000)).condition_dropout == 0.1
    handler = SamplePreviewHandler(None, scheduler(), torch.zeros(1, 1, 3), (1, 4, 4), None)
    assert (handler.interval, handler.num_inference_steps, handler.guidance_scale, handler.tag) == (5, 25, 3.0, "samples")


def test_a_dpm_chain_ending_at_timestep_one_steps_to_the_noise_level_of_zero():
    dpm = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="sample")
    dpm.set_timesteps(19)
    assert dpm.timesteps.tolist()[-1] == 1
    x, clean = torch.full((3,), 1.0, dtype=torch.float64), torch.full((3,), 0.25, dtype=torch.float64)
    last, _ = dpm.step(clean, 1, x)  # not following its predecessor: first order
    abar = dpm.alphas_cumprod.double()
    a1, s1, a0, s0 = abar[1].sqrt(), (1 - abar[1]).sqrt(), abar[0].sqrt(), (1 - abar[0]).sqrt()
    h = torch.log(a0 / s0) - torch.log(a1 / s1)
    torch.testing.assert_close(last, (s0 / s1) * x - a0 * torch.expm1(-h) * clean)
    assert not torch.equal(last, clean)


def test_preview_takes_fixed_contexts_or_the_engines_network_and_every_interval():
    class Codec:
        def decode(self, latents):
            return latents[:, :1] * 10  # far outside [0, 1] both ways: clamped

    class Writer:
        def __init__(self):
            self.logged = []

        def add_images(self, tag, images, step):
            self.logged.append((step, images))

        def flush(self):
            pass

    net, writer = Recorder(), Writer()
    engine = Engine(lambda e, b: None)
    engine.state.device = "cpu"
    engine.network = net
    SamplePreviewHandler(Codec(), scheduler(), torch.ones(2, 1, 3), (1, 4, 6), writer, interval=1,
                         num_inference_steps=2, guidance_scale=1.0).attach(engine)
    engine.run([0], max_epochs=3)
    assert [step for step, _ in writer.logged] == [1, 2, 3] and len(net.calls) == 6, "the engine's own network"
    images = writer.logged[0][1]
    assert images.shape == (2, 1, 6, 4) and float(images.min()) == 0.0 and float(images.max()) == 1.0
