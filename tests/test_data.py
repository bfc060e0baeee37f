"""Loading real radiographs of every supported format, and refusing bad input with one clear message."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle.data import (apply_to_file, build_datalist, default_data, find_images, image_items, modality_preprocessing,
                         preprocessed_images, read_datalist)
from bundle.errors import BundleInputError

from .conftest import ROOT, write_datalist

SIZE = 64


@pytest.fixture
def preprocessing():
    return modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=SIZE)


def load(preprocessing, path) -> torch.Tensor:
    return apply_to_file(preprocessing, {"image": str(path)})["image"]


def check_image(image: torch.Tensor) -> None:
    assert tuple(image.shape) == (1, SIZE, SIZE)
    assert image.dtype == torch.float32
    assert 0.0 <= float(image.min()) < 0.1 and 0.9 < float(image.max()) <= 1.0


def test_png_jpeg_nifti_and_rgb_load_to_the_same_grey_image(tmp_path, jsrt_images, preprocessing):
    source = jsrt_images[0]
    grey = np.array(Image.open(source))
    Image.fromarray(grey).save(tmp_path / "a.jpg", quality=98)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    # MONAI reads PNG in (x, y) order; a NIfTI written in that order must read back identically
    nib.save(nib.Nifti1Image(grey.T.astype(np.float32), np.eye(4)), tmp_path / "a.nii.gz")

    reference = load(preprocessing, source)
    check_image(reference)
    for other, tolerance in (("rgb.png", 1e-2), ("a.nii.gz", 1e-5), ("a.jpg", 0.03)):
        image = load(preprocessing, tmp_path / other)
        check_image(image)
        assert float((image - reference).abs().mean()) < tolerance, other


def test_dicom_monochrome1_is_inverted_so_bone_is_bright(cxr_samples, preprocessing):
    mono2 = load(preprocessing, cxr_samples / "nih_cxr_monochrome2.dcm")
    mono1 = load(preprocessing, cxr_samples / "nih_cxr_monochrome1.dcm")
    check_image(mono2)
    check_image(mono1)
    # same stored pixels, opposite photometric interpretation: one must be the negative of the other
    assert float((mono1 - (1 - mono2)).abs().max()) < 1e-3
    assert float((mono1 - mono2).abs().mean()) > 0.2


def test_folder_search_is_recursive_and_skips_other_files(tmp_path, jsrt_images):
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(jsrt_images[0], tmp_path / "a" / "x.png")
    shutil.copy(jsrt_images[1], tmp_path / "a" / "b" / "y.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    rows = find_images(tmp_path)
    assert sorted(r["image"].split("/")[-1] for r in rows) == ["x.png", "y.PNG"]


def test_datalist_carries_columns_and_resolves_relative_paths(tmp_path, jsrt_images):
    shutil.copy(jsrt_images[0], tmp_path / "img.png")
    (tmp_path / "list.csv").write_text("image,sex,nodule\nimg.png,F,1\n")
    (tmp_path / "list.json").write_text('{"training": [{"image": "img.png", "sex": "M"}]}')
    csv_rows = read_datalist(tmp_path / "list.csv")
    assert csv_rows == [{"image": str(tmp_path / "img.png"), "sex": "F", "nodule": "1"}]
    assert build_datalist(tmp_path / "list.json", tmp_path)[0] == {"image": str(tmp_path / "img.png"), "sex": "M"}


def test_image_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, jsrt_images, preprocessing, monkeypatch):
    images = [tmp_path / f"{i}.png" for i in range(3)]
    for src, dst in zip(jsrt_images, images):
        shutil.copy(src, dst)
    datalist = read_datalist(write_datalist(tmp_path / "list.csv", images))
    first = preprocessed_images(datalist, preprocessing, tmp_path / "images.pt")
    assert first["images"].shape == (3, 1, SIZE, SIZE) and first["images"].dtype == torch.float16
    expected = torch.stack([torch.as_tensor(apply_to_file(preprocessing, r)["image"]) for r in datalist]).half()
    assert torch.equal(first["images"], expected), "the cache holds each image's preprocessed pixels, in order"
    pixel_files = list(tmp_path.glob("images.*.f16"))
    assert len(pixel_files) == 1 and pixel_files[0].stat().st_size == 3 * SIZE * SIZE * 2

    import bundle.data

    calls = []
    real = bundle.data.write_pixels
    monkeypatch.setattr(bundle.data, "write_pixels", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = preprocessed_images(datalist, preprocessing, tmp_path / "images.pt")
    assert calls == [] and torch.equal(again["images"], first["images"])

    shutil.copy(jsrt_images[5], images[1])  # same name, new content
    changed = preprocessed_images(datalist, preprocessing, tmp_path / "images.pt")
    assert calls == [1] and not torch.equal(changed["images"][1], first["images"][1])
    assert torch.equal(changed["images"][0], first["images"][0])
    assert len(list(tmp_path.glob("images.*.f16"))) == 1, "the pixel file of the old build is removed"

    resized = modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=32)
    assert preprocessed_images(datalist, resized, tmp_path / "images.pt")["images"].shape[-1] == 32
    assert calls == [1, 1]

    # a cache whose pixel file is cut short (a full disk, a kill while copying) is rebuilt, not read past its end
    pixel_file = next(tmp_path.glob("images.*.f16"))
    pixel_file.write_bytes(pixel_file.read_bytes()[:100])
    assert preprocessed_images(datalist, resized, tmp_path / "images.pt")["images"].shape == (3, 1, 32, 32)
    assert calls == [1, 1, 1] and pixel_file.stat().st_size == 3 * 32 * 32 * 2


def test_dataset_items_convert_one_image_at_a_time(tmp_path, jsrt_images, preprocessing):
    datalist = read_datalist(write_datalist(tmp_path / "list.csv", jsrt_images[:4]))
    cache = preprocessed_images(datalist, preprocessing, tmp_path / "images.pt")
    items = image_items(cache)
    assert len(items) == 4 and items[2]["image"].dtype == torch.float32
    assert torch.equal(items[2]["image"], cache["images"][2].float()) and items[2]["source"] == datalist[2]["image"]
    assert [it["source"] for it in items[1:3]] == [r["image"] for r in datalist[1:3]]


# ---- bad input ------------------------------------------------------------------------------------------


def test_corrupt_image_names_the_file(tmp_path, preprocessing):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(BundleInputError, match="broken.png.*could not be read.*replace the file"):
        load(preprocessing, bad)


def test_3d_volume_is_refused(preprocessing):
    ct = ROOT.parent / "shared/data/ct/head_ct.nii.gz"
    if not ct.exists():
        pytest.skip(f"needs {ct} (the ../shared/data folder beside the repository), absent here")
    with pytest.raises(BundleInputError, match="head_ct.nii.gz' is a 3D volume.*extract 2D slices"):
        load(preprocessing, ct)


def test_constant_image_is_refused(tmp_path, preprocessing):
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(BundleInputError, match="flat.png' is a constant image"):
        load(preprocessing, tmp_path / "flat.png")


def test_image_with_nan_pixels_is_refused(tmp_path, jsrt_images, preprocessing):
    """A NaN block would train stage 1 on loss=nan: it is stopped at load time, naming the file."""
    array = np.asarray(Image.open(jsrt_images[0]), dtype=np.float32)
    array[100:140, 100:140] = np.nan
    nib.save(nib.Nifti1Image(array.T.copy(), np.eye(4)), str(tmp_path / "holes.nii.gz"))
    with pytest.raises(BundleInputError, match="holes.nii.gz' has NaN or infinite pixel values"):
        load(preprocessing, tmp_path / "holes.nii.gz")


def test_malformed_json_datalist_is_named(tmp_path):
    (tmp_path / "list.json").write_text('[{"image": "a.png"},')
    with pytest.raises(BundleInputError, match=r"Datalist '.*list.json' is not valid JSON \(Expecting"):
        build_datalist(tmp_path / "list.json", tmp_path)


def test_empty_folder_missing_paths_and_bad_datalists(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleInputError, match="No images were found in .*empty"):
        build_datalist(tmp_path / "empty", tmp_path)
    with pytest.raises(BundleInputError, match="does not exist"):
        build_datalist(tmp_path / "nowhere", tmp_path)
    (tmp_path / "list.csv").write_text("path,label\na.png,1\n")
    with pytest.raises(BundleInputError, match="has no 'image' column"):
        read_datalist(tmp_path / "list.csv")
    (tmp_path / "gone.csv").write_text("image\nmissing.png\n")
    with pytest.raises(BundleInputError, match="missing.png' does not exist"):
        apply_to_file(lambda d: d, read_datalist(tmp_path / "gone.csv")[0])


def test_unknown_modality_lists_the_available_ones(tmp_path):
    with pytest.raises(BundleInputError, match=r"choose --modality from \['ct', 'cxr', 'mri'\]"):
        modality_preprocessing(ROOT / "configs/modality/xyz.json", image_size=32)


def test_mednist_offline_says_what_to_do(tmp_path, monkeypatch):
    import monai.apps.datasets

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(monai.apps.datasets, "download_and_extract", offline)
    with pytest.raises(BundleInputError, match="MedNIST.*could not be downloaded.*leave --dataset_dir out"):
        build_datalist("mednist", tmp_path)


def test_default_data_ships_with_the_bundle_and_preprocesses(tmp_path):
    """No --dataset_dir: the NIH radiographs in the repository, offline; val holds other patients."""
    rows = build_datalist(None, tmp_path)
    assert len(rows) == 685 and all(Path(r["image"]).is_file() for r in rows)
    val = find_images(default_data("val"))
    assert len(val) == 45
    train_ids = {Path(r["image"]).name for r in rows}
    assert not train_ids & {Path(r["image"]).name for r in val}
    item = apply_to_file(modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=64), rows[0])
    image = np.asarray(item["image"])
    assert image.shape == (1, 64, 64) and 0.0 <= image.min() < 0.1 and 0.9 < image.max() <= 1.0
    assert not list(tmp_path.iterdir()), "the default data must not download anything"
