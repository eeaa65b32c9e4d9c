"""Distributed search on Keras Tuner's own chief/worker mode.

The chief is the process that owns the search's parent run: it serves the
tuner's oracle over gRPC with Keras Tuner's `OracleServicer`. A worker is
`python -m search worker`: Keras Tuner's tuner with `KERASTUNER_TUNER_ID`,
`KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT` set, asking the chief for
trials, training them on the shared tuner directory, and logging each trial as
a child run of the parent, tagged with its `worker`.

Keras Tuner's chief on its own never notices a dead worker: the worker's trial
stays in `oracle.ongoing_trials`, its id in `oracle.tuner_ids`, and the chief
waits for them forever. The chief here watches the workers it started (and,
with `worker_timeout_s`, how long any trial has gone without reporting an
epoch) and ends such a trial FAILED and its run KILLED, so the other workers
finish the search.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import keras
import keras_tuner as kt
from keras_tuner.src import protos
from keras_tuner.src.distribute.oracle_chief import OracleServicer

from experiments import ConfigError, from_params
from search import data as data_module
from search import interrupts, tracking
from search.data import DataError
from search.tuner import make_tuner, run_trials

POLL_S = 0.5  # how often the chief looks at its workers and trials
TERMINATE_S = 10  # how long a local worker has to exit on SIGTERM before it is killed


class WorkersFailed(RuntimeError):
    """Every worker exited before the search was done."""


@dataclass
class Chief:
    """Serves the oracle of a search and starts `workers` local worker processes."""

    workers: int = 2  # local worker processes; 0: workers are started elsewhere
    threads: int = 1  # TensorFlow threads per local worker
    host: str = "127.0.0.1"  # address the oracle binds; 0.0.0.0 for workers on other machines
    port: int = 0  # 0: a free port
    worker_timeout_s: float = 0  # >0: end a trial that reports no epoch for this long
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def search(self, tuner: kt.Tuner, tracker: tracking.SearchTracker) -> None:
        """Run the search on the workers; return once every trial has ended."""
        oracle = tuner.oracle
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        servicer = OracleServicer(oracle)
        protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{self.host}:{self.port}")
        server.start()
        tuner.save()  # as Keras Tuner's chief does before serving
        address = f"{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{port}"
        print(
            f"oracle serving on {self.host}:{port}; start a worker with:\n  python -m search worker --parent-run-id {tracker.run_id} --oracle <this host>:{port} --tuner-id <unique name>",
            flush=True,
        )
        activity: dict[str, tuple[object, float]] = {}
        try:
            for index in range(self.workers):
                self._start_worker(f"worker-{index}", tracker.run_id, address)
            while not (servicer.stop_triggered and not oracle.ongoing_trials and not oracle.tuner_ids):
                interrupts.raise_if_requested()
                time.sleep(POLL_S)
                for tuner_id, process in self.processes.items():
                    if process.poll() is not None and (tuner_id in oracle.tuner_ids or tuner_id in oracle.ongoing_trials):
                        self._end_worker(
                            oracle, tracker, tuner_id, f"worker {tuner_id} exited with status {process.returncode} during the trial"
                        )
                if self.worker_timeout_s:
                    self._end_silent_trials(oracle, tracker, activity)
                if self.processes and all(p.poll() is not None for p in self.processes.values()) and not servicer.stop_triggered:
                    raise WorkersFailed(f"all {len(self.processes)} workers exited before the search was done")
        finally:
            for process in self.processes.values():
                if process.poll() is None:
                    process.terminate()
            for process in self.processes.values():
                try:
                    process.wait(timeout=TERMINATE_S)
                except subprocess.TimeoutExpired:
                    process.kill()  # a stopped or hung worker does not act on SIGTERM
                    process.wait()
            server.stop(grace=None)

    def _start_worker(self, tuner_id: str, parent_run_id: str, address: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
        # The worker must not adopt the parent run (mlflow run passes MLFLOW_RUN_ID):
        # it logs trial runs under it instead.
        command = [
            sys.executable,
            "-m",
            "search",
            "worker",
            "--parent-run-id",
            parent_run_id,
            "--oracle",
            address,
            "--tuner-id",
            tuner_id,
            "--threads",
            str(self.threads),
        ]
        self.processes[tuner_id] = subprocess.Popen(command, env=env)

    def _end_worker(self, oracle: kt.Oracle, tracker: tracking.SearchTracker, tuner_id: str, reason: str) -> None:
        """End the worker's open trial FAILED (its run KILLED) and forget the worker."""
        trial = oracle.ongoing_trials.get(tuner_id)
        if trial is not None:
            trial.status, trial.message = kt.engine.trial.TrialStatus.FAILED, reason
            oracle.end_trial(trial)
            tracker.end_trial_runs(trial.trial_id, "KILLED", reason)
            print(f"trial {trial.trial_id} FAILED: {reason}", flush=True)
        oracle.tuner_ids.discard(tuner_id)

    def _end_silent_trials(self, oracle: kt.Oracle, tracker: tracking.SearchTracker, activity: dict) -> None:
        now = time.monotonic()
        for tuner_id, trial in list(oracle.ongoing_trials.items()):
            reported = tuple(len(m.get_history()) for m in trial.metrics.metrics.values())
            seen, since = activity.get(trial.trial_id, (None, now))
            if reported != seen:
                activity[trial.trial_id] = (reported, now)
            elif now - since > self.worker_timeout_s:
                self._end_worker(oracle, tracker, tuner_id, f"worker {tuner_id} reported nothing for {self.worker_timeout_s:.0f} s")


def run_worker(parent_run_id: str, oracle_address: str, tuner_id: str, verbose: int = 0) -> int:
    """Train trials from the chief at `oracle_address` until it has none left; how many ran."""
    host, _, port = oracle_address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--oracle must be host:port, got {oracle_address!r}")
    os.environ.update(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=port)
    params = tracking.resumable_params(parent_run_id)
    config = from_params(params)
    data = data_module.load_mnist(data_module.data_source(config.data), config.validation_size)
    if data.digest != params.get("data_sha256"):
        raise DataError(f"{data.source}: not the data of search {parent_run_id} (sha256 {data.digest[:12]}...)")
    keras.utils.set_random_seed(config.seed)
    train = data_module.subset(data.train, config.train_subset)
    tracker = tracking.attach(parent_run_id, worker=tuner_id)
    directory = Path(config.output_dir) / parent_run_id
    # resume=True: never overwrite, which would delete the chief's shared tuner directory.
    # The chief's precision, not this machine's own choice: one search, one set of numbers.
    tuner = make_tuner(config, tracker, directory, project_name="tuner", resume=True, dtype_policy=params.get("precision_used", "float32"))
    tuner.progress.prefix = f"[{tuner_id}] "
    try:
        run_trials(tuner, config, train, data.validation, verbose)
        tracker.flush()
    except BaseException:
        tracker.end_open_trials("KILLED")
        raise
    finally:
        tracker.close()
    return tracker.trials_logged
