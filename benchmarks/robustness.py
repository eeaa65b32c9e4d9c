"""Robustness to change the training never saw: the ablation of the final training's
choices and the leave-one-family-out estimate, on one fixed network.

    MNIST_NPZ=../shared/data/mnist.npz python -m benchmarks.robustness [--epochs 5] [--seed 42]

The ablation trains the same network on the 54,000 training digits with each
combination of the augmentation (search/augment.py) and the input normalisation
(`none`, `standardize`) and measures clean validation accuracy (what a recipe is
chosen by), clean test accuracy, the held-out kinds' mean and the training's
seconds per image. The leave-one-family-out estimate trains the
chosen recipe once per family of the suite with that family's augmentations
removed, and measures that family's kinds, trained-on and held-out alike: what the
recipe does for a family of change nobody anticipated. A family that no augmentation
imitates needs no second training: the full recipe already left it out.
Appends its tables, command and commit to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The fast profile's network, one block wider: a few seconds an epoch on a fast CPU.
NETWORK = {"conv_filters": (32, 64), "batch_norm": True, "dense_units": 128, "dropout": 0.25}
PEAK_LEARNING_RATE = 3e-3
ABLATION = "none/none,none/standardize,robust/none,robust/standardize,pixels/standardize,gentle/standardize"
LOFO = "pixels/standardize,gentle/standardize"


@dataclass(frozen=True)
class Recipe:
    augment: str
    input_norm: str
    leave_out: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        left = f", without {'+'.join(self.leave_out)}" if self.leave_out else ""
        return f"augment={self.augment}, input_norm={self.input_norm}{left}"


def train(recipe: Recipe, data, epochs: int, seed: int):
    """The network trained under `recipe`: warm-up + cosine, the last epoch on clean digits
    (as the final training's clean_final_epochs); returns (model, seconds per training image)."""
    import keras  # noqa: PLC0415

    from model_zoo import make_cnn  # noqa: PLC0415
    from search.train import training_dataset  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    steps = epochs * -(-len(data.train) // 128)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps - steps // 10, warmup_target=PEAK_LEARNING_RATE, warmup_steps=steps // 10)
    model = make_cnn(**NETWORK, input_norm=recipe.input_norm)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    augmented = training_dataset(data.train, 128, seed, recipe.augment, leave_out=recipe.leave_out)
    clean = training_dataset(data.train, 128, seed)
    started = time.perf_counter()
    if epochs > 1:
        model.fit(augmented, epochs=epochs - 1, verbose=0)
    model.fit(clean, initial_epoch=epochs - 1, epochs=epochs, verbose=0)
    return model, (time.perf_counter() - started) / (epochs * len(data.train))


def measure(recipe: Recipe, data, suite, epochs: int, seed: int) -> dict:
    from search import robustness  # noqa: PLC0415

    model, seconds_per_image = train(recipe, data, epochs, seed)
    predict = lambda x: model.predict(x, batch_size=1024, verbose=0)  # noqa: E731
    report = robustness.evaluate(predict, suite)
    result = {
        "recipe": recipe.name,
        "validation_accuracy": float((predict(data.validation.x).argmax(1) == data.validation.y).mean()),
        "test_accuracy": float((predict(data.test.x).argmax(1) == data.test.y).mean()),
        "heldout_mean": report.heldout_mean,
        "trained_mean": report.trained_mean,
        "worst_heldout": report.worst,
        "seconds_per_image": seconds_per_image,
        "accuracy": report.accuracy,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "accuracy"}), flush=True)
    return result


def family_mean(result: dict, family: str) -> float:
    from search.robustness import KINDS  # noqa: PLC0415

    values = [v for k, v in result["accuracy"].items() if KINDS[k].family == family]
    return sum(values) / len(values)


def lofo_estimate(recipe: dict, left_out: dict[str, dict]) -> dict[str, float]:
    """Family -> its mean accuracy after a training without that family's augmentations: the
    run itself where the recipe imitates none of the family, else its leave-one-out run."""
    from search.robustness import FAMILIES  # noqa: PLC0415

    return {family: family_mean(left_out.get(family, recipe), family) for family in FAMILIES}


def ablation_table(ablation: list[dict], left_out: dict[str, dict[str, dict]]) -> str:
    lines = [
        "Ablation (one network, the same seed and epochs; the leave-one-family-out estimate is the mean over the suite's"
        " families, each measured after a training without that family's augmentations):",
        "",
        "| recipe | clean validation | clean test | leave-one-family-out estimate | held-out kinds: mean | worst held-out kind "
        "| trained-on kinds: mean | training s per image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ablation:
        worst, value = r["worst_heldout"]
        estimate = "not run (a training per family)"
        if r["recipe"] in left_out or r["recipe"].startswith("augment=none"):
            per_family = lofo_estimate(r, left_out.get(r["recipe"], {}))
            estimate = f"{sum(per_family.values()) / len(per_family):.2%} (least {min(per_family.values()):.2%})"
        lines.append(
            f"| {r['recipe']} | {r['validation_accuracy']:.2%} | {r['test_accuracy']:.2%} | {estimate} | {r['heldout_mean']:.2%} | {worst} {value:.2%} | "
            f"{r['trained_mean']:.2%} | {1e6 * r['seconds_per_image']:.0f} us |"
        )
    return "\n".join(lines)


def lofo_table(chosen: dict, left_out: dict[str, dict], imitated: set[str]) -> str:
    from search import robustness  # noqa: PLC0415

    lines = [
        f"Leave one family out ({chosen['recipe']}):",
        "",
        "| family | kinds | left out of training | with its augmentations |",
        "|---|---|---|---|",
    ]
    estimate = lofo_estimate(chosen, left_out)
    for family in robustness.FAMILIES:
        kinds = [k for k, kind in robustness.KINDS.items() if kind.family == family]
        with_it = f"{family_mean(chosen, family):.2%}" if family in imitated else "(never imitated)"
        lines.append(f"| {family} | {', '.join(kinds)} | {estimate[family]:.2%} | {with_it} |")
    return "\n".join(lines)


def recipes(text: str) -> list[Recipe]:
    """`augment/input_norm,...` as recipes."""
    return [Recipe(*item.split("/")) for item in text.split(",") if item]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each training, the last on clean digits (default 5)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--robust-size", type=int, default=2_000, help="test digits per kind of change (default 2,000)")
    parser.add_argument("--recipes", default=ABLATION, help=f"augment/input_norm, comma-separated (default {ABLATION})")
    parser.add_argument("--lofo", default=LOFO, help=f"recipes that get a training per family left out (default {LOFO})")
    parser.add_argument("--out", default="benchmark-robustness.json", help="every measurement as JSON, written as it is made")
    parser.add_argument(
        "--results", default=str(REPO / "benchmarks" / "RESULTS.md"), help="Markdown file the tables are added to ('' to skip)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from search import augment, robustness  # noqa: PLC0415
    from search.data import load_mnist  # noqa: PLC0415

    data = load_mnist(os.environ.get("MNIST_NPZ", "keras"))
    suite = robustness.suite(data.test, args.seed, args.robust_size)
    measured: dict = {"ablation": [], "left_out": {}}

    def run(recipe: Recipe) -> dict:
        result = measure(recipe, data, suite, args.epochs, args.seed)
        Path(args.out).write_text(json.dumps(measured, indent=1))
        return result

    texts = []
    for recipe in recipes(args.recipes):
        measured["ablation"].append(run(recipe))
    for recipe in recipes(args.lofo):
        chosen = next(r for r in measured["ablation"] if r["recipe"] == recipe.name)
        imitated = {robustness.KINDS[k].family for change in augment.kept_changes(recipe.augment) for k in augment.IMITATES[change]}
        left_out = measured["left_out"].setdefault(recipe.name, {})
        for family in (f for f in robustness.FAMILIES if f in imitated):
            left_out[family] = run(Recipe(recipe.augment, recipe.input_norm, (family,)))
        texts.append(lofo_table(chosen, left_out, imitated))
    text = "\n\n".join([ablation_table(measured["ablation"], measured["left_out"]), *texts])
    print(text)
    if args.results:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        cpu = next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), ""
        )
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python -m benchmarks.robustness " + shlex.join(argv if argv is not None else sys.argv[1:])
        section = f"## Robustness: ablation and leave one family out, {stamp}\n\n`{command.strip()}`, commit {commit}, {cpu}, {os.cpu_count()} cores\n\n{text}\n"
        path = Path(args.results)
        old = path.read_text() if path.exists() else "# Benchmark results\n"
        head, _, rest = old.partition("\n## ")
        path.write_text(f"{head.rstrip()}\n\n{section}\n" + (f"## {rest}" if rest else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
