"""The search report: figures comparing the trials, and one self-contained report.html.

Every function takes the trial records the tracker read back from MLflow
(`SearchTracker.trial_records`), so a resumed search reports all its trials.
"""

from __future__ import annotations

import base64
import csv
import math
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import jinja2
import numpy as np
from matplotlib.ticker import MaxNLocator, NullFormatter

from experiments import SearchConfig, to_params
from search.reporting.model_card import code_commit, utc_now
from search.reporting.plots import save, subplots
from search.reporting.progress import completed, describe, readable


def write_report(
    records: list[dict],
    config: SearchConfig,
    headline: Mapping[str, str],
    out: Path,
    final_curves: Mapping[str, list[tuple[int, float]]] | None = None,
    *,
    run_id: str,
    recall: Sequence[float],
    card: str = "",
) -> Path:
    """`out/report/`: report.html and its figures. It leads with what its reader came for:
    `headline` (the registry decision first, then the winner and why, its accuracy, the time
    and the machine), the final training's `final_curves` (metric -> [(epoch, value)]) and the
    winner's evaluation figures (drawn under `out/evaluation/`) and its `recall` per digit; then the
    trials; the settings last. The title names the run, the date and the code's commit; a
    registered model's `card` is written beside the page as model_card.md, and linked."""
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    winner = {}
    if final_curves and any(final_curves.values()):
        winner["The final training of the winner"] = final_training(final_curves, folder / "final_training.png")
    winner |= {
        "The winner: test confusion matrix": Path(shutil.copy(out / "evaluation" / "confusion_matrix.png", folder)),
        "The winner: misclassified test digits": Path(shutil.copy(out / "evaluation" / "misclassified.png", folder)),
        "The winner: the robustness suite": Path(shutil.copy(out / "evaluation" / "robustness.png", folder)),
    }
    trials = {
        "Learning curves of the top trials": learning_curves(records, folder / "learning_curves.png"),
        "Hyperparameters against validation accuracy": hyperparameter_effects(records, folder / "hyperparameters.png"),
        "Accuracy against model cost": accuracy_vs_cost(records, folder / "accuracy_vs_cost.png"),
    }
    settings = {k.removeprefix("config."): readable(v) for k, v in to_params(config).items()}
    if card:
        (folder / "model_card.md").write_text(card)
    commit = code_commit()
    title = f"MNIST CNN search ({config.profile} profile): run {run_id}, {utc_now()} UTC, commit {commit[:12] if commit else 'unknown'}"
    write_html(folder / "report.html", title, headline, settings, records, winner, trials, list(recall), bool(card))
    return folder


def final_training(curves: Mapping[str, list[tuple[int, float]]], path: Path) -> Path:
    """Accuracy per epoch of the final training: each metric's curve (training and validation)."""
    fig, ax = subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        if curve:
            steps, values = zip(*curve)
            ax.plot([s + 1 for s in steps], values, marker="o", markersize=3, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("Final training of the winner (training digits augmented, validation digits clean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def learning_curves(records: list[dict], path: Path, top: int = 5) -> Path:
    """Validation accuracy per epoch of the `top` best trials."""
    fig, ax = subplots(figsize=(7, 4.5))
    for r in completed(records)[:top]:
        steps, values = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot([s + 1 for s in steps], values, marker="o", label=f"trial {r['trial_id']} ({r['val_accuracy']:.2%})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"Learning curves of the top {min(top, len(completed(records)))} trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def hyperparameter_effects(records: list[dict], path: Path, cols: int = 4) -> Path:
    """One panel per hyperparameter: its value against the trial's best validation accuracy."""
    done = completed(records)
    names = sorted({n for r in done for n in r["hyperparameters"] if not n.startswith("tuner/")})
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = subplots(rows, cols, figsize=(cols * 3.2, rows * 2.8), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        points = [(r["hyperparameters"][name], r["val_accuracy"]) for r in done if name in r["hyperparameters"]]
        values = [_number(v) for v, _ in points]
        if all(v is not None for v in values):  # numeric: on a value axis
            ax.scatter(values, [a for _, a in points], s=18)
            if name == "learning_rate":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap in a small panel
            elif len(set(values)) <= 6:
                ax.set_xticks(sorted(set(values)), [f"{v:g}" for v in sorted(set(values))])
        else:  # categorical: one column per category
            categories = sorted({str(v) for v, _ in points})
            ax.scatter([categories.index(str(v)) for v, _ in points], [a for _, a in points], s=18)
            ax.set_xticks(range(len(categories)), categories)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        ax.set_xlabel(name)
        ax.set_ylabel("best val_accuracy")
    fig.suptitle("Effect of each hyperparameter on the best validation accuracy")
    return save(fig, path)


def accuracy_vs_cost(records: list[dict], path: Path) -> Path:
    """Best validation accuracy against parameter count and compute per digit, each with its Pareto front."""
    fig, axes = subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "param_count", "parameters (log scale)"),
        (axes[1], "multiply_adds", "multiply-adds per digit (log scale)"),
    ):
        done = [r for r in completed(records) if r.get(key)]
        costs = np.array([r[key] for r in done], dtype=float)
        accuracies = np.array([r["val_accuracy"] for r in done])
        ax.scatter(costs, accuracies, s=20, label="trial")
        front = pareto_front(costs, accuracies)
        ax.plot(costs[front], accuracies[front], color="crimson", marker="D", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("best validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Accuracy against model cost")
    return save(fig, path)


def pareto_front(sizes: np.ndarray, accuracies: np.ndarray) -> np.ndarray:
    """Indices, by increasing size, of the trials that no smaller-or-equal trial beats."""
    front, best = [], -np.inf
    for i in np.lexsort((-accuracies, sizes)):
        if accuracies[i] > best:
            front.append(i)
            best = accuracies[i]
    return np.array(front, dtype=int)


def write_html(
    path: Path,
    title: str,
    headline: Mapping[str, str],
    settings: Mapping[str, object],
    records: list[dict],
    winner_figures: Mapping[str, Path],
    trial_figures: Mapping[str, Path],
    recall: list[float] | None = None,
    card_linked: bool = False,
) -> Path:
    """One page, images embedded, so it can be mailed or opened from the MLflow UI: the
    `headline` rows, the winner's figures, the trials and their figures, the settings."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.filters["describe"] = describe
    pruned = [{**r, "epochs_saved": r.get("epochs_saved") or 0} for r in records if r.get("pruned")]
    embed = lambda figures: {caption: base64.b64encode(p.read_bytes()).decode() for caption, p in figures.items()}  # noqa: E731
    page = environment.get_template("report.html.j2").render(
        title=title,
        headline=headline,
        settings=settings,
        records=records,
        completed=completed(records),
        pruned=pruned,
        cut=[r for r in records if r.get("cut")],
        failed=sum(r["status"] == "FAILED" for r in records),
        killed=sum(r["status"] == "KILLED" for r in records),  # interrupted, then run again on resume
        winner_images=embed(winner_figures),
        trial_images=embed(trial_figures),
        recall=list(enumerate(recall or [])),
        card_linked=card_linked,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def _number(value: object) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def write_trials_csv(records: list[dict], path: Path) -> Path:
    """The trials table: id, status, best val_accuracy and its epoch, pruning, every hyperparameter; a row per trial run."""
    hp_names = sorted({name for r in records for name in r["hyperparameters"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["trial_id", "status", "val_accuracy", "best_step", "pruned", "epochs_saved", *hp_names])
        writer.writeheader()
        for r in records:
            best_step = max(r["curve"], key=lambda point: point[1])[0] if r["curve"] else None
            row = {
                "trial_id": r["trial_id"],
                "status": r["status"],
                "val_accuracy": r["val_accuracy"],
                "best_step": best_step,
                "pruned": r["pruned"],
                "epochs_saved": None if r["epochs_saved"] is None else int(r["epochs_saved"]),
            }
            writer.writerow(row | dict(r["hyperparameters"]))
    return path
