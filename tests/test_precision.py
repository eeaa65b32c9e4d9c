"""Tests of the precision choice: pinned, forced by the environment, or probed."""

import pytest

from experiments import ConfigError
from search.precision import AUTO_PRECISION_ENV, BF16_MIN_SPEEDUP, Precision, choose_precision


def test_precision_choice(monkeypatch):
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)
    assert choose_precision("float32", native_bf16=True) == Precision("float32", "pinned")
    assert choose_precision("mixed_bfloat16", native_bf16=False).policy == "mixed_bfloat16"
    assert choose_precision("auto", native_bf16=False).params() == {
        "precision_used": "float32",
        "precision_reason": "no native bf16 on this CPU",
    }
    # The environment decides for `auto` without a probe, whatever the CPU; a pinned precision wins over it.
    for forced in ("mixed_bfloat16", "float32"):
        monkeypatch.setenv(AUTO_PRECISION_ENV, forced)
        assert choose_precision("auto", native_bf16=forced == "float32") == Precision(forced, f"${AUTO_PRECISION_ENV}")
        assert choose_precision("float32").policy == "float32"
    monkeypatch.setenv(AUTO_PRECISION_ENV, "float16")
    with pytest.raises(ConfigError, match=r"\$SEARCH_AUTO_PRECISION is 'float16': use float32 or mixed_bfloat16"):
        choose_precision("auto")


def test_the_probe_runs_once_per_process_and_its_speedup_is_logged(monkeypatch):
    monkeypatch.delenv(AUTO_PRECISION_ENV, raising=False)
    first = choose_precision("auto", native_bf16=True)
    assert first.probe_speedup > 0 and first.policy == ("mixed_bfloat16" if first.probe_speedup >= BF16_MIN_SPEEDUP else "float32")
    assert first.params()["precision_probe_speedup"] == f"{first.probe_speedup:.3f}"
    assert choose_precision("auto", native_bf16=True) == first  # the same measurement, not a second probe
