"""Trials as Ray tasks: many at once, on one machine or a cluster.

A backend of the one driver loop (search/driver.py), which stays in this process
with the oracle and the search run. Each trial is a Ray task reserving
`cpus_per_trial` CPUs, with TensorFlow's thread pools sized to match: it runs
search/trial.py's `run_trial` on the data the driver put in Ray's object store
once, logs itself as the nested run `trial-<id>` (tag `ray_node`) to the tracking
server that MLFLOW_TRACKING_URI names, asks the driver's median rule after each
epoch (a Ray actor holding it), and returns its curve and its best epoch's
weights, which the driver keeps. Nothing but Ray and MLflow is shared between machines.

A task whose worker process or node died is run again by Ray, up to
`trial_retries` times; the new attempt ends the lost one's run KILLED and logs
a run of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from pathlib import Path

import keras_tuner as kt
import ray

from experiments import ConfigError, SearchConfig
from search import tracking
from search.pruning import MedianStopping
from search.trial import SearchStopped, TrialData, TrialJob, TrialLifecycle, TrialOutcome, TrialResult, failure_reason, run_trial

PACKAGES = ("experiments", "model_zoo", "search")  # shipped to every worker: no shared file system
CONNECT_TIMEOUT_S = 10  # an address that does not answer fails within this
WAIT_S = 1.0  # how often the driver looks up from waiting, to act on Ctrl-C
PING_S = 5.0  # how often it asks the tracking server whether it still answers
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")  # MLflow reads them
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


class ClusterError(ConfigError):
    """The Ray address names no cluster that answers: the user's to fix."""


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
    """A backend of Ray tasks, up to `parallel_trials` at once. Faults that stop an
    in-process search stop this one the same way: a tracking server gone past
    `tracking_wait_s` (the worker waits for it as the driver does, and the driver, while
    it waits for the trials, asks the server whether it still answers)."""

    verbose = 0  # no progress bars from workers

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

    def start(self, tuner: kt.Tuner, data: TrialData) -> tuple[list[str], SharedRule | None]:
        """The slots the cluster holds; the data in its object store; the tuner's median rule in an actor."""
        self.tuner, self.tracker, self.pinged = tuner, tuner.tracker, time.monotonic()
        slots = self.config.parallel_trials or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.config.cpus_per_trial)
        self.tracker.log_metrics({"ray_startup_s": self.startup_s})
        print(
            f"Ray {ray.__version__}: joined in {self.startup_s:.1f} s; up to {slots} trial(s) at once, "
            f"{self.config.cpus_per_trial} CPU(s) each"
        )
        self.data = ray.put(data)
        self.task = ray.remote(ray_trial).options(num_cpus=self.config.cpus_per_trial, max_retries=self.config.trial_retries)
        self.rule = SharedRule(tuner.pruner) if tuner.pruner else None
        return [f"ray-{i}" for i in range(slots)], self.rule

    def submit(self, job: TrialJob) -> ray.ObjectRef:
        return self.task.remote(dataclasses.replace(job, credentials=tracking_credentials()), self.data)

    def wait(self, handles: list) -> list:
        done, _ = ray.wait(handles, num_returns=1, timeout=WAIT_S)
        if time.monotonic() - self.pinged > PING_S:
            # The workers wait for a tracking server that stopped answering; so does this
            # process, saying so, and it stops the search past the same limit.
            self.tracker.metric("ray_startup_s")
            self.pinged = time.monotonic()
        return done

    def outcome(self, handle: ray.ObjectRef, trial_id: str) -> TrialOutcome:
        try:
            return ray.get(handle)
        except ray.exceptions.RayError as err:  # lost more often than trial_retries, or could not run
            reason = f"Ray could not finish the trial: {_reason(err)}"
            self.tracker.end_trial_runs(trial_id, "KILLED", reason)
            return TrialOutcome(TrialResult(trial_id, True, reason))

    def cancel(self, handle: ray.ObjectRef) -> None:
        ray.cancel(handle, force=True)

    def close(self) -> None:
        try:
            if getattr(self, "rule", None):
                with contextlib.suppress(Exception):  # a cluster gone: the error that stopped the loop says so
                    self.tuner.pruner.__dict__.update(self.rule.state().__dict__)  # what the trials taught it
        finally:
            ray.shutdown()


class _RuleHolder:
    """The Ray actor holding the driver's median rule for the search's duration."""

    def __init__(self, rule: MedianStopping):
        self.rule = rule

    def report(self, trial_id: str, epoch: int, value: float, last: bool) -> bool:
        return self.rule.report(trial_id, epoch, value, last)

    def end(self, trial_id: str, failed: bool) -> None:
        self.rule.end(trial_id, failed)

    def state(self) -> MedianStopping:
        return self.rule


class SharedRule:
    """The driver's median rule, shared live with the trials: each epoch's report and each
    trial's end go to one actor, so that a trial is judged against every trial that has
    finished by then, also those that finished after it was sent. Picklable."""

    def __init__(self, rule: MedianStopping):
        self.actor = ray.remote(num_cpus=0)(_RuleHolder).remote(rule)

    def report(self, trial_id: str, epoch: int, value: float, last: bool = False) -> bool:
        return ray.get(self.actor.report.remote(trial_id, epoch, value, last))

    def end(self, trial_id: str, failed: bool = False) -> None:
        ray.get(self.actor.end.remote(trial_id, failed))

    def state(self) -> MedianStopping:
        return ray.get(self.actor.state.remote())


def worker_environment(cpus: int) -> dict[str, str]:
    """What a trial's worker process starts with: TensorFlow's threads for its CPUs, and the
    tracking store this process logs to (its credentials travel with each task)."""
    env = dict.fromkeys(THREAD_VARIABLES, str(cpus))
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    return env


def tracking_credentials() -> dict[str, str]:
    """The tracking store's credentials in this process's environment."""
    return {name: os.environ[name] for name in CREDENTIALS if os.environ.get(name)}


def ray_trial(job: TrialJob, data: TrialData) -> TrialOutcome:
    """One trial, in a Ray worker: attached to the search run, then search/trial.py's `run_trial`."""
    os.environ.update(job.credentials)
    try:
        tracker = tracking.attach(job.parent_run_id, {"ray_node": ray.util.get_node_ip_address()}, job.config.tracking_wait_s)
        # An earlier attempt whose worker died left its run RUNNING: this attempt replaces it.
        TrialLifecycle(tracker, job.spec).replaces_earlier_attempt("its Ray worker or node died; Ray ran the trial again")
    except SearchStopped as stop:
        return TrialOutcome(TrialResult(job.spec.trial_id, True, str(stop)), stopped=stop.error)
    except Exception as err:  # the server gone past the wait, as for any tracking call in a trial
        return TrialOutcome(TrialResult(job.spec.trial_id, True, str(err)), stopped=err)
    return run_trial(job, data, tracker)


def _package_dir(name: str) -> str:
    return str(Path(__import__(name).__file__).parent)


def _reason(err: BaseException) -> str:
    """The error's last line: Ray's errors carry the remote traceback before it."""
    return failure_reason(str(err)) if str(err).strip() else type(err).__name__
