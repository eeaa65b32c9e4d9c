"""`python -m search`: the command line of the search.

Bad input ends with one line on stderr and exit status 2; a traceback is
printed only with --debug or SEARCH_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from experiments import PROFILES, ConfigError, resolve

EXIT_USAGE = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a hyperparameter search (what `mlflow run .` does)")
    run.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)} (default: default)")
    # Blank or 0 means "the profile's value", as in the MLproject.
    run.add_argument("--tuner", default="", help="hyperband, bayesian or random")
    run.add_argument("--max-trials", type=_whole, default=0, help="most trials to run")
    run.add_argument("--max-epochs", type=_whole, default=0, help="most epochs per trial")
    run.add_argument("--threshold", type=float, default=0.0, help="test accuracy needed to register, in (0, 1]")
    run.add_argument("--model-name", default="", help="registered model name")
    run.add_argument("--data", default="", help="MNIST .npz (default: $MNIST_NPZ, else Keras' download)")
    run.add_argument("--seed", type=_whole, default=0, help="random seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SEARCH_DEBUG") == "1"
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        status = EXIT_USAGE if _is_user_error(err) else EXIT_FAILED
        print(f"error: {err}", file=sys.stderr)
        return status


def _run(args: argparse.Namespace) -> int:
    config = resolve(
        args.profile,
        tuner=args.tuner,
        max_trials=args.max_trials,
        max_epochs=args.max_epochs,
        threshold=args.threshold,
        model_name=args.model_name,
        data=args.data,
        seed=args.seed,
    )
    from search.pipeline import run_search  # TensorFlow loads only once the arguments are valid

    result = run_search(config)
    print(f"search run {result.run_id}: {result.completed_trials}/{result.trials} trials completed, best val_accuracy {result.best_val_accuracy:.4f}")
    return 0


def _is_user_error(err: Exception) -> bool:
    from search.data import DataError

    return isinstance(err, (ConfigError, DataError))


def _whole(text: str) -> int:
    """A whole number; MLflow passes float parameters like "3.0". Ranges are the config's to check."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)

