"""Finding the user's images, loading them once with clear errors, and caching the result on disk."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .constants import DEFAULT_DATA_DIR, NON_DICOM_SUFFIXES
from .errors import BundleInputError
from .io import atomic_path, atomic_torch_save

logger = logging.getLogger(__name__)

# DICOM files are always read with pydicom, whatever other readers are installed: ITK (GDCM) would invert MONOCHROME1
# itself, and Radiograph2Dd inverts it again. Other formats fall through to MONAI's usual readers.
DICOM_READER = "PydicomReader"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".nii.gz")
DATALIST_SUFFIXES = (".csv", ".json")


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def find_images(folder: str | os.PathLike) -> list[dict[str, str]]:
    """All images under ``folder`` (searched recursively, sorted), as ``[{"image": path}, ...]``."""
    root = Path(folder)
    files = sorted(str(p) for p in root.rglob("*") if _is_image(p))
    if not files:
        raise BundleInputError(
            f"No images were found in '{folder}' (searched recursively for {', '.join(IMAGE_SUFFIXES)}): "
            "point dataset_dir at a folder of 2D images or at a CSV/JSON datalist."
        )
    return [{"image": f} for f in files]


def read_datalist(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV or JSON datalist with an ``image`` column; other columns are carried through.

    Relative image paths are taken relative to the datalist's folder. A JSON datalist is a list of
    records, or a dict whose ``training`` key holds that list (the MONAI/Decathlon layout).
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows: list[dict[str, Any]] = list(csv.DictReader(f))
        except UnicodeDecodeError as err:
            raise BundleInputError(f"Datalist '{path}' is not UTF-8 text (byte {err.start}): save it as UTF-8 CSV "
                                   "(most spreadsheet programs offer 'CSV UTF-8').") from None
    else:
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleInputError(f"Datalist '{path}' is not valid JSON ({err}): fix the file, or give a CSV with an "
                                   "'image' column.") from None
        rows = data.get("training", []) if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise BundleInputError(
                f"Datalist '{path}' is not a list of records: give a JSON list of {{\"image\": path, ...}} "
                "objects or a dict with such a list under 'training'."
            )
    if not rows:
        raise BundleInputError(f"Datalist '{path}' has no rows: add at least one image.")
    if "image" not in rows[0]:
        raise BundleInputError(
            f"Datalist '{path}' has no 'image' column (it has {sorted(rows[0])}): rename the column that "
            "holds the image paths to 'image'."
        )
    for row in rows:
        image = Path(str(row["image"]))
        row["image"] = str(image if image.is_absolute() else path.parent / image)
    return rows


def mednist_cxr_datalist(root_dir: str | os.PathLike, class_name: str = "CXR") -> list[dict[str, Any]]:
    """The MedNIST chest X-ray class, downloaded (checksum verified) and cached by MONAI's own downloader."""
    from monai.apps import MedNISTDataset

    Path(root_dir).mkdir(parents=True, exist_ok=True)
    try:
        data = MedNISTDataset(root_dir=str(root_dir), section="training", download=True, progress=False,
                              val_frac=0.0, test_frac=0.0, transform=None, cache_num=0).data
    except Exception as err:  # network, checksum or archive errors all end the same way for the user
        raise BundleInputError(
            f"The default data set (MedNIST) could not be downloaded into '{root_dir}' "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0]}); "
            "offline, leave --dataset_dir out to use the images that ship with the bundle, or pass your own."
        ) from None
    return [{"image": item["image"]} for item in data if item["class_name"] == class_name]


def default_data(split: str = "train") -> Path:
    """The chest radiographs that ship with the bundle (NIH ChestX-ray14, 128 px): ``train`` or ``val``."""
    folder = Path(__file__).resolve().parents[1] / DEFAULT_DATA_DIR / split
    if not folder.is_dir():
        raise BundleInputError(f"The bundle's default images '{folder}' are missing (an incomplete copy of the "
                               "bundle?): restore them from the repository, or pass --dataset_dir with your images.")
    return folder


def build_datalist(dataset_dir: str | os.PathLike | None, download_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The training datalist: a folder, a CSV/JSON datalist, ``mednist`` (the MedNIST CXR class, downloaded
    into ``download_dir``) or nothing (``None``: the chest radiographs that ship with the bundle)."""
    if dataset_dir in (None, "", "None"):
        return find_images(default_data("train"))
    if str(dataset_dir).lower() == "mednist":
        return mednist_cxr_datalist(download_dir)
    path = Path(dataset_dir)
    if not path.exists():
        raise BundleInputError(f"dataset_dir '{dataset_dir}' does not exist: pass an existing folder or datalist file.")
    if path.is_dir():
        return find_images(path)
    if path.suffix.lower() in DATALIST_SUFFIXES:
        return read_datalist(path)
    raise BundleInputError(
        f"dataset_dir '{dataset_dir}' is neither a folder nor a .csv/.json datalist: pass one of those."
    )


def preprocess(datalist: Sequence[dict[str, Any]], transform: Callable, desc: str = "preprocess") -> list[dict]:
    """Run the deterministic preprocessing on every item, stopping at the first bad file with its name."""
    items = []
    for row in tqdm(datalist, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        items.append(apply_to_file(transform, row))
    return items


def slice_suffix(row: Mapping[str, Any]) -> str:
    """``_axial060``-style suffix of a volume slice row (bundle/volumes.py), empty for a 2D image row."""
    if row.get("slice_index") in (None, ""):
        return ""
    from .volumes import AXES

    axis = {v: k for k, v in AXES.items()}.get(int(row.get("slice_axis", 2)), "axis")
    return f"_{axis}{int(row['slice_index']):03d}"


def output_stems(rows: Sequence[dict[str, Any]]) -> list[str]:
    """File-name stems for outputs: the source's name, made unique with its index only where names clash."""
    from collections import Counter

    names = [Path(str(r["image"])).name.split(".")[0] + slice_suffix(r) for r in rows]
    counts = Counter(names)
    return [n if counts[n] == 1 else f"{i:05d}_{n}" for i, n in enumerate(names)]


def apply_to_file(transform: Callable, row: dict[str, Any]) -> dict[str, Any]:
    """``transform(row)`` with any failure turned into one message that names the file."""
    path = row.get("image")
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise BundleInputError(f"Image '{path}' does not exist: fix the path or remove it from the datalist.")
    try:
        item = transform(dict(row))
    except BundleInputError:
        raise
    except Exception as err:
        cause = err
        while cause.__cause__ is not None:  # MONAI wraps transform errors in "applying transform ..."
            cause = cause.__cause__
        if isinstance(cause, BundleInputError):
            raise cause from None
        detail = (str(cause).strip().splitlines() or [""])[0]  # MONAI appends every reader's traceback: the first line
        raise BundleInputError(
            f"Image '{path}' could not be read or preprocessed ({type(cause).__name__}: {detail}); "
            "replace the file or remove it from the datalist."
        ) from None
    image = item.get("image") if isinstance(item, dict) else None
    if isinstance(image, (torch.Tensor, np.ndarray)) and not bool(np.isfinite(np.asarray(image)).all()):
        raise BundleInputError(f"Image '{path}' has NaN or infinite pixel values: repair the file or remove it from "
                               "the datalist.")
    return item


def preprocessed_stack(rows: Sequence[dict[str, Any]], transform: Callable, desc: str = "load") -> torch.Tensor:
    """``(N, 1, H, W)`` float images: :func:`preprocess` on every row, stacked (not cached)."""
    return torch.stack([torch.as_tensor(np.asarray(it["image"])).float() for it in preprocess(rows, transform, desc)])


def read_mask(path: str, size: Sequence[int]) -> torch.Tensor:
    """``(1, X, Y)`` binary mask from a file (any format MONAI reads, any non-zero pixel inside), resized and
    padded like the images (longest side to the image size, centred padding) so it stays aligned with them.
    Used for inpainting masks and segmentation labels."""
    from monai.transforms import LoadImage, Resize, SpatialPad

    if not os.path.isfile(path):
        raise BundleInputError(f"Mask '{path}' does not exist: fix the mask column of the datalist.")
    try:
        mask = LoadImage(image_only=True, ensure_channel_first=True)(path)
    except Exception as err:
        raise BundleInputError(f"Mask '{path}' could not be read ({type(err).__name__}): replace it.") from None
    mask = (torch.as_tensor(np.asarray(mask))[:1] > 0).float()
    if mask.ndim != 3:
        raise BundleInputError(f"Mask '{path}' is not a 2D image (shape {tuple(mask.shape)}).")
    mask = Resize(max(size), size_mode="longest", mode="area")(mask)
    mask = SpatialPad(list(size))(mask)
    mask = (torch.as_tensor(np.asarray(mask)) > 0.5).float()
    if not mask.any():
        raise BundleInputError(f"Mask '{path}' is empty at the image size: check the file or use a larger image_size.")
    return mask


# ---- fingerprints: what a cache was built from -------------------------------------------------------------


def describe(obj: Any, _depth: int = 0) -> Any:
    """A JSON-able description of a (transform) object's settings, used to notice changed preprocessing."""
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, (list, tuple)):
        return [describe(o, _depth + 1) for o in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, _depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return np.asarray(obj).tolist() if np.asarray(obj).size <= 64 else hash_bytes(np.asarray(obj).tobytes())
    if isinstance(obj, np.random.RandomState) or _depth > 6:
        return type(obj).__name__
    module = type(obj).__module__
    if hasattr(obj, "__dict__") and (module.startswith("monai") or module.startswith("bundle")):
        fields = {k: describe(v, _depth + 1) for k, v in sorted(vars(obj).items()) if not k.startswith("_")}
        return {"class": f"{module}.{type(obj).__qualname__}", **fields}
    return f"{module}.{type(obj).__qualname__}"


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_json(obj: Any) -> str:
    return hash_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def hash_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_id(*paths: str | os.PathLike) -> str:
    """``name:sha256[:16]`` of each file, joined by ``|``: names trained weights by what they hold, so a result row
    records the model it came from whatever folder the file sits in now."""
    return "|".join(f"{Path(p).name}:{hash_file(p)[:16]}" for p in paths)


def file_stamp(path: str | os.PathLike) -> str:
    """``name:size:mtime_ns`` of a file that is never rewritten once written (a model file, a snapshot): names what
    made a stored result without reading the file."""
    st = os.stat(path)
    return f"{Path(path).name}:{st.st_size}:{st.st_mtime_ns}"


def files_fingerprint(datalist: Sequence[dict[str, Any]], memo: str | os.PathLike | None = None) -> str:
    """Changes when any image is added, removed, renamed or rewritten (path, size, contents), or when another
    slice of a volume is chosen (a DICOM series folder counts by its files).

    The contents count, not the modification time: a data folder copied or mounted anew (new times, same files)
    keeps its caches. ``memo`` (a JSON file) keeps each file's digest under its size and time, so a file is read
    again only when one of those changed."""
    known = {}
    if memo is not None and Path(memo).is_file():
        try:
            known = json.loads(Path(memo).read_text())
        except (OSError, ValueError):
            known = {}
    seen = {}

    def digest(path: Path):
        try:
            st = path.stat()
        except OSError:
            return -1, None
        stamp = [st.st_size, st.st_mtime_ns]
        entry = known.get(str(path))
        value = entry[2] if isinstance(entry, list) and entry[:2] == stamp else hash_file(path)
        seen[str(path)] = [*stamp, value]
        return st.st_size, value

    stats = []
    for row in datalist:
        path = Path(str(row["image"]))
        folder = path.is_dir()  # a DICOM series: its files count
        entry = [str(path), *([] if folder else digest(path))]
        if row.get("slice_index") not in (None, ""):
            entry += [row.get("slice_axis"), int(row["slice_index"])]
        if folder:
            entry.append([[f.name, *digest(f)] for f in sorted(path.iterdir()) if f.is_file()])
        stats.append(entry)
    if memo is not None and seen != known:
        try:
            with atomic_path(memo) as tmp:
                Path(tmp).write_text(json.dumps(seen))
        except OSError:
            pass  # a read-only cache folder: the digests are read again next time
    return hash_json(stats)


def load_or_build(path: str | os.PathLike, key: dict[str, str], build: Callable[[], dict], what: str,
                  complete: Callable[[dict], bool] | None = None) -> dict:
    """Return the cache at ``path`` if it was built from exactly ``key``; otherwise rebuild it (atomically).

    ``key`` names each ingredient (images, transforms, autoencoder, ...) so that a rebuild says which changed;
    ``complete`` checks what the cache refers to outside its own file (a cache that fails it is rebuilt). In a
    multi-process run the first process builds it and the others then read it.
    """
    from .distributed import main_first

    return main_first(lambda: _load_or_build(Path(path), key, build, what, complete))


def _load_or_build(path: Path, key: dict[str, str], build: Callable[[], dict], what: str,
                   complete: Callable[[dict], bool] | None) -> dict:
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            logger.warning("%s cache %s is unreadable (%s): rebuilding it.", what, path, err)
        else:
            old = cached.get("key", {})
            if old == key and (complete is None or complete(cached)):
                logger.info("%s cache %s is up to date: reusing it.", what, path)
                return cached
            if old == key:
                logger.warning("%s cache %s is incomplete (its data file is missing or short): rebuilding it.", what, path)
            else:
                changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                logger.info("%s cache %s was built from other %s: rebuilding it.", what, path, ", ".join(changed))
    built = build()
    built["key"] = dict(key)
    atomic_torch_save(built, path)
    logger.info("%s cache written to %s.", what, path)
    return built


PIXEL_DTYPE = torch.float16


def write_pixels(datalist: Sequence[dict[str, Any]], transform: Callable, path: str | os.PathLike) -> list[int]:
    """Preprocess image after image and append each one's float16 pixels to ``path`` (atomically): memory holds
    one image at a time, whatever the number of images. Returns the shape of one image."""
    if not datalist:
        raise BundleInputError("The datalist is empty: give at least one image.")
    shape = None
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for row in tqdm(datalist, desc="load images", leave=False, dynamic_ncols=True, disable=None):
            image = np.asarray(apply_to_file(transform, row)["image"], dtype=np.float16)
            if shape is None:
                shape = image.shape
            elif image.shape != shape:
                raise BundleInputError(
                    f"Preprocessing gave '{row.get('image')}' the shape {image.shape}, other images {shape}: the "
                    "modality transforms must end in a fixed size (resize and pad to image_size)."
                )
            f.write(np.ascontiguousarray(image).tobytes())
    return list(shape)


def _pixel_file(cache_path: Path, key: dict[str, str]) -> Path:
    return cache_path.with_name(f"{cache_path.stem}.{hash_json(key)[:16]}.f16")


def preprocessed_images(datalist: Sequence[dict[str, Any]], transform: Callable, cache_path: str | os.PathLike) -> dict:
    """Every image preprocessed once and cached on disk, with its source row; ``images`` is ``(N, 1, H, W)`` float16.

    The pixels live in a raw file beside the cache, written image by image and memory-mapped when read: building
    and using the cache take memory for one image, not for all of them (the operating system pages the file in
    and out), which is what lets a large data set through on a small machine.
    """
    cache_path = Path(cache_path)
    key = {"images": files_fingerprint(datalist, cache_path.with_suffix(".digests.json")), "transforms": hash_json(describe(transform))}
    pixels = _pixel_file(cache_path, key)  # named by the key: a cache whose key matches refers to this file

    def build() -> dict:
        shape = write_pixels(datalist, transform, pixels)
        for stale in cache_path.parent.glob(f"{glob.escape(cache_path.stem)}.*.f16"):
            if stale != pixels:
                stale.unlink(missing_ok=True)
        rows = [{k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in r.items()} for r in datalist]
        return {"shape": [len(datalist), *shape], "rows": rows}

    def complete(cache: dict) -> bool:
        expected = math.prod(cache.get("shape", [0])) * PIXEL_DTYPE.itemsize
        return pixels.is_file() and pixels.stat().st_size == expected > 0

    cache = load_or_build(cache_path, key, build, "image", complete)
    shape = cache["shape"]
    images = torch.from_file(str(pixels), shared=False, size=math.prod(shape), dtype=PIXEL_DTYPE).view(shape)
    return {**cache, "images": images}


class ImageItems(Sequence):
    """The cached images as dataset items (float32 ``(1, H, W)`` tensors under ``image``), converted one at a
    time as the data loader asks for them, so a data set never exists twice in memory."""

    def __init__(self, cache: dict) -> None:
        self.images, self.rows = cache["images"], cache["rows"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {"image": self.images[index].float(), "source": self.rows[index]["image"]}


def image_items(cache: dict) -> ImageItems:
    """The cached images as dataset items (see :class:`ImageItems`)."""
    return ImageItems(cache)


def modality_preprocessing(config_path: str | os.PathLike, **values: Any):
    """The modality config's ``loader`` (default ``LoadImaged``) followed by its ``transforms`` list (e.g.
    configs/modality/cxr.json; volume modalities load one slice with bundle.volumes.LoadSliced).

    ``values`` (such as ``image_size``, or a CT ``window``) fill the ``@`` references of the modality file, so one
    file serves every image size.
    """
    from monai.transforms import Compose

    parser = modality_parser(config_path, **values)
    transforms = parser.get_parsed_content("transforms")
    loader = parser.get_parsed_content("loader") if "loader" in parser.get("", {}) else LoadImageByTyped("image")
    return Compose([loader, *transforms])


class LoadImageByTyped:
    """MONAI's ``LoadImaged`` (channel first, image only) with the reader chosen from the file's name: MONAI's own
    choice by suffix for PNG, JPEG, NIfTI and the like, pydicom for DICOM and for files without a known suffix.
    A reader list makes MONAI try and log every reader in turn (two failures for each good PNG); choosing first
    keeps the log to real failures."""

    def __init__(self, key: str = "image") -> None:
        from monai.transforms import LoadImaged

        self.key = key
        self.by_suffix = LoadImaged(keys=key, image_only=True, ensure_channel_first=True)
        self.dicom = LoadImaged(keys=key, image_only=True, ensure_channel_first=True, reader=DICOM_READER)

    def __call__(self, data: dict) -> dict:
        name = str(data[self.key]).lower()
        return (self.by_suffix if name.endswith(NON_DICOM_SUFFIXES) else self.dicom)(data)


def output_preprocessing(image_size: int):
    """Reading generated images back (bundle.writers outputs): one grey 2D image, values divided by their storage
    range (8-bit, 16-bit, or float in [0, 1] as written), resized and padded to ``image_size``."""
    from monai.transforms import Compose, EnsureTyped, Resized, SpatialPadd

    from .transforms import Radiograph2Dd, UnitRanged

    return Compose([LoadImageByTyped("image"),
                    UnitRanged(keys="image"),
                    Radiograph2Dd(keys="image"),
                    Resized(keys="image", spatial_size=image_size, size_mode="longest", mode="area"),
                    SpatialPadd(keys="image", spatial_size=[image_size, image_size], mode="constant"),
                    EnsureTyped(keys="image", dtype=torch.float32, track_meta=False)])


def modality_parser(path: str | os.PathLike, **values: Any):
    """The modality config at ``path`` with ``values`` set (keys it lacks are added, others replaced)."""
    from monai.bundle import ConfigParser

    path = Path(path)
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.json")) if path.parent.is_dir() else []
        raise BundleInputError(
            f"Modality config '{path}' does not exist: choose --modality from {available} or add that file."
        )
    parser = ConfigParser(ConfigParser.load_config_file(path), globals={"bundle": "bundle"})
    for key, value in values.items():
        if key == "slices" and isinstance(value, dict):
            parser[key] = {**(parser.get("slices") or {}), **value}
        else:
            parser[key] = value
    return parser


def modality_datalist(rows: Sequence[dict[str, Any]], config_path: str | os.PathLike, **values: Any) -> list[dict]:
    """The datalist as the modality takes it: a volume modality (a ``slices`` section in its config) turns each
    volume (NIfTI file, or DICOM series: the files of one folder count as one volume) into one row per usable 2D
    slice (bundle/volumes.py); a 2D modality takes the rows as they are."""
    parser = modality_parser(config_path, **values)
    slices = parser.get_parsed_content("slices") if "slices" in parser.get("", {}) else None
    if not slices:
        return list(rows)
    from .volumes import slice_rows

    volumes: dict[str, dict[str, Any]] = {}
    for row in rows:
        image = Path(str(row["image"]))
        key = str(image.parent) if image.name.lower().endswith((".dcm", ".dicom")) else str(image)
        volumes.setdefault(key, {**row, "image": key})
    return slice_rows(list(volumes.values()), **slices)
