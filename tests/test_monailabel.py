"""The MONAI Label app (apps/monailabel) served by a real MONAI Label server on loopback, called over its REST API."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, jsrt_datalist, run_bundle, tiny_settings, write_datalist

pytest.importorskip("monailabel", reason="MONAI Label is not installed: install it as the README's MONAI Label "
                                         "section says (CI does)")
requests = pytest.importorskip("requests")
from PIL import Image  # noqa: E402

STRUCTURES = ["mask_left_lung", "mask_heart"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Tiny models trained on real JSRT images, a studies folder of three JSRT films, and the server running on them."""
    tmp = tmp_path_factory.mktemp("monailabel")
    train, rows = jsrt_datalist(tmp)
    heads = {"dataset_dir": str(write_datalist(tmp / "images.csv", [r["image"] for r in rows[:6]])),
             "work_dir": str(tmp / "heads"), "image_size": 32, "denoiser_channels": [8, 16],
             "denoiser_attention_levels": [False, True], "denoiser_head_channels": 8, "denoiser_epochs": 1,
             "denoiser_batch_size": 3, "labelled_dir": str(train), "num_labelled": 3,
             "head_iterations": 4, "head_batch_size": 2}
    run_bundle("heads/pretrain.json", "training", heads)
    run_bundle("heads/segmentation.json", "training", {**heads, "structures": STRUCTURES})
    run_bundle("heads/landmarks.json", "training", {**heads, "landmark_groups": ["RL", "H"]})
    generator = tiny_settings(tmp / "generator", write_datalist(tmp / "gen.csv", [r["image"] for r in rows[:8]]))
    run_bundle("train.json", "training", generator)
    concept_images = str(write_datalist(tmp / "concept.csv", [r["image"] for r in rows[:6]]))
    run_bundle("concept.json", "learn_concept", {"work_dir": str(tmp / "generator"), "concept_images": concept_images,
                                                 "concept_name": "jsrt", "concept_steps": 4, "concept_batch_size": 3})
    studies = tmp / "studies"
    studies.mkdir()
    for row in rows[10:13]:
        shutil.copy(row["image"], studies)
    port = free_port()
    log = open(tmp / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "apps/monailabel"),
         "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "heads_dir", str(tmp / "heads"),
         "--conf", "generator_dir", str(tmp / "generator"), "--conf", "structures", ",".join(STRUCTURES),
         "--conf", "sample_steps", "4", "--conf", "train_iterations", "3"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if requests.get(f"{url}/info/", timeout=5).ok:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"the MONAI Label server did not start: {(tmp / 'server.log').read_text()[-3000:]}")
        time.sleep(1)
    yield {"url": url, "rows": rows[10:13], "tmp": tmp, "heads": tmp / "heads"}
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text[:500]
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_info_lists_every_task_and_the_datastore_the_studies(server):
    url = server["url"]
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert sorted(info["models"]) == ["generation", "landmarks", "segmentation", "zero_shot_lungs"]
    assert info["models"]["segmentation"]["labels"] == {"left_lung": 1, "heart": 2}
    method = json.loads((ROOT / "configs/heads/zero_shot.json").read_text())["zero_shot_method"]
    assert method in info["models"]["zero_shot_lungs"]["description"]  # says what it serves
    assert list(info["trainers"]) == ["segmentation"]
    datastore = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert sorted(datastore["objects"]) == sorted(Path(r["image"]).stem for r in server["rows"])


def test_infer_tasks_return_masks_points_and_images_in_the_study_frame(server):
    url, image_id = server["url"], Path(server["rows"][0]["image"]).stem
    size = Image.open(server["rows"][0]["image"]).size[::-1]
    label = png(requests.post(f"{url}/infer/segmentation", params={"image": image_id, "output": "image"}, timeout=300))
    assert label.shape == size and set(np.unique(label)) <= {0, 1, 2}
    summary = requests.post(f"{url}/infer/segmentation", params={"image": image_id, "output": "json"}, timeout=300).json()
    assert summary["label_names"] == {"left_lung": 1, "heart": 2}
    assert summary["pixels"]["heart"] == int((label == 2).sum())
    points = requests.post(f"{url}/infer/landmarks", params={"image": image_id, "output": "json"}, timeout=300).json()
    assert list(points["landmarks"]) == ["RL", "H"] and len(points["landmarks"]["RL"]) == 44
    assert all(-1 <= v <= max(size) for p in points["landmarks"]["RL"] for v in p)
    lungs = png(requests.post(f"{url}/infer/zero_shot_lungs", params={"image": image_id, "output": "image"}, timeout=300))
    assert lungs.shape == size and set(np.unique(lungs)) <= {0, 1} and lungs.any()
    synthetic = png(requests.post(f"{url}/infer/generation", params={"image": image_id, "output": "image"}, timeout=300))
    assert synthetic.shape == size and synthetic.std() > 0  # generated at 32 px, answered at the study's size
    # a learned concept instead of the study's embedding (the request's params choose the strategy)
    concept = {"strategy": "concept", "strategy_params": {"concept": {"concepts": {"jsrt": 1.0}}}}
    from_concept = png(requests.post(f"{url}/infer/generation", params={"image": image_id, "output": "image"},
                                     data={"params": json.dumps(concept)}, timeout=300))
    record = requests.post(f"{url}/infer/generation", params={"image": image_id, "output": "json"},
                           data={"params": json.dumps(concept)}, timeout=300).json()
    assert from_concept.shape == size and record["strategy"] == "concept"
    assert record["generated_size"] == [32, 32] and record["returned_size"] == list(size)


def test_monai_label_own_client_decodes_every_task_and_hears_404_for_an_unknown_trainer(server):
    """MONAILabelClient, as a viewer plug-in calls the server: every infer answer decodes (points as a dict, not
    undecoded bytes), and an unknown trainer is refused before anything is queued."""
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    client = MONAILabelClient(server["url"])
    image_id = Path(server["rows"][0]["image"]).stem
    size = Image.open(server["rows"][0]["image"]).size[::-1]
    assert sorted(client.info()["models"]) == ["generation", "landmarks", "segmentation", "zero_shot_lungs"]
    points_file, points = client.infer("landmarks", image_id, {})
    assert isinstance(points, dict) and list(points["landmarks"]) == ["RL", "H"]
    assert json.loads(Path(points_file).read_text()) == points["landmarks"]
    for task, values in (("segmentation", {0, 1, 2}), ("zero_shot_lungs", {0, 1})):
        label_file, result = client.infer(task, image_id, {})
        label = np.asarray(Image.open(label_file))
        assert isinstance(result, dict) and label.shape == size and set(np.unique(label)) <= values
        if task == "zero_shot_lungs":  # the answer names the UNet and the method that made the mask: the served ones
            served = json.loads((ROOT / "configs/heads/zero_shot.json").read_text())
            assert result["settings"]["model"] == served["zero_shot_model"] == "denoiser"
            assert [result["settings"][k] for k in ("method", "lung_threshold", "lung_scale")] == [
                served[k] for k in ("zero_shot_method", "lung_threshold", "lung_scale")]
    image_file, result = client.infer("generation", image_id, {})
    assert np.asarray(Image.open(image_file)).shape == size and result["generated_size"] == [32, 32]
    # the server deletes each answer file after sending it; the client, beside it on this machine, saved its copies
    # in the same temporary folder under the answer's file name: they must outlive the server's clean-up
    client.info()
    time.sleep(1.0)
    assert all(Path(f).is_file() for f in (points_file, label_file, image_file))
    with pytest.raises(MONAILabelClientException, match="Status: 404.*no_such_trainer"):
        client.train_start("no_such_trainer", {})
    assert client.train_status(check_if_running=True) is False  # nothing was queued


def test_bad_requests_get_a_clear_http_error_and_the_server_keeps_running(server, tmp_path):
    url, image_id = server["url"], Path(server["rows"][0]["image"]).stem
    unknown = requests.post(f"{url}/infer/lungs3d", params={"image": image_id, "output": "json"}, timeout=60)
    assert unknown.status_code == 404 and "lungs3d" in unknown.text and "segmentation" in unknown.text
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(flat)
    with open(flat, "rb") as f:
        refused = requests.post(f"{url}/infer/segmentation", params={"output": "json"}, files={"file": f}, timeout=60)
    assert refused.status_code == 422 and "constant image" in refused.json()["detail"]
    concept = {"strategy": "concept", "strategy_params": {"concept": {"concepts": {"pneumothorax": 1.0}}}}
    missing = requests.post(f"{url}/infer/generation", params={"image": image_id, "output": "image"},
                            data={"params": json.dumps(concept)}, timeout=60)
    assert missing.status_code == 422 and "pneumothorax" in missing.json()["detail"]
    no_labels = requests.post(f"{url}/train/segmentation", params={"run_sync": True}, json={}, timeout=60)
    assert no_labels.status_code == 422 and "PUT /datastore/label" in no_labels.json()["detail"]
    assert requests.get(f"{url}/info/", timeout=30).ok


def test_the_server_reads_and_writes_only_inside_its_datastore_and_refuses_bad_labels(server, tmp_path):
    import tempfile

    url, row = server["url"], server["rows"][0]
    image_id = Path(row["image"]).stem
    outside = server["tmp"] / "images.csv"  # a file on the server's disk, outside the studies folder
    for image in (row["image"], str(outside), "../../../../etc/passwd"):  # the first: the same film, by its path
        answer = requests.post(f"{url}/infer/segmentation", params={"image": image, "output": "json"}, timeout=60)
        assert answer.status_code == 404, (image, answer.text[:300])
    assert "not an image of this server's datastore" in requests.post(
        f"{url}/infer/segmentation", params={"image": row["image"], "output": "json"}, timeout=60).json()["detail"]

    height, width = np.asarray(Image.open(row["image"])).shape[:2]
    good = np.zeros((height, width), np.uint8)
    cases = {"garbage": (b"not an image", "final", 422, "is not a readable image"),
             "small": (np.zeros((height // 2, width), np.uint8), "final", 422, "save a grey label map of the study's size"),
             "values": (np.full((height, width), 9, np.uint8), "final", 422, "values [9] that name no structure"),
             "traversal": (good, "../../../../escaped", 422, "is not a plain name")}
    stray = sorted(Path(tempfile.gettempdir()).glob("tmp*.refused.png"))
    for name, (content, tag, status, message) in cases.items():
        path = tmp_path / f"{name}.refused.png"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            Image.fromarray(content).save(path)
        with open(path, "rb") as f:
            answer = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": tag},
                                  files={"label": (path.name, f)}, timeout=60)
        assert answer.status_code == status and message in answer.json()["detail"], (name, answer.text[:300])
    assert sorted(Path(tempfile.gettempdir()).glob("tmp*.refused.png")) == stray, "a refused upload leaves no file"
    assert not list(server["tmp"].rglob("escaped")) and not list(server["tmp"].parent.rglob("escaped"))
    labels = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"][image_id]
    assert not labels.get("labels"), "nothing was saved"


def save_true_label(url: str, row: dict, folder: Path) -> None:
    """The study's true masks as one label map, saved with tag final, as an annotator would."""
    masks = [np.asarray(Image.open(row[c])) > 0 for c in STRUCTURES]
    label = np.zeros(masks[0].shape, np.uint8)
    for value, mask in enumerate(masks, start=1):
        label[mask] = value
    path = folder / "label.png"
    Image.fromarray(label).save(path)
    with open(path, "rb") as f:
        saved = requests.put(f"{url}/datastore/label", params={"image": Path(row["image"]).stem, "tag": "final"},
                             files={"label": ("label.png", f)}, timeout=60)
    assert saved.status_code == 200, saved.text


def test_train_fine_tunes_the_head_on_a_saved_label_and_inference_uses_it(server, tmp_path):
    url = server["url"]
    save_true_label(url, server["rows"][1], tmp_path)
    head = server["heads"] / "models" / "heads" / "segmentation.pt"
    before = head.stat().st_mtime_ns
    stats = requests.post(f"{url}/train/segmentation", params={"run_sync": True}, json={"iterations": 3},
                          timeout=600).json()
    assert stats["images"] == 1 and stats["iterations"] == 3 and np.isfinite(stats["final_loss"])
    assert stats["lr"] == 0.001  # head_recipe's learning rate for one labelled film
    assert head.stat().st_mtime_ns > before
    assert not list(head.parent.glob(".segmentation.pt.*"))  # nothing half-written beside it
    # the head trained before is kept beside it (one version), with its record; the new record is portable
    from bundle.models import read_record

    previous = read_record(head.parent / "segmentation.previous.pt", "head", "x")
    assert previous["record"]["task"] == "segmentation" and stats["previous_head"].endswith("segmentation.previous.pt")
    assert read_record(head, "head", "x")["record"]["pretrained"] == "models/heads/denoiser.pt"
    image_id = Path(server["rows"][2]["image"]).stem
    after = png(requests.post(f"{url}/infer/segmentation", params={"image": image_id, "output": "image"}, timeout=300))
    assert set(np.unique(after)) <= {0, 1, 2}


def test_zero_shot_task_reads_the_generator_when_the_app_is_told_to(server):
    """--conf zero_shot_model generator: the task reads the generator's work dir and says so in its answer."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("dinodiffusion_app", ROOT / "apps/monailabel/main.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    import dinodiffusion_tasks as tasks

    assert tasks.config_default("heads/zero_shot.json", "zero_shot_model") in app.ZERO_SHOT
    where = SimpleNamespace(heads_dir=str(server["heads"]), generator_dir=str(server["tmp"] / "generator"))
    work_dir, model, remedy = app.ZERO_SHOT["generator"](where)
    task = tasks.BundleInfer("heads/zero_shot.json", "inference", work_dir, model, remedy, "segmentation",
                             {"lungs": 1}, "zero-shot lungs", tasks.lung_mask, {"zero_shot_model": "generator"})
    assert task.is_valid()
    label_file, result = task({"image": str(server["rows"][0]["image"]), "model": "zero_shot_lungs"})
    label = np.asarray(Image.open(label_file))
    assert label.shape == Image.open(server["rows"][0]["image"]).size[::-1] and set(np.unique(label)) <= {0, 1}
    assert result["settings"]["model"] == "generator" and result["settings"]["model_path"].endswith("models/model.pt")


def test_a_task_without_its_model_is_hidden_and_answers_503_naming_what_to_train(tmp_path):
    from fastapi import HTTPException

    sys.path.insert(0, str(ROOT / "apps/monailabel/lib"))
    import dinodiffusion_tasks as tasks

    task = tasks.BundleInfer("heads/zero_shot.json", "inference", str(tmp_path), "denoiser", "pre-train it first",
                             "segmentation", {"lungs": 1}, "zero-shot lungs", tasks.lung_mask)
    assert not task.is_valid()
    image = tmp_path / "film.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8)).save(image)
    with pytest.raises(HTTPException) as err:
        task({"image": str(image), "model": "zero_shot_lungs"})
    assert err.value.status_code == 503 and "pre-train it first" in err.value.detail
    with pytest.raises(HTTPException) as err:
        task({"image": str(tmp_path / "missing.png"), "model": "zero_shot_lungs"})
    assert err.value.status_code == 404


def test_a_synchronous_training_does_not_hold_up_inference(server, tmp_path):
    """MONAI Label runs a run_sync training inside its event loop (every request waits for it); the app serves that
    path off the loop, so an /infer sent during a training is answered while the training still runs."""
    import threading

    url, image_id = server["url"], Path(server["rows"][2]["image"]).stem
    save_true_label(url, server["rows"][1], tmp_path)
    infer = {"image": image_id, "output": "json"}
    start = time.perf_counter()
    assert requests.post(f"{url}/infer/zero_shot_lungs", params=infer, timeout=300).ok
    idle = time.perf_counter() - start
    done = {}

    def train():
        t0 = time.perf_counter()
        done["answer"] = requests.post(f"{url}/train/segmentation", params={"run_sync": True},
                                       json={"iterations": 400}, timeout=900)
        done["seconds"] = time.perf_counter() - t0

    worker = threading.Thread(target=train)
    worker.start()
    time.sleep(3)  # the training is under way
    start = time.perf_counter()
    answer = requests.post(f"{url}/infer/zero_shot_lungs", params=infer, timeout=900)
    during = time.perf_counter() - start
    still_training = worker.is_alive()
    worker.join()
    print(f"/infer idle {idle:.1f} s, during a synchronous training {during:.1f} s; the training {done['seconds']:.1f} s")
    assert answer.ok and done["answer"].ok, done["answer"].text[:300]
    assert still_training, (f"/infer took {during:.1f} s during a {done['seconds']:.1f} s training (idle {idle:.1f} s): "
                            "it waited for the training")
