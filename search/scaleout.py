"""Trials as Ray tasks: many at once, on one machine or a cluster.

The Keras Tuner oracle stays in this process (the driver, which owns the search
run) and decides what to try next, as in Keras Tuner's own search loop. Each
trial is a Ray task reserving `cpus_per_trial` CPUs, with TensorFlow's thread
pools sized to match: it trains on the data the driver put in Ray's object
store once, logs itself as the nested run `trial-<id>` (tag `ray_node`) to the
tracking server that MLFLOW_TRACKING_URI names, and returns its curve and its
best epoch's weights. The driver writes them where Keras Tuner keeps trial
checkpoints, so nothing but Ray and MLflow is shared between machines.

A task whose worker process or node died is run again by Ray, up to
`trial_retries` times; the new attempt ends the lost one's run KILLED and logs
a run of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import ray

from experiments import ConfigError, SearchConfig
from model_zoo import multiply_adds
from search import interrupts, tracking
from search.budget import TrainingClock, too_costly
from search.data import Split
from search.pruning import MedianStopping
from search.train import evaluation_dataset, training_dataset
from search.tuner import active_values, check_room, checkpoint_bytes, epochs_saved, planned_epochs, trial_callbacks

PACKAGES = ("experiments", "model_zoo", "search")  # shipped to every worker: no shared file system
CONNECT_TIMEOUT_S = 10  # an address that does not answer fails within this
WAIT_S = 1.0  # how often the driver looks up from waiting, to act on Ctrl-C
# Keras Tuner's names for a trial's best weights and its model's build config (tests/test_scaleout.py).
CHECKPOINT, BUILD_CONFIG = "checkpoint.weights.h5", "build_config.json"
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
RUNNING, STOPPED = kt.engine.trial.TrialStatus.RUNNING, kt.engine.trial.TrialStatus.STOPPED


class ClusterError(ConfigError):
    """The Ray address names no cluster that answers: the user's to fix."""


@dataclass(frozen=True)
class TrialJob:
    """What one trial's task needs besides the data."""

    trial_id: str
    hyperparameters: kt.HyperParameters
    hypermodel: kt.HyperModel
    parent_run_id: str
    config: SearchConfig
    finished_curves: dict[str, dict[int, float]]  # the median rule's reference, when the trial starts
    weights: list[np.ndarray] | None = None  # Hyperband: the earlier round's weights it continues
    max_seconds_per_image: float = float("inf")  # costlier, and the trial is cut in its first epoch (TrackedTuner)


@dataclass
class TrialOutcome:
    trial_id: str
    completed: bool
    metrics: dict[str, float] = field(default_factory=dict)  # at the best val_accuracy epoch
    best_epoch: int = 0
    curve: dict[int, float] = field(default_factory=dict)  # val_accuracy per epoch
    pruned: int | None = None  # epochs trained when the median rule stopped it
    weights: list[np.ndarray] | None = None  # of the best epoch
    reason: str = ""  # why it failed
    seconds: float = 0.0
    seconds_per_image: float | None = None  # training, measured in its first epoch
    cut: str = ""  # why it was cut as too costly to win


def connect(address: str, cpus_per_trial: int = 1) -> float:
    """Join the Ray cluster at `address` ("local": start one here) as a job whose workers
    get the project's code and `worker_environment`; the seconds it took."""
    started = time.perf_counter()  # the address was checked before the search run opened (pipeline)
    try:
        ray.init(
            address=address,  # "local" starts a cluster, whatever RAY_ADDRESS says
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
            configure_logging=False,
            runtime_env={"py_modules": [_package_dir(p) for p in PACKAGES], "env_vars": worker_environment(cpus_per_trial)},
        )
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as err:
        hint = (
            "" if os.environ.get("RAY_AUTH_MODE") else " (a cluster with token authentication also needs RAY_AUTH_MODE=token and its token)"
        )
        raise ClusterError(f"Ray cluster {address!r} cannot be joined: {_reason(err)}{hint}") from None
    return time.perf_counter() - started


def check_address(address: str) -> None:
    """Fail fast, with one clear error, if `address` names no Ray cluster that answers."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ClusterError(f"Ray cluster {address} does not answer ({err.strerror or err})") from None


class RayTrials:
    """Runs a tuner's trials as Ray tasks, up to `parallel_trials` at once."""

    def __init__(self, config: SearchConfig):
        self.config = config

    def search(self, tuner: kt.Tuner, tracker: tracking.SearchTracker, train: Split, validation: Split) -> None:
        """Every trial the oracle hands out, run on the cluster; returns once all have ended."""
        startup_s = connect(self.config.ray, self.config.cpus_per_trial)
        try:
            slots = self.config.parallel_trials or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.config.cpus_per_trial)
            tracker.log_metrics({"ray_startup_s": startup_s})
            print(
                f"Ray {ray.__version__}: joined in {startup_s:.1f} s; up to {slots} trial(s) at once, {self.config.cpus_per_trial} CPU(s) each"
            )
            self._run(tuner, tracker, ray.put((train.x, train.y, validation.x, validation.y)), slots)
        finally:
            ray.shutdown()

    def _run(self, tuner: kt.Tuner, tracker: tracking.SearchTracker, data: ray.ObjectRef, slots: int) -> None:
        oracle, cpus = tuner.oracle, self.config.cpus_per_trial
        oracle.verbose = 0  # Keras Tuner's own tables: the progress lines say it
        task = ray.remote(run_trial).options(num_cpus=cpus, max_retries=self.config.trial_retries)
        tuner.save()  # a resume reloads the oracle only where the tuner was saved
        running: dict[ray.ObjectRef, tuple[kt.engine.trial.Trial, str]] = {}
        free = [f"ray-{i}" for i in range(slots)]
        stopped = False
        try:
            while True:
                interrupts.raise_if_requested()
                while free and not stopped:
                    tuner.pre_create_trial()  # the budget's check, as in Keras Tuner's own loop
                    trial = oracle.create_trial(free[0])
                    if trial.status == STOPPED:
                        stopped = True
                    elif trial.status == RUNNING:
                        running[task.remote(self._job(tuner, tracker, trial), data)] = (trial, free.pop(0))
                        tuner.progress.trial_started(trial.trial_id, active_values(trial.hyperparameters))
                    else:
                        break  # Hyperband waits for the round's running trials
                if not running:
                    break
                done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)
                for ref in done:
                    trial, tuner_id = running.pop(ref)
                    free.append(tuner_id)
                    self._end(tuner, tracker, trial, ref)
        except BaseException:
            for ref, (trial, _) in running.items():
                ray.cancel(ref, force=True)
                with contextlib.suppress(Exception):  # the store may be what failed
                    tracker.end_trial_runs(trial.trial_id, "KILLED", "the search was interrupted")
            raise

    def _job(self, tuner: kt.Tuner, tracker: tracking.SearchTracker, trial: kt.engine.trial.Trial) -> TrialJob:
        earlier = trial.hyperparameters.values.get("tuner/trial_id")
        pruner = tuner.pruner
        return TrialJob(
            trial_id=trial.trial_id,
            hyperparameters=trial.hyperparameters.copy(),
            hypermodel=tuner.hypermodel,
            parent_run_id=tracker.run_id,
            config=self.config,
            finished_curves=dict(pruner.finished) if pruner else {},
            weights=tuner.load_model(tuner.oracle.get_trial(earlier)).get_weights() if earlier else None,
            max_seconds_per_image=tuner.max_seconds_per_image(),
        )

    def _end(self, tuner: kt.Tuner, tracker: tracking.SearchTracker, trial: kt.engine.trial.Trial, ref: ray.ObjectRef) -> None:
        """Tell the oracle how the trial ended; keep its weights as Keras Tuner's checkpoint."""
        try:
            outcome: TrialOutcome = ray.get(ref)
        except ray.exceptions.RayError as err:  # lost more often than trial_retries, or could not run
            reason = f"Ray could not finish the trial: {_reason(err)}"
            tracker.end_trial_runs(trial.trial_id, "KILLED", reason)
            outcome = TrialOutcome(trial.trial_id, completed=False, reason=reason)
        if outcome.completed:
            tuner.oracle.update_trial(trial.trial_id, outcome.metrics, step=outcome.best_epoch)
            save_checkpoint(tuner, trial, outcome.weights)
        trial.status = kt.engine.trial.TrialStatus.COMPLETED if outcome.completed else kt.engine.trial.TrialStatus.FAILED
        trial.message = outcome.reason
        if tuner.pruner and outcome.completed and not outcome.cut:
            tuner.pruner.seed(trial.trial_id, outcome.curve, outcome.pruned)
        if outcome.cut:
            tuner.costs.cut[trial.trial_id] = outcome.cut
        tuner.costs.trial_ended(trial.trial_id, outcome.seconds, outcome.seconds_per_image)
        tuner.oracle.end_trial(trial)
        tuner.save()  # as Keras Tuner's own loop does after each trial: what a resume reloads
        score = tuner.oracle.get_trial(trial.trial_id).score if outcome.completed else None
        tuner.progress.trial_ended(trial.trial_id, score, outcome.seconds, outcome.reason, outcome.pruned, outcome.cut)


def worker_environment(cpus: int) -> dict[str, str]:
    """What a trial's worker process starts with: TensorFlow's threads for its CPUs,
    and the tracking store (and its credentials) this process logs to."""
    env = dict.fromkeys(THREAD_VARIABLES, str(cpus))
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def save_checkpoint(tuner: kt.Tuner, trial: kt.engine.trial.Trial, weights: list[np.ndarray]) -> None:
    """The trial's weights where `tuner.load_model(trial)` (and Hyperband's next round) reads them."""
    model = tuner.hypermodel.build(trial.hyperparameters.copy())
    model.set_weights(weights)
    folder = Path(tuner.get_trial_dir(trial.trial_id))
    check_room(folder, checkpoint_bytes(sum(w.nbytes for w in weights)))
    model.save_weights(folder / CHECKPOINT)
    (folder / BUILD_CONFIG).write_text(json.dumps(model.get_build_config()))


def run_trial(job: TrialJob, data: tuple[np.ndarray, ...]) -> TrialOutcome:
    """One trial, in a Ray worker: train, log every epoch to its own nested run, return the outcome."""
    started, cpu_started = time.perf_counter(), time.process_time()
    settings = job.config
    keras.backend.clear_session()  # a worker process runs many trials: free the last one's graph
    tracker = tracking.attach(job.parent_run_id, {"ray_node": ray.util.get_node_ip_address()})
    watch = None
    try:
        # An earlier attempt whose worker died left its run RUNNING: this attempt replaces it.
        tracker.end_trial_runs(job.trial_id, "KILLED", "its Ray worker or node died; Ray ran the trial again")
        hp = job.hyperparameters
        tracker.start_trial(job.trial_id, active_values(hp))
        train, validation = Split(data[0], data[1]), Split(data[2], data[3])
        trial = kt.engine.trial.Trial(hp, job.trial_id)
        keras.utils.set_random_seed(settings.seed)
        model = job.hypermodel.build(hp.copy())
        if job.weights is not None:
            model.set_weights(job.weights)
        pruner = MedianStopping(settings.prune_min_trials, settings.prune_grace_epochs) if settings.prune else None
        if pruner:
            pruner.finished = dict(job.finished_curves)
        watch = _Watch(
            tracker, job.trial_id, pruner, planned_epochs(trial, settings.max_epochs), settings.batch_size, job.max_seconds_per_image
        )
        history = model.fit(
            training_dataset(train, settings.batch_size, settings.seed),
            validation_data=evaluation_dataset(validation, settings.batch_size),
            initial_epoch=int(hp.values.get("tuner/initial_epoch", 0)),
            epochs=planned_epochs(trial, settings.max_epochs),
            callbacks=[*trial_callbacks(settings), watch],
            verbose=0,
        )
        losses = history.history.get("loss", [])
        if not watch.curve or any(np.isnan(losses)):
            raise ValueError(f"loss became NaN after {len(losses)} epoch(s)")
        pruned = pruner.pruned.get(job.trial_id) if pruner else None
        outcome = TrialOutcome(job.trial_id, True, watch.best_logs, watch.best_epoch, watch.curve, pruned, watch.best_weights)
        outcome.cut = watch.cut
        summary = {
            "best_val_accuracy": watch.best_logs["val_accuracy"],
            "param_count": model.count_params(),
            "multiply_adds": multiply_adds(model),
            "epochs_saved": epochs_saved(trial, settings.max_epochs, pruned or (1 if watch.cut else None)),
        }
    except Exception as err:
        outcome, summary = TrialOutcome(job.trial_id, False, reason=_reason(err)), {}
    outcome.seconds = time.perf_counter() - started
    outcome.seconds_per_image = watch.clock.seconds_per_image if watch else None
    summary |= {"wall_time_s": outcome.seconds, "cpu_seconds": time.process_time() - cpu_started}
    summary["train_seconds_per_image"] = outcome.seconds_per_image
    tracker.end_trial(job.trial_id, not outcome.completed, summary, outcome.reason, pruned=outcome.pruned, cut=outcome.cut)
    return outcome


class _Watch(keras.callbacks.Callback):
    """Logs each epoch, keeps the best epoch's weights, cuts a trial too costly to win (as
    TrackedTuner does), and asks the median rule whether to go on."""

    def __init__(
        self,
        tracker: tracking.SearchTracker,
        trial_id: str,
        pruner: MedianStopping | None,
        planned: int,
        batch_size: int,
        max_seconds_per_image: float,
    ):
        super().__init__()
        self.tracker, self.trial_id, self.pruner, self.planned = tracker, trial_id, pruner, planned
        self.clock, self.batch_size, self.max_seconds_per_image = TrainingClock(batch_size), batch_size, max_seconds_per_image
        self.curve: dict[int, float] = {}
        self.best_logs: dict[str, float] = {}
        self.best_epoch, self.best_weights = 0, None
        self.cut, self.judged, self.batches = "", False, 0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.epoch_started, self.batches = time.perf_counter(), 0

    # A begin hook: a batch-end hook turns off Keras' asynchronous dispatch of each batch's logs.
    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        self.batches = batch + 1
        self.clock.batch_begins(batch)
        self._judge_cost()

    def _judge_cost(self) -> None:
        if self.judged or not self.clock.measured:
            return
        self.judged = True
        self.cut = too_costly(self.clock.seconds_per_image, self.max_seconds_per_image)
        if self.cut:
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.clock.epoch_ends(time.perf_counter() - self.epoch_started, self.batches * self.batch_size)
        self._judge_cost()
        logs = {k: float(v) for k, v in (logs or {}).items()}
        self.tracker.log_epoch(self.trial_id, epoch, logs)
        value = logs.get("val_accuracy", float("nan"))
        if np.isnan(value):
            return
        self.curve[epoch] = value
        if not self.best_logs or value > self.best_logs["val_accuracy"]:
            self.best_logs, self.best_epoch, self.best_weights = logs, epoch, self.model.get_weights()
        if self.pruner and not self.cut and self.pruner.report(self.trial_id, epoch, value, last=epoch + 1 >= self.planned):
            self.model.stop_training = True


def _package_dir(name: str) -> str:
    return str(Path(__import__(name).__file__).parent)


def _reason(err: BaseException) -> str:
    """The error's last line: Ray's errors carry the remote traceback before it."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(err).__name__
