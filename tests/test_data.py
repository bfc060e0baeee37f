"""Loading real radiographs of every supported format, and refusing bad input with one clear message."""

from __future__ import annotations

import logging
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

from .conftest import DATA, ROOT, require, write_datalist

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


def test_each_file_goes_to_its_own_reader_and_good_files_log_no_reader_failure(tmp_path, cxr_samples, jsrt_images,
                                                                               preprocessing, caplog):
    """A reader list made MONAI try pydicom and nibabel on every PNG first, logging two failures per good film."""
    shutil.copy(cxr_samples / "nih_cxr_monochrome1.dcm", tmp_path / "film")  # DICOM files often have no suffix
    shutil.copy(jsrt_images[0], tmp_path / "upper.PNG")
    with caplog.at_level(logging.DEBUG, logger="LoadImage"):
        images = [load(preprocessing, path) for path in (jsrt_images[0], tmp_path / "upper.PNG",
                                                         cxr_samples / "nih_cxr_monochrome1.dcm", tmp_path / "film")]
    assert "unable to load" not in caplog.text
    torch.testing.assert_close(images[0], images[1])
    torch.testing.assert_close(images[2], images[3]), "a DICOM file without a suffix is read (and inverted) by pydicom"


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
    ct = DATA / "ct/head_ct.nii.gz"
    if not ct.exists():
        pytest.skip(f"needs {ct} (set DINO_DIFFUSION_DATA to the data folder), absent here")
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


# ---- discovery, datalists and their refusals, whole -------------------------------------------------------


def test_hidden_files_are_not_images_and_an_empty_folder_says_what_to_do(tmp_path, jsrt_images):
    shutil.copy(jsrt_images[0], tmp_path / "x.png")
    shutil.copy(jsrt_images[1], tmp_path / ".x.png")  # editor or OS side files
    assert [Path(r["image"]).name for r in find_images(tmp_path)] == ["x.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleInputError) as err:
        find_images(tmp_path / "empty")
    assert str(err.value) == (
        f"No images were found in '{tmp_path / 'empty'}' (searched recursively for .png, .jpg, .jpeg, .dcm, .dicom, "
        ".nii, .nii.gz): point dataset_dir at a folder of 2D images or at a CSV/JSON datalist.")


def test_datalist_refusals_are_whole_messages_and_csv_fields_keep_their_line_breaks(tmp_path):
    def message(text: str, name: str) -> str:
        (tmp_path / name).write_text(text, newline="")
        with pytest.raises(BundleInputError) as err:
            read_datalist(tmp_path / name)
        return str(err.value)

    path = tmp_path / "a.json"
    assert message("[]", "a.json") == f"Datalist '{path}' has no rows: add at least one image."
    assert message('{"validation": [{"image": "x.png"}]}', "a.json") == f"Datalist '{path}' has no rows: add at least one image."
    assert message("[1, 2]", "a.json") == (
        f"Datalist '{path}' is not a list of records: give a JSON list of {{\"image\": path, ...}} objects or a dict "
        "with such a list under 'training'.")
    assert message('{"training": {"image": "x.png"}}', "a.json").endswith("with such a list under 'training'.")
    assert message('[{"path": "x.png"}]', "a.json") == (
        f"Datalist '{path}' has no 'image' column (it has ['path']): rename the column that holds the image paths to "
        "'image'.")
    assert message("[{", "a.json").endswith("fix the file, or give a CSV with an 'image' column.")
    assert read_datalist(_write(tmp_path / "l.json", '[{"image": "/abs/x.png"}]')) == [{"image": "/abs/x.png"}]
    rows = read_datalist(_write(tmp_path / "l.csv", 'image,note\nx.png,"two\r\nlines"\r\ny.png,plain\r\n'))
    assert [r["note"] for r in rows] == ["two\r\nlines", "plain"] and rows[1]["image"] == str(tmp_path / "y.png")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,site\nx.png,Universit\u00e4t\n".encode("latin-1"))  # a spreadsheet's non-UTF-8 export
    with pytest.raises(BundleInputError) as err:
        read_datalist(latin)
    assert str(err.value) == (f"Datalist '{latin}' is not UTF-8 text (byte 26): save it as UTF-8 CSV (most spreadsheet "
                              "programs offer 'CSV UTF-8').")
    bom = _write(tmp_path / "bom.csv", "\ufeffimage,site\nx.png,Universit\u00e4t\n")  # 'CSV UTF-8' starts with a BOM
    assert read_datalist(bom) == [{"image": str(tmp_path / "x.png"), "site": "Universit\u00e4t"}]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, newline="")
    return path


def test_no_dataset_dir_in_any_spelling_means_the_shipped_images(tmp_path, monkeypatch):
    import bundle.data

    assert default_data() == default_data("train") == ROOT / "bundle/default_data/nih_cxr/train"
    shipped = build_datalist(None, tmp_path)
    assert build_datalist("", tmp_path) == shipped and build_datalist("None", tmp_path) == shipped
    monkeypatch.setattr(bundle.data, "DEFAULT_DATA_DIR", "bundle/default_data/gone")
    with pytest.raises(BundleInputError) as err:
        default_data("val")
    assert str(err.value) == (
        f"The bundle's default images '{ROOT / 'bundle/default_data/gone/val'}' are missing (an incomplete copy of "
        "the bundle?): restore them from the repository, or pass --dataset_dir with your images.")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BundleInputError) as err:
        build_datalist(tmp_path / "notes.txt", tmp_path)
    assert str(err.value) == (f"dataset_dir '{tmp_path / 'notes.txt'}' is neither a folder nor a .csv/.json datalist: "
                              "pass one of those.")


def test_mednist_keeps_the_chest_class_of_the_whole_training_section(tmp_path, monkeypatch):
    """MONAI's MedNIST loader is replaced by one that records what it was asked for (no network here)."""
    import monai.apps

    asked = {}

    class FakeMedNIST:
        def __init__(self, **kwargs):
            asked.update(kwargs)
            self.data = [{"image": "a.jpeg", "class_name": "CXR", "label": 3},
                         {"image": "b.jpeg", "class_name": "Hand", "label": 4},
                         {"image": "c.jpeg", "class_name": "CXR", "label": 3}]

    monkeypatch.setattr(monai.apps, "MedNISTDataset", FakeMedNIST)
    root = tmp_path / "deep" / "downloads"
    assert build_datalist("MedNIST", root) == [{"image": "a.jpeg"}, {"image": "c.jpeg"}]
    assert root.is_dir()
    assert asked == {"root_dir": str(root), "section": "training", "download": True, "progress": False,
                     "val_frac": 0.0, "test_frac": 0.0, "transform": None, "cache_num": 0}
    from bundle.data import mednist_cxr_datalist

    assert mednist_cxr_datalist(root, class_name="Hand") == [{"image": "b.jpeg"}]


def test_mednist_download_failure_is_one_line(tmp_path, monkeypatch):
    import monai.apps

    class Offline:
        def __init__(self, **kwargs):
            raise OSError("Name or service not known\nTraceback (most recent call last): ...")

    monkeypatch.setattr(monai.apps, "MedNISTDataset", Offline)
    with pytest.raises(BundleInputError) as err:
        build_datalist("mednist", tmp_path)
    assert str(err.value) == (
        f"The default data set (MedNIST) could not be downloaded into '{tmp_path}' (OSError: Name or service not "
        "known); offline, leave --dataset_dir out to use the images that ship with the bundle, or pass your own.")


def test_a_failing_transform_is_reported_with_the_first_line_of_its_cause(tmp_path, jsrt_images):
    from bundle.data import preprocess, preprocessed_stack

    path = str(jsrt_images[0])

    def fails(error):
        def transform(row):
            raise error
        return transform

    def message(error) -> str:
        with pytest.raises(BundleInputError) as err:
            apply_to_file(fails(error), {"image": path})
        return str(err.value)

    assert message(ValueError("first line\nsecond line")) == (
        f"Image '{path}' could not be read or preprocessed (ValueError: first line); replace the file or remove it "
        "from the datalist.")
    assert message(ValueError()) == (f"Image '{path}' could not be read or preprocessed (ValueError: ); replace the "
                                     "file or remove it from the datalist.")
    wrapped = RuntimeError("applying transform")
    wrapped.__cause__ = BundleInputError("the real reason")
    assert message(wrapped) == "the real reason"
    assert apply_to_file(lambda row: [row, row], {"image": path}) == [{"image": path}] * 2  # list outputs pass through
    with pytest.raises(BundleInputError) as err:
        apply_to_file(lambda row: {"image": torch.tensor([1.0, float("inf")])}, {"image": path})
    assert str(err.value) == (f"Image '{path}' has NaN or infinite pixel values: repair the file or remove it from the "
                              "datalist.")

    preprocessing = modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=32)
    rows = [{"image": str(p)} for p in jsrt_images[:2]]
    stack = preprocessed_stack(rows, preprocessing)
    assert stack.shape == (2, 1, 32, 32) and stack.dtype == torch.float32
    assert torch.equal(stack[1], torch.as_tensor(apply_to_file(preprocessing, rows[1])["image"]))
    with pytest.raises(BundleInputError, match="nowhere.png' does not exist"):
        preprocess(rows + [{"image": str(tmp_path / "nowhere.png")}], preprocessing)


def test_pixel_writer_refuses_empty_lists_and_mixed_sizes_and_leaves_nothing(tmp_path, jsrt_images):
    from bundle.data import write_pixels

    target = tmp_path / "pixels.f16"
    with pytest.raises(BundleInputError) as err:
        write_pixels([], lambda row: row, target)
    assert str(err.value) == "The datalist is empty: give at least one image."
    rows = [{"image": str(p)} for p in jsrt_images[:3]]
    sizes = {rows[0]["image"]: 8, rows[1]["image"]: 8, rows[2]["image"]: 4}
    with pytest.raises(BundleInputError) as err:
        write_pixels(rows, lambda row: {"image": np.zeros((1, sizes[row["image"]], 8))}, target)
    assert str(err.value) == (
        f"Preprocessing gave '{rows[2]['image']}' the shape (1, 4, 8), other images (1, 8, 8): the modality transforms "
        "must end in a fixed size (resize and pad to image_size).")
    assert list(tmp_path.iterdir()) == [], "no pixel file, complete or partial, after a refusal"
    assert write_pixels(rows[:2], lambda row: {"image": np.full((1, 8, 8), 0.5)}, target) == [1, 8, 8]
    assert np.array_equal(np.fromfile(target, np.float16), np.full(128, 0.5, np.float16))


def test_modality_settings_merge_into_the_slices_and_a_config_may_name_its_loader(tmp_path, jsrt_images):
    from monai.transforms import LoadImaged

    from bundle.data import modality_datalist, modality_parser

    parser = modality_parser(ROOT / "configs/modality/ct.json", image_size=32, slices={"stride": 4}, window="lung")
    assert parser.get_parsed_content("slices") == {"axis": "axial", "stride": 4, "span": [0.0, 1.0],
                                                   "foreground_threshold": -500, "min_foreground": 0.1}
    assert parser.get_parsed_content("transforms")[0].scaler.a_min == -1350.0  # "$bundle.volumes..." resolved
    assert parser["window"] == "lung" and parser["image_size"] == 32
    assert modality_parser(ROOT / "configs/modality/cxr.json", slices={"stride": 2})["slices"] == {"stride": 2}
    assert modality_parser(ROOT / "configs/modality/ct.json", extra={"stride": 2})["extra"] == {"stride": 2}
    rows = [{"image": str(p)} for p in jsrt_images[:2]]
    assert modality_datalist(rows, ROOT / "configs/modality/cxr.json") == rows  # 2D modalities keep their rows

    config = {"loader": {"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True,
                         "reader": "PILReader"},
              "transforms": [{"_target_": "Lambdad", "keys": "image",
                              "func": "$lambda x: x * 0 + len(bundle.data.DATALIST_SUFFIXES)"}]}
    import json

    (tmp_path / "pil.json").write_text(json.dumps(config))
    custom = modality_preprocessing(tmp_path / "pil.json")
    assert isinstance(custom.transforms[0], LoadImaged) and type(custom.transforms[0]._loader.readers[-1]).__name__ == \
        "PILReader"
    assert float(custom({"image": rows[0]["image"]})["image"].max()) == 2.0
    standard = modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=32)
    assert set(standard({"image": rows[0]["image"], "sex": "F"})) == {"image", "sex"}, "no meta-data keys added"
    with pytest.raises(BundleInputError) as err:
        modality_parser(tmp_path / "none" / "x.json")
    assert str(err.value) == (f"Modality config '{tmp_path / 'none' / 'x.json'}' does not exist: choose --modality "
                              "from [] or add that file.")


def test_masks_are_read_aligned_with_their_images(tmp_path):
    from bundle.data import read_mask

    drawing = np.zeros((40, 80), np.uint8)  # rows x columns: wider than tall, so the padding shows
    drawing[10:20, 50:70] = 255
    Image.fromarray(drawing).save(tmp_path / "mask.png")
    mask = read_mask(str(tmp_path / "mask.png"), (32, 32))
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    preprocessing = modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=32)
    image = torch.as_tensor(apply_to_file(preprocessing, {"image": str(tmp_path / "mask.png")})["image"])
    assert torch.equal(mask, (image > 0.5).float()), "the mask lands on the pixels its image lands on"
    assert mask[0, 20:28, 12:16].all() and mask.sum() == 8 * 4

    def refusal(path, size=(32, 32)) -> str:
        with pytest.raises(BundleInputError) as err:
            read_mask(str(path), size)
        return str(err.value)

    assert refusal(tmp_path / "none.png") == f"Mask '{tmp_path / 'none.png'}' does not exist: fix the mask column of " \
                                             "the datalist."
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert refusal(tmp_path / "bad.png") == f"Mask '{tmp_path / 'bad.png'}' could not be read (UnidentifiedImageError): " \
                                            "replace it."
    dot = np.zeros((400, 400), np.uint8)
    dot[200, 200] = 255
    Image.fromarray(dot).save(tmp_path / "dot.png")
    assert refusal(tmp_path / "dot.png") == (f"Mask '{tmp_path / 'dot.png'}' is empty at the image size: check the file "
                                             "or use a larger image_size.")
    assert read_mask(str(tmp_path / "dot.png"), (400, 400)).sum() == 1
    labels = (drawing > 0).astype(np.uint8)  # a 0/1 label map, as segmentation tools save them
    Image.fromarray(labels).save(tmp_path / "labels.png")
    Image.fromarray(np.stack([drawing, np.zeros_like(drawing), 255 - drawing], -1)).save(tmp_path / "rgb.png")
    for name in ("labels.png", "rgb.png"):  # an RGB mask counts by its first channel
        assert torch.equal(read_mask(str(tmp_path / name), (32, 32)), mask), name
    half = np.zeros((8, 8), np.uint8)
    half[:, :2] = 1  # columns 0-1: a whole 2 x 2 block when brought to 4 x 4
    half[:, 3] = 1  # column 3: half of the next block, which is not enough
    Image.fromarray(half).save(tmp_path / "half.png")
    assert read_mask(str(tmp_path / "half.png"), (4, 4))[0].sum(1).tolist() == [4.0, 0.0, 0.0, 0.0]
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "cube.nii.gz"))
    assert refusal(tmp_path / "cube.nii.gz") == f"Mask '{tmp_path / 'cube.nii.gz'}' is not a 2D image (shape (1, 8, 8, 8))."


def test_output_names_are_the_sources_made_unique_and_name_their_slice():
    from bundle.data import output_stems, slice_suffix

    rows = [{"image": "a/x.png"}, {"image": "b/x.png"}, {"image": "c/y.nii.gz"}, {"image": "d/z.dcm", "slice_index": ""}]
    assert output_stems(rows) == ["00000_x", "00001_x", "y", "z"]
    assert slice_suffix({"image": "ct.nii.gz", "slice_index": 60, "slice_axis": 2}) == "_axial060"
    assert slice_suffix({"image": "ct.nii.gz", "slice_index": "7", "slice_axis": "0"}) == "_sagittal007"
    assert slice_suffix({"image": "ct.nii.gz", "slice_index": 7, "slice_axis": 1}) == "_coronal007"
    assert slice_suffix({"image": "ct.nii.gz", "slice_index": 7}) == "_axial007"
    assert slice_suffix({"image": "ct.nii.gz", "slice_index": 1234, "slice_axis": 5}) == "_axis1234"
    assert slice_suffix({"image": "ct.nii.gz", "slice_index": None}) == ""
    slices = [{"image": "/v/ct.nii.gz", "slice_index": i, "slice_axis": 2} for i in (3, 4)]
    assert output_stems(slices) == ["ct_axial003", "ct_axial004"]


def test_generated_images_read_back_in_their_storage_range(tmp_path):
    from bundle.data import output_preprocessing
    from bundle.writers import write_dicom, write_nifti, write_png

    values = torch.linspace(0, 1, 32 * 32).reshape(1, 32, 32)
    write_png(values, tmp_path / "a8.png", bit_depth=8)
    write_png(values, tmp_path / "a16.png", bit_depth=16)
    write_nifti(values, tmp_path / "a.nii.gz")
    write_dicom(values, tmp_path / "a.dcm")
    read = output_preprocessing(32)
    for name, tolerance in (("a8.png", 0.5 / 255 + 1e-6), ("a16.png", 0.5 / 65535 + 1e-6), ("a.nii.gz", 1e-6),
                            ("a.dcm", 0.5 / 65535 + 1e-6)):
        image = read({"image": str(tmp_path / name)})["image"]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32, name
        assert float((image - values).abs().max()) <= tolerance, name
    assert read({"image": str(tmp_path / "a16.png")})["image"].shape == output_preprocessing(32)(
        {"image": str(tmp_path / "a8.png")})["image"].shape
    half = output_preprocessing(16)({"image": str(tmp_path / "a.nii.gz")})["image"]
    assert half.shape == (1, 16, 16) and abs(float(half.mean()) - float(values.mean())) < 1e-3
    assert type(half) is torch.Tensor, "plain tensors: no metadata tracking downstream"
    write_png(torch.linspace(0.5, 1, 32 * 16).reshape(1, 32, 16), tmp_path / "tall.png")  # 32 wide (x), 16 high (y)
    tall = read({"image": str(tmp_path / "tall.png")})["image"]
    assert tall.shape == (1, 32, 32) and tall[0, :, 8:24].min() >= 0.49, "padded above and below with zeros"
    assert tall[0, :, :8].max() == 0.0 and tall[0, :, 24:].max() == 0.0


def _corpus_manifest(path, rows):
    import csv
    import gzip

    columns = ["id", "split", "patient", "source", "label", "finding", "view", "orig_width", "orig_height",
               "original_path", "repo", "commit", "licence"]
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{c: r.get(c, "") for c in columns} for r in rows])
    return path


def test_corpus_is_laid_out_from_its_source_repositories_at_their_commits(tmp_path, cxr_samples):
    """scripts.prepare_corpus on a real 1024-px NIH film in a git clone (read at the manifest's commit, not as the
    working tree has it now) and the same film as a JPEG in a plain folder."""
    import subprocess

    from scripts import prepare_corpus

    film = cxr_samples / "nih_00000001_000.png"
    clone = tmp_path / "src" / "COVID-19"
    (clone / "X-Ray Image DataSet/No_findings").mkdir(parents=True)
    shutil.copy(film, clone / "X-Ray Image DataSet/No_findings/00000001_000.png")
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "films"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    Image.new("L", (8, 8)).save(clone / "X-Ray Image DataSet/No_findings/00000001_000.png")  # changed after the commit
    plain = tmp_path / "src" / "kermany"
    (plain / "train/NORMAL").mkdir(parents=True)
    Image.open(film).convert("RGB").resize((1000, 800)).save(plain / "train/NORMAL/IM-1.jpeg", quality=95)
    rows = [{"id": "nih_00000001_000", "split": "train", "source": "nih", "original_path":
             "X-Ray Image DataSet/No_findings/00000001_000.png", "repo": "muhammedtalo/COVID-19", "commit": commit},
            {"id": "kermany_IM-1", "split": "test", "source": "kermany", "original_path": "train/NORMAL/IM-1.jpeg",
             "repo": "someone/kermany", "commit": "0" * 40}]
    manifest = _corpus_manifest(tmp_path / "manifest.csv.gz", rows)
    out = tmp_path / "cxr_corpus"
    prepare_corpus.main(["--sources", str(tmp_path / "src"), "--out", str(out), "--manifest", str(manifest)])
    made = np.asarray(Image.open(out / "images/nih_00000001_000.png"))
    expected = np.asarray(Image.open(film).convert("L").resize((256, 256), Image.LANCZOS))
    assert made.dtype == np.uint8 and np.array_equal(made, expected)  # the committed film, not the changed file
    jpeg = np.asarray(Image.open(out / "images/kermany_IM-1.png"))
    assert jpeg.shape == (205, 256) and np.abs(jpeg.astype(float) - np.asarray(Image.open(film).convert("L").resize(
        (256, 205), Image.LANCZOS), dtype=float)).mean() < 3  # the JPEG's aspect kept, the same film
    with open(out / "manifest.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["id", "nih_00000001_000", "kermany_IM-1"]
    stamp = (out / "images/nih_00000001_000.png").stat().st_mtime_ns
    prepare_corpus.main(["--sources", str(tmp_path / "src"), "--out", str(out), "--manifest", str(manifest)])
    assert (out / "images/nih_00000001_000.png").stat().st_mtime_ns == stamp  # a rerun keeps what is there
    with pytest.raises(SystemExit, match="someone/kermany is not in .*git clone https://github.com/someone/kermany"):
        prepare_corpus.main(["--sources", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"),
                             "--manifest", str(manifest), "--repo", f"muhammedtalo/COVID-19={clone}"])
    shutil.rmtree(clone / ".git")
    (clone / "X-Ray Image DataSet/No_findings/00000001_000.png").unlink()
    with pytest.raises(SystemExit, match="is not in .*clone https://github.com/muhammedtalo/COVID-19 there"):
        prepare_corpus.main(["--sources", str(tmp_path / "src"), "--out", str(tmp_path / "o3"), "--manifest", str(manifest)])
    assert not (tmp_path / "o3/manifest.csv").exists()  # no manifest for a folder that is not complete


def test_shipped_corpus_manifest_is_the_one_the_evidence_used():
    import csv

    from scripts.prepare_corpus import MANIFEST, manifest_rows

    shipped = manifest_rows(MANIFEST)
    with open(require(DATA / "cxr_corpus" / "manifest.csv"), newline="") as f:
        used = list(csv.DictReader(f))
    assert len(shipped) == 2394 and shipped == used, "scripts/data/cxr_corpus_manifest.csv.gz is stale"


def test_shipped_jsrt_manifest_is_the_one_the_evidence_used():
    shipped = ROOT / "scripts/data/jsrt_manifest.csv"
    assert shipped.read_bytes() == require(DATA / "jsrt" / "manifest.csv").read_bytes(), f"{shipped} is stale"
