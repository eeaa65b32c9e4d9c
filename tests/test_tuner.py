"""Code tests of search/tuner.py that need no training: which trial wins."""

from __future__ import annotations

import errno
import shutil

import keras_tuner as kt
import pytest

from experiments import resolve
from model_zoo import BatchNormCNN, make_cnn, multiply_adds
from search.trial import check_room, checkpoint_bytes
from search.tuner import make_tuner, pick_winner, planned_trials


def test_multiply_adds_counts_convolutions_and_dense_layers():
    # 28x28x8 outputs of a 3x3x1 kernel, then 14*14*8 = 1568 inputs to 10 units.
    model = make_cnn(conv_filters=(8,), kernel_size=3)
    assert multiply_adds(model) == 28 * 28 * 8 * 9 + 1568 * 10


def completed_trial(trial_id: str, conv_filters_1: int, score: float) -> kt.engine.trial.Trial:
    hp = kt.HyperParameters()
    BatchNormCNN().build(hp)
    hp.values["conv_filters_1"] = conv_filters_1
    trial = kt.engine.trial.Trial(hyperparameters=hp, trial_id=trial_id, status=kt.engine.trial.TrialStatus.COMPLETED)
    trial.score = score
    return trial


@pytest.fixture
def tuner(tmp_path):
    """A real tuner whose oracle holds three finished trials: 128, 64 and 32 filters in block 2."""
    tuner = make_tuner(resolve("smoke", families=("batchnorm",)), None, tmp_path, "tuner", hypermodel=BatchNormCNN())
    for trial in (completed_trial("00", 128, 0.9717), completed_trial("01", 64, 0.9700), completed_trial("02", 32, 0.9600)):
        tuner.oracle.trials[trial.trial_id] = trial
    failed = completed_trial("03", 16, 0.99)
    failed.status = kt.engine.trial.TrialStatus.FAILED
    tuner.oracle.trials["03"] = failed
    return tuner


def test_the_cheapest_trial_within_one_standard_error_of_the_best_wins(tuner):
    # On 6,000 digits one standard error of 0.9717 is 0.0021: 0.9700 is within it, 0.9600 is not.
    winner = pick_winner(tuner, validation_size=6_000, within_se=1.0)
    assert (winner.trial.trial_id, winner.best.trial_id) == ("01", "00")
    assert winner.standard_error == pytest.approx(0.00214, abs=1e-5)
    assert winner.multiply_adds == multiply_adds(BatchNormCNN().build(winner.trial.hyperparameters.copy()))
    assert "trial 01" in winner.describe() and "trial 00 (97.17%)" in winner.describe()


def test_with_zero_standard_errors_the_best_score_wins(tuner):
    assert pick_winner(tuner, validation_size=6_000, within_se=0).trial.trial_id == "00"


def test_a_larger_validation_split_separates_closer_scores(tuner):
    # On 60,000 digits one standard error is 0.0007: 0.9700 is no longer within it.
    assert pick_winner(tuner, validation_size=60_000, within_se=1.0).trial.trial_id == "00"


def test_neighbouring_seeds_draw_different_trials(tmp_path):
    """Keras Tuner samples trial k with seed + k; without spreading the seeds apart,
    seed 43's trials were seed 42's shifted by one."""
    drawn = {}
    for seed in (42, 43):
        tuner = make_tuner(resolve("default", seed=seed), None, tmp_path / str(seed), "tuner")
        trials = [tuner.oracle.create_trial(f"t{i}") for i in range(4)]
        drawn[seed] = [tuple(sorted(t.hyperparameters.values.items())) for t in trials]
    assert not set(drawn[42]) & set(drawn[43])


@pytest.mark.parametrize("max_epochs, factor", [(2, 3), (9, 3), (8, 2)])
def test_progress_counts_down_hyperbands_own_schedule(tmp_path, max_epochs, factor):
    """planned_trials computes Hyperband's schedule: driving a real Hyperband oracle
    to its end (scores without training) must create exactly that many trials."""
    config = resolve("smoke", tuner="hyperband", max_epochs=max_epochs, hyperband_factor=factor, max_trials=1_000)
    oracle = make_tuner(config, None, tmp_path, "tuner").oracle
    created = 0
    while (trial := oracle.create_trial("tuner0")).status == "RUNNING":
        created += 1
        oracle.update_trial(trial.trial_id, {"val_accuracy": 0.5 + 0.001 * created}, step=0)
        trial.status = kt.engine.trial.TrialStatus.COMPLETED
        oracle.end_trial(trial)
    assert created == planned_trials(oracle, config.max_trials) > 1
    assert planned_trials(oracle, 1) == 1  # max_trials caps it
    assert planned_trials(make_tuner(resolve("smoke"), None, tmp_path, "random").oracle, 7) == 7


def test_a_checkpoint_without_room_on_disk_is_refused_before_it_is_written(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_room(tmp_path, checkpoint_bytes(1_000))  # room
    with pytest.raises(OSError) as full:
        check_room(tmp_path, free + checkpoint_bytes(0))
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(tmp_path)
    assert "MB checkpoint" in full.value.strerror
