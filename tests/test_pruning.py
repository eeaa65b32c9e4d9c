"""Tests of search/pruning.py: the median-stopping rule, and real trials it stops."""

from __future__ import annotations

import csv

import mlflow
import numpy as np

from experiments import resolve
from search import tracking
from search.data import Split
from search.driver import drive
from search.in_process import InProcess
from search.pruning import MedianStopping
from search.reporting.report import write_trials_csv
from search.tuner import make_tuner


def test_a_trial_below_the_median_of_finished_trials_stops():
    rule = MedianStopping(min_trials=3, grace_epochs=1)
    for trial_id, curve in {"a": [0.90, 0.95], "b": [0.80, 0.96], "c": [0.85, 0.97]}.items():
        for epoch, value in enumerate(curve):
            assert not rule.report(trial_id, epoch, value)  # fewer than 3 finished trials: never
        rule.end(trial_id)
    # After epoch 1 (0-based 0) the median of 0.90, 0.80, 0.85 is 0.85.
    assert not rule.report("d", 0, 0.86)
    assert rule.report("e", 0, 0.84) and rule.pruned == {"e": 1}
    # After epoch 2 the finished trials' bests are 0.95, 0.96, 0.97: median 0.96.
    assert not rule.report("d", 1, 0.961)
    assert rule.report("f", 1, 0.5) and not rule.report("g", 1, 0.5, last=True)  # the last epoch saves nothing


def test_grace_epochs_minimum_trials_and_failed_trials():
    rule = MedianStopping(min_trials=2, grace_epochs=2)
    rule.report("a", 0, 0.9)
    rule.end("a", failed=True)  # a failed trial's curve is no yardstick
    rule.report("b", 0, 0.9)
    rule.end("b")
    rule.seed("c", {0: 0.9, 1: 0.95}, pruned_after=None)  # finished before a resume
    assert not rule.report("d", 0, 0.1)  # within the grace epochs
    # Only "c" reached epoch 2 ("b" stopped after one): fewer than 2 finished trials there.
    assert not rule.report("d", 1, 0.1)
    rule.seed("e", {0: 0.9, 1: 0.93}, pruned_after=1)
    assert rule.pruned["e"] == 1
    assert rule.report("f", 0, 0.1) is False and rule.report("f", 1, 0.1) is True


def digits(mnist_npz, n: int, offset: int = 0) -> Split:
    data = np.load(mnist_npz)
    x = data["x_train"][offset : offset + n, :, :, None].astype("float32") / 255
    return Split(x, data["y_train"][offset : offset + n].astype("int64"))


def test_a_real_trial_that_is_clearly_worse_is_stopped_and_logged_as_pruned(tracking_store, tmp_path, mnist_npz):
    """Two real trials that learn, then a real trial whose learning rate is too small
    to learn anything: it stops after its first epoch, FINISHED, tag pruned=1."""
    train, validation = digits(mnist_npz, 2_000), digits(mnist_npz, 1_000, offset=50_000)
    rule = MedianStopping(min_trials=2, grace_epochs=1)
    pins = ("conv_blocks=1", "conv_filters_0=8", "dense_units=0", "head=flatten", "kernel_size=3")  # dropout varies
    with tracking.tracked_run("pruning") as tracker:
        for name, learning_rate, trials in (("good", 3e-3, 2), ("hopeless", 1e-7, 1)):
            config = resolve(
                "smoke", max_trials=trials, max_epochs=3, early_stopping_patience=0, fixed=(*pins, f"learning_rate={learning_rate}")
            )
            tuner = make_tuner(config, tracker, tmp_path / name, "tuner", pruner=rule)
            drive(tuner, InProcess(config), config, train, validation)
        records = tracker.trial_records()
    (hopeless,) = [r for r in records if r["pruned"]]
    assert rule.pruned == {hopeless["trial_id"]: 1}
    write_trials_csv(records, tmp_path / "trials.csv")
    with (tmp_path / "trials.csv").open() as f:
        (row,) = [r for r in csv.DictReader(f) if r["pruned"]]
    assert (row["pruned"], row["epochs_saved"], row["status"], row["best_step"]) == ("1", "2", "FINISHED", "0")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("pruning").experiment_id], "tags.trial_id != ''")
    pruned = [r for r in runs if "pruned" in r.data.tags]
    assert len(runs) == 3 and len(pruned) == 1
    (run,) = pruned
    assert run.info.status == "FINISHED" and run.data.tags["pruned"] == "1" and run.data.metrics["epochs_saved"] == 2
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1
    for good in (r for r in runs if "pruned" not in r.data.tags):
        assert len(client.get_metric_history(good.info.run_id, "val_accuracy")) == 3
