"""What users feel, measured in one run: training speed, tracking overhead,
inference speed and, optionally, whole profiles end to end.

    MNIST_NPZ=../shared/data/mnist.npz python -m benchmarks [--profiles fast,default]

Prints a table and writes JSON (`--out`). Everything logs to a throw-away
sqlite store. Compared measurements are interleaved (A, B, A, B, ...) so that
stalls and noise hit both sides, and reported as medians.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
# A slower CPU, approximated on this one: one core, oneDNN held to AVX2 (no AVX-512, no
# bf16 or AMX kernels) and float32, as on the AVX2-only machines (benchmarks/RESULTS.md
# compares the speeds).
SLOWED = "(slowed)"
SLOWED_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
SLOWED_PREFIX = ("taskset", "-c", "0")
# A model name of its own: a champion registered in bf16 by an unslowed run cannot even be
# evaluated where oneDNN is held to AVX2 (it has no bf16 kernels there to emulate with).
SLOWED_SETTINGS = ("precision=float32", "model_name=mnist-cnn-slowed")
TARGETS = {
    "training_speedup": 1.5,  # project's training path / plain fp32 model.fit, at least
    "tracking_overhead": 1.02,  # search with MLflow / without, at most
    "inference_digits_per_s": 10_000,  # registered model via pyfunc, at least
    # Per profile (and slowed run): wall seconds of `mlflow run` at most (its budget and 5%),
    # test accuracy at least (the mean over seeds), and each seed's at least.
    "profiles": {
        "fast": (63, 0.993, 0.0),
        f"fast {SLOWED}": (63, 0.990, 0.0),
        "default": (630, 0.9965, 0.0),
        f"default {SLOWED}": (630, 0.9955, 0.0),
        "thorough": (3780, 0.998, 0.0),
    },
    "distinct_architectures": {"default": 14},  # at least, per search
    # Per profile: robust_accuracy_mean at least, and every corruption of the suite at least.
    "robustness": {"default": (0.97, 0.90), f"default {SLOWED}": (0.97, 0.90)},
}
TRAINING_IMAGES = 10_240  # one timed epoch per variant and round
RESULTS = REPO / "benchmarks" / "RESULTS.md"  # every run's table, newest first: the figures the README points to
RESULTS_TITLE = "# Benchmark results\n\nWritten by `python -m benchmarks` (benchmarks/run.py), newest first. Compare ratios within one run: these machines vary by up to 2x between runs.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of training epochs (default 5)")
    parser.add_argument("--pairs", type=int, default=9, help="interleaved pairs of searches with and without tracking (default 9)")
    parser.add_argument("--profiles", default="", help="also run these profiles end to end with `mlflow run`, e.g. fast,default")
    parser.add_argument("--profiles-only", action="store_true", help="only the --profiles runs")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds: each profile runs once per seed (default 42)")
    parser.add_argument("--settings", default="", help="settings for the profile runs, as name=value[;name=value], e.g. augment=jitter")
    parser.add_argument("--slowed", action="store_true", help="also run each profile as on a slower CPU (one core, AVX2, float32)")
    parser.add_argument(
        "--parallel",
        default="",
        help="also time a fixed budget of trials with these numbers of trials at once on Ray, e.g. 1,2 (0: without Ray)",
    )
    parser.add_argument("--out", default="benchmark.json", help="JSON results (default: benchmark.json)")
    parser.add_argument("--tracking-uri", default="", help="keep the runs in this store (default: a throw-away sqlite store)")
    parser.add_argument(
        "--results",
        default=str(RESULTS),
        help=f"the Markdown file the table is added to, newest first (default: {RESULTS.relative_to(REPO)}; '' to skip)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        from search import data as data_module  # noqa: PLC0415 - TensorFlow loads after the environment is set

        data = data_module.load_mnist(data_module.data_source())
        results = {"machine": machine(), "data": data.source}
        if not args.profiles_only:
            results["training"] = training_throughput(data, args.rounds)
            results["tracking"] = tracking_overhead(data, args.pairs, Path(tmp))
            results["inference"] = inference_throughput(data)
        profiles = [p for p in args.profiles.split(",") if p]
        seeds = [int(seed) for seed in args.seeds.split(",") if seed]
        settings = [item for item in args.settings.split(";") if item]
        results["settings"] = settings
        results["profiles"] = {p: [profile_end_to_end(p, seed, settings) for seed in seeds] for p in profiles}
        if args.slowed:
            for p in profiles:
                results["profiles"][f"{p} {SLOWED}"] = [profile_end_to_end(p, seed, settings, slowed=True) for seed in seeds]
        results["scale_out"] = [trials_at_once(int(n), seeds[0]) for n in args.parallel.split(",") if n]

    print(table(results))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    if args.results:
        add_to_results(
            Path(args.results),
            results,
            "python -m benchmarks " + shlex.join(measured_arguments(argv if argv is not None else sys.argv[1:])),
        )
        print(f"added to: {args.results}")
    return 0


def measured_arguments(argv: list[str]) -> list[str]:
    """The arguments that decide what is measured: not where the results and runs are written."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--results", "--tracking-uri"):
            skip = True
        elif not arg.startswith(("--out=", "--results=", "--tracking-uri=")):
            kept.append(arg)
    return kept


def add_to_results(path: Path, results: dict, command: str) -> None:
    """Put this run's table at the top of the results file, under its command and commit;
    earlier runs stay below it (the file's first line is its title)."""
    commit = (
        subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False
    ).stdout.strip()
    section = f"## `{command}`\n\ncommit {commit}{' with uncommitted changes' if dirty else ''}, {results['machine']['date']}\n\n{table(results)}\n"
    text = path.read_text() if path.exists() else RESULTS_TITLE
    title, _, earlier = text.partition("\n## ")
    path.write_text(title.rstrip() + "\n\n" + section + ("\n## " + earlier if earlier else ""))


def training_throughput(data, rounds: int) -> dict:
    """Images/s of one epoch of the default batch-norm CNN: the project's training
    path (tf.data from memory, the profile's batch size and precision, fused batch
    norm) against plain fp32 `model.fit(x, y)` of the same network built of
    Keras' own layers (Keras' default batch size of 32)."""
    import keras_tuner as kt  # noqa: PLC0415

    from experiments import resolve  # noqa: PLC0415
    from model_zoo import BatchNormCNN, precision_policy, with_keras_layers  # noqa: PLC0415
    from search.data import Split  # noqa: PLC0415
    from search.precision import choose_precision, cpu_has_bf16  # noqa: PLC0415
    from search.train import training_dataset  # noqa: PLC0415

    config = resolve("default")
    split = Split(data.train.x[:TRAINING_IMAGES], data.train.y[:TRAINING_IMAGES])
    policy = choose_precision(config.precision).policy
    batch = config.batch_size

    def build(dtype_policy: str):
        with precision_policy(dtype_policy):
            return BatchNormCNN().build(kt.HyperParameters())

    project, keras_bn = build(policy), with_keras_layers(build(policy))
    plain, plain_batch = with_keras_layers(build("float32")), with_keras_layers(build("float32"))
    variants: dict[str, Callable[[Split], object]] = {
        f"project path ({policy}, tf.data, batch {batch}, fused batch norm)": lambda s: project.fit(
            training_dataset(s, batch, config.seed), shuffle=False, verbose=0
        ),
        "plain fp32 model.fit(x, y), batch 32": lambda s: plain.fit(s.x, s.y, verbose=0),
        f"plain fp32 model.fit(x, y), batch {batch}": lambda s: plain_batch.fit(s.x, s.y, batch_size=batch, verbose=0),
        # Which part of the speedup is the fused batch norm.
        "project path with Keras' BatchNormalization": lambda s: keras_bn.fit(
            training_dataset(s, batch, config.seed), shuffle=False, verbose=0
        ),
    }
    if cpu_has_bf16() and policy != "mixed_bfloat16":
        bf16 = build("mixed_bfloat16")
        variants[f"mixed_bfloat16, tf.data, batch {batch}, fused batch norm"] = lambda s: bf16.fit(
            training_dataset(s, batch, config.seed), shuffle=False, verbose=0
        )
    warm_up = Split(split.x[: batch * 4], split.y[: batch * 4])
    for fit in variants.values():
        fit(warm_up)  # builds the train function outside the timing
    seconds, cpu_seconds = _interleaved(variants, rounds, lambda fit: fit(split))
    rates = {name: len(split) / statistics.median(times) for name, times in seconds.items()}
    cpu_per_image = {name: statistics.median(times) / len(split) for name, times in cpu_seconds.items()}
    names = list(variants)
    return {
        "images": len(split),
        "rounds": rounds,
        "precision_chosen": policy,
        "images_per_s": rates,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "speedup": rates[names[0]] / rates[names[1]],
        "speedup_same_batch": rates[names[0]] / rates[names[2]],
        # Not the target, but tf.data's autotuner stalls (in Keras' own pipeline of plain fit) stretch wall time, not CPU seconds.
        "cpu_speedup": cpu_per_image[names[1]] / cpu_per_image[names[0]],
    }


def tracking_overhead(data, pairs: int, tmp: Path) -> dict:
    """Wall time of the smoke profile's search (3 trials, 2 epochs, 6,000 images) with
    MLflow logging against Keras Tuner's own tuner with tracking switched off."""
    import keras  # noqa: PLC0415

    from experiments import resolve  # noqa: PLC0415
    from search import tracking  # noqa: PLC0415
    from search.data import subset  # noqa: PLC0415
    from search.executors import InProcess  # noqa: PLC0415
    from search.tuner import make_tuner  # noqa: PLC0415

    config = resolve("smoke", precision="float32")
    train = subset(data.train, config.train_subset)

    def search(tracked: bool) -> None:
        keras.utils.set_random_seed(config.seed)
        folder = Path(tempfile.mkdtemp(dir=tmp))
        with contextlib.redirect_stdout(io.StringIO()):
            if tracked:
                with tracking.tracked_run("benchmark-tracking") as tracker:
                    InProcess(config).run(make_tuner(config, tracker, folder, "tuner"), train, data.validation)
            else:
                InProcess(config).run(make_tuner(config, None, folder, "tuner"), train, data.validation)

    search(False)  # warm-up: TensorFlow's first graphs, MLflow's store creation
    search(True)
    seconds, cpu_seconds = _interleaved({"with MLflow": True, "without": False}, pairs, search)
    ratios = [on / off for on, off in zip(seconds["with MLflow"], seconds["without"])]
    # CPU seconds are not the target, but stalls and other processes stretch them less than wall time.
    cpu_ratio = statistics.median(on / off for on, off in zip(cpu_seconds["with MLflow"], cpu_seconds["without"]))
    return {
        "search": "smoke profile: random, 3 trials x 2 epochs, 6,000 images",
        "pairs": pairs,
        "seconds": seconds,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "cpu_seconds": cpu_seconds,
        "cpu_ratio": cpu_ratio,
        # timeit's reading: stalls and other processes only add time, so the fastest run of each is the least disturbed.
        "fastest_ratio": min(seconds["with MLflow"]) / min(seconds["without"]),
    }


def inference_throughput(data, batch_size: int = 1_000, passes: int = 3) -> dict:
    """Digits/s of a registered model loaded as MLflow's pyfunc, on the 10,000 test
    digits as uint8: served with int8 weights (the default) and in float32, interleaved."""
    import keras_tuner as kt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from model_zoo import BatchNormCNN  # noqa: PLC0415
    from search import registry, tracking  # noqa: PLC0415
    from search.assessment import int8_tflite  # noqa: PLC0415

    model = BatchNormCNN().build(kt.HyperParameters())
    # 300 steps: enough for batch norm's moving statistics to settle.
    model.fit(data.train.x[:19_200], data.train.y[:19_200], batch_size=128, epochs=2, verbose=0)
    served = {}
    for form, int8_model in (("int8", int8_tflite(model)), ("float32", None)):
        with contextlib.redirect_stdout(io.StringIO()), tracking.tracked_run("benchmark-inference") as tracker:
            registry.register_if_better(
                tracker, model, {"test_accuracy": 1.0}, {"test_accuracy": 0.5}, f"benchmark-cnn-{form}", "champion", None, int8_model
            )
        served[form] = tracking.load_pyfunc_model(f"models:/benchmark-cnn-{form}@champion")
    digits = np.round(data.test.x[..., 0] * 255).astype(np.uint8)
    predicted = {}

    def classify(form: str) -> None:
        predicted[form] = np.concatenate(
            [served[form].predict(digits[i : i + batch_size])["digit"] for i in range(0, len(digits), batch_size)]
        )

    for form in served:
        served[form].predict(digits[:batch_size])  # warm-up
    seconds, _ = _interleaved({form: form for form in served}, passes, classify)
    return {
        "digits": len(digits),
        "batch_size": batch_size,
        "seconds": seconds,
        "digits_per_s": len(digits) / statistics.median(seconds["int8"]),
        "float32_digits_per_s": len(digits) / statistics.median(seconds["float32"]),
        "accuracy_after_2_epochs_on_19200": {form: float(np.mean(predicted[form] == data.test.y)) for form in served},
    }


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
    robust = {
        k.removeprefix("robust_accuracy_"): v
        for k, v in metrics.items()
        if k.startswith("robust_accuracy_") and k != "robust_accuracy_mean"
    }
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
        "test_accuracy": metrics["test_accuracy"],
        "robust_accuracy_mean": metrics.get("robust_accuracy_mean"),
        "robust_accuracy": robust,
        "decision": parent.data.tags.get("registry_decision", ""),
    }


def table(results: dict) -> str:
    """The results as a Markdown table: figure, measured, target, met."""
    rows = _micro_rows(results) if "training" in results else []
    for profile, runs in results["profiles"].items():
        rows += _profile_rows(profile, runs)
    rows += [_scale_out_row(run) for run in results.get("scale_out", [])]
    settings = f", settings {' '.join(results['settings'])}" if results.get("settings") else ""
    lines = [
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, {results['machine']['date']}{settings}",
        "",
        "| figure | measured | target | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def _profile_rows(profile: str, runs: list[dict]) -> list[tuple[str, str, str, str]]:
    wall_target, mean_target, each_target = TARGETS["profiles"].get(profile, (None, None, None))
    robust_mean_target, robust_each_target = TARGETS["robustness"].get(profile, (None, None))
    rows = []
    for run in runs:
        name = f"profile {profile}, seed {run['seed']}"
        if run.get("exit"):
            rows.append((f"{name}: mlflow run", f"failed: {run['error']}", "", "no"))
            continue
        target = f"<= {wall_target / 60:.2f} min" + (f", >= {each_target:.2%}" if each_target else "") if wall_target else ""
        met = _met(run["wall_s"] <= wall_target and run["test_accuracy"] >= each_target) if wall_target else ""
        rows.append((f"{name}: mlflow run", f"{run['wall_s'] / 60:.2f} min, test {run['test_accuracy']:.2%}", target, met))
        rows.append((f"{name}: plan", _plan(run), "", ""))
        robust = run["robust_accuracy"]
        worst = min(robust, key=robust.get)
        robust_target = f">= {robust_mean_target:.0%}, each >= {robust_each_target:.0%}" if robust_mean_target else ""
        robust_met = (
            _met(run["robust_accuracy_mean"] >= robust_mean_target and robust[worst] >= robust_each_target) if robust_mean_target else ""
        )
        rows.append(
            (
                f"{name}: robustness suite",
                f"mean {run['robust_accuracy_mean']:.2%}, worst {worst} {robust[worst]:.2%}",
                robust_target,
                robust_met,
            )
        )
        rows.append((f"{name}: each corruption", " ".join(f"{k} {v:.2%}" for k, v in robust.items()), "", ""))
        least = TARGETS["distinct_architectures"].get(profile)
        searched = (
            f"{run['architectures']} distinct architectures in {run['trials']} trials, {run['pruned']} pruned, "
            f"{run.get('cut', 0)} cut as too costly ({run['epochs_saved']} epochs saved)"
        )
        rows.append(
            (
                f"{name}: search",
                searched,
                f">= {least} architectures" if least else "",
                _met(run["architectures"] >= least) if least else "",
            )
        )
        rows.append((f"{name}: winner", run["winner"], "", ""))
    done = [run for run in runs if not run.get("exit")]
    if done and mean_target:
        mean = statistics.fmean(run["test_accuracy"] for run in done)
        rows.append(
            (
                f"profile {profile}: mean test accuracy of {len(done)} seed(s)",
                f"{mean:.2%}",
                f">= {mean_target:.2%}",
                _met(mean >= mean_target and len(done) == len(runs)),
            )
        )
    return rows


def _plan(run: dict) -> str:
    """The budget, and what the run made of it."""
    budget = f"budget {run['budget_s'] / 60:g} min, " if run.get("budget_s") else ""
    search = f" in {run['search_s']:.0f} s" if run.get("search_s") else ""
    adds = f", {run['winner_multiply_adds'] / 1e6:.1f} M multiply-adds" if run.get("winner_multiply_adds") else ""
    return (
        f"{budget}{run.get('precision', '')}: {run['trials']} trials{search}; winner{adds}, "
        f"{run.get('final_epochs', 0):.0f} final epochs; {run.get('decision', '')}"
    )


def _scale_out_row(run: dict) -> tuple[str, str, str, str]:
    name = f"{run['parallel']} trial(s) at once on Ray" if run["parallel"] else "trials one after another, without Ray"
    if run.get("exit"):
        return (f"scale-out, {name}", f"failed: {run['error']}", "", "")
    cpu = f", {run['cpu_seconds_per_trial']:.0f} CPU s per trial" if run["cpu_seconds_per_trial"] else ""
    ray = f", Ray started in {run['ray_startup_s']:.1f} s" if run["ray_startup_s"] else ""
    measured = f"{run['trials']} trials in {run['trials_span_s']:.0f} s ({run['cpus_per_trial']} CPU{'s' if run['cpus_per_trial'] > 1 else ''} each){cpu}{ray}; whole run {run['wall_s']:.0f} s"
    return (f"scale-out, {name}", measured, "", "")


def _micro_rows(results: dict) -> list[tuple[str, str, str, str]]:
    train, track, infer = results["training"], results["tracking"], results["inference"]
    rates = train["images_per_s"]
    names = list(rates)
    return [
        *[("training: " + name, f"{rates[name]:,.0f} img/s", "", "") for name in names],
        (
            "training speedup vs plain fp32 model.fit",
            f"{train['speedup']:.2f}x",
            f">= {TARGETS['training_speedup']}x",
            _met(train["speedup"] >= TARGETS["training_speedup"]),
        ),
        ("training speedup vs fp32 model.fit at the same batch", f"{train['speedup_same_batch']:.2f}x", "", ""),
        ("training speedup in CPU seconds per image vs plain fp32 model.fit", f"{train['cpu_speedup']:.2f}x", "", ""),
        (
            "tracking overhead (median of pairs)",
            f"{track['ratio']:.3f}x ({statistics.median(track['seconds']['with MLflow']):.1f} s vs {statistics.median(track['seconds']['without']):.1f} s)",
            f"<= {TARGETS['tracking_overhead']}x",
            _met(track["ratio"] <= TARGETS["tracking_overhead"]),
        ),
        ("tracking overhead in CPU seconds (median of pairs)", f"{track['cpu_ratio']:.3f}x", "", ""),
        ("tracking overhead, fastest search of each", f"{track['fastest_ratio']:.3f}x", "", ""),
        (
            "inference: registered model via pyfunc",
            f"{infer['digits_per_s']:,.0f} digits/s",
            f">= {TARGETS['inference_digits_per_s']:,}",
            _met(infer["digits_per_s"] >= TARGETS["inference_digits_per_s"]),
        ),
        ("inference: the same, served in float32 (serve_int8 off)", f"{infer['float32_digits_per_s']:,.0f} digits/s", "", ""),
    ]


def machine() -> dict:
    """What the figures were measured on."""
    import tensorflow as tf  # noqa: PLC0415

    from search.precision import cpu_has_bf16  # noqa: PLC0415
    from search.reporting.model_card import cpu_model  # noqa: PLC0415

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "bf16": cpu_has_bf16(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _interleaved(variants: dict, rounds: int, run: Callable) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds (every thread of this process) of `run(variant)` per
    variant, alternating variants within each round and reversing their order
    every other round."""
    seconds = {name: [] for name in variants}
    cpu_seconds = {name: [] for name in variants}
    for round_number in range(rounds):
        order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
        for name in order:
            started, cpu_started = time.perf_counter(), time.process_time()
            run(variants[name])
            seconds[name].append(time.perf_counter() - started)
            cpu_seconds[name].append(time.process_time() - cpu_started)
    return seconds, cpu_seconds


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
