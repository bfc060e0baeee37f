"""The synthetic-augmentation experiment on a tiny setting with real JSRT images and the tiny trained generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.data import read_datalist
from bundle.errors import BundleInputError
from bundle.augmentation import (binary_labels, experiment_cells, fold_pool, paired_differences, run_experiment,
                                 stratified_pool)

from .conftest import JSRT, workflow


def labelled(ids: list[str]) -> list[dict]:
    return [{"image": str(JSRT / "images" / f"{i}.png"), "id": i, "nodule": str(int(i.startswith("JPCLN"))),
             "sex": "M" if k % 2 else "F"} for k, i in enumerate(ids)]


def test_labels_and_stratified_pools():
    rows = labelled(["JPCLN001", "JPCNN001", "JPCLN002"])
    assert binary_labels(rows, "nodule").tolist() == [1, 0, 1]
    assert binary_labels(rows, "sex", positive="M").tolist() == [0, 1, 0]
    with pytest.raises(BundleInputError, match="--positive"):
        binary_labels(rows, "sex")
    with pytest.raises(BundleInputError, match="not in the datalist"):
        binary_labels(rows, "age")
    with pytest.raises(BundleInputError, match="Every row of the datalist is negative in label column 'sex'.*check "
                                               "--positive 'm'"):  # a positive value no row has
        binary_labels(rows, "sex", positive="m")
    labels = np.array([1] * 30 + [0] * 70)
    pool = stratified_pool(labels, 10, seed=0)
    assert len(set(pool)) == 10 and labels[pool].sum() == 3 and pool == stratified_pool(labels, 10, seed=0)
    assert labels[stratified_pool(labels, 2, seed=1)].sum() == 1  # both classes even in a tiny pool
    assert stratified_pool(labels, 500, seed=0) == list(range(100))


def test_auc_of_known_scores_in_batches_of_64():
    import torch

    from bundle.augmentation import auc

    class Score(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :1]  # the image's first pixel is its score

    scores = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1)  # more than one batch of 64
    labels = (torch.arange(100) >= 60).long()
    assert auc(Score(), scores, labels) == pytest.approx(1.0)
    assert auc(Score(), -scores, labels) == pytest.approx(0.0)
    # positives at 1 and 3, negatives at 0 and 2: of 4 positive-negative pairs 3 are ranked right
    assert auc(Score(), torch.tensor([0.0, 1.0, 2.0, 3.0]).view(4, 1, 1, 1), torch.tensor([0, 1, 0, 1])) == \
        pytest.approx(0.75)


def report_only(out):
    import subprocess
    import sys

    from .conftest import ROOT

    return subprocess.run([sys.executable, "-m", "scripts.augmentation_experiment", "--train", "unused",
                           "--test", "unused", "--label", "nodule", "--out", str(out), "--report_only"],
                          capture_output=True, text=True, cwd=ROOT)


def test_report_only_tables_every_arm_on_record(tmp_path):
    records = [{"size": n, "ratio": r, "fold": f, "arm": arm, "test_auc": auc}
               for n, r, f, arm, auc in [(10, 0, 0, "real", 0.8), (10, 0, 1, "real", 0.9), (10, 5, 0, "real+synthetic", 0.7),
                                         (10, 5, 1, "real+synthetic", 0.9), (25, 0, 0, "real", 0.95),
                                         (10, 5, 0, "synthetic", 0.6)]]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = report_only(tmp_path)
    assert run.returncode == 0, run.stderr
    table = (tmp_path / "results.md").read_text()
    assert "(mean ± std over 2 folds unless a cell says otherwise)" in table
    assert "| real only | 0.850 ± 0.050 | 0.950 ± 0.000 (1 fold) |" in table
    assert "| real + synthetic 1:5 | 0.800 ± 0.100 |  |" in table
    assert "| synthetic only (1:5 of N) | 0.600 ± 0.000 (1 fold) |  |" in table
    assert (tmp_path / "augmentation_auc.png").stat().st_size > 0
    # a label column whose values are class names: the title names the positive class the run was given
    (tmp_path / "test_set.json").write_text(json.dumps({"label": "nodule", "positive": "present"}))
    assert report_only(tmp_path).returncode == 0
    assert (tmp_path / "results.md").read_text().startswith("Test AUC for `nodule = present` (mean ± std over 2 folds")
    assert {k: json.loads((tmp_path / "summary.json").read_text())[k] for k in ("label", "positive")} == {
        "label": "nodule", "positive": "present"}
    empty = tmp_path / "empty"
    empty.mkdir()
    run = report_only(empty)
    assert run.returncode == 1 and run.stderr.strip() == (f"error: no results in {empty / 'results.jsonl'}: run the "
                                                          "experiment first.")


def test_experiment_runs_end_to_end_writes_table_and_plot_and_resumes(trained_tiny, tmp_path):
    images = sorted(p.stem for p in (JSRT / "images").glob("*.png"))
    if len(images) < 20:
        pytest.skip("needs at least 20 JSRT images")
    positives, negatives = [i for i in images if i.startswith("JPCLN")], [i for i in images if i.startswith("JPCNN")]
    train, test = labelled(positives[:5] + negatives[:5]), labelled(positives[5:9] + negatives[5:9])
    wf = workflow("inference.json", "sample", {**trained_tiny})
    generation, preprocessing = wf.parser.get_parsed_content("generation"), wf.parser.get_parsed_content("preprocessing")
    out = tmp_path / "experiment"
    kwargs = dict(label="nodule", sizes=[4, 10], ratios=[1], folds=1, iterations=4)
    records = run_experiment(generation, train, test, preprocessing, output_dir=out,
                             arms=["real", "real+synthetic", "synthetic"], **kwargs)
    assert [(r["size"], r["ratio"], r["arm"]) for r in records] == [
        (4, 0, "real"), (4, 1, "real+synthetic"), (4, 1, "synthetic"), (10, 0, "real"), (10, 1, "real+synthetic"),
        (10, 1, "synthetic")]
    assert all(0 <= r["test_auc"] <= 1 and r["test_images"] == 8 and len(r["test_scores"]) == 8 for r in records)
    assert [r["synthetic_images"] for r in records] == [0, 4, 4, 0, 10, 10]
    # synthetic images come only from the pool, labels carried from their sources
    manifest = (out / "n004_fold0" / "synthetic" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 5 and all(line.split(",")[-1] in ("0", "1") for line in manifest[1:])
    table = (out / "results.md").read_text()
    assert "| real only |" in table and "synthetic only" in table and (out / "augmentation_auc.png").stat().st_size > 0
    assert "Paired difference in test AUC to real only" in table  # no classic arm yet: compared with real only
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6
    stamp = (out / "n004_fold0" / "synthetic" / "manifest.csv").stat().st_mtime_ns
    again = run_experiment(generation, train, test, preprocessing, output_dir=out,
                           arms=["real", "real+synthetic", "synthetic"], **kwargs)
    key = lambda r: (r["size"], r["ratio"], r["arm"])  # noqa: E731
    assert sorted(map(json.loads, lines), key=key) == sorted(again, key=key) and len((out / "results.jsonl").read_text().splitlines()) == 6
    assert (out / "n004_fold0" / "synthetic" / "manifest.csv").stat().st_mtime_ns == stamp
    # the classic-augmentation arms join later: only they train, on the fold's synthetic images made before
    more = run_experiment(generation, train, test, preprocessing, output_dir=out,
                          arms=["real", "real+classic", "real+synthetic", "classic+synthetic", "synthetic"], **kwargs)
    added = [(r["size"], r["ratio"], r["arm"]) for r in more if "classic" in r["arm"]]
    assert added == [(4, 0, "real+classic"), (4, 1, "classic+synthetic"), (10, 0, "real+classic"),
                     (10, 1, "classic+synthetic")]
    assert [r["synthetic_images"] for r in more if "classic" in r["arm"]] == [0, 4, 0, 10]
    assert len((out / "results.jsonl").read_text().splitlines()) == 10
    assert sorted((r for r in more if "classic" not in r["arm"]), key=key) == sorted(again, key=key)
    assert (out / "n004_fold0" / "synthetic" / "manifest.csv").stat().st_mtime_ns == stamp
    table = (out / "results.md").read_text()
    assert "| real + classic augmentation |" in table and "Paired difference in test AUC to real + classic" in table
    summary = json.loads((out / "summary.json").read_text())
    assert {(d["size"], d["arm"]) for d in summary["paired_differences"]} == {
        (n, a) for n in (4, 10) for a in ("real", "real+synthetic", "classic+synthetic", "synthetic")}
    # and every arm against real films alone, the papers' comparison, as a second table
    assert "Paired difference in test AUC to real only" in table.split("to real + classic")[1]
    assert {(d["size"], d["arm"]) for d in summary["paired_differences_to_real"]} == {
        (n, a) for n in (4, 10) for a in ("real+classic", "real+synthetic", "classic+synthetic", "synthetic")}
    # another test set or label in the same folder is refused, not mixed into these results
    with pytest.raises(BundleInputError, match="another test set"):
        run_experiment(generation, train, test[:6], preprocessing, output_dir=out, arms=["real"], **kwargs)


def test_rows_kept_elsewhere_resume_score_new_classifiers_at_once_and_remake_another_generators_cells(trained_tiny,
                                                                                                      tmp_path):
    # results=: the rows file kept with the results; score_rows: each new classifier scores the films at once;
    # generator=: the synthetic cells (rows and images) of another generator are made again, the real ones are kept
    from bundle.augmentation import generator_id

    images = sorted(p.stem for p in (JSRT / "images").glob("*.png"))
    positives, negatives = [i for i in images if i.startswith("JPCLN")], [i for i in images if i.startswith("JPCNN")]
    train, test = labelled(positives[:3] + negatives[:3]), labelled(positives[3:6] + negatives[3:6])
    unseen = labelled(positives[6:8] + negatives[6:7])
    wf = workflow("inference.json", "sample", {**trained_tiny})
    generation, preprocessing = wf.parser.get_parsed_content("generation"), wf.parser.get_parsed_content("preprocessing")
    out, rows_file, scores = tmp_path / "work", tmp_path / "record" / "rows.jsonl", tmp_path / "scores"
    models = [wf.parser.get_parsed_content(k) for k in ("autoencoder_path", "diffusion_path")]
    first_id = generator_id(*models)
    assert first_id == generator_id(*models) and [part.split(":")[0] for part in first_id.split("|")] == [
        Path(m).name for m in models]

    def run(generator):
        run_experiment(generation, train, test, preprocessing, output_dir=out, label="nodule", positive="1",
                       sizes=[4], ratios=[1], folds=1, iterations=2, arms=["real", "real+synthetic"], results=rows_file,
                       generator=generator, score_rows=unseen, scores_dir=scores, score_sizes=[4])
        return [json.loads(line) for line in rows_file.read_text().splitlines()]

    rows = run(first_id)
    assert [(r["arm"], r["generator"]) for r in rows] == [("real", None), ("real+synthetic", first_id)]
    assert not (out / "results.jsonl").exists(), "the rows go to the file given"
    assert (out / "results.md").read_text().startswith("Test AUC for `nodule = 1` (mean ± std over 1 fold unless")
    written = {p.parent.name: p.read_text().splitlines() for p in scores.glob("*/scores.csv")}
    assert sorted(written) == ["real-synthetic_r1_n4_f0", "real_r0_n4_f0"]
    assert all([line.split(",")[0] for line in v[1:]] == [r["id"] for r in unseen] for v in written.values())
    made = out / "n004_fold0" / "synthetic" / "manifest.csv"
    stamp = made.stat().st_mtime_ns
    assert run(first_id) == rows and made.stat().st_mtime_ns == stamp, "the same generator: nothing is made again"

    again = run("other.pt:0123456789abcdef")
    assert len(again) == 3 and (again[2]["arm"], again[2]["generator"]) == ("real+synthetic", "other.pt:0123456789abcdef")
    assert made.stat().st_mtime_ns != stamp and (made.parent / "generator.txt").read_text() == again[2]["generator"]


def test_cells_follow_the_arms_ratio_caps_and_fold_counts():
    cells = experiment_cells(["synthetic", "real+synthetic", "real"], [10, 25, 50], [1, 5, 50], {25: 2, 100: 1},
                             ratio_max_size={"50": 25})
    count = lambda n, arm: sorted({c[1] for c in cells if c[0] == n and c[3] == arm})  # noqa: E731
    assert count(10, "real") == [0] and count(10, "real+synthetic") == [1, 5, 50] and count(10, "synthetic") == [50]
    assert count(50, "real+synthetic") == [1, 5] and count(50, "synthetic") == [5]  # 1:50 only up to N = 25
    assert {c[2] for c in cells if c[0] == 25} == {0, 1} and {c[2] for c in cells if c[0] == 50} == {0}
    assert [c[3] for c in cells[:3]] == ["real", "real", "real+synthetic"]  # real first, both folds
    with pytest.raises(BundleInputError, match="Unknown augmentation arm"):
        experiment_cells(["real+mixup"], [10], [1], 1)
    # a costly arm only for small pools; the others at every N
    capped = experiment_cells(["real", "real+concept"], [10, 25], [1, 5], 1, arm_max_size={"real+concept": 10})
    assert capped == [(10, 0.0, 0, "real"), (10, 1.0, 0, "real+concept"), (10, 5.0, 0, "real+concept"), (25, 0.0, 0, "real")]
    with pytest.raises(BundleInputError, match="Unknown augmentation arm"):
        experiment_cells(["real"], [10], [1], 1, arm_max_size={"real+mixup": 10})
    with pytest.raises(BundleInputError, match="arm_max_size"):
        experiment_cells(["real"], [10], [1], 1, arm_max_size={"real": "ten"})
    with pytest.raises(BundleInputError, match="folds"):
        experiment_cells(["real"], [10], [1], {"ten": 5})


def test_a_concept_pool_too_small_for_a_class_is_refused_before_any_work(tmp_path):
    """JSRT nodule at N = 10 draws 6 nodule and 4 normal films: a concept of 4 films passes a minimum of 3, fails 5,
    and the refusal comes before a single image is made or classifier trained."""
    ids = sorted(p.stem for p in (JSRT / "images").glob("*.png"))
    rows = labelled([i for i in ids if i.startswith("JPCLN")][:12] + [i for i in ids if i.startswith("JPCNN")][:8])

    def generation(*args, **kwargs):
        raise AssertionError("no image may be made before the pools are checked")

    common = dict(label="nodule", sizes=[10], ratios=[1], folds=2, arms=["real", "real+concept"], learn_concept=print)
    with pytest.raises(BundleInputError, match="N = 10 .fold 0. would learn a concept from 4 films of one class, "
                                               "fewer than augmentation_concept_min_images = 5"):
        run_experiment(generation, rows, rows, None, output_dir=tmp_path / "out", concept_min_images=5, **common)
    assert not (tmp_path / "out").exists()
    # a test list of one class has no AUC: refused at once (its bootstrap would draw forever)
    with pytest.raises(BundleInputError, match="Every row of test_list is positive in label column 'nodule': pools"):
        run_experiment(generation, rows, rows[:5], None, output_dir=tmp_path / "one", **common)
    assert paired_differences([{"size": 10, "arm": a, "ratio": 0, "fold": 0, "test_scores": [0.1, 0.2]}
                               for a in ("real", "real+classic")], [1, 1]) == []
    with pytest.raises(AssertionError, match="no image may be made"):  # passes the check, then starts to work
        run_experiment(generation, rows, rows, lambda row: {"image": torch.zeros(1, 8, 8)}, output_dir=tmp_path / "ok",
                       concept_min_images=3, **common)


def test_paired_differences_find_a_real_gain_and_not_a_null_one():
    """Bootstrap over folds and test films: an arm that separates the classes better than the reference on every
    fold is significant; an arm equal to the reference up to noise is not, and its detectable difference is given."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 40)
    records = []
    for fold in range(3):
        base = labels * 1.0 + rng.normal(0, 1.0, 80)
        for arm, ratio, scores in [("real+classic", 0, base), ("real+synthetic", 1, labels * 3.0 + rng.normal(0, 1.0, 80)),
                                   ("real+concept", 1, base + rng.normal(0, 0.05, 80))]:
            records.append({"size": 10, "ratio": ratio, "fold": fold, "arm": arm, "test_scores": scores.tolist()})
    found = {d["arm"]: d for d in paired_differences(records, labels, boots=500)}
    gain, null = found["real+synthetic"], found["real+concept"]
    assert gain["significant"] and gain["difference"] > 0.15 and gain["ci95"][0] > 0
    assert not null["significant"] and null["ci95"][0] < 0 < null["ci95"][1] and abs(null["difference"]) < 0.02
    assert 0 < null["detectable"] < 0.2 and gain["folds"] == 3


def test_augment_run_id_writes_every_arm_through_monai_bundle_and_refuses_missing_settings(trained_tiny, tmp_path):
    """The user's entry point: python -m monai.bundle run augment with the augmentation overlay on a tiny generator
    and real JSRT films."""
    import subprocess
    import sys

    from .conftest import ROOT

    images = sorted(p.stem for p in (JSRT / "images").glob("*.png"))
    positives, negatives = [i for i in images if i.startswith("JPCLN")], [i for i in images if i.startswith("JPCNN")]
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    for path, ids in ((train, positives[:3] + negatives[:3]), (test, positives[3:6] + negatives[3:6])):
        rows = labelled(ids)
        path.write_text("image,nodule\n" + "".join(f"{r['image']},{r['nodule']}\n" for r in rows))
    out = tmp_path / "out"
    base = [sys.executable, "-m", "monai.bundle", "run", "augment", "--config_file",
            "['configs/inference.json','configs/augmentation.json']", "--work_dir", trained_tiny["work_dir"]]
    settings = ["--labelled_list", str(train), "--test_list", str(test), "--label", "nodule", "--augmentation_dir", str(out),
                "--pool_sizes", "[4]", "--ratios", "[1]", "--folds", "1", "--classifier_iterations", "2",
                "--arms", "['real','real+classic','real+synthetic']", "--num_inference_steps", "2"]
    run = subprocess.run(base + settings, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["real", "real+classic", "real+synthetic"] and rows[2]["synthetic_images"] == 4
    from bundle.performance import cpu_has_bf16
    assert {r["precision"] for r in rows} == {"bf16" if cpu_has_bf16() else "float32"}  # classifier_amp: auto
    assert "| real + synthetic 1:1 |" in (out / "results.md").read_text()
    # run ID score: the kept classifiers applied to other films (as to a blind set), one scores.csv per cell
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    for i in positives[6:8] + negatives[6:7]:
        (unseen / f"{i}.png").symlink_to(JSRT / "images" / f"{i}.png")
    scored = subprocess.run([*base[:4], "score", *base[5:], "--augmentation_dir", str(out), "--score_list", str(unseen),
                             "--scores_dir", str(tmp_path / "scores")], capture_output=True, text=True, cwd=ROOT)
    assert scored.returncode == 0, scored.stderr[-3000:]
    cells = sorted(p.name for p in (tmp_path / "scores").iterdir())
    assert cells == ["real-classic_r0_n4_f0", "real-synthetic_r1_n4_f0", "real_r0_n4_f0"]
    lines = (tmp_path / "scores" / "real_r0_n4_f0" / "scores.csv").read_text().splitlines()
    assert lines[0] == "id,score" and sorted(line.split(",")[0] for line in lines[1:]) == sorted(
        positives[6:8] + negatives[6:7])
    assert all(np.isfinite(float(line.split(",")[1])) for line in lines[1:])
    if cpu_has_bf16():  # cells trained in another precision are trained again, not mixed into the table
        again = subprocess.run(base + settings + ["--arms", "['real']", "--classifier_amp", "none"], capture_output=True,
                               text=True, cwd=ROOT)
        assert again.returncode == 0, again.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert [(r["arm"], r["precision"]) for r in rows[3:]] == [("real", "float32")]
    missing = subprocess.run(base + [s for s in settings if s not in ("--label", "nodule")], capture_output=True,
                             text=True, cwd=ROOT)
    assert missing.returncode != 0 and "No label column is set: give --label" in missing.stderr


def test_per_class_pools_take_n_of_each_class():
    labels = np.array([1] * 30 + [0] * 70)
    pool = stratified_pool(labels, 10, seed=0, per_class=True)
    assert len(pool) == 20 and labels[pool].sum() == 10 and pool == stratified_pool(labels, 10, seed=0, per_class=True)
    assert labels[stratified_pool(labels, 50, seed=0, per_class=True)].sum() == 30  # all of a class that has fewer


def test_concept_arms_learn_one_concept_per_class_from_the_pool_only(trained_tiny, tmp_path):
    from bundle.augmentation import concept_learner

    images = sorted(p.stem for p in (JSRT / "images").glob("*.png"))
    positives, negatives = [i for i in images if i.startswith("JPCLN")], [i for i in images if i.startswith("JPCNN")]
    if len(positives) < 9 or len(negatives) < 9:
        pytest.skip("needs at least 9 JSRT images of each class")
    train, test = labelled(positives[:7] + negatives[:7]), labelled(positives[7:9] + negatives[7:9])
    wf = workflow("inference.json", "sample", {**trained_tiny, "num_inference_steps": 2})
    get = wf.parser.get_parsed_content
    learn = concept_learner(trained_tiny, get("autoencoder_path"), get("diffusion_path"), get("generator").context_dim,
                            concept_tokens=2, concept_steps=4, concept_batch_size=4)
    out = tmp_path / "showdown"
    records = run_experiment(get("generation"), train, test, get("preprocessing"), label="nodule", output_dir=out, sizes=[5],
                             ratios=[2], folds=1, iterations=2, per_class=True, learn_concept=learn,
                             arms=["real", "real+synthetic", "real+concept", "synthetic", "concept"])
    assert [(r["arm"], r["real_images"], r["synthetic_images"]) for r in records] == [
        ("real", 10, 0), ("real+synthetic", 10, 20), ("real+concept", 10, 20), ("synthetic", 0, 20), ("concept", 0, 20)]
    fold = out / "n005_fold0" / "concept"
    labels = binary_labels(train, "nodule")
    pool = fold_pool(labels, 5, 0, per_class=True)  # the experiment's pool of fold 0
    for cls in (1, 0):
        learned_from = (fold / "concepts" / f"class{cls}.csv").read_text().splitlines()[1:]
        assert learned_from == [train[i]["image"] for i in pool if labels[i] == cls]
        assert (fold / "concepts" / f"class{cls}.safetensors").stat().st_size < 1 << 20
        manifest = read_datalist(fold / f"class{cls}" / "manifest.csv")
        assert len(manifest) == 10 and {m["nodule"] for m in manifest} == {str(cls)} and {m["strategy"] for m in manifest} == {"concept"}
    assert "| real + concept images 1:2 |" in (out / "results.md").read_text()
    # a concept is learned against one generator: with another, the concept cell is learned and sampled anew
    learned = (fold / "concepts" / "class1.safetensors").stat().st_mtime_ns
    again = run_experiment(get("generation"), train, test, get("preprocessing"), label="nodule", output_dir=out,
                           sizes=[5], ratios=[2], folds=1, iterations=2, per_class=True, learn_concept=learn,
                           arms=["real", "real+concept"], generator="other.pt:0123456789abcdef")
    assert [r["generator"] for r in again] == [None, "other.pt:0123456789abcdef"]
    assert (fold / "concepts" / "class1.safetensors").stat().st_mtime_ns != learned
    assert (fold / "generator.txt").read_text() == "other.pt:0123456789abcdef"


def test_classic_augmentation_changes_every_batch_it_trains_on_within_range():
    """The classic-augmentation baseline changes the real films the classifier sees (new draws each batch, same
    shape and [0, 1] range), is reproducible from its seed, and train_classifier really applies it."""
    from monai.transforms import LoadImage, Resize

    from bundle.augmentation import classic_augmentation, train_classifier

    from .conftest import require

    files = sorted(require(JSRT / "images").glob("*.png"))[:4]
    films = torch.stack([Resize((32, 32))(LoadImage(image_only=True, ensure_channel_first=True)(str(f))) for f in files])
    films = (films - films.amin()) / (films.amax() - films.amin())
    augment = classic_augmentation(seed=0)
    first, second = augment(films), augment(films)
    assert first.shape == films.shape and 0 <= float(first.amin()) and float(first.amax()) <= 1
    assert not torch.equal(first, films) and not torch.equal(first, second)  # changed, and drawn again each time
    assert torch.equal(classic_augmentation(seed=0)(films), first)  # the same seed, the same draws
    seen = []

    def recording(batch):
        out = augment(batch)
        seen.append((batch.clone(), out.clone()))
        return out

    train_classifier(films, torch.tensor([0, 1, 0, 1]), seed=0, iterations=2, batch_size=4, augment=recording)
    assert len(seen) == 2 and all(not torch.equal(a, b) for a, b in seen)


def test_classifiers_train_under_bf16_autocast_when_asked_and_keep_float32_weights():
    from bundle.augmentation import make_classifier, train_classifier
    from bundle.performance import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("bf16 training needs a CPU with bf16 instructions")
    from monai.networks.nets import DenseNet

    seen = []
    forward = DenseNet.forward

    def recording(self, x):
        out = forward(self, x)
        seen.append(out.dtype)
        return out

    films, labels = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    try:
        DenseNet.forward = recording
        model = train_classifier(films, labels, seed=0, iterations=2, batch_size=4, dtype=torch.bfloat16)
        assert seen == [torch.bfloat16] * 2 and all(p.dtype == torch.float32 for p in model.parameters())
        seen.clear()
        plain = train_classifier(films, labels, seed=0, iterations=2, batch_size=4)
        assert seen == [torch.float32] * 2
    finally:
        DenseNet.forward = forward
    assert type(model) is type(plain) is type(make_classifier())
