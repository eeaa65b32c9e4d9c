"""Search profiles: every default of the search, defined once.

`SearchConfig` holds the defaults, one commented field each. A profile in
`PROFILES` overrides only what it changes; `resolve()` applies a profile and
then the caller's overrides (command line or MLproject parameters), and rejects
unknown profiles, unknown keys and out-of-range values with a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from model_zoo.families import FAMILIES  # the CNN families, by name: model_zoo/families.py

# Each tuner by name, and the Keras Tuner class that runs it (search/tuner.py tracks it).
TUNERS = {"hyperband": "Hyperband", "bayesian": "BayesianOptimization", "random": "RandomSearch"}
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
AUGMENTATIONS = ("none", "jitter", "robust", "gentle", "pixels")  # of the final training: search/augment.py


class ConfigError(ValueError):
    """A profile, parameter or setting the search cannot run with."""


@dataclass(frozen=True)
class SearchConfig:
    profile: str = "default"
    # --- the whole run's time ---------------------------------------------------
    # Minutes from start to registered model, on whatever machine this runs on (0:
    # no limit; the caps below decide). The run plans against it from what it
    # measures here: trials stop when the search's share is spent, a trial whose
    # final training could not get min_final_epochs in the time left is cut at
    # once, and the final training gets as many epochs as fit before the
    # evaluation it keeps time for (search/budget.py).
    budget_minutes: float = 10.0
    search_share: float = 0.3  # of the budget, at most, for the trials
    # --- what is searched -------------------------------------------------
    # One of TUNERS. Random sampling with median stopping covers a space of ten
    # hyperparameters in a few minutes; Bayesian optimisation would spend its
    # first 3 x (hyperparameters) trials sampling at random anyway.
    tuner: str = "random"
    families: tuple[str, ...] = tuple(FAMILIES)  # CNN families the search chooses among
    # Hyperparameters pinned to one value, as "name=value"; the search tunes the
    # rest. The default pins nothing: family, blocks, convolutions per block,
    # filters per block, kernel size, dropout, dense units and learning rate are searched.
    fixed: tuple[str, ...] = ()
    objective: str = "val_accuracy"  # scored on the validation split, maximised
    max_trials: int = 16  # most trials run (hyperband: a cap on its own schedule)
    max_epochs: int = 2  # most epochs one trial trains
    hyperband_factor: int = 3  # hyperband keeps 1/factor of the trials per round
    early_stopping_patience: int = 0  # epochs without val_accuracy gain per trial (0: off)
    # The median-stopping rule: a trial whose best val_accuracy after an epoch is
    # below the median of the finished trials' after theirs stops there.
    prune: bool = True
    prune_min_trials: int = 3  # finished trials needed before any trial is stopped
    prune_grace_epochs: int = 1  # epochs every trial trains before it can be stopped
    # Each trial runs the final training's warm-up + cosine schedule over its own
    # epochs, peaking at its learning_rate, so that its score is that of a
    # finished (annealed) training, as the final model's is; False: a constant rate.
    trial_schedule: bool = True
    # --- data ----------------------------------------------------------------
    validation_size: int = 6_000  # last images of the 60,000 training images
    train_subset: int = 10_000  # trials train on the first N of the 54,000 (0 = all)
    batch_size: int = 128
    precision: str = "auto"  # auto: mixed_bfloat16 where the CPU has bf16 and a probe times it faster
    # --- where the trials run -------------------------------------------------
    # "": one after another in this process. "local": as Ray tasks on a Ray
    # cluster started in this process (ray.init()). An address ("auto",
    # "host:6379", "ray://host:10001"): on that running Ray cluster. The oracle and
    # everything after the search stay in this process (search/scaleout.py).
    ray: str = ""
    # With ray: trials at once (0: as many as the cluster's CPUs hold, cpus_per_trial each).
    parallel_trials: int = 0
    cpus_per_trial: int = 1  # with ray: CPUs each trial reserves, and its TensorFlow threads
    trial_retries: int = 2  # with ray: reruns of a trial whose worker process or node died
    # --- after the search ---------------------------------------------------
    # 0: the winner is the best-scoring trial among those whose final training gets
    # min_final_epochs in the time left. N: the cheapest (measured seconds per training
    # image) within N standard errors of that best (the one-standard-error rule; on 6,000
    # digits near 97% one is 0.22 points), which favours networks too small to gain from
    # the epochs they save (benchmarks/RESULTS.md).
    winner_within_se: float = 0.0
    # Epochs the final training must be able to run for a configuration to win (with
    # a budget): a network that would get fewer, retrained, loses to a cheaper one
    # that gets many; past it, a larger network's few epochs beat a small one's many
    # (benchmarks/RESULTS.md).
    min_final_epochs: int = 6
    # 0: the model is the winner's checkpoint. N: the winner's configuration is
    # retrained from scratch on all training images (not train_subset) for up to N
    # epochs under a warm-up + cosine schedule, keeping its best validation epoch;
    # the budget decides how many fit, so a cheap winner trains longer.
    final_epochs: int = 40
    # Peak learning rate of that schedule (0: the searched learning_rate, which
    # two-epoch trials on a subset choose for a much shorter schedule).
    final_learning_rate: float = 3e-3
    # N > 1: the winner's configuration is retrained N times (seeds seed, seed+1,
    # ...), the final training's time shared among them, and the registered model averages
    # their probabilities: one model for the registry, N times its cost to serve.
    final_models: int = 1
    # How the final training changes its digits every epoch (AUGMENTATIONS): gentle
    # nudges every digit (up to 9 degrees, 1.6 px) and gives most of them one of the
    # suite's trained-on pixel changes (noise, thick strokes, occlusion, a line), never a
    # held-out kind. Of the recipes whose clean validation accuracy reaches 99.5%, the
    # one with the best leave-one-family-out estimate; pixels (no nudge) has a better
    # estimate but misses it (benchmarks/RESULTS.md, docs/DEVELOPING.md).
    augment: str = "gentle"
    # The schedule's last epochs train on unchanged digits: at its lowest rates they
    # win back the clean accuracy the augmentation costs, and keep most of its
    # robustness (benchmarks/RESULTS.md compares 0, 1 and 2 on the same networks).
    # At most half the epochs the budget allows: one epoch is augmented.
    clean_final_epochs: int = 2
    # The registered model's pyfunc serves it with int8 weights (TFLite run by
    # XNNPACK), several times the digits/s of float32 on a CPU; not where that
    # int8 form's test accuracy is more than int8_max_accuracy_drop below the float32 model's.
    serve_int8: bool = True  # False: always float32
    int8_max_accuracy_drop: float = 0.001  # 10 of the 10,000 test digits
    threshold: float = 0.90  # register only if test_accuracy >= threshold
    # ... and robust_heldout_accuracy_mean >= robust_threshold: the mean accuracy over the
    # robustness suite's held-out kinds of change (search/robustness.py), which no
    # training imitates: digits changed in ways the model never saw.
    robust_threshold: float = 0.90
    robust_size: int = 10_000  # test digits in each kind of change of the suite (at most 10,000)
    model_name: str = "mnist-cnn"  # registered model name
    champion_alias: str = "champion"
    experiment_name: str = "mnist-cnn-search"  # used outside `mlflow run`
    seed: int = 42
    # Optional --data path; empty: $MNIST_NPZ, else keras.datasets.mnist.
    data: str = field(default="", compare=False)
    output_dir: str = "outputs"  # figures, tables and tuner state, per parent run id
    # How long the search waits for a tracking server that stops answering (a
    # restart, a network blip) before it stops, resumable, as if interrupted.
    tracking_wait_s: float = 600.0

    def __post_init__(self) -> None:
        _check_choice("tuner", self.tuner, TUNERS)
        if not self.families:
            raise ConfigError("families is empty: name at least one of " + ", ".join(FAMILIES))
        for family in self.families:
            _check_choice("model family", family, FAMILIES)
        for pin in self.fixed:
            if pin.count("=") != 1 or not all(part.strip() for part in pin.split("=")):
                raise ConfigError(f"fixed hyperparameter {pin!r} is not of the form name=value")
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("augmentation", self.augment, AUGMENTATIONS)
        if self.objective != "val_accuracy":
            raise ConfigError(f"objective {self.objective!r} is not supported: use 'val_accuracy'")
        for name in (
            "max_trials",
            "max_epochs",
            "hyperband_factor",
            "validation_size",
            "batch_size",
            "final_models",
            "robust_size",
            "cpus_per_trial",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in (
            "early_stopping_patience",
            "clean_final_epochs",
            "parallel_trials",
            "trial_retries",
            "prune_min_trials",
            "prune_grace_epochs",
            "train_subset",
            "final_epochs",
            "budget_minutes",
            "min_final_epochs",
            "final_learning_rate",
            "winner_within_se",
            "int8_max_accuracy_drop",
            "tracking_wait_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.search_share < 1.0:
            raise ConfigError(f"search_share must be in (0, 1), got {self.search_share}")
        for name in ("threshold", "robust_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        _check_registry_names(self.model_name, self.champion_alias)
        ray_only = {name: getattr(self, name) for name in RAY_ONLY if getattr(self, name) != RAY_ONLY[name]}
        if ray_only and not self.ray:
            given = ", ".join(f"{name}={value}" for name, value in ray_only.items())
            raise ConfigError(f"{given} only mean(s) something on Ray: add ray=local, or the address of a Ray cluster")


# Each profile overrides only what it changes. Measured costs and accuracies are in
# benchmarks/RESULTS.md; `python -m benchmarks --profiles ...` measures them again.
PROFILES: dict[str, dict] = {
    # What a plain `mlflow run .` runs, in 10 minutes: up to 16 random
    # architectures of all three families, two epochs each on a 10,000-image
    # subset, stopped after one if below the median; then the winner retrained
    # with augmentation and a warm-up + cosine schedule on all 54,000 training
    # images for the epochs that fit.
    "default": {},
    # A one-minute budget: two one-epoch trials of a pinned small two-block
    # batch-norm network (16 and 32 filters, dense 128) that differ in dropout,
    # the winner retrained with augmentation for as many epochs as fit,
    # the last on clean digits, so that it clears both registry gates. float32:
    # bf16 does not speed up a network this small, and its probe would cost
    # seconds of the minute (benchmarks/RESULTS.md).
    "fast": {
        "budget_minutes": 1.0,
        "families": ("batchnorm",),
        "fixed": (
            "conv_blocks=2",
            "convs_per_block=1",
            "conv_filters_0=16",
            "conv_filters_1=32",
            "kernel_size=3",
            "head=flatten",
            "dense_units=128",
            # Two random trials cannot find a learning rate: pinned to the retraining's peak.
            "learning_rate=0.006",
        ),
        "precision": "float32",
        "max_trials": 2,
        "max_epochs": 1,
        "train_subset": 6_000,
        "final_learning_rate": 0.006,
        "clean_final_epochs": 1,
        "min_final_epochs": 1,  # one network, pinned: nothing to choose among
        "robust_size": 2_000,
    },
    # An hour, for the last tenth of a point: the default search, its winner
    # retrained twice (two seeds) in the time left, the two averaged.
    "thorough": {
        "budget_minutes": 60.0,
        "search_share": 0.1,
        "final_epochs": 60,
        "final_models": 2,
        # Clean epochs scale with the schedule: about a sixth of it, as in the
        # default's 2 of 11 (benchmarks/RESULTS.md: 2 of 36 kept less clean accuracy).
        "clean_final_epochs": 6,
    },
    # Tests and CI: a data subset and tiny caps instead of a time budget (what a
    # test checks must not depend on the machine's speed), still well above the
    # 90% registry gate.
    "smoke": {
        "budget_minutes": 0.0,
        "families": ("plain",),
        # Two epochs are too few for global average pooling after small blocks, or
        # for the low end of the learning-rate range: tests need a model above 90%.
        # Two blocks of 3x3 convolutions: the cost of a test's search is its widest trials.
        "fixed": ("head=flatten", "learning_rate=0.003", "conv_blocks=2", "kernel_size=3"),
        # The bf16 probe costs seconds at every start, more than bf16 saves on two-epoch
        # trials; tests that are about precision choose it themselves.
        "precision": "float32",
        "max_trials": 3,
        "train_subset": 6_000,
        "early_stopping_patience": 1,
        "final_epochs": 0,
        # A two-epoch model of clean digits: the gate is low so that tests get a
        # registered model; the suite still runs, on 500 digits per kind of change.
        "robust_threshold": 0.5,
        "robust_size": 500,
    },
}


def resolve(profile: str = "default", **overrides) -> SearchConfig:
    """The profile's config with `overrides` applied; an override of None means
    "not given" (the profile's value). Any other value, 0 and "" included, is a value."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}: known are {', '.join(SETTINGS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return SearchConfig(profile=profile, **{**PROFILES[profile], **given})


def resolve_text(settings: dict[str, str]) -> SearchConfig:
    """The config of settings given as text (`name=value` on a command line, `mlflow run -P`):
    `profile` picks the profile, every other key overrides one field."""
    settings = dict(settings)
    profile = settings.pop("profile", "default")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}: known are {', '.join(SETTINGS)}")
    return resolve(profile, **{name: parse_setting(name, text) for name, text in settings.items()})


def parse_setting(name: str, text: str) -> object:
    """Setting `name` from text, typed as its field: a comma-separated list for
    tuples ("" is empty), true/false for flags, "3" or "3.0" for whole numbers."""
    default = SETTINGS[name]
    text = text.strip()
    if isinstance(default, tuple):
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"setting {name}: {text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, (int, float)):
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"setting {name}: {text!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"setting {name}: {text!r} is not a finite number")
        if isinstance(default, int) and number != int(number):
            raise ConfigError(f"setting {name}: {text!r} is not a whole number")
        return type(default)(number)
    return text


def champion_uri(config: SearchConfig | None = None) -> str:
    """The registry URI of the champion, `models:/mnist-cnn@champion` by default."""
    config = config or SearchConfig()
    return f"models:/{config.model_name}@{config.champion_alias}"


def to_params(config: SearchConfig) -> dict[str, object]:
    """The resolved config as flat params `config.<field>` (sequences joined by commas).
    Prefixed because `mlflow run` has already logged the entry-point parameters it was
    given under the plain names, and MLflow params cannot change."""
    return {f"config.{k}": ",".join(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def from_params(params: dict[str, str]) -> SearchConfig:
    """The config a search logged as `config.<field>` params (strings), for resuming it."""
    missing = [name for name in SETTINGS if f"config.{name}" not in params]
    if missing or "config.profile" not in params:
        raise ConfigError(f"the run has no param config.{(missing or ['profile'])[0]}: it was not started by this version of the search")
    return SearchConfig(profile=params["config.profile"], **{name: parse_setting(name, params[f"config.{name}"]) for name in SETTINGS})


# The settings of trials on Ray, and their defaults: another value without `ray` is refused.
RAY_ONLY = {name: SearchConfig.__dataclass_fields__[name].default for name in ("parallel_trials", "cpus_per_trial", "trial_retries")}
# Every field but the profile: what a profile, a command line or `mlflow run -P` can set, with its default.
SETTINGS: dict[str, object] = {f.name: f.default for f in dataclasses.fields(SearchConfig) if f.name != "profile"}


def _check_registry_names(model_name: str, alias: str) -> None:
    """The model registry's own rules for names and aliases, checked before any run opens
    rather than by the registry after the whole search."""
    if not model_name.strip():
        raise ConfigError("model_name is empty")
    if any(c in model_name for c in "/:") or posixpath.normpath(model_name) != model_name or model_name.startswith("."):
        raise ConfigError(f"model_name {model_name!r} cannot be a registered model's name: no '/', ':' or leading '.'")
    if not re.fullmatch(r"[\w\-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ConfigError(
            f"champion_alias {alias!r} cannot be an alias: letters, digits, '_' and '-' only, and not 'latest' or a version such as 'v3'"
        )


def _check_choice(what: str, value: str, valid: Collection[str]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}: choose one of {', '.join(valid)}")
