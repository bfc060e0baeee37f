"""CT and MRI volumes: DICOM series, HU windows, slices and their display orientation, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle.data import modality_datalist, modality_preprocessing
from bundle.errors import BundleInputError
from bundle.volumes import LoadSliced, read_volume, slice_rows, window_range
from bundle.writers import save_dicom

from .conftest import DATA, require

CT = DATA / "ct" / "head_ct.nii.gz"
T1 = DATA / "mri" / "brain_t1_ch2.nii.gz"


@pytest.fixture
def head_ct():
    return require(CT)


def write_series(folder, hu: np.ndarray, affine: np.ndarray, series_uid: str = "1.2.3.4", order=None,
                 orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)) -> list:
    """A CT DICOM series of the RAS volume ``hu`` (X, Y, Z) with ``affine``: stored values HU + 1024 with
    RescaleIntercept -1024, files named in ``order`` (so the names do not give the slice order away)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    paths = []
    order = list(range(hu.shape[2])) if order is None else order
    for name, k in enumerate(order):
        ras = affine @ np.array([0.0, 0.0, k, 1.0])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, "1.2.3"
        ds.ImagePositionPatient = [float(-ras[0]), float(-ras[1]), float(ras[2])]  # RAS -> LPS
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = [float(sizes[1]), float(sizes[0])]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[:, :, k].T + 1024).astype(np.uint16).tobytes()
        path = folder / f"slice_{name:03d}.dcm"
        save_dicom(ds, path)
        paths.append(path)
    return paths


def small_ct(head_ct):
    """The head CT's middle 12 slices at every 4th voxel (64 x 64 x 12), in HU, with their affine."""
    data, affine, _ = read_volume(head_ct)
    scale = np.diag([4.0, 4.0, 1.0, 1.0])
    offset = np.eye(4)
    offset[2, 3] = 48
    return np.round(data[::4, ::4, 48:60]), affine @ offset @ scale


def test_dicom_series_is_ordered_by_position_and_read_in_hounsfield_units(head_ct, tmp_path):
    hu, affine = small_ct(head_ct)
    shuffled = [7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 6, 4]  # file k holds slice shuffled[k]
    write_series(tmp_path / "series", hu, affine, order=shuffled)
    data, read_affine, info = read_volume(tmp_path / "series")
    assert info["modality"] == "CT" and info["slices"] == 12
    assert data.shape == hu.shape and np.array_equal(data, hu), "same HU voxels in the same RAS order as the NIfTI"
    assert np.allclose(read_affine, affine, atol=1e-3)
    assert data.min() == -1024 and data.max() > 1000  # air and bone: RescaleIntercept was applied


def test_each_nifti_file_and_each_series_folder_is_one_volume(head_ct, tmp_path):
    import nibabel as nib

    hu, affine = small_ct(head_ct)
    first = write_series(tmp_path / "first", hu, affine, series_uid="1.1")
    second = [path.rename(path.with_suffix(".DICOM")) for path in write_series(tmp_path / "second", hu[:, :, :6], affine,
                                                                              series_uid="2.2")]
    nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), str(tmp_path / "ct.nii.gz"))
    rows = [{"image": str(p), "patient": "a"} for p in first] + [{"image": str(p), "patient": "b"} for p in second]
    rows.append({"image": str(tmp_path / "ct.nii.gz"), "patient": "c"})
    slices = modality_datalist(rows, "configs/modality/ct.json", slices={"min_foreground": 0.0})
    per_volume = {}
    for row in slices:
        per_volume.setdefault(row["volume"], []).append(row["slice_index"])
        assert row["image"] == row["volume"]
    assert per_volume == {str(tmp_path / "first"): list(range(12)), str(tmp_path / "second"): list(range(6)),
                          str(tmp_path / "ct.nii.gz"): list(range(12))}
    assert [r["patient"] for r in slices if r["volume"].endswith("second")] == ["b"] * 6


def test_bad_series_stop_with_one_message_naming_the_folder(head_ct, tmp_path):
    hu, affine = small_ct(head_ct)
    paths = write_series(tmp_path / "gap", hu, affine)
    paths[5].unlink()
    with pytest.raises(BundleInputError, match=r"gap' is missing slices: a gap of 3\.00 mm after slice 5"):
        read_volume(tmp_path / "gap")
    write_series(tmp_path / "two", hu[:, :, :4], affine, series_uid="1.1")
    for k, path in enumerate(write_series(tmp_path / "other", hu[:, :, :4], affine, series_uid="2.2")):
        path.rename(tmp_path / "two" / f"other_{k}.dcm")
    with pytest.raises(BundleInputError, match="two' holds 2 DICOM series"):
        read_volume(tmp_path / "two")
    write_series(tmp_path / "mixed", hu[:, :, :3], affine)
    for k, path in enumerate(write_series(tmp_path / "tilted", hu[:, :, 3:6], affine, orientation=(-1, 0, 0, 0, -0.8, 0.6))):
        path.rename(tmp_path / "mixed" / f"tilted_{k}.dcm")
    with pytest.raises(BundleInputError, match="mixes slice orientations"):
        read_volume(tmp_path / "mixed")


def test_bad_volumes_and_windows_are_refused(tmp_path, jsrt_images):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 4, 3).astype(np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(BundleInputError, match=r"4d.nii.gz' has shape \(8, 8, 4, 3\): a 4D image"):
        read_volume(tmp_path / "4d.nii.gz")
    nan = np.ones((8, 8, 4), np.float32)
    nan[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(BundleInputError, match="nan.nii.gz' has NaN or infinite voxels"):
        read_volume(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), 7, np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(BundleInputError, match=r"flat.nii.gz' is constant \(7.0\)"):
        read_volume(tmp_path / "flat.nii.gz")
    with pytest.raises(BundleInputError, match="CT window 'lungs' is not known: choose one of"):
        window_range("lungs")
    with pytest.raises(BundleInputError, match="is a 2D image, but this modality config takes volumes"):
        modality_datalist([{"image": str(jsrt_images[0])}], "configs/modality/ct.json")
    with pytest.raises(BundleInputError, match="slice_axis 'oblique' is not known"):
        slice_rows([{"image": str(tmp_path / "nan.nii.gz")}], axis="oblique")


def test_ct_slices_skip_empty_ones_and_window_hounsfield_units(head_ct):
    data, _, _ = read_volume(head_ct)
    tissue = (data > -500).reshape(-1, data.shape[2]).mean(0)
    rows = modality_datalist([{"image": str(head_ct), "patient": "p1"}], "configs/modality/ct.json")
    assert [r["slice_index"] for r in rows] == [k for k in range(108) if tissue[k] >= 0.1]
    assert 90 < len(rows) < 108 and rows[0]["patient"] == "p1" and rows[0]["volume"] == str(head_ct)
    assert len(modality_datalist([{"image": str(head_ct)}], "configs/modality/ct.json",
                                 slices={"min_foreground": 0.0, "stride": 4})) == 27
    # the brain window (level 40, width 80) maps -> [0, 1] linearly, clipped; 256 px keeps the voxel grid
    row = rows[len(rows) // 2]
    raw = LoadSliced()(row)["image"][0].numpy()
    windowed = modality_preprocessing("configs/modality/ct.json", image_size=256)(row)["image"][0].numpy()
    assert np.allclose(windowed, np.clip((raw - 0.0) / 80.0, 0, 1), atol=1e-5)
    lung = modality_preprocessing("configs/modality/ct.json", image_size=256, window="lung")(row)["image"][0].numpy()
    assert np.allclose(lung, np.clip((raw + 1350.0) / 1500.0, 0, 1), atol=1e-5)


def test_slices_are_shown_in_the_radiological_convention(head_ct):
    data, _, _ = read_volume(head_ct)
    axial = LoadSliced(spacing=None)({"image": str(head_ct), "slice_axis": 2, "slice_index": 60})["image"][0]
    assert torch.equal(axial, torch.from_numpy(np.ascontiguousarray(data[::-1, ::-1, 60])))
    # posterior at the bottom of an axial slice: the CT couch, under the patient's back, fills the last display rows
    display = axial.T  # rows = y
    assert (display[-64:] > 300).sum() > 2 * (display[:64] > 300).sum()
    coronal = LoadSliced()({"image": str(head_ct), "slice_axis": "coronal", "slice_index": 128})["image"]
    assert coronal.shape == (1, 256, round(108 * 1.5 / 0.957)), "1.5 mm slices resampled to 0.957 mm pixels"
    with pytest.raises(BundleInputError, match="slice_index 300 is outside"):
        LoadSliced()({"image": str(head_ct), "slice_axis": 2, "slice_index": 300})


def test_mri_slices_are_scaled_by_percentiles():
    t1 = require(T1)
    rows = modality_datalist([{"image": str(t1)}], "configs/modality/mri.json")
    assert 100 < len(rows) < 181
    image = modality_preprocessing("configs/modality/mri.json", image_size=64)(rows[len(rows) // 2])["image"]
    assert image.shape == (1, 64, 64) and float(image.min()) == 0.0 and 0.8 < float(image.max()) <= 1.0


def test_slice_rows_name_their_slice_in_outputs_and_cache_keys(head_ct):
    from bundle.data import files_fingerprint, output_stems
    from bundle.sampling import source_id

    rows = slice_rows([{"image": str(head_ct)}], "axial", stride=10, span=(0.2, 0.8))
    assert [r["slice_index"] for r in rows] == [21, 31, 41, 51, 61, 71, 81]
    assert output_stems(rows)[:2] == ["head_ct_axial021", "head_ct_axial031"]
    assert source_id(rows[0]) == "head_ct_axial021"
    shifted = slice_rows([{"image": str(head_ct)}], "axial", stride=10, span=(0.21, 0.8))
    assert len(shifted) == len(rows) and files_fingerprint(shifted) != files_fingerprint(rows)


def test_a_synthetic_slice_is_written_where_its_source_slice_lies(head_ct, tmp_path):
    import nibabel as nib

    from bundle.volumes import output_affine, source_modality
    from bundle.writers import write_dicom, write_nifti

    data, affine, _ = read_volume(head_ct)
    row = slice_rows([{"image": str(head_ct)}], "axial", stride=50)[1]
    image = modality_preprocessing("configs/modality/ct.json", image_size=64)(row)["image"]
    out = output_affine(row, image.shape[-2:])
    assert nib.aff2axcodes(out) == ("L", "P", "S") and np.allclose(np.linalg.norm(out[:3, :2], axis=0), 256 * 0.957 / 64, atol=1e-3)
    # every output pixel is the brain-windowed mean of the 4 x 4 voxels it lies over
    to_voxel = np.linalg.inv(affine) @ out
    for p, q in [(10, 30), (32, 32), (50, 20)]:
        i, j = (to_voxel @ np.array([p, q, 0, 1]))[:2]
        block = data[int(round(i - 1.5)) : int(round(i - 1.5)) + 4, int(round(j - 1.5)) : int(round(j - 1.5)) + 4, row["slice_index"]]
        assert float(image[0, p, q]) == pytest.approx(float(np.clip(block / 80.0, 0, 1).mean()), abs=1e-5)
    write_nifti(image, tmp_path / "slice.nii.gz", out)
    assert np.allclose(nib.load(str(tmp_path / "slice.nii.gz")).affine, out)
    # a slice of a DICOM series keeps the series' Modality in the synthetic Secondary Capture
    hu, small_affine = small_ct(head_ct)
    write_series(tmp_path / "series", hu, small_affine)
    series_row = slice_rows([{"image": str(tmp_path / "series")}], "axial")[0]
    assert source_modality(series_row) == "CT" and source_modality({"image": "x.png"}) is None
    write_dicom(image, tmp_path / "slice.dcm", modality=source_modality(series_row))
    import pydicom

    ds = pydicom.dcmread(str(tmp_path / "slice.dcm"))
    assert ds.Modality == "CT" and ds.ConversionType == "SYN" and "synthetic" in ds.SeriesDescription


@pytest.mark.parametrize("modality, volume, settings", [
    ("ct", CT, {"window": "brain", "slices": {"stride": 8}}),
    ("mri", T1, {"slices": {"stride": 12}}),
])
def test_tiny_volume_pipeline_trains_and_samples_slices_in_place(modality, volume, settings, tmp_path):
    import csv

    import nibabel as nib
    import pydicom

    from .conftest import run_bundle, tiny_settings

    require(volume)
    datalist = tmp_path / "volumes.csv"
    datalist.write_text(f"image,patient\n{volume},p1\n")
    run_bundle("train.json", "training", {**tiny_settings(tmp_path / "work", datalist), "modality": modality,
                                          "modality_settings": settings, "diffusion_epochs": 1, "ae_epochs": 1})
    out = tmp_path / "samples"
    run_bundle("inference.json", "sample", {"work_dir": str(tmp_path / "work"), "input_dir": str(datalist), "num_inputs": 2,
                                            "num_samples": 1, "num_inference_steps": 2, "output_dir": str(out),
                                            "output_formats": ["nifti", "dicom"]})
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = slice_rows([{"image": str(volume)}], **{"axis": "axial", **settings.get("slices", {}),
                        **({"foreground_threshold": -500, "min_foreground": 0.1} if modality == "ct" else {"min_foreground": 0.15})})
    assert [r["source_ids"] for r in rows] == [f"{volume.name.split('.')[0]}_axial{r['slice_index']:03d}" for r in first[:2]]
    image = nib.load(str(out / rows[0]["image"]))
    assert image.shape == (32, 32) and nib.aff2axcodes(image.affine) == ("L", "P", "S")
    dicom = pydicom.dcmread(str(out / rows[0]["image"].replace(".nii.gz", ".dcm")))
    assert dicom.Modality == {"ct": "CT", "mri": "MR"}[modality] and dicom.ConversionType == "SYN"


def test_single_dicom_files_are_2d_images_and_a_volume_config_says_so(tmp_path):
    """pydicom's own CT and MR test slices: read as 2D images (the cxr path, any 2D modality), refused by a volume
    config with a message naming the file's folder."""
    import shutil

    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "MR_small.dcm"):
        image = modality_preprocessing("configs/modality/cxr.json", image_size=32)({"image": get_testdata_file(name)})["image"]
        assert tuple(image.shape) == (1, 32, 32) and 0.0 <= float(image.min()) < 0.05 and 0.95 < float(image.max()) <= 1.0
        assert float(image.std()) > 0.1, "a real slice, not a flat image"
    single = tmp_path / "one_slice"
    single.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), single / "CT_small.dcm")
    with pytest.raises(BundleInputError, match="one_slice' holds a single DICOM slice"):
        modality_datalist([{"image": str(single / "CT_small.dcm")}], "configs/modality/ct.json")
