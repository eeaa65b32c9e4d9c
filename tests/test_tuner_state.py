"""Code tests of the tuner state's good copy, on the files Keras Tuner itself writes."""

from __future__ import annotations

import json

import keras_tuner as kt
import pytest

from search.tuner_state import GOOD, TunerStateError, keep_good_copy, restore_if_damaged, state_files


def build(hp):
    import keras

    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(hp.Int("units", 1, 4))])


def saved_tuner(tmp_path, trials: int) -> kt.RandomSearch:
    """A Keras Tuner tuner (reloaded where one was saved) whose oracle has run `trials` more
    trials, each ended as Keras Tuner's loop ends it, then saved."""
    tuner = kt.RandomSearch(build, objective="loss", max_trials=5, directory=str(tmp_path), project_name="tuner", seed=1)
    for _ in range(trials):
        trial = tuner.oracle.create_trial("worker")
        tuner.oracle.update_trial(trial.trial_id, {"loss": 1.0})
        tuner.oracle.end_trial(trial)
    tuner.save()
    return tuner


def test_a_truncated_file_is_put_back_from_the_copy_and_later_trials_are_dropped(tmp_path):
    project = tmp_path / "tuner"
    saved_tuner(tmp_path, trials=1)
    keep_good_copy(project)
    saved_tuner(tmp_path, trials=1)  # a trial that ended after the copy
    assert len(list(project.glob("trial_*/trial.json"))) == 2
    (project / "oracle.json").write_text('{"ongoing_tri')  # half-written
    assert restore_if_damaged(project) == "tuner state oracle.json was damaged; restored the state saved after the last trial that ended"
    assert [f.relative_to(project).as_posix() for f in state_files(project)] == [
        f.relative_to(project / GOOD).as_posix() for f in state_files(project / GOOD)
    ]
    for file in state_files(project):
        json.loads(file.read_text())
    reloaded = kt.RandomSearch(build, objective="loss", max_trials=5, directory=str(tmp_path), project_name="tuner", seed=1)
    assert len(reloaded.oracle.trials) == 1


def test_nothing_is_touched_when_nothing_is_damaged(tmp_path):
    project = tmp_path / "tuner"
    saved_tuner(tmp_path, trials=2)
    before = {f: f.read_text() for f in state_files(project)}
    assert restore_if_damaged(project) == ""
    assert {f: f.read_text() for f in state_files(project)} == before


def test_a_damaged_state_without_a_copy_says_what_to_do(tmp_path):
    project = tmp_path / "tuner"
    saved_tuner(tmp_path, trials=1)
    (project / "oracle.json").write_text("")
    with pytest.raises(TunerStateError, match=r"tuner state .*oracle.json is damaged .* start a new search with `python -m search run`"):
        restore_if_damaged(project)


def test_a_kill_between_the_copys_two_renames_leaves_the_older_copy_to_restore(tmp_path):
    project = tmp_path / "tuner"
    saved_tuner(tmp_path, trials=1)
    keep_good_copy(project)
    (project / GOOD).rename(project / f"{GOOD}.old")  # the first rename done, the second not
    (project / "oracle.json").write_text("")
    assert restore_if_damaged(project).startswith("tuner state oracle.json was damaged")
    json.loads((project / "oracle.json").read_text())
