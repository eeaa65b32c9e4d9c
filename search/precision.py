"""The precision a search trains with: float32, or mixed bfloat16 where the CPU
has native bf16 and a short probe on the project's training path times it faster."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments import ConfigError
from model_zoo.cnn import make_cnn
from search.data import Split
from search.train import training_dataset

# What `precision=auto` resolves to on this machine without running the probe
# (float32 or mixed_bfloat16): for CI and tests, which must cover both choices
# on any CPU, and for a cluster whose machines should all agree.
AUTO_PRECISION_ENV = "SEARCH_AUTO_PRECISION"
# bf16 is chosen only when the probe times it at least this much faster: a
# margin, so that a probe near 1.0x on a noisy machine does not flip between runs.
BF16_MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class Precision:
    """The Keras dtype policy a search trains with, and why."""

    policy: str  # float32 or mixed_bfloat16
    reason: str  # e.g. "pinned", "probe: bf16 0.61x float32's speed"
    probe_speedup: float | None = None  # bf16 against float32, where the probe ran

    def params(self) -> dict[str, str]:
        logged = {"precision_used": self.policy, "precision_reason": self.reason}
        if self.probe_speedup is not None:
            logged["precision_probe_speedup"] = f"{self.probe_speedup:.3f}"
        return logged


def cpu_has_bf16() -> bool:
    """Whether the CPU advertises native bf16 (AVX-512 BF16 or AMX) on Linux."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(precision: str, native_bf16: bool | None = None) -> Precision:
    """The Keras dtype policy to train with: `precision` itself unless it is `auto`.

    `auto` is float32 where the CPU has no native bf16. Elsewhere it is
    `mixed_bfloat16` only if a short probe measures it `BF16_MIN_SPEEDUP` times
    faster than float32: on CPUs with AMX it is; on an Intel Xeon with
    AVX512-BF16 and no AMX, oneDNN's native avx512_core_bf16 convolution
    kernels are slower than its float32 ones, so bf16 loses there. The probe
    runs once per process; `$SEARCH_AUTO_PRECISION` replaces it.
    """
    if precision != "auto":
        return Precision(precision, "pinned")
    forced = os.environ.get(AUTO_PRECISION_ENV, "")
    if forced:
        if forced not in ("float32", "mixed_bfloat16"):
            raise ConfigError(f"${AUTO_PRECISION_ENV} is {forced!r}: use float32 or mixed_bfloat16")
        return Precision(forced, f"${AUTO_PRECISION_ENV}")
    if not (cpu_has_bf16() if native_bf16 is None else native_bf16):
        return Precision("float32", "no native bf16 on this CPU")
    speedup = _probe_once()
    policy = "mixed_bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    return Precision(policy, f"probe: bf16 {speedup:.2f}x float32's speed (bf16 needs {BF16_MIN_SPEEDUP}x)", speedup)


@functools.cache
def _probe_once() -> float:
    return probe_speedup("mixed_bfloat16")


def probe_speedup(policy: str, batch_size: int = 128, steps: int = 8, rounds: int = 3) -> float:
    """How many times faster than float32 a small batch-norm CNN trains under `policy`,
    along the project's training path (tf.data without its autotuner, whose stalls
    would time the pipeline instead of the arithmetic); the best of `rounds`
    interleaved timings each, so one slow round does not decide."""
    rng = np.random.default_rng(0)
    split = Split(rng.random((batch_size * steps, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, batch_size * steps))
    models, best = {}, {}
    for name in ("float32", policy):
        models[name] = make_cnn(conv_filters=(32, 64), convs_per_block=2, batch_norm=True, dense_units=128, dtype_policy=name)
        models[name].fit(training_dataset(split, batch_size, seed=0).take(2), verbose=0)  # compile, warm up
    for _ in range(rounds):
        for name, model in models.items():
            started = time.perf_counter()
            model.fit(training_dataset(split, batch_size, seed=0), verbose=0)
            best[name] = min(best.get(name, np.inf), time.perf_counter() - started)
    return best["float32"] / best[policy]
