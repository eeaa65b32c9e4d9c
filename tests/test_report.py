"""Code tests of the progress lines and the report figures, on hand-made trial records."""

import io
import re

import numpy as np

from search.reporting import report
from search.reporting.progress import Progress, describe, top_table
from tests.test_evaluate import assert_png


def records():
    rows = []
    for i, (family, lr, acc, params) in enumerate(
        [("plain", 1e-3, 0.97, 50_000), ("batchnorm", 3e-3, 0.98, 90_000), ("plain", 1e-2, 0.95, 20_000), ("plain", 1e-4, None, None)]
    ):
        rows.append(
            {
                "trial_id": str(i),
                "status": "FAILED" if acc is None else "FINISHED",
                "hyperparameters": {"family": family, "learning_rate": str(lr), "conv_blocks": str(1 + i % 2), "tuner/epochs": "2"},
                "val_accuracy": acc,
                "param_count": params,
                "multiply_adds": None if params is None else params * 40,
                "wall_time_s": 3.0,
                "pruned": 1 if i == 2 else None,  # stopped after its first epoch
                "epochs_saved": 1 if i == 2 else None,
                "curve": [] if acc is None else [(0, acc - 0.02), (1, acc)][: 1 if i == 2 else 2],
            }
        )
    return rows


def test_pareto_front_keeps_only_trials_no_smaller_trial_beats():
    sizes = np.array([50, 20, 90, 60, 20])
    accuracies = np.array([0.97, 0.95, 0.98, 0.96, 0.94])
    assert list(report.pareto_front(sizes, accuracies)) == [1, 0, 2]


def test_figures_and_html(tmp_path):
    rows = records()
    figures = {
        "curves": report.learning_curves(rows, tmp_path / "learning_curves.png"),
        "hyperparameters": report.hyperparameter_effects(rows, tmp_path / "hyperparameters.png"),
        "cost": report.accuracy_vs_cost(rows, tmp_path / "accuracy_vs_cost.png"),
    }
    for path in figures.values():
        assert_png(path, min_bytes=10_000)
    final = report.final_training({"validation accuracy": [(0, 0.97), (1, 0.99)]}, tmp_path / "final_training.png")
    assert_png(final, min_bytes=10_000)
    headline = {"Registry decision": "registered x version 1", "Winner": "trial 1"}
    rows[0]["wall_time_s"] = None  # not logged (a run cut short): shown as such, never as 0
    recall = [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.905]
    page = report.write_html(
        tmp_path / "report.html", "A search", headline, {"tuner": "random"}, rows, {"final": final}, figures, recall, card_linked=True
    ).read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert len(re.findall(r"<img alt='[^']+' src='data:image/png;base64,", page)) == 4
    # What the reader came for first: the decision, the winner's figures, then the trials, the settings last.
    assert page.index("registered x version 1") < page.index("alt='final'") < page.index("Top trials") < page.index("<h2>Settings")
    assert "registered x version 1" in page and "4 trial runs: 3 completed (1 of them pruned), 1 failed, 0 interrupted." in page
    assert "1 trials stopped below the median of the finished trials, saving 1 epochs." in page
    assert "<tr><td>2</td><td>1</td><td>1</td><td>95.00%</td>" in page  # trial, stopped after epoch, epochs saved, score
    assert page.index(">1</td><td>98.00%") < page.index(">0</td><td>97.00%")  # best first
    assert "<tr><td>0</td><td>97.00%</td><td>50,000</td><td>not logged</td>" in page
    assert "<tr><th>recall</th><td>99.00%</td><td>98.00%</td>" in page and "<td>90.50%</td></tr>" in page
    assert '<a href="model_card.md">model_card.md</a>' in page


def test_values_are_printed_as_people_read_them():
    from search.reporting.progress import readable

    assert [readable(v) for v in ("0.30000000000000004", "0.0058113637263627485", 0.1 + 0.2, "128", 64, True, "plain", "1e-05")] == [
        "0.3", "0.00581", "0.3", "128", "64", "True", "plain", "1e-05",
    ]  # fmt: skip
    assert describe({"dropout": "0.30000000000000004", "learning_rate": "0.0058113637263627485"}) == "dropout=0.3 learning_rate=0.00581"


def test_progress_lines_give_trial_count_best_so_far_and_time_left():
    out = io.StringIO()
    progress = Progress(max_trials=4, out=out)
    progress.trial_started("00", {"family": "plain", "learning_rate": 0.00123456, "tuner/bracket": 1, "tuner/round": 0, "tuner/epochs": 2})
    progress.trial_ended("00", 0.9512, 10.0)
    progress.trial_ended("01", None, 20.0, failure="ValueError: boom")
    progress.trial_ended("02", 0.5, 3.0, pruned=1)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("trial 1/4 (id 00): family=plain learning_rate=0.00123 (bracket 1 round 0, 2 epochs)")
    assert lines[1].endswith("trial 1/4 (id 00) val_accuracy 0.9512 in 10s; best so far 0.9512, about 30s left for up to 3 more")
    assert lines[2].endswith("trial 2/4 (id 01) FAILED (ValueError: boom) in 20s; best so far 0.9512, about 30s left for up to 2 more")
    assert "trial 3/4 (id 02) val_accuracy 0.5000, pruned after epoch 1 (below the median) in 3s" in lines[3]


def test_top_table_lists_the_best_completed_trials_first():
    rows = [{"trial_id": r["trial_id"], "val_accuracy": r["val_accuracy"], "hyperparameters": r["hyperparameters"]} for r in records()]
    table = top_table(rows, k=2).splitlines()
    assert table[0] == "top 2 trials"
    assert [line.split()[0] for line in table[2:]] == ["1", "0"]
    assert describe({"tuner/epochs": 2, "dropout": 0.25}) == "dropout=0.25"
