"""DINO pre-training on real JSRT images with a tiny ViT: loss, EMA teacher, export into the main pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Events

from bundle.dino import DinoFeatures
from bundle.dino_pretrain import DinoLoss, cosine, local_crop_size, multi_crop, update_teacher
from bundle.errors import BundleInputError

from .conftest import run_bundle, workflow

TINY = {"dino_model": "vit_tiny_patch16_224", "dino_input_size": 32, "dino_kwargs": {"patch_size": 8, "depth": 2},
        "dino_batch_size": 4, "num_local_crops": 2, "dino_epochs": 3, "dino_warmup_epochs": 1,
        "dino_lr": 0.05}


def settings(tmp_path, dataset) -> dict:
    return {**TINY, "dataset_dir": str(dataset), "work_dir": str(tmp_path)}


def test_multi_crop_gives_two_global_and_local_crops():
    image = torch.rand(1, 64, 64)
    crops = multi_crop(48, 24, 3)({"image": image, "source": "x"})
    assert sorted(crops) == [f"crop_{i}" for i in range(5)]
    assert [tuple(crops[f"crop_{i}"].shape) for i in range(5)] == [(1, 48, 48)] * 2 + [(1, 24, 24)] * 3
    assert all(torch.isfinite(c).all() for c in crops.values())
    assert not torch.allclose(crops["crop_0"], crops["crop_1"])


def test_local_crops_are_a_whole_number_of_patches_for_every_profile():
    """The GPU profiles' ViT-S/14 cannot embed a crop that is not a multiple of 14 pixels (112 * 3 // 7 = 48 is not)."""
    from timm import create_model

    for size, model, kwargs, expected in ((64, "vit_tiny_patch16_224", {"patch_size": 8}, 32),
                                          (112, "vit_small_patch14_dinov2.lvd142m", {}, 42),
                                          (224, "vit_small_patch14_dinov2.lvd142m", {}, 98)):
        assert local_crop_size(size, model, kwargs) == expected
    vit = create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=112,
                       dynamic_img_size=True, depth=1)
    assert vit(torch.rand(1, 3, 42, 42)).shape == (1, 384)


def test_dino_steps_train_the_student_and_the_teacher_follows_the_ema_rule(tmp_path, tiny_dataset):
    wf = workflow("train.json", "train_dino", settings(tmp_path, tiny_dataset))
    trainer = wf.parser.get_parsed_content("dino_trainer")
    student, teacher = wf.parser.get_parsed_content("student_on_device"), wf.parser.get_parsed_content("teacher")
    losses, checks, before = [], [], {}
    initial = [p.detach().clone() for p in student.parameters()]

    @trainer.on(Events.ITERATION_STARTED)
    def snapshot(engine):
        before["teacher"] = [p.detach().clone() for p in teacher.parameters()]

    @trainer.on(Events.ITERATION_COMPLETED)
    def check(engine):
        out = engine.state.output
        losses.append(float(out["loss"]))
        m = float(out["teacher_momentum"])
        expected = [m * t + (1 - m) * s.detach() for t, s in zip(before["teacher"], student.parameters())]
        checks.append(max(float((e - t).abs().max()) for e, t in zip(expected, teacher.parameters())))

    wf.run()
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # the optimiser moved the student (a loss that merely varies with the random crops would not show this)
    assert max(float((p - q).abs().max()) for p, q in zip(student.parameters(), initial)) > 1e-3
    assert max(checks) < 1e-6
    differences = [float((t - s).abs().max()) for t, s in zip(teacher.backbone.parameters(), student.backbone.parameters())]
    assert max(differences) > 1e-4


def test_exported_teacher_loads_into_the_pipeline_extractor_with_the_same_tokens(tmp_path, tiny_dataset, jsrt_images):
    wf = run_bundle("train.json", "train_dino", {**settings(tmp_path, tiny_dataset), "dino_epochs": 1})
    teacher = wf.parser.get_parsed_content("teacher").cpu()
    path = tmp_path / "models/dino/teacher.safetensors"
    info = json.loads((tmp_path / "models/dino/teacher.safetensors.json").read_text())
    assert info["model_name"] == "vit_tiny_patch16_224" and info["img_size"] == 32

    dino = DinoFeatures("vit_tiny_patch16_224", weights=str(path), tokens="cls+patch", input_size=32,
                        model_kwargs=TINY["dino_kwargs"])
    images = wf.parser.get_parsed_content("dino_image_cache")["images"][:3].float()
    with torch.no_grad():
        x = (images.expand(-1, 3, -1, -1) - teacher.mean) / teacher.std
        expected = teacher.backbone.forward_features(x)
    torch.testing.assert_close(dino(images), expected)

    with pytest.raises(BundleInputError, match="was trained as vit_tiny_patch16_224"):
        DinoFeatures("vit_tiny_patch16_224", weights=str(path), input_size=32, model_kwargs={"patch_size": 8})


def test_ema_update_and_schedules():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    update_teacher(teacher, student, 0.9)
    for t, old, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s)
    assert cosine(0.996, 1.0, 0.0) == pytest.approx(0.996) and cosine(0.996, 1.0, 1.0) == pytest.approx(1.0)
    assert cosine(0.04, 0.4, 0.5) == pytest.approx(0.22)


def test_dino_loss_is_lowest_when_the_student_matches_the_teacher_and_the_centre_is_an_ema():
    torch.manual_seed(0)
    loss = DinoLoss(out_dim=16, center_momentum=0.9)
    teacher = torch.randn(2 * 4, 16)
    t0, t1 = teacher.chunk(2)
    # each global crop is compared with the other one: a student that predicts the other view's teacher
    # distribution exactly reaches the minimum, the teacher's entropy
    matched = loss(torch.cat([t1, t0]) * 0.1 / 0.04, teacher, num_crops=2, teacher_temp=0.04)
    probs = torch.softmax(teacher / 0.04, -1)
    entropy = -(probs * torch.log_softmax(teacher / 0.04, -1)).sum(-1).mean()
    torch.testing.assert_close(matched, entropy)
    random = DinoLoss(out_dim=16)(torch.randn(2 * 4, 16), teacher, num_crops=2, teacher_temp=0.04)
    assert float(matched) < float(random)
    torch.testing.assert_close(loss.center, 0.1 * teacher.mean(0, keepdim=True))


def test_sinkhorn_targets_spread_the_batch_over_prototypes_and_koleo_rewards_spread():
    from bundle.dino_pretrain import koleo, sinkhorn_knopp

    torch.manual_seed(0)
    # near-identical teacher outputs, as a random ViT gives for radiographs: softmax targets are all alike,
    # Sinkhorn-Knopp targets still sum to one per image and use every prototype equally over the batch
    logits = (torch.randn(1, 8) + 0.01 * torch.randn(16, 8)) / 0.04
    targets = sinkhorn_knopp(logits)
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    torch.testing.assert_close(targets.sum(0), torch.full((8,), 2.0), atol=0.05, rtol=0)
    softmax = torch.softmax(logits, -1)
    assert softmax.sum(0).max() > 4 * targets.sum(0).max()  # softmax piles the batch onto a few prototypes
    sk = DinoLoss(out_dim=8, centering="sinkhorn")
    assert torch.isfinite(sk(torch.randn(32, 8), torch.randn(16, 8), num_crops=4, teacher_temp=0.04))
    clustered, spread = torch.randn(1, 8) + 0.01 * torch.randn(16, 8), torch.randn(16, 8)
    assert float(koleo(clustered)) > float(koleo(spread))
    with pytest.raises(ValueError, match="centering"):
        DinoLoss(8, centering="batch")
