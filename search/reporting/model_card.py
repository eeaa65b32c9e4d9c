"""The model card of a registered version: what it saw, what it is, how well and how fast
it does, and where it fails. Markdown, logged with the model and set as the version's
description, so the registry page shows it."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Mapping, Protocol

import jinja2
import numpy as np
from scipy.stats import binomtest

from search.data import MnistData


class TestFigures(Protocol):
    """What the card reads of the test split's evaluation (search/evaluate.py's TestReport)."""

    accuracy: float
    loss: float
    confusion: np.ndarray
    recall: np.ndarray


class RobustnessFigures(Protocol):
    """What the card reads of the robustness suite's (search/robustness.py's RobustnessReport)."""

    heldout_mean: float  # over the kinds of change no training imitates: the gated figure
    trained_mean: float  # over the kinds training may imitate
    rows: list[tuple[str, str, bool, float]]  # (kind, family, trained-on, accuracy)


class CalibrationFigures(Protocol):
    """What the card reads of the served form's calibration (search/evaluate.py's Calibration)."""

    expected_calibration_error: float
    bins: list[tuple[float, float, int, float, float]]  # (low, high, images, mean confidence, accuracy)


TEMPLATE = Path(__file__).with_name("model_card.md.j2")


@dataclass(frozen=True)
class Speed:
    """The served form (int8 or float32) measured on the machine that made the model."""

    machine: str
    latency_ms_p50: float  # one digit per call
    digits_per_second: float  # batches of the served form's size


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC"."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )


def machine() -> str:
    """The CPU model and core count, e.g. "AMD EPYC, 2 cores"."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def measure_speed(predict: Callable[[np.ndarray], object], digits: np.ndarray, single_calls: int = 50) -> Speed:
    """Median latency of one-digit calls and the digits/s of one call on all of `digits`."""
    predict(digits[:1])  # warm-up: the first call builds what later calls reuse
    latencies = []
    for i in range(single_calls):
        started = time.perf_counter()
        predict(digits[i % len(digits) : i % len(digits) + 1])
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    predict(digits)
    return Speed(machine(), 1000 * statistics.median(latencies), len(digits) / (time.perf_counter() - started))


def code_commit() -> str:
    """The git commit of the code that runs, or "" outside a git checkout."""
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return found.stdout.strip() if found.returncode == 0 else ""


def utc_now() -> str:
    """This minute in UTC, as the card and the report date themselves."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def framework_versions() -> dict[str, str]:
    """The versions of what made and serves the model."""
    return {name: version(name) for name in ("tensorflow", "keras", "keras-tuner", "mlflow", "numpy")}


def write(
    *,
    data: MnistData,
    hyperparameters: Mapping[str, object],
    param_count: int,
    multiply_adds: float,
    test: TestFigures,
    robustness: RobustnessFigures,
    robust_size: int,
    int8_accuracy: float | None,
    served_form: str,
    speed: Speed,
    search_run_id: str,
    settings: Mapping[str, object],
    gates: Mapping[str, float],
    served_accuracy: float,
    calibration: CalibrationFigures,
    epochs_run: float | None = None,
) -> str:
    """The card as Markdown."""
    n = int(test.confusion.sum())
    interval = binomtest(int(round(test.accuracy * n)), n).proportion_ci(0.95, method="wilson")
    worst = sorted(((kind, value) for kind, _, trained, value in robustness.rows if not trained), key=lambda item: item[1])[:3]
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    return environment.get_template(TEMPLATE.name).render(
        data=data,
        hyperparameters={k: v for k, v in hyperparameters.items() if not k.startswith("tuner/")},
        param_count=param_count,
        multiply_adds=multiply_adds,
        test=test,
        n=n,
        interval=(interval.low, interval.high),
        recall=list(enumerate(test.recall)),
        robustness=robustness,
        robust_size=robust_size,
        worst=worst,
        int8_accuracy=int8_accuracy,
        served_form=served_form,
        speed=speed,
        search_run_id=search_run_id,
        settings=settings,
        gates=gates,
        epochs_run=epochs_run,
        served_accuracy=served_accuracy,
        calibration=calibration,
        made=utc_now(),
        commit=code_commit(),
        frameworks=framework_versions(),
    )
