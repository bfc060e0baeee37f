"""What a cache is keyed on, and what it says when it is reused or rebuilt: the fingerprints of images and
transforms, the key comparison, the log lines a user reads to learn why a stage re-reads its images."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.data import (_pixel_file, describe, files_fingerprint, hash_bytes, hash_file, hash_json, load_or_build,
                         modality_preprocessing, preprocessed_images, read_datalist)

from .conftest import ROOT, write_datalist

SIZE = 32


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bundle.data"]


# ---- load_or_build: reuse, rebuild, and why ---------------------------------------------------------------


def test_cache_is_reused_only_for_the_same_key_and_says_which_ingredient_changed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bundle.data")
    path = tmp_path / "latents.pt"
    builds = []

    def build():
        builds.append(1)
        return {"value": torch.arange(3) * len(builds)}

    first = load_or_build(path, {"images": "a", "model": "m"}, build, "latent")
    assert builds == [1] and first["key"] == {"images": "a", "model": "m"} and path.is_file()
    assert messages(caplog) == [f"latent cache written to {path}."]

    caplog.clear()
    again = load_or_build(str(path), {"model": "m", "images": "a"}, build, "latent")
    assert builds == [1] and torch.equal(again["value"], first["value"])
    assert messages(caplog) == [f"latent cache {path} is up to date: reusing it."]

    caplog.clear()
    load_or_build(path, {"images": "b", "model": "m"}, build, "latent")
    assert builds == [1, 1]
    assert messages(caplog) == [f"latent cache {path} was built from other images: rebuilding it.",
                                f"latent cache written to {path}."]

    caplog.clear()  # an ingredient the old cache did not have counts as changed, and names are listed in order
    load_or_build(path, {"images": "c", "model": "m", "autoencoder": "x"}, build, "latent")
    assert messages(caplog)[0] == f"latent cache {path} was built from other autoencoder, images: rebuilding it."


def test_incomplete_cache_is_rebuilt_with_its_own_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bundle.data")
    path = tmp_path / "c.pt"
    load_or_build(path, {"k": "1"}, lambda: {"n": 1}, "image")
    caplog.clear()
    rebuilt = load_or_build(path, {"k": "1"}, lambda: {"n": 2}, "image", complete=lambda cache: False)
    assert rebuilt["n"] == 2
    assert messages(caplog) == [
        f"image cache {path} is incomplete (its data file is missing or short): rebuilding it.",
        f"image cache written to {path}."]
    assert [r.levelname for r in caplog.records if r.name == "bundle.data"] == ["WARNING", "INFO"]


@pytest.mark.parametrize("content", ["garbage", "no_key", "pickled_object"])
def test_unreadable_or_foreign_cache_file_is_rebuilt(tmp_path, caplog, content):
    """A torn file, a dict without a key, and a file holding arbitrary pickled objects (refused by the weights-only
    load, which is what keeps a cache file from running code) are all rebuilt, not trusted."""
    caplog.set_level(logging.INFO, logger="bundle.data")
    path = tmp_path / "c.pt"
    key = {"k": "1"}
    if content == "garbage":
        path.write_bytes(b"not a torch file")
    elif content == "no_key":
        torch.save({"n": 0}, path)
    else:
        torch.save({"n": 0, "key": dict(key), "extra": argparse.Namespace(a=1)}, path)
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        reason = None
    except Exception as err:  # the reason torch gives is passed on to the user
        reason = err
    rebuilt = load_or_build(path, key, lambda: {"n": 5}, "image")
    assert rebuilt["n"] == 5 and torch.load(path, weights_only=True)["n"] == 5
    first = messages(caplog)[0]
    if content == "no_key":
        assert first == f"image cache {path} was built from other k: rebuilding it."
    else:
        assert first == f"image cache {path} is unreadable ({reason}): rebuilding it."
        assert caplog.records[0].levelname == "WARNING"


# ---- fingerprints -----------------------------------------------------------------------------------------


def test_hashes_do_not_depend_on_key_order_and_take_paths(tmp_path):
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})
    assert hash_json({"p": Path("/x/y")}) == hash_json({"p": "/x/y"})
    data = os.urandom((1 << 20) + 17)  # more than one read chunk
    (tmp_path / "blob").write_bytes(data)
    assert hash_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest() == hash_bytes(data)


def test_files_fingerprint_follows_contents_not_modification_times(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1234")
    b.write_bytes(b"5678")
    rows = [{"image": str(a)}, {"image": str(b)}]
    base = files_fingerprint(rows)
    assert files_fingerprint([dict(r) for r in rows]) == base
    assert files_fingerprint(rows[::-1]) != base and files_fingerprint(rows[:1]) != base

    stat = a.stat()
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # copied or mounted anew: a new time, same bytes
    assert files_fingerprint(rows) == base
    a.write_bytes(b"4321")  # rewritten: the same size, other bytes
    assert files_fingerprint(rows) != base
    a.write_bytes(b"12345")  # a different size
    grown = files_fingerprint(rows)
    assert grown != base

    # the memo keeps each file's digest under its size and time: an unchanged file is not read again...
    memo = tmp_path / "cache" / "images.digests.json"
    assert files_fingerprint(rows, memo) == grown and memo.is_file()
    digests = json.loads(memo.read_text())
    digests[str(b)][2] = "0" * 64  # what the memo says is what counts while size and time match
    memo.write_text(json.dumps(digests))
    assert files_fingerprint(rows, memo) != grown
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))  # ... a file with a new time is
    assert files_fingerprint(rows, memo) == grown

    gone = [{"image": str(tmp_path / "missing.png")}]
    assert files_fingerprint(gone) == files_fingerprint(gone)  # a missing file fingerprints, it does not raise
    assert files_fingerprint([{"image": str(a), "slice_index": ""}]) == files_fingerprint(rows[:1])


def test_files_fingerprint_of_volume_slices_follows_the_slice_and_the_series_files(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(bytes(10 + i))
    row = {"image": str(series), "slice_axis": 2, "slice_index": 4}
    base = files_fingerprint([row])
    assert files_fingerprint([{**row, "slice_index": "4"}]) == base
    assert files_fingerprint([{**row, "slice_index": 5}]) != base
    assert files_fingerprint([{**row, "slice_axis": 0}]) != base
    assert files_fingerprint([{"image": str(series)}]) != base
    stat = (series / "1.dcm").stat()
    (series / "1.dcm").write_bytes(bytes(30))  # one file of the series rewritten, the folder's own time kept
    os.utime(series / "1.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files_fingerprint([row]) != base

    volume = tmp_path / "ct.nii.gz"  # a slice of a volume file: the file itself counts
    volume.write_bytes(bytes(100))
    nifti = {"image": str(volume), "slice_axis": 2, "slice_index": 4}
    before = files_fingerprint([nifti])
    stat = volume.stat()
    volume.write_bytes(bytes(120))
    os.utime(volume, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert files_fingerprint([nifti]) != before


class Node:
    """A settings object of the bundle's own (describe follows the fields of monai and bundle objects only)."""

    def __init__(self, child=None) -> None:
        self.child, self._private = child, "hidden"


Node.__module__ = "bundle.test_objects"


class Plain:
    def __init__(self) -> None:
        self.value = 1


def test_describe_is_json_with_sorted_keys_small_arrays_and_depth_limit():
    from monai.transforms import ScaleIntensityd

    assert describe(None) is None and describe(3) == 3 and describe("x") == "x" and describe((1, 2.5)) == [1, 2.5]
    described = describe({"b": 1, "a": [2, {"d": 0, "c": 9}], 3: "z"})
    assert described == {"3": "z", "a": [2, {"c": 9, "d": 0}], "b": 1}
    assert list(described) == ["3", "a", "b"] and list(described["a"][1]) == ["c", "d"]
    assert list(describe({"b": 1, "a": 2})) == ["a", "b"]  # sorted by key, not by value or insertion

    assert describe(np.arange(64)) == list(range(64))
    big = np.arange(65)
    assert describe(big) == hash_bytes(big.tobytes()) and describe(torch.arange(65)) == hash_bytes(big.tobytes())
    assert describe(np.random.RandomState(0)) == "RandomState"
    assert describe(Plain()) == f"{Plain.__module__}.Plain"

    transform = describe(ScaleIntensityd(keys="image", minv=0.0, maxv=2.0))
    assert transform["class"] == "monai.transforms.intensity.dictionary.ScaleIntensityd"
    assert transform["scaler"]["class"] == "monai.transforms.intensity.array.ScaleIntensity"
    assert transform["scaler"]["maxv"] == 2.0
    assert describe(ScaleIntensityd(keys="image", maxv=3.0)) != transform

    # objects are followed six levels deep, through fields, lists and dicts alike; deeper ones are named only
    chain = Node(Node(Node(Node(Node(Node(Node(Node())))))))
    level, depth = describe(chain), 0
    while isinstance(level, dict):
        assert level["class"] == "bundle.test_objects.Node" and "_private" not in level
        level, depth = level["child"], depth + 1
    assert (depth, level) == (7, "Node")
    assert describe([[[[[[Node()]]]]]])[0][0][0][0][0][0]["class"] == "bundle.test_objects.Node"
    assert describe([[[[[[[Node()]]]]]]])[0][0][0][0][0][0][0] == "Node"
    nested = {"a": {"a": {"a": {"a": {"a": {"a": Node()}}}}}}
    assert describe(nested)["a"]["a"]["a"]["a"]["a"]["a"]["class"] == "bundle.test_objects.Node"
    assert describe({"a": nested})["a"]["a"]["a"]["a"]["a"]["a"]["a"] == "Node"


# ---- the image cache --------------------------------------------------------------------------------------


@pytest.fixture
def preprocessing():
    return modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=SIZE)


def test_image_cache_names_its_pixel_file_by_the_key_and_keeps_rows(tmp_path, jsrt_images, preprocessing, caplog):
    caplog.set_level(logging.INFO, logger="bundle.data")
    images = [tmp_path / f"{i}.png" for i in range(2)]
    for src, dst in zip(jsrt_images, images):
        shutil.copy(src, dst)
    rows = read_datalist(write_datalist(tmp_path / "list.csv", images))
    rows[0]["score"], rows[1]["score"] = 1.5, 2  # numbers stay numbers, everything else is kept as text
    rows[0]["where"] = Path("/somewhere")
    cache_path = tmp_path / "images.pt"
    cache = preprocessed_images(rows, preprocessing, cache_path)
    assert cache["key"]["transforms"] == hash_json(describe(preprocessing))
    assert [p.name for p in tmp_path.glob("*.f16")] == [_pixel_file(cache_path, cache["key"]).name]
    assert _pixel_file(cache_path, cache["key"]).name == f"images.{hash_json(cache['key'])[:16]}.f16"
    assert cache["rows"][0]["score"] == 1.5 and cache["rows"][1]["score"] == 2 and cache["rows"][0]["where"] == "/somewhere"
    assert cache["rows"][0]["index"] == "0" and cache["shape"] == [2, 1, SIZE, SIZE]
    assert messages(caplog) == [f"image cache written to {cache_path}."]

    caplog.clear()
    cache["images"][0].fill_(0)  # changing the loaded images must not change the cache on disk
    again = preprocessed_images(rows, preprocessing, cache_path)
    assert float(again["images"][0].float().abs().max()) > 0.5
    assert messages(caplog) == [f"image cache {cache_path} is up to date: reusing it."]

    caplog.clear()
    shutil.copy(jsrt_images[3], images[0])
    preprocessed_images(rows, preprocessing, cache_path)
    assert messages(caplog)[0] == f"image cache {cache_path} was built from other images: rebuilding it."
    caplog.clear()
    preprocessed_images(rows, modality_preprocessing(ROOT / "configs/modality/cxr.json", image_size=16), cache_path)
    assert messages(caplog)[0] == f"image cache {cache_path} was built from other transforms: rebuilding it."
    assert len(list(tmp_path.glob("*.f16"))) == 1


# ---- the latent cache of stage 2 --------------------------------------------------------------------------


class Codec(torch.nn.Module):
    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, 2) * 2  # (N, 1, H/2, W/2)


class Dino(torch.nn.Module):
    def __init__(self, name: str = "dino-a") -> None:
        super().__init__()
        self.name, self.batches = name, []

    def fingerprint(self) -> str:
        return self.name

    def forward(self, x):
        self.batches.append(len(x))
        return torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)) + 1 / 3], 1)[:, None, :]  # (N, 1, 2)


def test_latent_cache_holds_each_images_latent_and_tokens_and_follows_its_models(tmp_path, caplog):
    from bundle.cache import encode_images, latent_cache, latent_items

    caplog.set_level(logging.INFO, logger="bundle.data")
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    image_cache = {"images": images, "rows": [{"image": f"{i}.png"} for i in range(5)],
                   "key": {"images": "i", "transforms": "t"}}
    (tmp_path / "ae.pt").write_bytes(b"autoencoder v1")
    dino = Dino()
    cache = latent_cache(image_cache, Codec(), dino, tmp_path / "ae.pt", tmp_path / "latents.pt", batch_size=2)
    assert dino.batches == [2, 2, 1], "encoded batch by batch"
    torch.testing.assert_close(cache["latents"], Codec().encode(images.float()))
    assert cache["tokens"].dtype == torch.float16 and cache["tokens"].shape == (5, 1, 2)
    torch.testing.assert_close(cache["tokens"], Dino()(images.float()).half())
    assert cache["rows"] == image_cache["rows"]
    assert cache["key"] == {"images": "i", "transforms": "t", "autoencoder": hash_file(tmp_path / "ae.pt"),
                            "dino": "dino-a"}
    items = latent_items(cache)
    assert len(items) == 5 and items[3]["context"].dtype == torch.float32
    assert torch.equal(items[3]["image"], cache["latents"][3]) and torch.equal(items[3]["context"], cache["tokens"][3].float())

    caplog.clear()
    latent_cache(image_cache, Codec(), Dino(), tmp_path / "ae.pt", tmp_path / "latents.pt")
    assert messages(caplog) == [f"latent cache {tmp_path / 'latents.pt'} is up to date: reusing it."]
    (tmp_path / "ae.pt").write_bytes(b"autoencoder v2")
    caplog.clear()
    latent_cache(image_cache, Codec(), Dino("dino-b"), tmp_path / "ae.pt", tmp_path / "latents.pt")
    assert messages(caplog)[0] == (f"latent cache {tmp_path / 'latents.pt'} was built from other autoencoder, dino: "
                                   "rebuilding it.")
    latents, tokens = encode_images(images, Codec(), Dino(), "cpu")  # the default batch holds them all
    assert latents.shape == (5, 1, 4, 4) and tokens.shape == (5, 1, 2)
