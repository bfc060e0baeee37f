"""Building blocks of the landmark and segmentation heads: heatmaps, decoding, metrics, the head network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.errors import BundleInputError
from bundle.heads.landmarks import (HeatmapCrossEntropy, decode_heatmaps, gaussian_heatmaps, landmark_layout,
                                    landmark_metrics, load_landmarks, resize_points)
from bundle.heads.networks import DenseHead, build_head, load_head
from bundle.models import read_record
from bundle.heads.segmentation import dice_and_hausdorff

from .conftest import JSRT, require


def test_heatmap_decoding_returns_the_planted_peak():
    points = torch.tensor([[3.0, 17.0], [20.0, 5.0], [31.0, 0.0]])
    maps = gaussian_heatmaps(points, (32, 24), sigma=1.5)
    assert maps.shape == (3, 32, 24) and maps[0, 3, 17] == 1 and maps[1, 20, 5] == 1
    assert torch.equal(decode_heatmaps(maps), points)
    torch.testing.assert_close(decode_heatmaps(maps[None], "soft", temperature=0.01)[0], points, atol=0.05, rtol=0)
    # the default temperature is sharp enough to land within a tenth of a pixel of an interior peak
    torch.testing.assert_close(decode_heatmaps(maps[:2], "soft"), points[:2], atol=0.1, rtol=0)
    assert not gaussian_heatmaps(torch.tensor([[-5.0, 3.0]]), (8, 8), 1.0).any()  # outside: no target
    with pytest.raises(BundleInputError, match="decoding"):
        decode_heatmaps(maps, "mean")


def test_mre_and_sdr_match_hand_computed_values():
    true = np.array([[0.0, 0.0], [10.0, 10.0], [5.0, 5.0], [1.0, 1.0]])
    predicted = true + np.array([[3.0, 4.0], [0.0, 2.0], [6.0, 8.0], [0.0, 0.0]])  # errors 5, 2, 10, 0
    m = landmark_metrics(predicted, true, pixel_spacing=0.5)
    assert m["mre_px"] == pytest.approx(4.25) and m["mre_mm"] == pytest.approx(2.125)
    assert (m["sdr_2px"], m["sdr_2.5px"], m["sdr_4px"], m["sdr_6px"], m["sdr_9px"], m["sdr_10px"]) == (0.5, 0.5, 0.5, 0.75, 0.75, 1.0)
    with pytest.raises(BundleInputError, match="do not match"):
        landmark_metrics(predicted[:2], true)
    assert m["mre_px_std"] == pytest.approx(np.std([5, 2, 10, 0]))
    # a batch of images (B, L, 2), integer pixels of any width: errors along the last axis only
    batch = landmark_metrics(np.array([[[0, 0], [9, 9]], [[250, 3], [4, 4]]], dtype=np.uint8),
                             np.array([[[3, 4], [9, 9]], [[253, 7], [4, 4]]], dtype=np.uint8))
    assert batch["mre_px"] == pytest.approx(2.5) and batch["sdr_4px"] == 0.5
    with pytest.raises(BundleInputError, match=r"shapes \(1, 2, 3\) and \(1, 2, 3\) do not match"):
        landmark_metrics(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)))
    np.testing.assert_allclose(resize_points(np.array([[511.0, 0.0]]), (512, 512), (64, 64)), [[63.4375, -0.4375]])


def test_landmark_files_round_trip_through_the_layout_and_bad_files_are_named(tmp_path):
    import json

    from bundle.heads.landmarks import group_points

    path = tmp_path / "lm.json"
    path.write_text(json.dumps({"H": [[1, 2], [3, 4], [5, 6]], "RL": [[7.123, 8.456]], "LL": [[9, 9], [8, 8]]}))
    assert load_landmarks(path).tolist() == [[1, 2], [3, 4], [5, 6], [7.123, 8.456], [9, 9], [8, 8]]  # file order
    assert load_landmarks(path, ["H"]).dtype == np.float64  # whole-number files too
    assert load_landmarks(path, ["RL", "H"]).tolist() == [[7.123, 8.456], [1, 2], [3, 4], [5, 6]]
    layout = landmark_layout(path, ["RL", "H", "LL"])
    assert layout == [["RL", 1], ["H", 3], ["LL", 2]]
    assert group_points(load_landmarks(path, ["RL", "H", "LL"]), layout) == {
        "RL": [[7.12, 8.46]], "H": [[1, 2], [3, 4], [5, 6]], "LL": [[9, 9], [8, 8]]}
    with pytest.raises(BundleInputError) as err:
        load_landmarks(path, ["H", "XX"])
    assert str(err.value) == f"Landmark file '{path}' has no group(s) ['XX'] (it has ['H', 'LL', 'RL'])."
    for point, shown in (([float("nan"), 4], "[nan, 4]"), ([1, 2, 3], "[1, 2, 3]"), (["a", 2], "['a', 2]")):
        (tmp_path / "odd.json").write_text(json.dumps({"H": [[1, 2], point]}))  # json writes NaN as Python reads it
        with pytest.raises(BundleInputError) as err:
            load_landmarks(tmp_path / "odd.json")
        assert str(err.value) == (f"Landmark file '{tmp_path / 'odd.json'}': point 1 of group 'H' is {shown}, not two "
                                  "finite pixel coordinates [x, y]: correct it or leave the image out.")
    (tmp_path / "bad.json").write_text("{not json")
    for bad, kind in ((tmp_path / "bad.json", "JSONDecodeError"), (tmp_path / "none.json", "FileNotFoundError")):
        with pytest.raises(BundleInputError) as err:
            load_landmarks(bad)
        assert str(err.value) == (f"Landmark file '{bad}' could not be read ({kind}): give a JSON file of "
                                  '{"group": [[x, y], ...]} pixel coordinates.')


def test_frame_maps_points_and_maps_between_a_non_square_image_and_its_padded_square():
    from bundle.heads.frame import Frame

    frame = Frame((200, 100), 64)  # 200 x 100 -> 64 x 32, padded by 16 on each side of the short axis
    assert frame.scale == pytest.approx(0.32) and frame.pad.tolist() == [0, 16]
    corners = np.array([[-0.5, -0.5], [199.5, 99.5], [100.0, 50.0]])  # pixel edges and a centre
    np.testing.assert_allclose(frame.to_image(corners), [[-0.5, 15.5], [63.5, 47.5], [31.66, 31.66]])
    np.testing.assert_allclose(frame.to_original(frame.to_image(corners)), corners)
    maps = torch.zeros(1, 64, 64)
    maps[0, :, 16:48] = 1.0  # the image's own region; the padding stays 0
    back = frame.maps_to_original(maps)
    assert back.shape == (1, 200, 100) and torch.all(back == 1.0)  # padding cut before resizing
    maps[0, 10, 20] = 5.0
    peak = np.unravel_index(int(frame.maps_to_original(maps)[0].argmax()), (200, 100))
    assert np.allclose(peak, frame.to_original(np.array([[10, 20]]))[0], atol=2)
    # maps and points agree on where a pixel is: a map holding each square pixel's own coordinates, brought back
    # to the original, holds there each original pixel's square coordinates (inside, away from the edges)
    grid = torch.stack(torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij"))
    back = frame.maps_to_original(grid)
    inner = np.array([[x, y] for x in range(10, 190, 7) for y in range(10, 90, 7)])
    expected = frame.to_image(inner)
    np.testing.assert_allclose(back[:, inner[:, 0], inner[:, 1]].T.numpy(), expected, atol=1e-4)
    assert Frame((200, 100, 3), 64).pad.tolist() == [0, 16]  # a channel axis in the size is ignored
    assert Frame((200, 103), 64).pad.tolist() == [0, 15]  # 33 px wide: whole pixels, the odd one after the image


def test_heatmaps_stop_at_the_image_edge_and_the_loss_matches_a_hand_value():
    inside = gaussian_heatmaps(torch.tensor([[7.0, 0.0], [0.0, 7.0]]), (8, 8), 1.0)  # on the last row/column
    assert inside[0, 7, 0] == 1 and inside[1, 0, 7] == 1
    outside = gaussian_heatmaps(torch.tensor([[8.0, 3.0], [3.0, 8.0], [3.0, -0.1]]), (8, 8), 1.0)
    assert not outside.any()
    wide = gaussian_heatmaps(torch.tensor([[2.0, 2.0]]), (5, 6), 1.5)
    assert wide.shape == (1, 5, 6) and wide.dtype == torch.float32
    assert wide[0, 2, 4] == pytest.approx(np.exp(-4 / 4.5))  # exp(-d^2 / (2 sigma^2))
    assert wide[0, 4, 5] == pytest.approx(np.exp(-13 / 4.5))
    logits = torch.zeros(1, 1, 2, 2)  # uniform prediction over 4 pixels, target on one pixel
    target = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]]]])  # any scale: the target is normalised
    assert HeatmapCrossEntropy()(logits, target).item() == pytest.approx(np.log(4))
    # two images x two landmarks: each map is its own distribution, the loss their mean
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]],
                           [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]]).view(2, 2, 2, 2)
    target = torch.tensor([[[0.5, 0.0, 0.0, 0.0], [0.0, 0.1, 0.1, 0.0]],
                           [[0.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.4]]]).view(2, 2, 2, 2)
    log_p = torch.log_softmax(logits.flatten(2), -1)
    by_hand = [-log_p[0, 0, 0], -(log_p[0, 1, 1] + log_p[0, 1, 2]) / 2, -log_p[1, 0, 1], -log_p[1, 1, 3]]
    assert HeatmapCrossEntropy()(logits, target).item() == pytest.approx(float(sum(by_hand) / 4))


def test_dice_matches_a_hand_computed_case():
    pred = torch.zeros(1, 2, 8, 8)
    true = torch.zeros(1, 2, 8, 8)
    pred[0, 0, :4, :4] = 1  # 16 pixels
    true[0, 0, 2:6, :4] = 1  # 16 pixels, 8 shared -> Dice 0.5
    pred[0, 1, 1:3, 1:3] = true[0, 1, 1:3, 1:3] = 1
    result = dice_and_hausdorff(pred, true, ["a", "b"])
    assert result["a"]["dice"] == pytest.approx(0.5) and result["b"]["dice"] == pytest.approx(1.0)
    assert result["a"]["hd95_px"] == pytest.approx(2.0) and result["b"]["hd95_px"] == pytest.approx(0.0)


def test_mask_folders_drop_the_datalist_prefix_and_never_share_a_folder():
    from bundle.heads.segmentation import mask_folders

    assert mask_folders(["mask_left_lung", "heart", "lungs"]) == ["left_lung", "heart", "lungs"]
    with pytest.raises(BundleInputError, match="same folder"):
        mask_folders(["mask_heart", "heart"])


def test_jsrt_landmarks_load_and_the_head_outputs_one_map_per_landmark():
    from monai.networks.nets import DiffusionModelUNet

    points = load_landmarks(require(JSRT / "landmarks") / "JPCLN001.json", ["RL", "LL"])
    assert points.shape == (94, 2) and 0 <= points.min() and points.max() < 512
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                              num_res_blocks=1, norm_num_groups=8)
    head = DenseHead(unet, out_channels=5, initial_bias=-4.6)
    assert head(torch.rand(2, 1, 32, 32)).shape == (2, 5, 32, 32)
    assert torch.equal(head.unet.out[-1].bias, torch.full((5,), -4.6))
    with pytest.raises(BundleInputError, match="no group"):
        load_landmarks(JSRT / "landmarks" / "JPCLN001.json", ["XX"])
    assert landmark_layout(JSRT / "landmarks" / "JPCLN001.json", ["RL", "H"]) == [["RL", 44], ["H", 26]]
    with pytest.raises(BundleInputError, match="no group"):
        landmark_layout(JSRT / "landmarks" / "JPCLN001.json", ["RL", "XX"])


def test_written_landmarks_are_in_the_original_frame_close_to_the_truth(tmp_path):
    """A head whose heatmaps peak at the true points (on the 32-px square) must write points within the 32-px
    grid's rounding (16 px cells in the 512-px frame) of the JSRT truth."""
    import json

    from bundle.cli import jsrt_rows
    from bundle.data import modality_preprocessing
    from bundle.heads.frame import image_frame
    from bundle.heads.inference import infer

    from .conftest import ROOT

    rows = [r for r in jsrt_rows(require(JSRT), "test") if r["landmark_file"]][:3]
    size, names = 32, [["RL", 44], ["H", 26]]
    maps = []
    for row in rows:
        points = np.round(image_frame(row, size).to_image(load_landmarks(row["landmark_file"], ["RL", "H"]))).astype(int)
        heat = torch.zeros(len(points), size, size)
        heat[torch.arange(len(points)), points[:, 0].clip(0, size - 1), points[:, 1].clip(0, size - 1)] = 1.0
        maps.append(heat)

    class Oracle(torch.nn.Module):
        def forward(self, images):
            return torch.stack([maps.pop(0) for _ in range(len(images))])

    preprocessing = modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=size)
    metrics = infer(Oracle(), {"task": "landmarks", "names": names, "image_size": size}, rows, preprocessing, tmp_path)
    for row in rows:
        written = json.loads((tmp_path / "landmarks" / f"{row['id']}.json").read_text())
        truth = load_landmarks(row["landmark_file"], ["RL", "H"])
        error = np.linalg.norm(np.asarray(written["RL"] + written["H"]) - truth, axis=1)
        assert error.max() < 512 / size * 0.75 and error.mean() < 512 / size * 0.5, row["id"]
    assert metrics["images"] == 3 and metrics["mre_px"] < 8


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny denoiser pre-trained without labels on 6 real JSRT training images, and their datalist rows."""
    from .conftest import jsrt_datalist, run_bundle, write_datalist

    tmp_path = tmp_path_factory.mktemp("heads")
    datalist, rows = jsrt_datalist(tmp_path)
    rows = rows[:6]
    settings = {"dataset_dir": str(write_datalist(tmp_path / "images.csv", [rows[i]["image"] for i in range(6)])),
                "work_dir": str(tmp_path / "work"), "image_size": 32, "denoiser_channels": [8, 16],
                "denoiser_attention_levels": [False, True], "denoiser_head_channels": 8, "denoiser_epochs": 2,
                "denoiser_batch_size": 3}
    run_bundle("heads/pretrain.json", "training", settings)
    denoiser = tmp_path / "work" / "models" / "heads" / "denoiser.pt"
    assert denoiser.exists()
    return {"rows": rows, "settings": settings, "denoiser": denoiser, "datalist": datalist, "tmp": tmp_path}


def test_pretrain_then_fine_tune_heads_on_real_images_loss_falls(pretrained):
    from monai.losses import DiceCELoss

    from bundle.data import modality_preprocessing
    from bundle.heads.inference import predict
    from bundle.heads.training import fine_tune, landmark_items, mask_items

    from .conftest import workflow

    rows, settings, denoiser = pretrained["rows"], pretrained["settings"], pretrained["denoiser"]
    pre = modality_preprocessing("configs/modality/cxr.json", image_size=32)
    items = landmark_items(rows[:4], pre, 32, ["RL", "LL"], sigma=1.0)
    assert items[0]["label"].shape == (94, 32, 32) and items[0]["image"].shape == (1, 32, 32)
    # the landmark frame maps back to the 512-pixel JSRT frame exactly
    np.testing.assert_allclose(items[0]["frame"].to_original(items[0]["points"]),
                               load_landmarks(rows[0]["landmark_file"], ["RL", "LL"]), atol=1e-9)
    for kind, data, loss in (("landmarks", items, HeatmapCrossEntropy()),
                             ("segmentation", mask_items(rows[:4], pre, 32, ["mask_left_lung", "mask_heart"]),
                              DiceCELoss(sigmoid=True))):
        unet = workflow("heads/pretrain.json", "training", settings).parser.get_parsed_content("denoiser_def")()
        head = build_head(unet, data[0]["label"].shape[0], denoiser)
        # the pre-trained denoiser's weights are in the fresh head (all but the new output layer)
        saved = read_record(denoiser, "denoiser", "x")["state_dict"]
        fresh = head.unet.state_dict()
        shared = [k for k in saved if k in fresh and saved[k].shape == fresh[k].shape]
        assert len(shared) > 0.9 * len(saved) and all(torch.equal(fresh[k], saved[k]) for k in shared)
        losses = fine_tune(head, data, loss, iterations=40, batch_size=4, lr=1e-3)
        first, last = np.mean(losses[:5]), np.mean(losses[-5:])
        # heatmap cross-entropy starts at log(32 * 32) = 6.93 and cannot go below the targets' entropy
        assert len(losses) == 40 and (last < first - 0.3 if kind == "landmarks" else last < 0.8 * first), kind
        assert predict(head, torch.stack([it["image"] for it in data])).shape == (4, data[0]["label"].shape[0], 32, 32)
    with pytest.raises(Exception, match="does not exist"):
        build_head(unet, 2, pretrained["tmp"] / "missing.pt")


@pytest.mark.skipif(not __import__("bundle.performance").performance.cpu_has_bf16(), reason="no bf16 instructions")
def test_heads_fine_tune_in_bf16_where_the_cpu_has_it_and_keep_float32_weights(pretrained):
    # at 128 px a fine-tuning step took 3.8 s in bf16 against 8.3 s in float32: the heads follow the amp setting
    from bundle.data import modality_preprocessing
    from bundle.heads.training import fine_tune, landmark_items
    from bundle.performance import Autocast

    from .conftest import workflow

    pre = modality_preprocessing("configs/modality/cxr.json", image_size=32)
    items = landmark_items(pretrained["rows"][:2], pre, 32, ["H"], sigma=1.0)
    make = workflow("heads/pretrain.json", "training", pretrained["settings"]).parser.get_parsed_content("denoiser_def")
    for amp, dtype in (("bf16", torch.bfloat16), ("none", torch.float32)):
        head = build_head(make(), items[0]["label"].shape[0], pretrained["denoiser"])
        seen = []
        hook = head.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        losses = fine_tune(head, items, HeatmapCrossEntropy(), iterations=3, batch_size=2, lr=1e-3, amp=amp)
        hook.remove()
        assert seen == [dtype] * 3 and np.isfinite(losses).all(), amp
        assert {p.dtype for p in head.parameters()} == {torch.float32}
    # the configs' trainers run the head the same way
    settings = {**pretrained["settings"], "labelled_dir": str(pretrained["datalist"]), "num_labelled": 2}
    for config in ("heads/landmarks.json", "heads/segmentation.json"):
        for amp, wrapped in (("bf16", True), ("none", False)):
            trainer = workflow(config, "training", {**settings, "amp": amp}).parser.get_parsed_content("head_trainer")
            assert isinstance(trainer.network, Autocast) is wrapped, (config, amp)


def test_heads_build_the_denoiser_with_fused_attention_and_it_computes_what_the_plain_one_does(pretrained):
    # sdpa_attention is a runtime choice (10% of a 128-px fine-tuning step): same weights, same outputs
    from bundle.data import modality_preprocessing
    from bundle.heads.training import landmark_items
    from bundle.models import build_network

    from .conftest import workflow

    settings = {**pretrained["settings"], "labelled_dir": str(pretrained["datalist"]), "num_labelled": 2}
    record = read_record(pretrained["denoiser"], "denoiser", "x")
    plain = build_network(record["record"]["network"])
    plain.load_state_dict(record["state_dict"])
    items = landmark_items(pretrained["rows"][:3], modality_preprocessing("configs/modality/cxr.json", image_size=32),
                           32, ["H"], sigma=1.0)
    images = torch.stack([it["image"] for it in items]) * 2 - 1
    t = torch.full((3,), 300)
    for config, key in (("heads/landmarks.json", "denoiser_def"), ("heads/segmentation.json", "denoiser_def"),
                        ("heads/zero_shot.json", "zero_shot_unet")):
        for sdpa in (True, False):
            net = workflow(config, "training", {**settings, "sdpa_attention": sdpa}).parser.get_parsed_content(key)
            net = getattr(net, "unet", net)  # zero-shot: the loaded denoiser inside its ZeroShotUNet
            flags = {m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")}
            assert flags == {sdpa}, (config, sdpa)
            net.load_state_dict(record["state_dict"])
            with torch.no_grad():
                torch.testing.assert_close(net.eval()(images, t), plain.eval()(images, t), atol=1e-4, rtol=1e-4)
    # a runtime setting the network does not take is ignored, not an error
    assert isinstance(build_network(record["record"]["network"], no_such_setting=1), type(plain))


def test_a_killed_fine_tune_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(pretrained, tmp_path):
    # a 128-px fine-tune is most of an hour on a CPU: a run killed on the way goes on from its last checkpoint
    from bundle.data import modality_preprocessing
    from bundle.heads.training import fine_tune, landmark_items

    from .conftest import workflow

    pre = modality_preprocessing("configs/modality/cxr.json", image_size=32)
    items = landmark_items(pretrained["rows"][:3], pre, 32, ["H"], sigma=1.0)
    make = workflow("heads/pretrain.json", "training", pretrained["settings"]).parser.get_parsed_content("denoiser_def")

    def fresh():
        torch.manual_seed(0)
        return build_head(make(), items[0]["label"].shape[0], pretrained["denoiser"])

    class Killed(RuntimeError):
        pass

    class KilledAfter(torch.nn.Module):  # the process dies during the step after `steps` finished ones
        def __init__(self, steps):
            super().__init__()
            self.steps, self.loss = steps, HeatmapCrossEntropy()

        def forward(self, output, target):
            if self.steps == 0:
                raise Killed("killed")
            self.steps -= 1
            return self.loss(output, target)

    kwargs = dict(iterations=6, batch_size=2, lr=1e-3, seed=3, amp="none")
    unbroken_head = fresh()
    unbroken = fine_tune(unbroken_head, items, HeatmapCrossEntropy(), **kwargs)
    checkpoint = tmp_path / "run" / "head.pt"
    with pytest.raises(Killed):
        fine_tune(fresh(), items, KilledAfter(5), checkpoint=checkpoint, checkpoint_every=2, **kwargs)
    assert len(torch.load(checkpoint, weights_only=True)["losses"]) == 4  # the last checkpoint, whole
    assert not list(checkpoint.parent.glob("*.tmp"))
    resumed_head = fresh()
    resumed = fine_tune(resumed_head, items, KilledAfter(2), checkpoint=checkpoint, checkpoint_every=2, **kwargs)
    # the resumed run saw the batches the unbroken one saw after step 4, from the same weights and optimiser state
    np.testing.assert_allclose(resumed, unbroken, rtol=1e-5)
    for a, b in zip(resumed_head.state_dict().values(), unbroken_head.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a finished checkpoint gives the trained head back without a step; other settings are refused
    again = fresh()
    assert fine_tune(again, items, KilledAfter(0), checkpoint=checkpoint, **kwargs) == resumed
    torch.testing.assert_close(again.state_dict(), resumed_head.state_dict())
    with pytest.raises(BundleInputError, match="other settings or images: delete it"):
        fine_tune(fresh(), items, HeatmapCrossEntropy(), checkpoint=checkpoint, **{**kwargs, "lr": 1e-4})


def test_fine_tuning_follows_the_recipe_for_the_number_of_labelled_films_unless_told_otherwise(pretrained, tmp_path):
    from bundle.heads.training import recipe_setting

    from .conftest import run_bundle

    recipe = [{"up_to": 2, "lr": 0.01, "iterations": 3}, {"up_to": None, "lr": 0.0001, "iterations": 2}]
    assert recipe_setting(recipe, 2, "lr") == 0.01 and recipe_setting(recipe, 3, "lr") == 0.0001
    assert recipe_setting(recipe, 150, "iterations") == 2 and recipe_setting(recipe, 1, "lr", given=0.5) == 0.5
    with pytest.raises(BundleInputError, match="no entry for 20 labelled films"):
        recipe_setting(recipe[:1], 20, "lr")
    settings = {**pretrained["settings"], "labelled_dir": str(pretrained["datalist"]), "head_batch_size": 2,
                "structures": ["mask_left_lung"], "head_recipe": recipe}
    for n, lr, iterations, overrides in ((2, 0.01, 3, {}), (3, 0.0001, 2, {}), (3, 0.001, 4, {"head_lr": 0.001,
                                                                                               "head_iterations": 4})):
        head = tmp_path / f"head_{n}_{iterations}.pt"
        wf = run_bundle("heads/segmentation.json", "training", {**settings, "num_labelled": n, "head_path": str(head),
                                                               **overrides})
        record = read_record(head, "head", "x")["record"]
        assert (record["lr"], record["iterations"]) == (lr, iterations)
        assert wf.parser.get_parsed_content("head_trainer").state.iteration == iterations
        assert wf.parser.get_parsed_content("head_optimizer").param_groups[0]["lr"] == lr


def test_head_configs_fine_tune_then_write_landmarks_and_masks_for_a_folder(pretrained, tmp_path):
    import json

    from monai.transforms import LoadImage

    from .conftest import run_bundle, workflow

    settings = {**pretrained["settings"], "labelled_dir": str(pretrained["datalist"]), "num_labelled": 3,
                "head_iterations": 6, "head_batch_size": 2, "input_dir": str(pretrained["datalist"])}
    # landmarks: train from the pre-trained denoiser, then write one JSON per image in the 512-pixel frame
    marks = {**settings, "landmark_groups": ["RL", "H"], "output_dir": str(tmp_path / "marks")}
    run_bundle("heads/landmarks.json", "training", marks)
    head_file = pretrained["tmp"] / "work" / "models" / "heads" / "landmarks.pt"
    assert read_record(head_file, "head", "x")["record"]["names"] == [["RL", 44], ["H", 26]]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # the inference run ID applies torch_threads as the training ones do
        run_bundle("heads/landmarks.json", "inference",
                   {**marks, "input_dir": str(pretrained["datalist"]), "torch_threads": 1})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    written = sorted((tmp_path / "marks" / "landmarks").glob("*.json"))
    first = json.loads(written[0].read_text())
    assert len(written) >= 6 and list(first) == ["RL", "H"] and len(first["RL"]) == 44 and len(first["H"]) == 26
    assert all(-1 <= v <= 512 for p in first["RL"] for v in p)
    metrics = json.loads((tmp_path / "marks" / "metrics.json").read_text())
    assert sorted(p.name for p in (tmp_path / "marks").iterdir()) == ["landmarks", "metrics.json"]
    assert metrics["images"] == len(written) and metrics["mre_px"] > 0 and 0 <= metrics["sdr_10px"] <= 1
    # segmentation from scratch (the command line's null), masks written as NIfTI in the original frame
    seg = {**settings, "structures": ["mask_left_lung", "mask_heart"], "pretrained_path": "null",
           "mask_format": "nifti", "output_dir": str(tmp_path / "seg")}
    run_bundle("heads/segmentation.json", "training", seg)
    run_bundle("heads/segmentation.json", "inference", seg)
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["heart", "left_lung", "metrics.json"]
    mask = LoadImage(image_only=True)(sorted((tmp_path / "seg" / "heart").glob("*.nii.gz"))[0])
    assert mask.shape == (512, 512) and set(np.unique(np.asarray(mask))) <= {0.0, 1.0}
    seg_metrics = json.loads((tmp_path / "seg" / "metrics.json").read_text())
    assert 0 <= seg_metrics["mask_left_lung"]["dice"] <= 1
    assert read_record(pretrained["tmp"] / "work" / "models" / "heads" / "segmentation.pt", "head",
                       "x")["record"]["pretrained"] is None
    # a head used with the wrong config, no labelled data, or a different image size: one clear message each
    unet = workflow("heads/pretrain.json", "training", pretrained["settings"]).parser.get_parsed_content("denoiser_def")()
    with pytest.raises(BundleInputError, match="is a landmarks head"):
        load_head(unet, head_file, "segmentation", 32)
    with pytest.raises(BundleInputError, match="image_size 32"):
        load_head(unet, head_file, "landmarks", 64)
    with pytest.raises(Exception) as err:
        workflow("heads/landmarks.json", "training", {**marks, "labelled_dir": None}).parser.get_parsed_content("train_items")
    assert "pass --labelled_dir" in str(err.value.__cause__ or err.value)


def test_zero_shot_segmentation_writes_a_lung_mask_of_the_input_size(pretrained, tmp_path):
    import json

    from monai.transforms import LoadImage

    from .conftest import run_bundle

    rows = pretrained["datalist"]
    settings = {**pretrained["settings"], "input_dir": str(rows), "output_dir": str(tmp_path / "zs")}
    run_bundle("heads/zero_shot.json", "inference", settings)
    masks = sorted((tmp_path / "zs" / "lungs").glob("*.png"))
    assert len(masks) >= 6
    mask = np.asarray(LoadImage(image_only=True)(masks[0]))
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert metrics["images"] == len(masks) and 0 <= metrics["dice"] <= 1 and 0 <= metrics["oracle_dice_upper_bound"] <= 1
    assert metrics["mean_clusters"] >= 1 and metrics["settings"]["model"] == "denoiser"
    # the served default: the lung rule alone on single pixels, with Otsu's threshold x 1.05 (it won on JSRT train)
    assert (metrics["settings"]["method"], metrics["settings"]["lung_threshold"], metrics["settings"]["lung_scale"]) == (
        "intensity", "otsu", 1.05) and metrics["settings"]["model_path"].endswith("denoiser.pt")
    # DiffSeg-style attention clusters of the same UNet, through the same config
    run_bundle("heads/zero_shot.json", "inference", {**settings, "output_dir": str(tmp_path / "attention"),
                                                     "zero_shot_method": "attention"})
    attention = json.loads((tmp_path / "attention" / "metrics.json").read_text())
    assert attention["settings"]["method"] == "attention" and attention["settings"]["timestep"] == 50
    assert 1 <= attention["mean_clusters"] < metrics["mean_clusters"] and 0 <= attention["dice"] <= 1
    # the label-free alternative: k-means on the finest decoder features, through the same config
    run_bundle("heads/zero_shot.json", "inference", {**settings, "output_dir": str(tmp_path / "features"),
                                                     "zero_shot_method": "features", "feature_clusters": 4})
    features = json.loads((tmp_path / "features" / "metrics.json").read_text())
    assert features["settings"]["method"] == "features" and features["settings"]["clusters"] == 4
    assert 1 <= features["mean_clusters"] <= 4 and 0 <= features["dice"] <= 1
    assert len(list((tmp_path / "features" / "lungs").glob("*.png"))) == len(masks)
    with pytest.raises(Exception) as err:
        run_bundle("heads/zero_shot.json", "inference", {**settings, "zero_shot_method": "kmeans"})
    assert "zero_shot_method 'kmeans' is not known" in str(err.value.__cause__ or err.value)
    # the lung rule alone on single pixels (no UNet call), with Otsu's threshold: settings on record, a mask per film
    rule = {"zero_shot_method": "intensity", "lung_threshold": "otsu", "lung_scale": 1.05}
    run_bundle("heads/zero_shot.json", "inference", {**settings, **rule, "output_dir": str(tmp_path / "rule")})
    alone = json.loads((tmp_path / "rule" / "metrics.json").read_text())
    assert (alone["settings"]["method"], alone["settings"]["lung_threshold"], alone["settings"]["lung_scale"]) == (
        "intensity", "otsu", 1.05) and "timestep" not in alone["settings"]
    assert alone["mean_clusters"] == alone["settings"]["image_size"] ** 2 and alone["dice"] > 0.6
    assert len(list((tmp_path / "rule" / "lungs").glob("*.png"))) == len(masks)
    run_bundle("heads/zero_shot.json", "inference", {**settings, **rule, "lung_scale": 0.9,
                                                     "output_dir": str(tmp_path / "lower")})
    area = lambda folder: sum(float(np.asarray(LoadImage(image_only=True)(p)).mean())  # noqa: E731
                              for p in (tmp_path / folder / "lungs").glob("*.png"))
    assert area("lower") < area("rule")  # a lower threshold takes fewer pixels: the setting reaches the rule
    run_bundle("heads/zero_shot.json", "inference", {**settings, **rule, "lung_threshold": "mean", "lung_scale": 1.0,
                                                     "output_dir": str(tmp_path / "mean")})
    assert json.loads((tmp_path / "mean" / "metrics.json").read_text())["settings"]["lung_threshold"] == "mean"
    with pytest.raises(Exception) as err:
        run_bundle("heads/zero_shot.json", "inference", {**settings, "lung_threshold": "median"})
    assert "lung_threshold 'median' is not known" in str(err.value.__cause__ or err.value)


def test_zero_shot_reads_the_generators_latent_unet_through_the_same_config_and_records_its_settings(
        pretrained, trained_tiny, tmp_path):
    import csv
    import json

    from monai.transforms import LoadImage

    from .conftest import run_bundle

    rows = pretrained["rows"][:3]
    listing = tmp_path / "films.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    settings = {"work_dir": trained_tiny["work_dir"], "zero_shot_model": "generator", "input_dir": str(listing),
                "output_dir": str(tmp_path / "zs"), "zero_shot_method": "features", "feature_clusters": 3,
                "feature_block": -2, "attention_timestep": 50}
    run_bundle("heads/zero_shot.json", "inference", settings)
    masks = sorted((tmp_path / "zs" / "lungs").glob("*.png"))
    assert len(masks) == 3 and np.asarray(LoadImage(image_only=True)(masks[0])).shape == (512, 512)
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert metrics["settings"]["model"] == "generator" and metrics["settings"]["model_path"].endswith("models/model.pt")
    assert metrics["settings"]["feature_block"] == -2 and metrics["settings"]["timestep"] == 50
    assert metrics["scored_images"] == 3 and 0 <= metrics["dice"] <= 1 and 1 <= metrics["mean_clusters"] <= 3
    # attention of the same UNet (the tiny generator attends at its coarser latent level)
    run_bundle("heads/zero_shot.json", "inference", {**settings, "zero_shot_method": "attention",
                                                      "output_dir": str(tmp_path / "att")})
    assert json.loads((tmp_path / "att" / "metrics.json").read_text())["settings"]["merge"] == "relative"
    for bad, message in (({"zero_shot_model": "vae"}, "zero_shot_model 'vae' is not known"),
                         ({"feature_block": 5}, "feature_block 5 is not a decoder block"),
                         ({"work_dir": str(tmp_path / "empty")}, "train it")):
        with pytest.raises(Exception) as err:
            run_bundle("heads/zero_shot.json", "inference", {**settings, **bad})
        assert message in str(err.value.__cause__ or err.value)


def test_latent_head_maps_at_image_size_and_keeps_the_autoencoder_frozen():
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    from bundle.autoencoder import LatentCodec
    from bundle.heads.networks import LatentDenseHead

    codec = LatentCodec(AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                                      num_res_blocks=1, attention_levels=(False, False), norm_num_groups=8))
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=2, channels=(8, 16), attention_levels=(False, True),
                              num_res_blocks=1, norm_num_groups=8, num_head_channels=8, with_conditioning=True,
                              cross_attention_dim=12).requires_grad_(False)
    head = LatentDenseHead(codec, unet, out_channels=3, context_shape=(1, 12))
    out = head(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 3, 32, 32)
    out.mean().backward()
    assert all(p.grad is None for p in codec.parameters())
    assert head.unet.out[-1].weight.grad is not None and unet.conv_in.conv.weight.grad is not None


def test_heads_refuse_a_nan_landmark_a_non_finite_loss_and_more_labels_than_there_are(pretrained, tmp_path, monkeypatch):
    """A NaN in a landmark file trained a head of NaN weights, saved with exit 0; asking for more labelled images
    than the datalist has trained on fewer and recorded that as N."""
    import csv
    import json

    import bundle.heads.training

    from .conftest import run_bundle

    rows = [dict(r) for r in pretrained["rows"][:3]]
    marks = json.loads(Path(rows[1]["landmark_file"]).read_text())
    marks["RL"][5][0] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(marks))
    rows[1]["landmark_file"] = str(tmp_path / "nan.json")
    datalist = tmp_path / "labelled.csv"
    with open(datalist, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    work = tmp_path / "work"
    shutil.copytree(pretrained["tmp"] / "work" / "models" / "heads", work / "models" / "heads",
                    ignore=shutil.ignore_patterns("landmarks.pt", "segmentation.pt"))
    settings = {**pretrained["settings"], "work_dir": str(work), "labelled_dir": str(datalist), "head_iterations": 4,
                "head_batch_size": 2, "landmark_groups": ["RL", "H"]}
    head_file = work / "models" / "heads" / "landmarks.pt"

    def refused(overrides: dict) -> str:
        with pytest.raises(Exception) as err:
            run_bundle("heads/landmarks.json", "training", {**settings, **overrides})
        assert not head_file.exists(), "nothing saved"
        return str(err.value.__cause__ or err.value)

    assert refused({"num_labelled": 3}) == (f"Landmark file '{tmp_path / 'nan.json'}': point 5 of group 'RL' is "
                                            f"{marks['RL'][5]!r}, not two finite pixel coordinates [x, y]: correct it "
                                            "or leave the image out.")
    assert refused({"num_labelled": 4}) == (f"num_labelled is 4 but datalist '{datalist}' has 3 labelled rows: give "
                                            "at most 3, or 'all'.")
    # a loss that turns non-finite anyway (here: targets made NaN) stops training before the head is saved
    monkeypatch.setattr(bundle.heads.training, "gaussian_heatmaps", lambda points, size, sigma: torch.full(
        (len(points), *size), float("nan")))
    message = refused({"num_labelled": 1})
    assert message.startswith("landmarks: the loss is nan at iteration 1, epoch 1 (batch files: ") and rows[0]["image"] in message
    assert message.endswith("lower the learning rate, then run the same command again.")


def test_encoder_baselines_pre_train_load_fine_tune_save_and_reload(pretrained, tmp_path, tiny_dataset):
    """The initialisations the denoiser is compared with: the bundle's own DINO (pre-trained here by run ID
    train_dino on real films) and a supervised encoder from a local weights file, each with the light decoder."""
    import timm
    from safetensors.torch import load_file

    from bundle.data import modality_preprocessing
    from bundle.heads.encoders import build_encoder_head, dino_encoder_spec, encoder_record
    from bundle.heads.training import fine_tune, landmark_items
    from bundle.heads.networks import save_head

    from .conftest import run_bundle
    from .test_dino_pretrain import TINY

    run_bundle("train.json", "train_dino", {**TINY, "dataset_dir": str(tiny_dataset), "work_dir": str(tmp_path),
                                            "dino_epochs": 1})
    teacher = tmp_path / "models/dino/teacher.safetensors"
    spec = dino_encoder_spec(teacher)
    assert spec["model"] == "vit_tiny_patch16_224" and spec["kwargs"] == TINY["dino_kwargs"]
    rows = pretrained["rows"]
    items = landmark_items(rows[:4], modality_preprocessing("configs/modality/cxr.json", image_size=32), 32,
                           ["H"], sigma=1.0)
    head = build_encoder_head(spec, items[0]["label"].shape[0])
    saved = load_file(str(teacher))
    encoder = {k.split("model.", 1)[-1]: v for k, v in head.encoder.state_dict().items()}
    blocks = [k for k in saved if k.startswith("blocks.")]
    assert blocks and all(torch.equal(encoder[k], saved[k]) for k in blocks)  # the teacher's weights, not random ones
    scratch = build_encoder_head(spec, items[0]["label"].shape[0], pretrained=False)
    assert not torch.equal(dict(scratch.encoder.named_parameters())[next(n for n, _ in head.encoder.named_parameters()
                                                                         if "blocks.0" in n)],
                           dict(head.encoder.named_parameters())[next(n for n, _ in head.encoder.named_parameters()
                                                                      if "blocks.0" in n)])
    images = torch.stack([it["image"] for it in items])
    assert head(images).shape == (4, items[0]["label"].shape[0], 32, 32)  # full resolution from 4x4 patch tokens
    losses = fine_tune(head, items, HeatmapCrossEntropy(), iterations=30, batch_size=4, lr=1e-3)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    path = tmp_path / "landmarks.pt"
    save_head(head, path, "landmarks", [["H", items[0]["label"].shape[0]]], 32, encoder=encoder_record(spec))
    reloaded, record = load_head(None, path, "landmarks", 32)  # rebuilt from the record, no weights file needed
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), head.eval()(images))
    # a supervised encoder from a local file (ImageNet weights in real use; here a file made for the test)
    cnn = timm.create_model("resnet10t", pretrained=False)
    torch.save(cnn.state_dict(), tmp_path / "resnet10t.pth")
    supervised = build_encoder_head({"model": "resnet10t", "weights": str(tmp_path / "resnet10t.pth")}, 2)
    assert torch.equal(supervised.encoder.state_dict()["conv1.0.weight"], cnn.state_dict()["conv1.0.weight"])
    assert supervised(images).shape == (4, 2, 32, 32)
    with pytest.raises(BundleInputError, match="do not load into 'resnet18'"):
        build_encoder_head({"model": "resnet18", "weights": str(tmp_path / "resnet10t.pth")}, 2)
    with pytest.raises(BundleInputError, match="is not a file"):
        build_encoder_head({"model": "resnet10t", "weights": str(tmp_path / "imagenet.pth")}, 2)


def test_film_draws_differ_by_seed_and_keep_the_first_n_for_seed_0():
    from evidence.run_heads import draw

    assert draw(150, 5, 0, "random") == [0, 1, 2, 3, 4] == draw(150, 5, 2, "first")
    one, two = draw(150, 5, 1, "random"), draw(150, 5, 2, "random")
    assert len(set(one)) == 5 and one != two and one == draw(150, 5, 1, "random") and max(one + two) < 150
    assert draw(150, 150, 1, "random") == list(range(150)) and draw(3, 5, 1, "random") == [0, 1, 2]


def test_paired_intervals_call_a_clear_gain_a_win_and_noise_a_tie():
    from evidence.run_heads import paired_intervals

    rng = np.random.default_rng(0)
    records = []
    for seed in range(3):
        base = rng.uniform(10, 20, 30)
        for init, errors in (("pretrained", base - 5), ("scratch", base + rng.normal(0, 0.5, 30)), ("dino", base - 5.2)):
            records.append({"task": "landmarks", "size": 5, "init": init, "seed": seed,
                            "per_image_mre_px": errors.tolist()})
    found = {c["other"]: c for c in paired_intervals(records, "landmarks", boots=300)}
    assert found["scratch"]["reading"] == "win" and found["scratch"]["ci95"][1] < 0
    assert found["dino"]["reading"] in ("tie", "loss") and found["dino"]["seeds"] == 3


def test_tune_choice_takes_each_ranges_best_setting_per_initialisation_and_the_recipe_from_the_denoiser(tmp_path):
    import subprocess
    import sys

    from evidence.heads_tune import choose, read_runs, setting

    # validation MRE of a tune stage: lr 1e-3 wins at N = 5 and lr 3e-4 at N = 50 for the denoiser; scratch the reverse
    mre = {(0.001, 5, "pretrained"): 14.0, (0.0003, 5, "pretrained"): 16.0, (0.001, 50, "pretrained"): 9.0,
           (0.0003, 50, "pretrained"): 8.0, (0.001, 5, "scratch"): 20.0, (0.0003, 5, "scratch"): 18.0,
           (0.001, 50, "scratch"): 10.0, (0.0003, 50, "scratch"): 11.0}
    folders = []
    for lr in (0.001, 0.0003):
        folder = tmp_path / f"it400_lr{lr}"
        folder.mkdir()
        rows = [{"task": "landmarks", "size": n, "init": init, "seed": 0, "iterations": 400, "lr": lr, "mre_px": v}
                for (l, n, init), v in mre.items() if l == lr]
        rows.append({"task": "segmentation", "size": 5, "init": "pretrained", "seed": 0, "iterations": 400, "lr": lr,
                     "mre_px": 0.0})  # another task never decides the landmark recipe
        (folder / "heads_results.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
        folders.append(folder)
    choice = choose(read_runs(folders), small_max=10)
    assert choice["head_recipe"] == [{"up_to": 10, "lr": 0.001, "iterations": 400},
                                     {"up_to": None, "lr": 0.0003, "iterations": 400}]
    assert setting(choice, "scratch", 5, "lr") == 0.0003 and setting(choice, "scratch", 150, "lr") == 0.001
    assert setting(choice, "dino", 1, "lr") == 0.001 and setting(choice, "latent", 25, "lr") == 0.0003  # untuned: the recipe's

    out = tmp_path / "recipe.json"
    run = lambda *a: subprocess.run([sys.executable, "-m", "evidence.heads_tune", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, cwd=Path(__file__).resolve().parents[1])
    assert run(*folders, "--out", out).returncode == 0 and json.loads(out.read_text())["head_recipe"] == choice["head_recipe"]
    assert "| pretrained | large | 400 | 0.0003 |" in out.with_suffix(".md").read_text()
    got = run("--out", out, "--get", "scratch", 50, "lr")
    assert got.stdout.strip() == "0.001"
    # a baseline tuned alone: its own choice, and the configured recipe for the denoiser and every untuned one
    alone = choose([r for r in read_runs(folders) if r["init"] == "scratch"], small_max=10)
    configured = json.loads((Path(__file__).resolve().parents[1] / "configs/heads/landmarks.json").read_text())["head_recipe"]
    assert alone["head_recipe"] == configured and alone["recipe_from"] == "configs/heads/landmarks.json"
    assert setting(alone, "scratch", 5, "lr") == 0.0003 and setting(alone, "pretrained", 5, "lr") == configured[0]["lr"]
    missing = run(tmp_path / "nothing", "--out", tmp_path / "r.json")
    assert missing.returncode != 0 and "does not exist" in missing.stderr and not (tmp_path / "r.json").exists()


def test_grid_heads_predict_the_blind_films_in_their_frame_and_list_both_tasks_in_the_index(pretrained, tmp_path,
                                                                                          monkeypatch):
    # evidence/run_heads.py --blind_dir: the seed-0 heads at the sizes asked predict every blind film (named by id)
    import sys

    from PIL import Image

    from evidence import run_heads

    lines = pretrained["datalist"].read_text().splitlines()
    (tmp_path / "test.csv").write_text("\n".join(lines[:3]) + "\n")
    blind = tmp_path / "blind"
    blind.mkdir()
    sources = [Path(r["image"]) for r in pretrained["rows"][-2:]]
    for i, source in enumerate(sources):
        (blind / f"bj{i:04d}.png").symlink_to(source)
    out = tmp_path / "results" / "heads"
    monkeypatch.setattr(sys, "argv", [
        "evidence/run_heads.py", "--train", str(pretrained["datalist"]), "--test", str(tmp_path / "test.csv"),
        "--denoiser", str(pretrained["denoiser"]), "--sizes", "1", "2", "--iterations", "2", "--inits", "pretrained",
        "--blind_dir", str(blind), "--blind_sizes", "2", "--blind_out", str(out), "--work", str(tmp_path / "work"),
        "--out", str(tmp_path / "tables"), "--", "--image_size", "32"])
    run_heads.main()
    assert sorted(p.name for p in out.iterdir()) == ["pretrained_n2"], "only the sizes asked for the blind films"
    points = json.loads((out / "pretrained_n2" / "landmarks" / "bj0001.json").read_text())
    xy = np.concatenate([np.asarray(v, float) for v in points.values()])
    assert len(xy) == 166 and (xy >= 0).all() and (xy < 512).all(), "the JSRT landmarks, in the 512-px frame"
    mask = np.asarray(Image.open(out / "pretrained_n2" / "left_lung" / "bj0000.png"))
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
    entry = json.loads((tmp_path / "results" / "index.json").read_text())["heads/pretrained_n2"]
    assert set(entry) >= {"landmarks", "segmentation"}, "both tasks of one folder, merged"
    assert entry["landmarks"]["films"] == [Path(pretrained["rows"][i]["image"]).stem for i in range(2)]
    seg = (tmp_path / "tables" / "heads_table.md").read_text().split("| segmentation |")[1].splitlines()
    assert "HD95" in seg[0] and any(x.startswith("| pretrained | 2 |") for x in seg)


def test_the_heads_report_gives_each_segmentation_row_its_mean_hd95_over_every_structure():
    # evidence/run_heads.py table() on the 128-px rows on record: the mean of the five structures' HD95, not one's
    from evidence import run_heads

    record = Path(__file__).resolve().parents[1] / "docs" / "results" / "heads128" / "heads_results.jsonl"
    rows = [json.loads(x) for x in record.read_text().splitlines()]
    seg = [r for r in rows if r["task"] == "segmentation" and r["precision"] == "bf16"]
    lines = run_heads.table(seg, {}).split("| segmentation |")[1].splitlines()
    assert len(seg) >= 8
    for init, size in {(r["init"], r["size"]) for r in seg}:
        hd95 = [[v["hd95_px"] for v in r["per_structure"].values()] for r in seg if (r["init"], r["size"]) == (init, size)]
        assert all(len(set(h)) == len(h) == 5 for h in hd95), "five different values: a mean of one of them would show"
        line = next(x for x in lines if x.startswith(f"| {init} | {size} |"))
        assert line.endswith(f" | {np.mean([np.mean(h) for h in hd95]):.1f} |"), line


def test_grid_rows_resume_from_their_file_and_run_again_from_other_pre_trained_weights(pretrained, tmp_path, monkeypatch):
    # evidence/run_heads.py --results: a finished run is not repeated, whatever folder or file name its weights have
    # now; a denoiser trained again (other weights) runs its rows again, the untrained baseline keeps its row
    import shutil
    import sys

    from evidence import run_heads

    from .conftest import run_bundle

    lines = pretrained["datalist"].read_text().splitlines()
    (tmp_path / "test.csv").write_text("\n".join(lines[:3]) + "\n")
    rows_file = tmp_path / "record" / "rows.jsonl"

    def grid(denoiser, *more):
        monkeypatch.setattr(sys, "argv", [
            "evidence/run_heads.py", "--train", str(pretrained["datalist"]), "--test", str(tmp_path / "test.csv"),
            "--denoiser", str(denoiser), "--sizes", "1", "--iterations", "2", "--tasks", "landmarks",
            "--inits", "pretrained", "scratch", "--work", str(tmp_path / "work"), "--results", str(rows_file),
            "--out", str(tmp_path / "tables"), *more, "--", "--image_size", "32"])
        run_heads.main()
        return [json.loads(line) for line in rows_file.read_text().splitlines()]

    def reported():
        runs = json.loads((tmp_path / "tables" / "heads.json").read_text())["runs"]
        return [(r["init"], r["weights"]) for r in runs]

    first = grid(pretrained["denoiser"])
    assert [(r["init"], r["weights"] is None) for r in first] == [("pretrained", False), ("scratch", True)]
    assert not (tmp_path / "work" / "heads_results.jsonl").exists(), "the rows go to --results only"
    copy = tmp_path / "elsewhere" / "denoiser.pt"
    shutil.copytree(pretrained["denoiser"].parent, copy.parent)  # the weights with their record
    assert grid(copy) == first, "the same weights under another path: nothing runs again"

    run_bundle("heads/pretrain.json", "training", {**pretrained["settings"], "work_dir": str(tmp_path / "again"),
                                                   "denoiser_epochs": 1})
    again = grid(tmp_path / "again" / "models" / "heads" / "denoiser.pt")
    assert len(again) == 3 and again[2]["init"] == "pretrained" and again[2]["weights"] != first[0]["weights"]
    assert reported() == [("pretrained", again[2]["weights"]), ("scratch", None)]
    # back to the first denoiser: its row on record is used again, nothing is fine-tuned
    assert grid(pretrained["denoiser"]) == again and reported()[0] == ("pretrained", first[0]["weights"])
    # a report from the rows alone where no denoiser file is (another machine): each run's latest row
    assert grid(tmp_path / "gone" / "denoiser.pt", "--report_only") == again
    assert reported() == [("pretrained", again[2]["weights"]), ("scratch", None)]
    # other fine-tuning settings run again (both inits); the settings on record again reuse their rows
    longer = grid(tmp_path / "again" / "models" / "heads" / "denoiser.pt", "--iterations", "3")
    assert [(r["init"], r["iterations"]) for r in longer[3:]] == [("pretrained", 3), ("scratch", 3)]
    assert grid(tmp_path / "again" / "models" / "heads" / "denoiser.pt") == longer
    assert [r["iterations"] for r in json.loads((tmp_path / "tables" / "heads.json").read_text())["runs"]] == [2, 2]
    # before any pre-training: the untrained network of the config runs from scratch; the pre-trained init is refused
    monkeypatch.setattr(sys, "argv", [
        "evidence/run_heads.py", "--train", str(pretrained["datalist"]), "--test", str(tmp_path / "test.csv"),
        "--sizes", "2", "--iterations", "2", "--tasks", "landmarks", "--inits", "scratch", "--work", str(tmp_path / "w2"),
        "--out", str(tmp_path / "t2"), "--", *(str(v) for key in ("image_size", "denoiser_channels",
        "denoiser_attention_levels", "denoiser_head_channels") for v in (f"--{key}", pretrained["settings"][key]))])
    run_heads.main()
    rows = [json.loads(line) for line in (tmp_path / "w2" / "heads_results.jsonl").read_text().splitlines()]
    assert [(r["init"], r["size"], r["weights"], np.isfinite(r["mre_px"])) for r in rows] == [("scratch", 2, None, True)]
    network = json.loads((tmp_path / "t2" / "heads.json").read_text())["settings"]["denoiser_network"]
    assert network == read_record(pretrained["denoiser"], "denoiser", "")["record"]["network"]
    monkeypatch.setattr(sys, "argv", [*sys.argv[:sys.argv.index("scratch")], "pretrained", *sys.argv[sys.argv.index("scratch") + 1:]])
    with pytest.raises(SystemExit, match="--inits pretrained needs --denoiser"):
        run_heads.main()


def test_a_grid_run_stopped_on_the_way_goes_on_from_its_own_checkpoint_and_a_run_of_other_settings_starts_anew(
        pretrained, tmp_path, monkeypatch):
    # evidence/run_heads.py: each fine-tune checkpoints as it goes; a grid started again with the same weights and
    # settings resumes it, one with other settings (here the learning rate) starts its own run beside it
    import sys

    from evidence import run_heads

    lines = pretrained["datalist"].read_text().splitlines()
    (tmp_path / "test.csv").write_text("\n".join(lines[:3]) + "\n")
    predict, work = run_heads.predict, tmp_path / "work"

    def grid(lr, stop=False):
        def stopping(*args, **kwargs):  # the machine goes away after the fine-tune, before its row is written
            if stop:
                raise KeyboardInterrupt
            return predict(*args, **kwargs)

        monkeypatch.setattr(run_heads, "predict", stopping)
        monkeypatch.setattr(sys, "argv", [
            "evidence/run_heads.py", "--train", str(pretrained["datalist"]), "--test", str(tmp_path / "test.csv"),
            "--denoiser", str(pretrained["denoiser"]), "--sizes", "1", "--iterations", "30", "--lr", lr,
            "--tasks", "landmarks", "--inits", "pretrained", "--work", str(work), "--out", str(tmp_path / "tables"),
            "--", "--image_size", "32"])
        run_heads.main()
        return [json.loads(line) for line in (work / "heads_results.jsonl").read_text().splitlines()]

    with pytest.raises(KeyboardInterrupt):
        grid("0.001", stop=True)
    assert len(list((work / "checkpoints").glob("*.pt"))) == 1
    other = grid("0.0005")
    assert [(r["lr"], r["resumed_at_iteration"]) for r in other] == [(0.0005, 0)]
    again = grid("0.001")
    assert [(r["lr"], r["resumed_at_iteration"]) for r in again] == [(0.0005, 0), (0.001, 30)]
    assert not list((work / "checkpoints").glob("*.pt")), "a finished run's checkpoint is removed"
