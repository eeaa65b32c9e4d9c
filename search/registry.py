"""The registry policy: which model is registered, which one the alias names, and the tags that say why.

A model is registered when every score named in the gates reaches its gate
(clean `test_accuracy` >= threshold, `robust_heldout_accuracy_mean` >= robust_threshold).
It becomes the champion (alias `champion`) when there is none, or when it beats
the champion by `Comparison.challenger_wins`; the champion it replaces gets
alias `previous_champion`, so a rollback is one call. Every call ends with the
search run's tag `registry_decision`, one line for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from model_zoo import with_keras_layers
from search import digits, faults
from search.evaluate import Comparison
from search.serving import pyfunc_model
from search.tracking import SearchTracker

PYFUNC_MODULE = "mnist_digits_pyfunc"  # the name search/serving/pyfunc_model.py is shipped under


@dataclass(frozen=True)
class RegistryDecision:
    registered: bool
    reason: str  # one line for people: stdout and the parent run's tag
    version: str | None = None
    champion: bool = False  # whether the alias now points to this version


def shortfalls(scores: Mapping[str, float], gates: Mapping[str, float]) -> list[str]:
    """Each score below its gate, as `name score < gate`; empty: the model may be registered."""
    return [f"{name} {scores[name]:.2%} < {gate:.2%}" for name, gate in gates.items() if scores[name] < gate]


@dataclass(frozen=True)
class Promotion:
    """Where a model may go: the registered model, the alias of its champion, and the
    gate each named score must reach."""

    model_name: str
    alias: str
    gates: Mapping[str, float]


@dataclass(frozen=True)
class Candidate:
    """A model the search offers the registry, with what it is judged by."""

    model: object  # the Keras model
    scores: Mapping[str, float]
    comparison: Comparison | None = None  # against the current champion; None: there is none
    int8_model: bytes | None = None  # a TFLite flatbuffer the pyfunc serves; None: the float32 model
    card: str = ""  # Markdown: `model_card.md` beside the model and the version's description


def register_if_better(
    tracker: SearchTracker, candidate: Candidate, promotion: Promotion, registered: str | None = None
) -> RegistryDecision:
    """Register the candidate if each of its scores named in the promotion's gates reaches its
    gate; move the promotion's alias to it if it beats the champion. `registered`: the version
    this search registered before it was stopped, completed instead of a new one."""
    comparison, model_name, alias = candidate.comparison, promotion.model_name, promotion.alias
    failed = shortfalls(candidate.scores, promotion.gates)
    if failed:
        return _decided(tracker, RegistryDecision(False, "not registered: " + ", ".join(failed)))
    previous = tracker.alias_version(model_name, alias)
    if registered:
        version = registered
    else:
        files = {pyfunc_model.TFLITE_FILE: candidate.int8_model} if candidate.int8_model else {}
        loader_config = {"output": "table"}  # load_model(..., model_config={"output": "digit"}) for the digits alone
        code = {
            PYFUNC_MODULE: Path(pyfunc_model.__file__),
            pyfunc_model.CHECK_MODULE: Path(digits.__file__),
        }  # the pyfunc and its check of digits
        model_uri = tracker.log_model(with_keras_layers(candidate.model), code, PYFUNC_MODULE, files, candidate.card, loader_config)
        version = tracker.register(model_uri, model_name)
        faults.at("registered")
    tags = {
        **{name: f"{value:.6f}" for name, value in candidate.scores.items()},
        "search_run_id": tracker.run_id,
        "served_form": "int8" if candidate.int8_model else "float32",
    }
    if comparison is not None:
        tags |= {
            "champion_version": previous,
            "champion_test_accuracy": f"{comparison.champion_accuracy:.6f}",
            "champion_robust_heldout_accuracy_mean": f"{comparison.champion_robust_accuracy:.6f}",
            "mcnemar_challenger_only_right": str(comparison.challenger_only_right),
            "mcnemar_champion_only_right": str(comparison.champion_only_right),
            "mcnemar_p_value": f"{comparison.p_value:.6g}",
        }
    tracker.tag_version(model_name, version, tags, description=candidate.card)
    figures = ", ".join(f"{name} {value:.2%}" for name, value in candidate.scores.items())
    if comparison is not None and not comparison.challenger_wins:
        reason = (
            f"registered {model_name} version {version}; @{alias} stays version {previous}: it is not worse on both "
            f"({figures}; the champion's {comparison.champion_accuracy:.2%} and {comparison.champion_robust_accuracy:.2%}, McNemar p={comparison.p_value:.3g})"
        )
        return _decided(tracker, RegistryDecision(True, reason, version))
    faults.at("compared")
    # The registry has no compare-and-set: read the alias again just before moving it. A
    # champion another search promoted meanwhile was not the one compared with: this one stays a version.
    now = tracker.alias_version(model_name, alias)
    if now != previous:
        reason = (
            f"registered {model_name} version {version}; not made @{alias}: another search made version {now} @{alias} "
            f"while this one compared against version {previous}; compare them with `python -m search evaluate`"
        )
        return _decided(tracker, RegistryDecision(True, reason, version))
    tracker.set_alias(model_name, alias, version)
    faults.at("champion_moved")
    if previous is not None:
        tracker.set_alias(model_name, f"previous_{alias}", previous)
    against = ""
    if comparison is not None:
        below = "" if comparison.champion_clears_gates else ", below today's gates"
        against = f", replacing version {previous} ({comparison.champion_accuracy:.2%} and {comparison.champion_robust_accuracy:.2%}{below}, McNemar p={comparison.p_value:.3g})"
    return _decided(
        tracker, RegistryDecision(True, f"registered {model_name} version {version} as @{alias} ({figures}{against})", version, True)
    )


def decided_before(tracker: SearchTracker, model_name: str, alias: str, version: str) -> RegistryDecision:
    """The decision of a search stopped after it made its `version` @`alias`, completed: the
    champion it replaced (tagged on the version before the alias moved) made previous_<alias>."""
    replaced = tracker.version_tag(model_name, version, "champion_version")
    if replaced and tracker.alias_version(model_name, f"previous_{alias}") != replaced:
        tracker.set_alias(model_name, f"previous_{alias}", replaced)
    return _decided(tracker, RegistryDecision(True, f"registered {model_name} version {version} as @{alias}", version, True))


def _decided(tracker: SearchTracker, decision: RegistryDecision) -> RegistryDecision:
    tracker.set_tag("registry_decision", decision.reason)
    return decision
