"""Checkpoints that survive kills: exact resume of every stage, atomic writes, unreadable files skipped, pruning
across restarts, and no non-finite state ever saved."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.checkpoints import AtomicCheckpointSaver, NonFiniteLossGuard, ResumeFromCheckpoint, checkpoint_files
from bundle.errors import BundleInputError

from .conftest import run_bundle, tiny_settings, workflow

STAGES = {  # run ID, state entry, stages to run first
    "autoencoder": ("train_autoencoder", "ae_state", ()),
    "diffusion": ("train_diffusion", "diffusion_state", ("train_autoencoder", "cache")),
    "dino": ("train_dino", "dino_state", ()),
}


def _flat(state_dict, prefix=""):
    """Every tensor of a (nested) state dict, by path."""
    out = {}
    for key, value in state_dict.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)) and key == "param_groups":
            continue
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_restores_every_weight_of_the_last_checkpoint(stage, tmp_path, tiny_dataset):
    run_id, state_key, before = STAGES[stage]
    settings = {**tiny_settings(tmp_path, tiny_dataset), "ae_epochs": 1, "diffusion_epochs": 3, "dino_epochs": 3,
                "dino_batch_size": 4, "num_local_crops": 2}
    for earlier in before:
        run_bundle("train.json", earlier, settings)
    settings = {**settings, "ae_epochs": 3, "torch_threads": 1}  # each stage's run ID applies the thread setting
    wf = workflow("train.json", run_id, settings)
    trainer = wf.parser.get_parsed_content(state_key)["trainer"]
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        wf.run()
    files = checkpoint_files(tmp_path / "models/checkpoints" / stage)
    assert [f.name for f in files] == [f"{stage}_checkpoint_epoch=1.pt"]
    saved = torch.load(files[0], weights_only=True)

    wf = workflow("train.json", run_id, settings)
    state = wf.parser.get_parsed_content(state_key)
    compared = []

    def compare(engine):  # after the resume handler, before the first step changes anything
        if compared:
            return
        threads.append(torch.get_num_threads())
        for key, obj in state.items():
            if key == "trainer":
                # Ignite has counted the new epoch and iteration by now
                assert engine.state.epoch == 2 and engine.state.iteration == saved["trainer"]["iteration"] + 1
                continue
            now, then = _flat(obj.state_dict()), _flat(saved[key])
            assert now.keys() == then.keys(), key
            for name in now:
                torch.testing.assert_close(now[name], then[name], msg=f"{key}.{name} differs after resume")
            compared.append(key)

    state["trainer"].add_event_handler(Events.ITERATION_STARTED, compare)
    threads, before_run = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        wf.run()
    finally:
        torch.set_num_threads(before_run)
    assert threads == [1], f"{run_id} trained on {threads} threads with torch_threads 1"
    expected = {"autoencoder": {"autoencoder", "discriminator", "ae_optimizer", "d_optimizer"},
                "diffusion": {"unet", "optimizer", "ema"},
                "dino": {"student", "teacher", "optimizer", "dino_loss"}}[stage]
    assert expected <= set(compared)


def _engine(model, epochs_seen):
    def step(engine, batch):
        model.weight.data += 1.0
        return {"loss": torch.tensor(1.0)}

    engine = Engine(step)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_seen.append(e.state.epoch))
    return engine


def test_an_unreadable_newest_checkpoint_is_skipped_and_old_ones_are_pruned(tmp_path, caplog):
    model = torch.nn.Linear(2, 2)
    state = {"model": model}
    seen: list[int] = []
    engine = _engine(model, seen)
    state["trainer"] = engine
    AtomicCheckpointSaver(tmp_path, state, "stage", n_saved=1).attach(engine)
    engine.run(range(2), max_epochs=2)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["stage_checkpoint_epoch=2.pt"]
    good = model.weight.detach().clone()
    (tmp_path / "stage_checkpoint_epoch=3.pt").write_bytes(b"")  # a kill during a write, with in-place saving
    (tmp_path / "stage_checkpoint_epoch=4.pt").write_bytes(
        (tmp_path / "stage_checkpoint_epoch=2.pt").read_bytes()[:100])  # truncated

    model2 = torch.nn.Linear(2, 2)
    seen2: list[int] = []
    engine2 = _engine(model2, seen2)
    state2 = {"model": model2, "trainer": engine2}
    ResumeFromCheckpoint(tmp_path, state2, "stage").attach(engine2)
    resumed = []
    engine2.add_event_handler(Events.STARTED, lambda e: resumed.append(model2.weight.detach().clone()))
    AtomicCheckpointSaver(tmp_path, state2, "stage", n_saved=1).attach(engine2)
    with caplog.at_level(logging.WARNING):
        engine2.run(range(2), max_epochs=5)
    assert torch.equal(resumed[0], good) and seen2 == [3, 4, 5]
    assert "Skipping checkpoint" in caplog.text and "epoch=4.pt" in caplog.text and "epoch=3.pt" in caplog.text
    # across the restart, only the newest epoch is kept: the broken files and epoch 2 are gone
    assert [p.name for p in tmp_path.iterdir()] == ["stage_checkpoint_epoch=5.pt"]


def test_a_failed_checkpoint_write_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    engine = _engine(model, [])
    state = {"model": model, "trainer": engine}
    AtomicCheckpointSaver(tmp_path, state, "stage", n_saved=1).attach(engine)
    engine.run(range(1), max_epochs=1)
    before = (tmp_path / "stage_checkpoint_epoch=1.pt").read_bytes()
    real_save = torch.save

    def dies_mid_write(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(10)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        engine.run(range(1), max_epochs=2)
    assert [p.name for p in tmp_path.iterdir()] == ["stage_checkpoint_epoch=1.pt"]
    assert (tmp_path / "stage_checkpoint_epoch=1.pt").read_bytes() == before


def test_a_foreign_checkpoint_is_refused_with_the_key_that_differs(tmp_path):
    torch.save({"model": torch.nn.Linear(3, 3).state_dict(), "trainer": {"epoch": 1, "iteration": 1,
                "epoch_length": 1, "max_epochs": 1}}, tmp_path / "stage_checkpoint_epoch=1.pt")
    model = torch.nn.Linear(2, 2)
    engine = _engine(model, [])
    ResumeFromCheckpoint(tmp_path, {"model": model, "trainer": engine}, "stage").attach(engine)
    with pytest.raises(BundleInputError, match=r"stage_checkpoint_epoch=1.pt' does not fit this stage's networks "
                                                r"\(.*weight.*\): .*delete"):
        engine.run(range(1), max_epochs=3)


def test_non_finite_losses_and_weights_stop_the_stage_and_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)

    def step(engine, batch):
        if engine.state.iteration == 3:
            model.weight.data[0, 0] = float("nan")
            return {"loss": torch.tensor(float("nan"))}
        return {"loss": torch.tensor(1.0)}

    engine = Engine(step)
    state = {"model": model, "trainer": engine}
    NonFiniteLossGuard("autoencoder").attach(engine)
    AtomicCheckpointSaver(tmp_path, state, "autoencoder").attach(engine)
    data = [{"image": torch.zeros(1), "source": ["a.png", "b.png"]}] * 2
    with pytest.raises(BundleInputError, match=r"autoencoder: the loss is nan at iteration 3, epoch 2 "
                                                r"\(batch files: a.png, b.png\)"):
        engine.run(data, max_epochs=3)
    assert [p.name for p in tmp_path.iterdir()] == ["autoencoder_checkpoint_epoch=1.pt"]
    # weights that went non-finite without a NaN loss are refused by the saver itself
    with pytest.raises(BundleInputError, match=r"model: the weights became non-finite by epoch .*model.weight"):
        AtomicCheckpointSaver(tmp_path, {"model": model}, "model")(engine)


def test_a_temporary_file_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path):
    from bundle.io import atomic_write

    target = tmp_path / "stage_checkpoint_epoch=3.pt"
    leftover = tmp_path / ".stage_checkpoint_epoch=3.pt.abc123.tmp"  # what SIGKILL during a write leaves
    leftover.write_bytes(b"partial")
    other = tmp_path / ".other.pt.abc123.tmp"
    other.write_bytes(b"another file's write")
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"done"))
    assert target.read_bytes() == b"done" and not leftover.exists() and other.exists()


def test_checkpoint_files_are_ordered_by_epoch_number_and_filtered_by_stage(tmp_path):
    assert checkpoint_files(tmp_path / "absent") == []
    for name in ("stage_checkpoint_epoch=10.pt", "stage_checkpoint_epoch=9.pt", "stage_checkpoint_epoch=2.pt.tmp",
                 "other_checkpoint_epoch=5.pt", "stage_notes.txt", "stagex_checkpoint_epoch=1.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in checkpoint_files(tmp_path, "stage")] == ["stage_checkpoint_epoch=9.pt",
                                                                     "stage_checkpoint_epoch=10.pt"]
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "stagex_checkpoint_epoch=1.pt", "other_checkpoint_epoch=5.pt", "stage_checkpoint_epoch=9.pt",
        "stage_checkpoint_epoch=10.pt"]


@pytest.mark.parametrize("n_saved, kept", [(2, [3, 4]), (0, [4]), (1, [4])])
def test_the_saver_keeps_the_newest_epochs_of_its_own_stage_only(tmp_path, n_saved, kept):
    (tmp_path / "other_checkpoint_epoch=1.pt").write_bytes(b"another stage")
    model = torch.nn.Linear(2, 2)
    engine = _engine(model, [])
    AtomicCheckpointSaver(tmp_path, {"model": model, "trainer": engine}, "stage", n_saved=n_saved).attach(engine)
    engine.run(range(1), max_epochs=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["other_checkpoint_epoch=1.pt"] + [f"stage_checkpoint_epoch={e}.pt" for e in kept])
    saved = torch.load(tmp_path / "stage_checkpoint_epoch=4.pt", weights_only=True)
    assert torch.equal(saved["model"]["weight"], model.weight) and saved["trainer"]["iteration"] == 4


def test_non_finite_weights_are_named_whole(tmp_path):
    model = torch.nn.Linear(2, 2)
    engine = _engine(model, [])
    engine.state.epoch = 7
    model.weight.data[0, 0] = float("inf")
    with pytest.raises(BundleInputError) as err:
        AtomicCheckpointSaver(tmp_path, {"net": model}, "unet")(engine)
    assert str(err.value) == (
        "unet: the weights became non-finite by epoch 7 (net.weight); nothing was saved for this epoch: check the "
        "images for NaN values and lower the learning rate, then run the same command to resume from the last good "
        "epoch.")
    model.bias.data[1] = float("nan")
    with pytest.raises(BundleInputError, match=r"by epoch 7 \(net\.weight and more\); nothing"):
        AtomicCheckpointSaver(tmp_path, {"net": model}, "unet")(engine)
    assert list(tmp_path.iterdir()) == []


class _Pickled:  # an object a weights-only load refuses
    pass


def _resume(folder, prefix="stage", max_epochs=4):
    """Resume a fresh Linear(2, 2) from ``folder``; returns (resume handler, epochs run, model)."""
    seen: list[int] = []
    model = torch.nn.Linear(2, 2)
    engine = _engine(model, seen)
    resume = ResumeFromCheckpoint(folder, {"model": model, "trainer": engine}, prefix)
    resume.attach(engine)
    engine.run(range(1), max_epochs=max_epochs)
    return resume, seen, model


def _good_checkpoint(folder, epoch=2, name="stage"):
    model = torch.nn.Linear(2, 2)
    engine = _engine(model, [])
    AtomicCheckpointSaver(folder, {"model": model, "trainer": engine}, name).attach(engine)
    engine.run(range(1), max_epochs=epoch)
    return model


def test_resume_keeps_the_asked_epochs_and_refuses_a_checkpoint_beyond_them(tmp_path):
    _good_checkpoint(tmp_path, epoch=3)
    resume, seen, _ = _resume(tmp_path, max_epochs=5)  # the checkpoint says 3 epochs; 5 are asked for
    assert seen == [4, 5] and resume.loaded == tmp_path / "stage_checkpoint_epoch=3.pt"
    with pytest.raises(BundleInputError) as err:
        _resume(tmp_path, max_epochs=2)
    assert str(err.value) == (f"Checkpoint '{tmp_path / 'stage_checkpoint_epoch=3.pt'}' is at epoch 3, beyond the 2 "
                              "epochs asked for: give more epochs, or delete the checkpoints to train anew.")


@pytest.mark.parametrize("output, batch, tail", [
    ({"loss": torch.tensor(float("inf"))}, {"image": 0}, ""),
    ({"loss": torch.tensor(float("nan"))}, torch.zeros(2), ""),  # a batch that is not a dict: no file names
    ({"loss": torch.tensor(float("nan"))}, {"source": ["a", "b", "c", "d"]}, " (batch files: a, b, c, d)"),
    (torch.tensor(float("nan")), {"source": ["a", "b", "c", "d", "e"]}, " (batch files: a, b, c, d, ...)"),
])
def test_the_loss_guard_names_the_stage_iteration_and_files(output, batch, tail):
    engine = Engine(lambda e, b: output)
    NonFiniteLossGuard("dino").attach(engine)
    with pytest.raises(BundleInputError) as err:
        engine.run([batch], max_epochs=1)
    value = float(output["loss"] if isinstance(output, dict) else output)
    assert str(err.value) == (
        f"dino: the loss is {value} at iteration 1, epoch 1{tail}; nothing of this epoch was saved: check those "
        "images for NaN or constant values and lower the learning rate, then run the same command to resume from "
        "the last good epoch.")


def test_the_loss_guard_lets_finite_and_non_numeric_outputs_pass():
    for output in ({"loss": torch.tensor(0.5)}, {"images": [1, 2]}, "text", None):
        engine = Engine(lambda e, b, out=output: out)
        NonFiniteLossGuard("stage").attach(engine)
        engine.run([0, 1], max_epochs=2)
        assert engine.state.iteration == 4


@pytest.mark.parametrize("content, reason", [
    ([1, 2], "ValueError: holds <class 'list'>, not ['model', 'trainer']"),
    ({"model": {}}, "ValueError: holds ['model'], not ['model', 'trainer']"),
    ({"model": {}, "trainer": {}, "extra": _Pickled()}, "UnpicklingError: "),
    (b"", "EOFError: "),
])
def test_each_unreadable_checkpoint_is_skipped_with_one_warning_naming_why(tmp_path, caplog, content, reason):
    good = _good_checkpoint(tmp_path, epoch=2)
    bad = tmp_path / "stage_checkpoint_epoch=3.pt"
    bad.write_bytes(content) if isinstance(content, bytes) else torch.save(content, bad)
    with caplog.at_level(logging.WARNING, logger="bundle.checkpoints"):
        resume, seen, model = _resume(tmp_path)
    assert resume.loaded == tmp_path / "stage_checkpoint_epoch=2.pt" and seen == [3, 4]
    assert torch.equal(model.weight, good.weight + 2.0)  # epoch 2's weights, then two more epochs of +1
    (message,) = [r.getMessage() for r in caplog.records if r.name == "bundle.checkpoints"]
    assert message.startswith(f"Skipping checkpoint {bad}: it cannot be read ({reason}")
    assert message.endswith("); trying the one before it.")
    if reason == "EOFError: ":
        assert message == f"Skipping checkpoint {bad}: it cannot be read (EOFError: empty); trying the one before it."


def test_resume_ignores_other_stages_and_a_finished_stage_runs_no_more_epochs(tmp_path, caplog):
    _good_checkpoint(tmp_path, epoch=9, name="other")
    with caplog.at_level(logging.WARNING, logger="bundle.checkpoints"):
        resume, seen, _ = _resume(tmp_path)  # only another stage's file: this stage starts from its first epoch
    assert resume.loaded is None and seen == [1, 2, 3, 4] and not caplog.records  # and nothing to warn about
    for f in tmp_path.glob("stage_*"):
        f.unlink()
    _good_checkpoint(tmp_path, epoch=3)
    resume, seen, _ = _resume(tmp_path, max_epochs=3)  # at the asked epochs already: nothing to do, no error
    assert resume.loaded is not None and seen == []
    (tmp_path / "stage_checkpoint_epoch=3.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="bundle.checkpoints"):
        _resume(tmp_path)
    assert [r.getMessage() for r in caplog.records][-1] == (
        f"No readable checkpoint in {tmp_path}: the stage starts from its first epoch.")


def test_a_foreign_checkpoint_names_the_unexpected_key_whole(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    engine = _engine(model[0], [])
    AtomicCheckpointSaver(tmp_path, {"model": model, "trainer": engine}, "stage").attach(engine)
    engine.run(range(1), max_epochs=1)
    for missing in (False, True):  # a network without the saved bias, and one with a layer more
        target = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)) if missing \
            else torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
        engine2 = _engine(torch.nn.Linear(2, 2), [])
        ResumeFromCheckpoint(tmp_path, {"model": target, "trainer": engine2}, "stage").attach(engine2)
        with pytest.raises(BundleInputError) as err:
            engine2.run(range(1), max_epochs=2)
        detail = ('Missing key(s) in state_dict: "1.weight", "1.bias".' if missing
                  else 'Unexpected key(s) in state_dict: "0.bias".')
        assert str(err.value) == (
            f"Checkpoint '{tmp_path / 'stage_checkpoint_epoch=1.pt'}' does not fit this stage's networks ({detail}): it "
            f"was written with other settings; delete {tmp_path} to start the stage over, or run with the settings it "
            "was written with.")


def test_non_finite_weights_are_found_in_any_network_of_the_state_and_one_checkpoint_is_the_default(tmp_path):
    bad, good = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    bad.weight.data[0, 0] = float("nan")
    engine = _engine(good, [])
    with pytest.raises(BundleInputError, match=r"\(student\.weight\)"):
        AtomicCheckpointSaver(tmp_path, {"student": bad, "teacher": good}, "dino")(engine)
    AtomicCheckpointSaver(tmp_path, {"model": good, "trainer": engine}, "stage").attach(engine)
    engine.run(range(1), max_epochs=3)
    assert [p.name for p in tmp_path.iterdir()] == ["stage_checkpoint_epoch=3.pt"]


def test_a_checkpoint_whose_optimizer_differs_is_named_with_torchs_first_line(tmp_path):
    model = torch.nn.Linear(2, 2)
    engine = _engine(model, [])
    state = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "trainer": engine}
    AtomicCheckpointSaver(tmp_path, state, "stage").attach(engine)
    engine.run(range(1), max_epochs=1)
    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    engine2 = _engine(other[0], [])
    optimizer = torch.optim.SGD([{"params": other[0].parameters()}, {"params": other[1].parameters()}], lr=0.1)
    ResumeFromCheckpoint(tmp_path, {"optimizer": optimizer, "trainer": engine2}, "stage").attach(engine2)
    with pytest.raises(BundleInputError) as err:
        engine2.run(range(1), max_epochs=2)
    assert str(err.value).startswith(f"Checkpoint '{tmp_path / 'stage_checkpoint_epoch=1.pt'}' does not fit this "
                                     "stage's networks (loaded state dict has a different number of parameter groups): ")
