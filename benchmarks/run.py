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

from benchmarks.searches import profile_end_to_end, trials_at_once
from benchmarks.table import SLOWED, table

REPO = Path(__file__).resolve().parent.parent
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
    from search.driver import drive  # noqa: PLC0415
    from search.in_process import InProcess  # noqa: PLC0415
    from search.robustness import heldout_probe  # noqa: PLC0415
    from search.train import evaluation_dataset, training_dataset  # noqa: PLC0415
    from search.trial import trial_callbacks  # noqa: PLC0415
    from search.tuner import make_tuner  # noqa: PLC0415

    config = resolve("smoke", precision="float32")
    train = subset(data.train, config.train_subset)

    def search(tracked: bool) -> None:
        keras.utils.set_random_seed(config.seed)
        folder = Path(tempfile.mkdtemp(dir=tmp))
        with contextlib.redirect_stdout(io.StringIO()):
            if tracked:
                with tracking.tracked_run("benchmark-tracking") as tracker:
                    drive(make_tuner(config, tracker, folder, "tuner"), InProcess(config), config, train, data.validation)
            else:  # Keras Tuner's own loop, the same trials' training, nothing logged
                make_tuner(config, None, folder, "tuner").search(
                    training_dataset(train, config.batch_size, config.seed),
                    validation_data=evaluation_dataset(data.validation, config.batch_size),
                    epochs=config.max_epochs,
                    callbacks=trial_callbacks(config, heldout_probe(data.validation, config.seed)),
                    shuffle=False,
                    verbose=0,
                )

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
            candidate = registry.Candidate(model, {"test_accuracy": 1.0}, int8_model=int8_model)
            registry.register_if_better(tracker, candidate, registry.Promotion(f"benchmark-cnn-{form}", "champion", {"test_accuracy": 0.5}))
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
