"""Whole searches, end to end as a user runs them (`mlflow run`), and trials on Ray; their
figures read back from the tracking store, not from what the search printed."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A slower CPU, approximated on this one: one core, oneDNN held to AVX2 (no AVX-512, no
# bf16 or AMX kernels) and float32, as on the AVX2-only machines (benchmarks/RESULTS.md
# compares the speeds).
SLOWED_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
SLOWED_PREFIX = ("taskset", "-c", "0")
# A model name of its own: a champion registered in bf16 by an unslowed run cannot even be
# evaluated where oneDNN is held to AVX2 (it has no bf16 kernels there to emulate with).
SLOWED_SETTINGS = ("precision=float32", "model_name=mnist-cnn-slowed")


def profile_end_to_end(profile: str, seed: int, settings: list[str] = (), slowed: bool = False) -> dict:
    """`mlflow run . -P profile=<profile> -P seed=<seed> [-P name=value ...]` (`slowed`: as on a
    slower CPU): its wall time, and from the tracking store what the run planned and did,
    the test accuracy and the robustness suite."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(SLOWED_ENV if slowed else {})}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # set by the runs above
        env.pop(name, None)
    experiment = f"benchmark-{profile}" + ("-slowed" if slowed else "")
    command = [*(SLOWED_PREFIX if slowed else ()), sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    command += ["-P", f"profile={profile}", "-P", f"seed={seed}", "--experiment-name", experiment]
    command += [arg for setting in (*settings, *(SLOWED_SETTINGS if slowed else ())) for arg in ("-P", setting)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    run_id = newest_search_run(experiment)
    if done.returncode or not run_id:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"seed": seed, "wall_s": wall, "exit": done.returncode, "error": " | ".join(tail)}
    return {"seed": seed, "wall_s": wall, "exit": 0, **search_summary(run_id)}


def newest_search_run(experiment: str) -> str | None:
    """The id of the newest search run of `experiment` in the tracking store, if any."""
    from search import tracking  # noqa: PLC0415

    client = tracking.PatientClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], "tags.command = 'search'", order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


# The fixed budget of the scale-out figures: the default space's first trials, none
# pruned (every run trains the same epochs), no final training.
SCALE_OUT_BUDGET = (
    "budget_minutes=0",
    "max_trials=8",
    "max_epochs=2",
    "prune=false",
    "final_epochs=0",
    "robust_size=1000",
    "model_name=mnist-cnn-scale-out",
)


def trials_at_once(parallel: int, seed: int) -> dict:
    """`python -m search run` of SCALE_OUT_BUDGET with `parallel` trials at once on a Ray
    cluster it starts (the machine's cores shared among them; 0: without Ray): the wall
    time of the whole run and of its trials, CPU seconds per trial, Ray's start-up."""
    cores = os.cpu_count() or 1
    ray = ["ray=local", f"parallel_trials={parallel}", f"cpus_per_trial={max(1, cores // parallel)}"] if parallel else []
    command = [sys.executable, "-m", "search", "run", "--profile", "default", f"seed={seed}", *SCALE_OUT_BUDGET, *ray]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_EXPERIMENT_NAME"] = "benchmark-scale-out"
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    run_id = newest_search_run("benchmark-scale-out")
    if done.returncode or not run_id:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"parallel": parallel, "wall_s": wall, "exit": done.returncode, "error": " | ".join(tail)}
    from search import tracking  # noqa: PLC0415

    client = tracking.PatientClient()
    parent = client.get_run(run_id)
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    trials = client.search_runs([parent.info.experiment_id], query, max_results=1000)
    span_s = (max(t.info.end_time for t in trials) - min(t.info.start_time for t in trials)) / 1000
    cpu = [t.data.metrics["cpu_seconds"] for t in trials if "cpu_seconds" in t.data.metrics]
    return {
        "parallel": parallel,
        "cpus_per_trial": max(1, cores // parallel) if parallel else cores,
        "exit": 0,
        "wall_s": wall,
        "trials": len(trials),
        "trials_span_s": span_s,
        "cpu_seconds_per_trial": statistics.fmean(cpu) if cpu else None,
        "ray_startup_s": parent.data.metrics.get("ray_startup_s"),
    }


def search_summary(run_id: str) -> dict:
    """What search run `run_id` planned and did, from the tracking store: its budget and time,
    trials (distinct architectures: active hyperparameters other than the learning rate),
    pruned and cut trials, the winner (hyperparameters, multiply-adds, final epochs), the test
    accuracy, the robustness suite (the mean and each corruption's) and the registry decision."""
    from search import tracking  # noqa: PLC0415
    from search.reporting.progress import describe  # noqa: PLC0415

    client = tracking.PatientClient()
    parent = client.get_run(run_id)
    records = tracking.SearchTracker(parent).trial_records()
    not_architecture = ("learning_rate", "tuner/")
    architectures = {tuple(sorted((k, v) for k, v in r["hyperparameters"].items() if not k.startswith(not_architecture))) for r in records}
    metrics, params = parent.data.metrics, parent.data.params
    robust = {k.removeprefix("robust_accuracy_"): v for k, v in metrics.items() if k.startswith("robust_accuracy_")}
    winner_id = parent.data.tags.get("winner_trial_id")
    winner = next((r["hyperparameters"] for r in records if r["trial_id"] == winner_id and r["status"] == "FINISHED"), {})
    return {
        "budget_s": float(params.get("config.budget_minutes", 0)) * 60,
        "run_s": metrics.get("run_seconds"),
        "search_s": metrics.get("search_seconds"),
        "precision": params.get("precision_used", ""),
        "trials": len(records),
        "architectures": len(architectures),
        "pruned": sum(bool(r["pruned"]) for r in records),
        "cut": sum(bool(r["cut"]) for r in records),
        "epochs_saved": int(sum(r["epochs_saved"] or 0 for r in records)),
        "winner": describe(winner),
        "winner_multiply_adds": metrics.get("winner_multiply_adds"),
        "final_epochs": metrics.get("final_epochs_run", metrics.get("final_0_epochs_run", 0)),
        # The kept epoch's: what the final training is judged by before the test digits are read.
        "final_val_accuracy": max((m.value for m in client.get_metric_history(run_id, "final_val_accuracy")), default=None),
        "test_accuracy": metrics["test_accuracy"],
        "robust_heldout_accuracy_mean": metrics.get("robust_heldout_accuracy_mean"),
        "robust_trained_accuracy_mean": metrics.get("robust_trained_accuracy_mean"),
        "robust_accuracy": robust,
        "decision": parent.data.tags.get("registry_decision", ""),
    }
