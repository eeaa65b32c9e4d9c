"""`python -m search`: the command line of the search.

Bad input ends with one line on stderr and exit status 2; a traceback is
printed only with --debug or SEARCH_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from experiments import PROFILES, ConfigError, champion_uri, resolve
from search import interrupts

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
    run.add_argument("--families", default="", help="comma-separated model families, e.g. plain,batchnorm")

    evaluate = commands.add_parser("evaluate", help="evaluate a logged or registered model on the MNIST test split, in its own run")
    evaluate.add_argument("--model-uri", default=champion_uri(), help=f"default: {champion_uri()}")
    evaluate.add_argument("--data", default="", help="MNIST .npz (default: $MNIST_NPZ, else Keras' download)")

    predict = commands.add_parser("predict", help="classify digit images (PNG/JPEG, a folder of them, or .npy/.npz)")
    predict.add_argument("--model-uri", default=champion_uri(), help=f"a logged or registered model (default: {champion_uri()})")
    predict.add_argument("--input", required=True, help="an image, a folder of images, or a .npy/.npz array of digits")
    predict.add_argument("--json", action="store_true", help="print JSON lines")

    resume = commands.add_parser("resume", help="continue an interrupted search with the settings it logged")
    resume.add_argument("run_id", nargs="?", default=os.environ.get("MLFLOW_RUN_ID", ""), help="the search's parent run id (default: $MLFLOW_RUN_ID, as `mlflow run --run-id` sets it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SEARCH_DEBUG") == "1"
    if not debug:
        _start_tensorflow_quietly()
    # Ctrl-C and SIGTERM (a scheduler, `kill`, `mlflow run` cancelling): open runs
    # are marked KILLED and the search can be resumed.
    interrupts.install()
    try:
        return {"run": _run, "resume": _resume, "evaluate": _evaluate, "predict": _predict}[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted; continue with `python -m search resume <run id>`", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        status = EXIT_USAGE if _is_user_error(err) else EXIT_FAILED
        print(f"error: {_first_line(err)}", file=sys.stderr)
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
        families=tuple(f.strip() for f in args.families.split(",") if f.strip()),
    )
    from search.pipeline import run_search  # TensorFlow loads only once the arguments are valid

    return _report(run_search(config))


def _resume(args: argparse.Namespace) -> int:
    if not args.run_id:
        raise ConfigError("resume needs the search's run id (or MLFLOW_RUN_ID, as `mlflow run --run-id` sets it)")
    from search.pipeline import resume_search

    return _report(resume_search(args.run_id))


def _evaluate(args: argparse.Namespace) -> int:
    from search.pipeline import evaluate_model

    evaluate_model(args.model_uri, args.data)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from search import images, predict, tracking

    names, digits = images.read_inputs(args.input)  # bad input fails before the model loads
    model = tracking.load_keras_model(args.model_uri)
    for prediction in predict.predict(model, names, digits):
        print(prediction.line(as_json=args.json))
    return 0


def _report(result) -> int:
    print(f"search run {result.run_id}: {result.completed_trials}/{result.trials} trials completed, best val_accuracy {result.best_val_accuracy:.4f}")
    return 0


def _start_tensorflow_quietly() -> None:
    """Import TensorFlow and place its first op with file descriptor 2 closed off.

    TensorFlow 2.21 writes start-up notices (oneDNN, CUDA not found) to fd 2
    before TF_CPP_MIN_LOG_LEVEL applies; they would bury the one line an error
    prints. Python errors raised here still surface after fd 2 is restored.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.constant(0.0) + 1.0
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _is_user_error(err: Exception) -> bool:
    from search.data import DataError
    from search.images import InputError
    from search.tracking import TrackingError

    return isinstance(err, (ConfigError, DataError, InputError, TrackingError))


def _whole(text: str) -> int:
    """A whole number; MLflow passes float parameters like "3.0". Ranges are the config's to check."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)

