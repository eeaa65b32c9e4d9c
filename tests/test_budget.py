"""search/budget.py and the budget in the tuner: the clock, the cost model, trials cut as too
costly for the final training, the search stopped at its share, and the winner chosen
for what this machine can train (real trials, real costs)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import keras
import keras_tuner as kt
import mlflow
import pytest

from experiments import resolve
from model_zoo import make_cnn
from search import tracking
from search.budget import (
    INFERENCE_SHARE,
    TRACINGS_AFTER_TRAINING,
    CostModel,
    EpochBudget,
    Plan,
    RunBudget,
    TrainingClock,
    duration,
    process_started,
    started_at,
    too_costly,
)
from search.data import Split
from search.driver import drive
from search.in_process import InProcess
from search.train import WarmupCosine
from search.tuner import make_tuner, pick_winner
from tests.helpers import MLFLOW_RUN_ENV, REPO, mlflow_run, mnist_subset, new_sqlite_store


def fit_under_a_budget(seconds_left: float, epochs: int = 5) -> tuple[EpochBudget, list[float]]:
    """A real fit of `epochs` epochs of 8 batches under the schedule and a budget that, after the
    first epoch, leaves `seconds_left` to train: the budget and the rate of every batch."""
    model = make_cnn(conv_filters=(4,), learning_rate=2e-3)
    schedule = WarmupCosine(peak=1e-2)
    timing = EpochBudget(schedule, seconds_left=lambda validation_s, warmup_s: seconds_left)
    rates = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    )
    x, y = keras.random.uniform((128, 28, 28, 1), seed=0), keras.ops.arange(128) % 10
    model.fit(x, y, batch_size=16, epochs=epochs, validation_data=(x[:32], y[:32]), callbacks=[schedule, timing, record], verbose=0)
    return timing, rates


def test_the_budget_settles_the_epochs_and_the_schedule_follows_them():
    """No time left after the first epoch: the training stops there, the schedule settled to
    one epoch. Time to spare: every epoch the fit asked for, the cosine at zero by the last batch."""
    stopped, rates = fit_under_a_budget(seconds_left=0.0)
    assert stopped.schedule.epochs == stopped.epochs == 1 and len(stopped.epoch_seconds) == 1 and len(rates) == 8
    assert stopped.estimate_s is not None and stopped.validation_s is not None and stopped.seconds_left() == 0
    ample, rates = fit_under_a_budget(seconds_left=1e9)
    assert ample.schedule.epochs == 5 and len(ample.epoch_seconds) == 5 and len(rates) == 40
    assert rates[8] == pytest.approx(1e-2) and rates[-1] == pytest.approx(0.0, abs=1e-9)


def test_the_budget_counts_from_its_start_and_keeps_the_searchs_share():
    budget = RunBudget(minutes=2, search_share=0.25, started=time.monotonic() - 30)
    assert budget.limited and 29 < budget.elapsed() < 40
    assert budget.search_left() == pytest.approx(120 * 0.25 - budget.elapsed(), abs=0.5)  # spent, about
    assert 120 * 0.97 - 40 < budget.left() < 120 * 0.97 - 29
    assert budget.status().startswith("run 3") and budget.status().endswith("left") and "of 2m00s" in budget.status()
    unlimited = RunBudget(minutes=0, search_share=0.3)
    assert not unlimited.limited and unlimited.left() == unlimited.search_left() == float("inf")
    assert unlimited.status().startswith("run ") and "left" not in unlimited.status()
    assert (duration(7.4), duration(185)) == ("7s", "3m05s")


def test_the_final_training_keeps_time_for_the_inference_and_tracing_after_it():
    """Told after its first epoch what a validation pass of 1,000 digits took (0.5 s) and what
    that epoch spent warming up (2 s): the evaluation's 4,000 digits and three more tracings
    of the model come out of the training's time."""
    budget = RunBudget(minutes=2, search_share=0.3, started=time.monotonic())
    plan = Plan(budget, CostModel(train_images=10_000, validation_images=1_000, evaluated_images=4_000), 5.0, min_final_epochs=1)
    cold = plan.training_seconds_left(validation_s=0.5)
    assert cold == pytest.approx(plan.final_seconds() - 4_000 * 0.5 / 1_000, abs=0.1)
    assert plan.training_seconds_left(validation_s=0.5, warmup_s=2.0) == pytest.approx(cold - TRACINGS_AFTER_TRAINING * 2.0, abs=0.1)


def test_the_process_clock_counts_start_up_and_imports():
    """A fresh Python that works a second before asking: the clock already holds that time,
    and Python's own start-up before it."""
    script = (
        "import time; t = time.monotonic()\n"
        "time.sleep(1.0)\n"
        "from search.budget import process_started\n"
        "print(time.monotonic() - process_started(), time.monotonic() - t)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300, check=True)
    since_start, since_script = map(float, done.stdout.split())
    assert since_start >= since_script >= 1.0 and since_start < since_script + 60
    assert process_started() <= time.monotonic()


def test_under_mlflow_run_the_clock_starts_with_mlflow_run(tmp_path, mnist_npz):
    """`mlflow run` imports MLflow and creates its run before it starts the command: seconds
    of the user's budget, which the command's clock counts (a real `mlflow run`)."""
    project = tmp_path / "project"
    project.mkdir()
    probe = (
        f"import os, sys; sys.path.insert(0, '{REPO}'); from search.budget import started_at, process_started; "
        "print(started_at(os.getpid()) - process_started())"
    )
    (project / "MLproject").write_text(f'name: clock\nentry_points:\n  main:\n    command: python -c "{probe}"\n')
    done = mlflow_run(project, new_sqlite_store(tmp_path), mnist_npz)
    assert done.returncode == 0, done.stderr[-2000:]
    before_the_command = float(done.stdout.split()[-1])
    print(f"mlflow run started {before_the_command:.2f} s before its command")
    # At least MLflow's import and its store's creation; less than the test's own time.
    assert 0.5 < before_the_command < 300
    assert process_started() == pytest.approx(started_at(os.getpid()), abs=0.05)  # pytest is no `mlflow run`


def test_the_cost_models_limit_is_where_exactly_the_needed_epochs_fit():
    cost = CostModel(train_images=54_000, validation_images=6_000, evaluated_images=40_000, augment_seconds_per_image=2e-5)
    limit = cost.max_seconds_per_image(seconds_left=300, min_epochs=8)
    assert cost.epochs_that_fit(300, limit) == pytest.approx(8)
    assert cost.epoch_seconds(1e-4) == pytest.approx(54_000 * 1.2e-4 + 6_000 * 1e-4 * INFERENCE_SHARE)
    assert cost.epochs_that_fit(300, limit * 2) < 8 < cost.epochs_that_fit(300, limit / 2)
    assert cost.evaluation_seconds(1e-4) == pytest.approx(4.0)
    assert cost.max_seconds_per_image(seconds_left=-5, min_epochs=8) == 0.0 and cost.epochs_that_fit(-5, limit) == 0.0
    assert (
        too_costly(limit / 2, limit) == ""
        and too_costly(2e-4, 1e-4) == "too costly here: 200 us per training image, the final training allows 100"
    )


def test_the_champions_evaluation_comes_out_of_the_final_trainings_time():
    """The champion's evaluation on the same digits, timed on the champion (30 s here), is
    kept whatever the new network costs: the limit still gives exactly the epochs needed."""
    plain = CostModel(train_images=54_000, validation_images=6_000, evaluated_images=40_000, augment_seconds_per_image=2e-5)
    with_champion = dataclasses.replace(plain, champion_seconds=30.0)
    assert with_champion.evaluation_seconds(1e-4) == pytest.approx(plain.evaluation_seconds(1e-4) + 30.0)
    limit = with_champion.max_seconds_per_image(seconds_left=300, min_epochs=8)
    assert with_champion.epochs_that_fit(300, limit) == pytest.approx(8)
    assert limit < plain.max_seconds_per_image(seconds_left=300, min_epochs=8)
    assert with_champion.epochs_that_fit(300, 1e-4) < plain.epochs_that_fit(300, 1e-4)


def test_the_training_clock_times_batches_after_the_warm_up():
    clock = TrainingClock(batch_size=100)
    for batch in range(TrainingClock.WARM + TrainingClock.ENOUGH + 1):
        clock.batch_begins(batch)
        time.sleep(0.002)
    assert clock.measured and 0.002 / 100 <= clock.seconds_per_image < 0.05 / 100
    measured = clock.seconds_per_image
    clock.epoch_ends(epoch_seconds=100.0, images=10)
    assert clock.seconds_per_image == measured  # the batches' timing, not the epoch's
    short = TrainingClock(batch_size=100)
    short.batch_begins(0)
    short.epoch_ends(epoch_seconds=2.0, images=400)  # too few batches: the epoch as a whole
    assert short.seconds_per_image == pytest.approx(0.005)


class TwoSizes(kt.HyperModel):
    """A small and a large real network: the large costs many times more per image."""

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        if hp.Choice("size", ["small", "large"]) == "small":
            return make_cnn(conv_filters=(4,), learning_rate=3e-3)
        return make_cnn(conv_filters=(32, 64), convs_per_block=2, learning_rate=3e-3)


def digits(mnist_npz, n: int, offset: int = 0) -> Split:
    import numpy as np

    with np.load(mnist_npz) as d:
        return Split(d["x_train"][offset : offset + n, :, :, None].astype("float32") / 255, d["y_train"][offset : offset + n])


def small_and_large_trials(tracking_store, tmp_path, mnist_npz, plan=None, max_trials=2, max_epochs=1):
    config = resolve("smoke", fixed=(), max_trials=max_trials, max_epochs=max_epochs, early_stopping_patience=0, prune=False)
    with tracking.tracked_run("budget") as tracker:
        tuner = make_tuner(config, tracker, tmp_path, "tuner", hypermodel=TwoSizes(), plan=plan)
        drive(tuner, InProcess(config), config, digits(mnist_npz, 2_560), digits(mnist_npz, 512, offset=50_000))
    return tuner, tracker.run_id


def test_the_cheaper_candidate_wins_where_the_costlier_cannot_train_enough_epochs(tracking_store, tmp_path, mnist_npz):
    tuner, _ = small_and_large_trials(tracking_store, tmp_path, mnist_npz)
    trials = {t.hyperparameters.values["size"]: t for t in tuner.oracle.trials.values()}
    small, large = trials["small"], trials["large"]
    costs = tuner.costs.seconds_per_image
    assert costs[large.trial_id] > 2 * costs[small.trial_id] > 0  # measured, not assumed
    large.score = max(large.score, small.score + 0.01)  # the costlier network scored better in its trial

    # With time for any final training, the better score wins.
    assert pick_winner(tuner, 512, within_se=0).trial is large
    # With time for 8 final epochs of the small network but not of the large one, the small one wins.
    cost = CostModel(train_images=54_000, validation_images=6_000, evaluated_images=40_000)

    def seconds_for_8_epochs(seconds_per_image: float) -> float:
        return 8 * cost.epoch_seconds(seconds_per_image) + cost.evaluation_seconds(seconds_per_image * INFERENCE_SHARE)

    seconds_left = (seconds_for_8_epochs(costs[small.trial_id]) * seconds_for_8_epochs(costs[large.trial_id])) ** 0.5
    winner = pick_winner(tuner, 512, within_se=0, epochs_that_fit=lambda s: cost.epochs_that_fit(seconds_left, s), min_epochs=8)
    assert winner.trial is small and winner.final_epochs_fit >= 8
    assert [trial_id for trial_id, _, fit in winner.left_out] == [large.trial_id] and winner.left_out[0][2] < 8
    assert f"trial {large.trial_id} ({large.score:.2%}) left out" in winner.describe()


def test_a_trial_too_costly_for_the_time_left_is_cut_in_its_first_epoch_and_the_search_stops_at_its_share(
    tracking_store, tmp_path, mnist_npz
):
    """Started 55 s into a one-minute budget: the first trial runs (it measures the machine),
    is cut (no final training could follow it), and no second trial starts."""
    budget = RunBudget(minutes=1, search_share=0.5, started=time.monotonic() - 55)
    cost = CostModel(train_images=54_000, validation_images=6_000, evaluated_images=40_000)
    plan = Plan(budget, cost, 1.0, min_final_epochs=8)
    tuner, run_id = small_and_large_trials(tracking_store, tmp_path, mnist_npz, plan, max_trials=3, max_epochs=2)
    (trial,) = tuner.oracle.trials.values()
    client = mlflow.MlflowClient()
    (child,) = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert child.data.tags["cut"].startswith("too costly here: ") and child.info.status == "FINISHED"
    assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 1  # of its 2 epochs
    assert child.data.metrics["train_seconds_per_image"] > 0 and child.data.metrics["epochs_saved"] == 1
    assert tuner.costs.cut == {trial.trial_id: child.data.tags["cut"]}
    # Every trial cut: the winner is still one of them (the cheapest), not an error.
    assert pick_winner(tuner, 512, within_se=1.0).trial is trial


# As on a slower CPU: one core, oneDNN held to AVX2 (no AVX-512, bf16 or AMX kernels), float32.
SLOWED = {"env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "prefix": ["taskset", "-c", "0"], "settings": ["precision=float32"]}
BUDGET_TOLERANCE = 1.10  # the run's wall time against its budget: the last epoch's timing noise


@pytest.mark.alone
@pytest.mark.e2e
def test_a_budgeted_search_ends_within_its_budget_on_a_slower_cpu(tmp_path, mnist_npz):
    """A real default search of real digits given 1.5 minutes, from process start to exit, as on a
    slower CPU (this CPU's own speed: the fast profile's test in test_pipeline.py): it plans
    against what it measures and ends in time."""
    data = mnist_subset(tmp_path / "mnist-part.npz", mnist_npz, n_train=14_000, n_test=2_000)
    store = new_sqlite_store(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(REPO), **SLOWED["env"]}
    for var in MLFLOW_RUN_ENV:
        env.pop(var, None)
    settings = [f"data={data}", "budget_minutes=1.5", "validation_size=2000", "train_subset=3000", "max_epochs=1", "robust_size=300"]
    command = [*SLOWED["prefix"], sys.executable, "-m", "search", "run", *settings, *SLOWED["settings"]]
    started = time.monotonic()
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    wall_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert wall_s <= 90 * BUDGET_TOLERANCE, f"{wall_s:.1f} s for a 90 s budget\n" + done.stdout[-3000:]
    client = mlflow.MlflowClient(store)
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.command = 'search'")
    metrics = parent.data.metrics
    assert metrics["run_seconds"] <= 90 and metrics["final_epochs_run"] >= 1 and "test_accuracy" in metrics
    assert "budget 1m30s on " in done.stdout and "done: run " in done.stdout and "of 1m30s" in done.stdout
    # No trial started that was expected to end past the search's share (27 s): the share is
    # passed by at most the last trial's overshoot of the median trial.
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    longest = max(t.data.metrics["wall_time_s"] for t in trials)
    assert metrics["search_seconds"] <= 90 * 0.3 + longest, (metrics["search_seconds"], longest)
