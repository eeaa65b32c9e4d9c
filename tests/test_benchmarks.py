"""Code tests of the benchmark command's bookkeeping (the measurements themselves run in `python -m benchmarks`)."""

import time

from benchmarks.run import _interleaved
from benchmarks.table import table


def test_variants_alternate_and_reverse_order_every_other_round():
    calls = []
    seconds, cpu_seconds = _interleaved({"a": "A", "b": "B"}, rounds=3, run=calls.append)
    assert calls == ["A", "B", "B", "A", "A", "B"]
    assert {name: len(times) for name, times in seconds.items()} == {"a": 3, "b": 3}
    assert {name: len(times) for name, times in cpu_seconds.items()} == {"a": 3, "b": 3}


def test_cpu_seconds_count_work_not_waiting():
    seconds, cpu_seconds = _interleaved(
        {"busy": 1, "asleep": 0}, rounds=1, run=lambda busy: sum(range(3_000_000)) if busy else time.sleep(0.2)
    )
    assert cpu_seconds["asleep"][0] < 0.05 < seconds["asleep"][0]
    # Not a share of the wall time: on a loaded machine the loop gets a small share of a core.
    assert cpu_seconds["busy"][0] > 10 * cpu_seconds["asleep"][0] and cpu_seconds["busy"][0] > 0.02


# Trained-on kinds (rotation, line) count in neither the held-out mean nor the worst held-out kind.
ROBUST = {
    "robust_heldout_accuracy_mean": 0.95,
    "robust_trained_accuracy_mean": 0.94,
    "robust_accuracy": {"rotation": 0.99, "line": 0.80, "elastic": 0.84, "inverted": 0.97},
}


def test_table_marks_each_target_met_or_not():
    results = {
        "machine": {"cpu": "Test CPU", "cores": 2, "date": "2026-11-24 00:00 UTC"},
        "training": {
            "images_per_s": {"project": 1600.0, "plain bs32": 800.0, "plain bs128": 1100.0},
            "speedup": 2.0,
            "speedup_same_batch": 1.45,
            "cpu_speedup": 1.9,
        },
        "tracking": {"ratio": 1.05, "cpu_ratio": 1.01, "fastest_ratio": 0.99, "seconds": {"with MLflow": [10.5], "without": [10.0]}},
        "inference": {"digits_per_s": 25_000.0, "float32_digits_per_s": 7_000.0},
        "profiles": {
            "fast": [
                {
                    "seed": 42,
                    "exit": 0,
                    "wall_s": 50.0,
                    "test_accuracy": 0.994,
                    "trials": 2,
                    "architectures": 1,
                    "pruned": 0,
                    "epochs_saved": 0,
                    "winner": "dropout=0.2",
                    **ROBUST,
                    "budget_s": 60.0,
                    "search_s": 12.6,
                    "precision": "float32",
                    "cut": 0,
                    "winner_multiply_adds": 1.2e6,
                    "final_epochs": 4.0,
                    "final_val_accuracy": 0.9912,
                    "decision": "registered mnist-cnn version 1 as @champion",
                }
            ],
            "default": [
                {
                    "seed": 42,
                    "exit": 0,
                    "wall_s": 700.0,
                    "test_accuracy": 0.9965,
                    "trials": 16,
                    "architectures": 16,
                    "pruned": 6,
                    "cut": 1,
                    "epochs_saved": 7,
                    "winner": "family=residual",
                    **ROBUST,
                },
                {
                    "seed": 43,
                    "exit": 0,
                    "wall_s": 600.0,
                    "test_accuracy": 0.9949,
                    "trials": 16,
                    "architectures": 14,
                    "pruned": 5,
                    "epochs_saved": 5,
                    "winner": "family=batchnorm",
                    "robust_heldout_accuracy_mean": 0.975,
                    "robust_accuracy": {"rotation": 0.99, "line": 0.80, "elastic": 0.96},
                },
            ],
        },
    }
    lines = table(results).splitlines()
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert row["training speedup vs plain fp32 model.fit"].endswith("| 2.00x | >= 1.5x | yes |")
    assert row["training speedup in CPU seconds per image vs plain fp32 model.fit"].endswith("| 1.90x |  |  |")
    assert row["tracking overhead (median of pairs)"].endswith("| <= 1.02x | no |")
    assert row["tracking overhead in CPU seconds (median of pairs)"].endswith("| 1.010x |  |  |")
    assert row["tracking overhead, fastest search of each"].endswith("| 0.990x |  |  |")
    assert row["inference: registered model via pyfunc"].endswith("| 25,000 digits/s | >= 10,000 | yes |")
    assert row["inference: the same, served in float32 (serve_int8 off)"].endswith("| 7,000 digits/s |  |  |")
    assert row["profile fast, seed 42: mlflow run"].endswith("| 0.83 min, test 99.40% | <= 1.05 min | yes |")
    assert row["profile fast, seed 42: plan"].endswith(
        "| budget 1 min, float32: 2 trials in 13 s; winner, 1.2 M multiply-adds, 4 final epochs (best val_accuracy 99.12%); registered mnist-cnn version 1 as @champion |  |  |"
    )
    assert row["profile default, seed 42: mlflow run"].endswith("| no |")  # 11.7 min > 10.5
    # In time, but each seed's test accuracy must reach 99.5%.
    assert row["profile default, seed 43: mlflow run"].endswith("| 10.00 min, test 99.49% | <= 10.50 min, >= 99.50% | no |")
    assert row["profile default, seed 42: search"].endswith(
        "| 16 distinct architectures in 16 trials, 6 pruned, 1 cut as too costly (7 epochs saved) | >= 14 architectures | yes |"
    )
    assert row["profile default, seed 43: search"].endswith(
        "| 14 distinct architectures in 16 trials, 5 pruned, 0 cut as too costly (5 epochs saved) | >= 14 architectures | yes |"
    )
    assert row["profile default, seed 42: winner"].endswith("| family=residual |  |  |")
    assert row["profile default, seed 42: held-out kinds of change"].endswith(
        "| mean 95.00%, worst elastic 84.00% (trained-on kinds: mean 94.00%) | >= 95%, each >= 85% | no |"
    )
    assert row["profile default, seed 43: held-out kinds of change"].endswith(
        "| mean 97.50%, worst elastic 96.00% | >= 95%, each >= 85% | yes |"
    )
    assert row["profile default, seed 42: each kind of change"].endswith(
        "| rotation 99.00% line 80.00% elastic 84.00% inverted 97.00% |  |  |"
    )
    assert row["profile default: mean test accuracy of 2 seed(s)"].endswith("| 99.57% | >= 99.65% | no |")


def test_a_slowed_profile_has_targets_of_its_own():
    run = {"seed": 42, "exit": 0, "wall_s": 61.0, "test_accuracy": 0.9905, "trials": 1, "architectures": 1, "pruned": 0, "epochs_saved": 0}
    results = {
        "machine": {"cpu": "Test CPU", "cores": 2, "date": "2026-12-03 00:00 UTC"},
        "profiles": {"fast (slowed)": [{**run, "winner": "", **ROBUST}]},
    }
    row = {line.split(" | ")[0].strip("| "): line for line in table(results).splitlines() if line.startswith("| ")}
    assert row["profile fast (slowed), seed 42: mlflow run"].endswith("| 1.02 min, test 99.05% | <= 1.05 min | yes |")
    assert row["profile fast (slowed): mean test accuracy of 1 seed(s)"].endswith("| 99.05% | >= 99.00% | yes |")


def test_the_scale_out_rows_give_the_trials_wall_and_cpu_time():
    results = {
        "machine": {"cpu": "Test CPU", "cores": 2, "date": "2026-11-30 00:00 UTC"},
        "profiles": {},
        "scale_out": [
            {"parallel": 0, "cpus_per_trial": 2, "exit": 0, "wall_s": 300.4, "trials": 8, "trials_span_s": 200.2, "cpu_seconds_per_trial": 40.0, "ray_startup_s": None},
            {"parallel": 2, "cpus_per_trial": 1, "exit": 0, "wall_s": 250.0, "trials": 8, "trials_span_s": 150.0, "cpu_seconds_per_trial": 35.4, "ray_startup_s": 4.26},
            {"parallel": 1, "wall_s": 3.0, "exit": 2, "error": "error: Ray cluster 'local' cannot be joined"},
        ],
    }  # fmt: skip
    rows = [line for line in table(results).splitlines() if line.startswith("| scale-out")]
    assert rows == [
        "| scale-out, trials one after another, without Ray | 8 trials in 200 s (2 CPUs each), 40 CPU s per trial; whole run 300 s |  |  |",
        "| scale-out, 2 trial(s) at once on Ray | 8 trials in 150 s (1 CPU each), 35 CPU s per trial, Ray started in 4.3 s; whole run 250 s |  |  |",
        "| scale-out, 1 trial(s) at once on Ray | failed: error: Ray cluster 'local' cannot be joined |  |  |",
    ]


def test_every_import_inside_the_benchmark_functions_resolves():
    """The benchmark imports lazily (TensorFlow after the environment is set): a renamed
    function would only fail an hour into a run."""
    import ast
    import importlib

    from tests.helpers import REPO

    for node in (n for path in (REPO / "benchmarks").glob("*.py") for n in ast.walk(ast.parse(path.read_text()))):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.import_module(f"{node.module}.{alias.name}"), (node.module, alias.name)


def test_each_run_puts_its_table_first_in_the_results_file(tmp_path):
    from benchmarks.run import add_to_results

    results = {"machine": {"cpu": "Test CPU", "cores": 2, "date": "2026-11-30 00:00 UTC"}, "profiles": {}}
    path = tmp_path / "RESULTS.md"
    add_to_results(path, results, "python -m benchmarks --profiles fast")
    add_to_results(path, {**results, "machine": {**results["machine"], "date": "2026-12-01 00:00 UTC"}}, "python -m benchmarks")
    text = path.read_text()
    assert text.startswith("# Benchmark results\n")
    newer, older = text.index("## `python -m benchmarks`\n"), text.index("## `python -m benchmarks --profiles fast`\n")
    assert newer < older and text.count("| figure | measured | target | met |") == 2
    assert "2026-12-01 00:00 UTC" in text[newer:older] and "commit " in text[newer:older]


def test_the_recorded_command_keeps_what_decides_the_measurement():
    from benchmarks.run import measured_arguments

    argv = [
        "--profiles",
        "fast",
        "--out",
        "/tmp/x.json",
        "--results=/tmp/r.md",
        "--settings",
        "augment=robust;seed=1",
        "--tracking-uri",
        "sqlite:///m.db",
    ]
    assert measured_arguments(argv) == ["--profiles", "fast", "--settings", "augment=robust;seed=1"]


def test_the_leave_one_family_out_estimate_takes_each_family_from_the_training_that_left_it_out():
    from benchmarks.robustness import ablation_table, lofo_estimate, lofo_table
    from search import augment, robustness

    def result(recipe: str, value: float, left_out: str = "") -> dict:
        accuracy = {k: (0.5 if kind.family == left_out else value) for k, kind in robustness.KINDS.items()}
        report = robustness.RobustnessReport(accuracy)
        return {
            "recipe": recipe,
            "validation_accuracy": 0.991,
            "test_accuracy": 0.99,
            "heldout_mean": report.heldout_mean,
            "trained_mean": report.trained_mean,
            "worst_heldout": report.worst,
            "seconds_per_image": 2e-4,
            "accuracy": accuracy,
        }

    chosen = result("augment=robust, input_norm=standardize", 0.9)
    left_out = {"geometry": result("without geometry", 0.9, left_out="geometry")}
    estimate = lofo_estimate(chosen, left_out)
    assert estimate["geometry"] == 0.5 and all(v == 0.9 for f, v in estimate.items() if f != "geometry")
    imitated = {robustness.KINDS[k].family for kinds in augment.IMITATES.values() for k in kinds}
    assert "geometry" in imitated and "intensity" not in imitated
    text = ablation_table([result("augment=none, input_norm=none", 0.8), chosen], {chosen["recipe"]: left_out})
    text += "\n" + lofo_table(chosen, left_out, imitated)
    row = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert row["geometry"].endswith("| 50.00% | 90.00% |")
    assert row["intensity"].endswith("| 90.00% | (never imitated) |")
    mean = (0.5 + 0.9 * (len(robustness.FAMILIES) - 1)) / len(robustness.FAMILIES)
    assert f"| {mean:.2%} (least 50.00%) |" in row["augment=robust, input_norm=standardize"]
    assert "| 80.00% (least 80.00%) |" in row["augment=none, input_norm=none"]
    assert row["augment=none, input_norm=none"].startswith("| augment=none, input_norm=none | 99.10% | 99.00% |")
