"""Zero-shot segmentation from self-attention: merging, cluster labels and the lung rule on planted cases."""

from __future__ import annotations

import pytest
import torch

from bundle.errors import BundleInputError
from bundle.zero_shot import (SelfAttentionRecorder, aggregate_attention, cluster_labels, decoder_features, kmeans_labels,
                              lung_clusters, merge_attention, merge_attention_diffseg, oracle_clusters, self_attention,
                              symmetric_kl, unet_internals)


def planted_attention(side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where every query attends uniformly to its own quadrant: four planted clusters."""
    quadrant = torch.zeros(side, side, dtype=torch.long)
    quadrant[side // 2 :, : side // 2], quadrant[: side // 2, side // 2 :], quadrant[side // 2 :, side // 2 :] = 1, 2, 3
    rows = []
    for q in quadrant.flatten():
        keys = (quadrant == q).float() + 1e-3
        rows.append((keys / keys.sum()).flatten())
    return torch.stack(rows)[None], quadrant


def test_symmetric_kl_is_zero_on_itself_and_matches_a_hand_computed_pair():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    d = symmetric_kl(p, p)
    assert torch.allclose(d.diagonal(), torch.zeros(2), atol=1e-6)
    hand = 0.5 * ((0.5 * torch.log(torch.tensor(0.5 / 0.9)) + 0.5 * torch.log(torch.tensor(0.5 / 0.1)))
                  + (0.9 * torch.log(torch.tensor(0.9 / 0.5)) + 0.1 * torch.log(torch.tensor(0.1 / 0.5))))
    assert d[0, 1] == pytest.approx(float(hand), rel=1e-5) and d[0, 1] == pytest.approx(float(d[1, 0]))


def test_merging_recovers_planted_clusters_at_the_finest_resolution():
    maps, quadrant = planted_attention(8)
    coarse, _ = planted_attention(4)  # a coarser layer with the same structure
    aggregated = aggregate_attention([maps, coarse])
    assert aggregated.shape == (1, 64, 8, 8)
    torch.testing.assert_close(aggregated.sum(dim=(-2, -1)), torch.ones(1, 64))
    proposals = merge_attention(aggregated[0], grid=8, threshold=0.5)
    assert proposals.shape[0] == 4
    labels = cluster_labels(proposals, (16, 16))
    assert labels.shape == (16, 16)
    # the same partition as the planted quadrants (cluster ids may be permuted)
    planted = quadrant.repeat_interleave(2, 0).repeat_interleave(2, 1)
    for k in labels.unique():
        assert planted[labels == k].unique().numel() == 1
    with pytest.raises(BundleInputError, match="square"):
        aggregate_attention([torch.rand(1, 12, 12)])


def test_diffseg_merge_as_published_gives_two_clusters_on_two_region_attention():
    """Two regions (left and right halves) whose pixels attend within their own half: DiffSeg's absolute-KL merge
    finds exactly two proposals, and every pixel of a half gets the same one."""
    side = 8
    region = (torch.arange(side)[None, :] >= side // 2).expand(side, side).flatten()  # 0 left, 1 right
    noise = torch.rand(side * side, side * side, generator=torch.Generator().manual_seed(0))
    rows = (region[:, None] == region[None, :]).float() + 0.05 * noise
    attention = (rows / rows.sum(1, keepdim=True)).reshape(side * side, side, side)
    proposals = merge_attention_diffseg(attention, grid=4, thresholds=(0.5, 0.5, 0.5))
    assert proposals.shape[0] == 2
    labels = cluster_labels(proposals, (side, side)).flatten()
    assert labels[region == 0].unique().numel() == 1 and labels[region == 1].unique().numel() == 1
    assert labels[region == 0][0] != labels[region == 1][0]
    # a threshold below every distance keeps each anchor's own map: one proposal per anchor, 16 here
    assert merge_attention_diffseg(attention, grid=4, thresholds=(1e-9,)).shape[0] == 16


def test_output_stems_stay_unique_when_names_clash():
    from bundle.data import output_stems

    rows = [{"image": "a/x.png"}, {"image": "b/x.png"}, {"image": "c/y.nii.gz"}]
    assert output_stems(rows) == ["00000_x", "00001_x", "y"]


def test_lung_rule_takes_dark_inner_clusters_and_the_oracle_uses_the_truth():
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[4:12, 3:7], labels[4:12, 9:13] = 1, 2  # two inner blocks
    labels[:, :1] = 3  # a dark strip along the border (air outside the body)
    image = torch.full((16, 16), 0.8)
    image[labels == 1], image[labels == 2], image[labels == 3] = 0.2, 0.9, 0.1
    lungs = lung_clusters(labels, image)
    assert torch.equal(lungs, labels == 1)  # dark and inside; the bright block and the dark border strip are not lung
    truth = (labels == 1) | (labels == 2)
    assert torch.equal(oracle_clusters(labels, truth), truth)
    from bundle.zero_shot import dice

    assert dice(labels == 1, truth) == pytest.approx(2 * 32 / (32 + 64)) and dice(truth & False, truth & False) == 1.0


def test_lung_rule_keeps_the_two_largest_regions_fills_their_holes_and_never_reads_a_mask():
    import inspect

    labels = torch.arange(20 * 20).reshape(20, 20)  # every pixel its own cluster: the plain intensity rule
    image = torch.full((20, 20), 0.9)
    image[4:16, 3:9], image[4:16, 11:17] = 0.1, 0.1  # two dark lungs
    image[8, 5] = 0.95  # a bright vessel inside the right lung
    image[17, 10] = 0.1  # a dark speck between them (not lung)
    lungs = lung_clusters(labels, image)
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[4:16, 3:9], expected[4:16, 11:17] = True, True
    assert torch.equal(lungs, expected)  # the speck dropped, the vessel's hole filled
    kept_all = lung_clusters(labels, image, components=None)
    assert kept_all[17, 10] and not kept_all[8, 5]
    assert "truth" not in inspect.signature(lung_clusters).parameters and "mask" not in str(
        inspect.signature(lung_clusters))  # the rule sees the labels and the image, nothing else


def test_otsu_threshold_inside_the_border_band_finds_lungs_that_a_dark_border_hides_from_the_mean():
    labels = torch.arange(32 * 32).reshape(32, 32)
    image = torch.full((32, 32), 0.8)  # soft tissue
    image[:4], image[-4:], image[:, :4], image[:, -4:] = 0.0, 0.0, 0.0, 0.0  # a wide black collimation border
    image[10:22, 7:13], image[10:22, 19:25] = 0.5, 0.5  # two lungs, darker than tissue but brighter than the border
    lungs = torch.zeros(32, 32, dtype=torch.bool)
    lungs[10:22, 7:13], lungs[10:22, 19:25] = True, True
    assert not lung_clusters(labels, image).any()  # the border drags the image's mean (0.42) below the lungs
    assert torch.equal(lung_clusters(labels, image, threshold="otsu"), lungs)  # Otsu of the inner pixels: 0.5 | 0.8
    assert not lung_clusters(labels, image, threshold="otsu", scale=0.7).any()  # scale moves the threshold
    with pytest.raises(BundleInputError, match="lung_threshold 'median' is not known"):
        lung_clusters(labels, image, threshold="median")
    for scale in (0, -1, "high", float("nan")):
        with pytest.raises(BundleInputError, match="lung_scale .* is not a positive number"):
            lung_clusters(labels, image, threshold="otsu", scale=scale)


def test_lung_rule_on_a_real_film_grows_with_its_scale_and_follows_the_lungs():
    from monai.transforms import LoadImage, Resize

    from bundle.zero_shot import dice

    from .conftest import JSRT, require

    load, resize = LoadImage(image_only=True, ensure_channel_first=True), Resize((128, 128))
    image = resize(load(require(JSRT / "images" / "JPCLN001.png")))[0].float()
    image = (image - image.min()) / (image.max() - image.min())
    truth = torch.zeros(128, 128, dtype=torch.bool)
    for side in ("left_lung", "right_lung"):
        truth |= resize(load(JSRT / "masks" / side / "JPCLN001.png"))[0] > 0.5 * load(JSRT / "masks" / side / "JPCLN001.png").max()
    labels = torch.arange(128 * 128).reshape(128, 128)
    sizes = [int(lung_clusters(labels, image, threshold="otsu", scale=s).sum()) for s in (0.9, 1.0, 1.05, 1.1)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert dice(lung_clusters(labels, image, threshold="otsu", scale=1.05), truth) > 0.8


def test_recorder_collects_every_self_attention_call_and_restores_the_network():
    from monai.networks.nets import DiffusionModelUNet

    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
                              num_res_blocks=1, norm_num_groups=8, num_head_channels=8)
    with SelfAttentionRecorder(unet) as recorder:
        unet(torch.rand(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    assert len(recorder.maps) >= 2 and all(m.shape == (2, 64, 64) for m in recorder.maps)
    torch.testing.assert_close(recorder.maps[0].sum(-1), torch.ones(2, 64))
    assert all(not b.save_attn for b in recorder.blocks)
    with pytest.raises(BundleInputError, match="no self-attention"):
        SelfAttentionRecorder(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()))


def test_recorder_sees_every_resolution_and_layers_can_be_chosen():
    """A UNet with self-attention at every level (as the 128-px profile has): maps at each grid, and
    aggregate_attention can keep only some grids."""
    from monai.networks.nets import DiffusionModelUNet

    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 8, 16),
                              attention_levels=(True, True, True), num_res_blocks=1, norm_num_groups=8, num_head_channels=8)
    maps = self_attention(unet, torch.rand(2, 1, 16, 16), 0)
    assert {m.shape[-1] for m in maps} == {256, 64, 16}  # 16x16, 8x8 and 4x4 token grids, encoder and decoder
    assert aggregate_attention(maps).shape == (2, 256, 16, 16)
    finest = aggregate_attention(maps, grids=[16])
    only = aggregate_attention([m for m in maps if m.shape[-1] == 256])
    torch.testing.assert_close(finest, only)
    assert not torch.allclose(finest, aggregate_attention(maps))
    with pytest.raises(BundleInputError, match="match no self-attention layer"):
        aggregate_attention(maps, grids=[32])


def test_feature_clustering_finds_planted_regions_and_reads_the_decoder():
    from monai.networks.nets import DiffusionModelUNet

    features = torch.randn(8, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.05
    regions = torch.zeros(16, 16, dtype=torch.long)
    regions[4:12, 3:8], regions[4:12, 9:14] = 1, 2
    features[0] += regions == 1
    features[1] += regions == 2
    labels = kmeans_labels(features, clusters=3, seed=0)
    assert labels.shape == (16, 16)
    for k in range(3):  # each planted region is exactly one cluster
        assert labels[regions == k].unique().numel() == 1
    assert labels.unique().numel() == 3 and torch.equal(labels, kmeans_labels(features, clusters=3, seed=0))
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16),
                              attention_levels=(False, True), num_res_blocks=1, norm_num_groups=8, num_head_channels=8)
    images = torch.rand(2, 1, 16, 16)
    features = decoder_features(unet, images, 0)
    assert features.shape == (2, 8, 16, 16)  # finest level, full size
    before = decoder_features(unet, images, 0, feature_block=-2)  # the block before the last: 16 channels
    assert before.shape == (2, 16, 16, 16) and decoder_features(unet, images, 0, feature_block=0).shape == before.shape
    with pytest.raises(BundleInputError, match="feature_block -3 is not a decoder block"):
        decoder_features(unet, images, 0, feature_block=-3)
    maps, both = unet_internals(unet, images, 0)  # one call gives what the two calls give
    torch.testing.assert_close(both, features)
    assert all(torch.equal(a, b) for a, b in zip(maps, self_attention(unet, images, 0)))
