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
import copy
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import ray

from experiments import ConfigError, SearchConfig
from search import faults, interrupts, tracking
from search.data import Split
from search.robustness import heldout_probe
from search.train import evaluation_dataset, training_dataset
from search.trial import (
    LifecycleCallback,
    SearchStopped,
    TrialLifecycle,
    TrialResult,
    TrialSpec,
    check_room,
    checkpoint_bytes,
    failure_reason,
    trial_callbacks,
    weight_bytes,
)

PACKAGES = ("experiments", "model_zoo", "search")  # shipped to every worker: no shared file system
CONNECT_TIMEOUT_S = 10  # an address that does not answer fails within this
WAIT_S = 1.0  # how often the driver looks up from waiting, to act on Ctrl-C
PING_S = 5.0  # how often it asks the tracking server whether it still answers
# Keras Tuner's names for a trial's best weights and its model's build config (tests/test_scaleout.py).
CHECKPOINT, BUILD_CONFIG = "checkpoint.weights.h5", "build_config.json"
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")  # MLflow reads them
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
RUNNING, STOPPED = kt.engine.trial.TrialStatus.RUNNING, kt.engine.trial.TrialStatus.STOPPED


class ClusterError(ConfigError):
    """The Ray address names no cluster that answers: the user's to fix."""


@dataclass(frozen=True)
class TrialJob:
    """What one trial's task needs besides the data."""

    spec: TrialSpec  # what its lifecycle needs (search/trial.py)
    hyperparameters: kt.HyperParameters
    hypermodel: kt.HyperModel
    parent_run_id: str
    config: SearchConfig
    weights: list[np.ndarray] | None = None  # Hyperband: the earlier round's weights it continues
    # The tracking store's credentials, as task arguments: Ray lists a job's runtime_env
    # (`ray list jobs`), not its tasks' arguments.
    credentials: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class TrialOutcome:
    """What the task returns: how the trial ended, its best epoch and that epoch's weights,
    or the fault that must stop the search (`stopped`)."""

    result: TrialResult
    metrics: dict[str, float] = field(default_factory=dict)  # at the best val_accuracy epoch
    best_epoch: int = 0
    weights: list[np.ndarray] | None = None  # of the best epoch
    stopped: Exception | None = None  # a fault that stops the search (SearchStopped.error)


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
    """An executor of a tuner's trials: Ray tasks, up to `parallel_trials` at once.

    The loop is Keras Tuner's own (`pre_create_trial`, `oracle.create_trial`, the trial,
    `oracle.end_trial`, `save`) with one slot per trial that may run at once. Each trial
    goes through the same lifecycle as in-process (search/trial.py), booked by the
    tuner (`trial_spec`, `trial_ended`). Faults that stop an in-process search stop
    this one the same way: a tracking server gone past `tracking_wait_s` (the worker
    waits for it as the driver does), a disk without room for the running trials'
    checkpoints (checked here, where they are written)."""

    def __init__(self, config: SearchConfig):
        """Join the cluster now, before the search opens a run: one that does not answer, or
        on which no trial could ever start, is a ClusterError."""
        check_address(config.ray)
        self.config = config
        self.startup_s = connect(config.ray, config.cpus_per_trial)
        largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if config.cpus_per_trial > largest:
            ray.shutdown()
            raise ClusterError(
                f"cpus_per_trial={config.cpus_per_trial}, but the largest node of Ray cluster {config.ray!r} has {largest:g} CPU(s): "
                "no trial could start"
            )

    def run(self, tuner: kt.Tuner, train: Split, validation: Split) -> None:
        """Every trial the oracle hands out, run on the cluster; returns once all have ended."""
        startup_s = self.startup_s
        try:
            slots = self.config.parallel_trials or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.config.cpus_per_trial)
            tuner.tracker.log_metrics({"ray_startup_s": startup_s})
            print(
                f"Ray {ray.__version__}: joined in {startup_s:.1f} s; up to {slots} trial(s) at once, {self.config.cpus_per_trial} CPU(s) each"
            )
            probe = heldout_probe(validation, self.config.seed)
            self._loop(tuner, ray.put((train.x, train.y, validation.x, validation.y, probe.x, probe.y)), slots)
        finally:
            ray.shutdown()

    def _loop(self, tuner: kt.Tuner, data: ray.ObjectRef, slots: int) -> None:
        oracle, cpus = tuner.oracle, self.config.cpus_per_trial
        oracle.verbose = 0  # Keras Tuner's own tables: the progress lines say it
        task = ray.remote(run_trial).options(num_cpus=cpus, max_retries=self.config.trial_retries)
        tuner.save()  # a resume reloads the oracle only where the tuner was saved
        running: dict[ray.ObjectRef, _Running] = {}
        free = [f"ray-{i}" for i in range(slots)]
        stopped, pinged = False, time.monotonic()
        try:
            while True:
                interrupts.raise_if_requested()
                while free and not stopped:
                    tuner.pre_create_trial()  # the budget's check, as in Keras Tuner's own loop
                    trial = oracle.create_trial(free[0])
                    if trial.status == STOPPED:
                        stopped = True
                    elif trial.status == RUNNING:
                        job, room = self._job(tuner, trial)
                        self._check_room(tuner, [*running.values(), _Running(trial, free[0], room)])
                        running[task.remote(job, data)] = _Running(trial, free.pop(0), room)
                    else:
                        break  # Hyperband waits for the round's running trials
                if not running:
                    break
                done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)
                for ref in done:
                    ended = running.pop(ref)
                    free.append(ended.tuner_id)
                    self._end(tuner, ended.trial, ref)
                self._check_room(tuner, running.values())
                if time.monotonic() - pinged > PING_S:
                    # The workers wait for a tracking server that stopped answering; so does this
                    # process, saying so, and it stops the search past the same limit.
                    tuner.tracker.metric("ray_startup_s")
                    pinged = time.monotonic()
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"  # as tracking.tracked_run ends in-process trials
            for ref, each in running.items():
                ray.cancel(ref, force=True)
                with contextlib.suppress(Exception):  # the store may be what failed
                    tuner.tracker.end_trial_runs(each.trial.trial_id, status, "the search stopped")
            raise

    def _job(self, tuner: kt.Tuner, trial: kt.engine.trial.Trial) -> tuple[TrialJob, float]:
        """The trial's task, and the room its checkpoint will need here."""
        earlier = trial.hyperparameters.values.get("tuner/trial_id")
        spec = tuner.trial_spec(trial, copy.deepcopy(tuner.pruner))  # the worker's own copy of the median rule
        job = TrialJob(
            spec=spec,
            hyperparameters=trial.hyperparameters.copy(),
            hypermodel=tuner.hypermodel,
            parent_run_id=tuner.tracker.run_id,
            config=self.config,
            weights=tuner.load_model(tuner.oracle.get_trial(earlier)).get_weights() if earlier else None,
            credentials=tracking_credentials(),
        )
        return job, checkpoint_bytes(weight_bytes(tuner.hypermodel.build(trial.hyperparameters.copy())))

    @staticmethod
    def _check_room(tuner: kt.Tuner, running) -> None:
        """A disk without room for the running trials' checkpoints stops the search, as in-process."""
        running = list(running)
        if running:
            try:
                check_room(Path(tuner.project_dir), sum(each.checkpoint_bytes for each in running))
            except OSError as full:
                raise SearchStopped(running[-1].trial.trial_id, full, "no space left on device") from full

    def _end(self, tuner: kt.Tuner, trial: kt.engine.trial.Trial, ref: ray.ObjectRef) -> None:
        """Tell the oracle how the trial ended; keep its weights as Keras Tuner's checkpoint."""
        try:
            outcome: TrialOutcome = ray.get(ref)
        except ray.exceptions.RayError as err:  # lost more often than trial_retries, or could not run
            reason = f"Ray could not finish the trial: {_reason(err)}"
            tuner.tracker.end_trial_runs(trial.trial_id, "KILLED", reason)
            outcome = TrialOutcome(TrialResult(trial.trial_id, True, reason))
        if outcome.stopped is not None:
            raise SearchStopped(trial.trial_id, outcome.stopped, "a fault that stops the search")
        result = outcome.result
        if not result.failed:
            tuner.oracle.update_trial(trial.trial_id, outcome.metrics, step=outcome.best_epoch)
            save_checkpoint(tuner, trial, outcome.weights)
        trial.status = kt.engine.trial.TrialStatus.FAILED if result.failed else kt.engine.trial.TrialStatus.COMPLETED
        trial.message = result.reason
        faults.at("trial_run_ended")  # the worker ended the trial's run; the oracle has not saved it
        tuner.oracle.end_trial(trial)
        tuner.save()  # as Keras Tuner's own loop does after each trial: what a resume reloads
        if not result.failed:
            result.score = tuner.oracle.get_trial(trial.trial_id).score
        tuner.trial_ended(result)


@dataclass(frozen=True)
class _Running:
    trial: kt.engine.trial.Trial
    tuner_id: str  # the slot it holds
    checkpoint_bytes: float  # the room its checkpoint will need


def worker_environment(cpus: int) -> dict[str, str]:
    """What a trial's worker process starts with: TensorFlow's threads for its CPUs, and the
    tracking store this process logs to (its credentials travel with each task)."""
    env = dict.fromkeys(THREAD_VARIABLES, str(cpus))
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    return env


def tracking_credentials() -> dict[str, str]:
    """The tracking store's credentials in this process's environment."""
    return {name: os.environ[name] for name in CREDENTIALS if os.environ.get(name)}


def save_checkpoint(tuner: kt.Tuner, trial: kt.engine.trial.Trial, weights: list[np.ndarray]) -> None:
    """The trial's weights where `tuner.load_model(trial)` (and Hyperband's next round) reads them."""
    model = tuner.hypermodel.build(trial.hyperparameters.copy())
    model.set_weights(weights)
    folder = Path(tuner.get_trial_dir(trial.trial_id))
    check_room(folder, checkpoint_bytes(sum(w.nbytes for w in weights)))
    model.save_weights(folder / CHECKPOINT)
    (folder / BUILD_CONFIG).write_text(json.dumps(model.get_build_config()))


def run_trial(job: TrialJob, data: tuple[np.ndarray, ...]) -> TrialOutcome:
    """One trial, in a Ray worker: the trial's lifecycle (search/trial.py) around its training."""
    keras.backend.clear_session()  # a worker process runs many trials: free the last one's graph
    settings, spec = job.config, job.spec
    os.environ.update(job.credentials)
    try:
        tracker = tracking.attach(job.parent_run_id, {"ray_node": ray.util.get_node_ip_address()}, settings.tracking_wait_s)
    except Exception as err:  # the server gone past the wait, as for any tracking call in a trial
        return TrialOutcome(TrialResult(spec.trial_id, True, str(err)), stopped=err)
    lifecycle = TrialLifecycle(tracker, spec)  # checkpoints are written by the driver, which checks their room
    try:
        # An earlier attempt whose worker died left its run RUNNING: this attempt replaces it.
        lifecycle.replaces_earlier_attempt("its Ray worker or node died; Ray ran the trial again")
        lifecycle.begin()
        failed, reason, watch = True, "", LifecycleCallback(lifecycle)
        try:
            train, validation = Split(data[0], data[1]), Split(data[2], data[3])
            keras.utils.set_random_seed(settings.seed)
            model = job.hypermodel.build(job.hyperparameters.copy())
            if job.weights is not None:
                model.set_weights(job.weights)
            history = model.fit(
                training_dataset(train, settings.batch_size, settings.seed),
                validation_data=evaluation_dataset(validation, settings.batch_size),
                initial_epoch=int(job.hyperparameters.values.get("tuner/initial_epoch", 0)),
                epochs=spec.planned_epochs,
                callbacks=[*trial_callbacks(settings, Split(data[4], data[5])), watch],
                verbose=0,
            )
            lifecycle.check_losses(history.history.get("loss", []))
            failed = False
        except SearchStopped:
            raise
        except Exception:
            reason = failure_reason(traceback.format_exc())
        score = None if failed else lifecycle.best_logs["val_accuracy"]
        result = lifecycle.end(failed, reason, score)
    except SearchStopped as stop:  # the run stays open: the resume ends it and runs the trial again
        return TrialOutcome(TrialResult(spec.trial_id, True, str(stop)), stopped=stop.error)
    return TrialOutcome(result, lifecycle.best_logs, lifecycle.best_epoch, watch.best_weights)


def _package_dir(name: str) -> str:
    return str(Path(__import__(name).__file__).parent)


def _reason(err: BaseException) -> str:
    """The error's last line: Ray's errors carry the remote traceback before it."""
    return failure_reason(str(err)) if str(err).strip() else type(err).__name__
