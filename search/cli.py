"""`python -m search`: the command line of the search.

Bad input ends with one line on stderr and exit status 2; a traceback is
printed only with --debug or SEARCH_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from experiments import PROFILES, SETTINGS, ConfigError, champion_uri, resolve_text
from search import interrupts, outputs

EXIT_USAGE = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a hyperparameter search (what `mlflow run .` does)")
    _add_search_arguments(run)

    evaluate = commands.add_parser("evaluate", help="evaluate a logged or registered model on the MNIST test split, in its own run")
    evaluate.add_argument("--model-uri", default=champion_uri(), help=f"default: {champion_uri()}")
    evaluate.add_argument("--data", default="", help="MNIST .npz (default: $MNIST_NPZ, else Keras' download)")

    predict = commands.add_parser("predict", help="classify digit images (PNG/JPEG, a folder of them, or .npy/.npz)")
    predict.add_argument("--model-uri", default=champion_uri(), help=f"a logged or registered model (default: {champion_uri()})")
    predict.add_argument("--input", required=True, help="an image, a folder of images, or a .npy/.npz array of digits")
    predict.add_argument("--json", action="store_true", help="print JSON lines")

    serve = commands.add_parser("serve", help="serve a model over REST, as `mlflow models serve` does, refusing oversized bodies unread")
    serve.add_argument("--model-uri", default=champion_uri(), help=f"a logged or registered model (default: {champion_uri()})")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=5001, help="default: 5001")

    resume = commands.add_parser("resume", help="continue an interrupted search with the settings it logged")
    resume.add_argument(
        "run_id",
        nargs="?",
        default=os.environ.get("MLFLOW_RUN_ID", ""),
        help="the search's parent run id (default: $MLFLOW_RUN_ID, as `mlflow run --run-id` sets it)",
    )
    return parser


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting of experiments.SearchConfig, as `--name value` (also `--name-with-dashes`,
    and what `mlflow run -P name=value` passes) or as `name=value`; a setting not given
    keeps the profile's value."""
    parser.add_argument("--profile", default=None, help=f"one of {', '.join(PROFILES)} (default: default)")
    for name, default in SETTINGS.items():
        flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
        shown = ",".join(default) if isinstance(default, tuple) else default
        # --ray alone: a Ray cluster of this machine's CPUs, started by the search.
        optional = {"nargs": "?", "const": "local"} if name == "ray" else {}
        parser.add_argument(*flags, dest=name, default=None, metavar="VALUE", help=f"default: {shown!r} or the profile's", **optional)
    parser.add_argument("settings", nargs="*", metavar="name=value", help="settings as name=value, e.g. seed=0 fixed= final_epochs=10")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SEARCH_DEBUG") == "1"
    if not debug:
        start_tensorflow_quietly()
    # Ctrl-C and SIGTERM (a scheduler, `kill`, `mlflow run` cancelling): open runs
    # are marked KILLED and the search can be resumed.
    interrupts.install()
    try:
        commands = {
            "run": _run,
            "resume": _resume,
            "evaluate": _evaluate,
            "predict": _predict,
            "serve": _serve,
        }
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted; continue with `python -m search resume <run id>`", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        status = EXIT_USAGE if _is_user_error(err) else EXIT_FAILED
        print(f"error: {_first_line(err)}", file=sys.stderr)
    # Python has dropped `err` here, and with its traceback what a full disk left half written.
    outputs.quiet_leftovers_of_a_full_disk()
    return status


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    from search.budget import process_started
    from search.pipeline import run_search  # TensorFlow loads only once the arguments are valid

    return _report(run_search(config, started=process_started()))


def _config(args: argparse.Namespace):
    settings = list(args.settings)
    if args.ray and "=" in args.ray:  # `--ray seed=0`: a bare --ray followed by a setting
        settings.insert(0, args.ray)
        args.ray = "local"
    given = {name: getattr(args, name) for name in ("profile", *SETTINGS) if getattr(args, name) is not None}
    for setting in settings:
        name, equals, value = setting.partition("=")
        if not equals or not name.strip():
            raise ConfigError(f"{setting!r} is not a setting of the form name=value")
        given[name.strip()] = value
    return resolve_text(given)


def _resume(args: argparse.Namespace) -> int:
    if not args.run_id:
        raise ConfigError("resume needs the search's run id (or MLFLOW_RUN_ID, as `mlflow run --run-id` sets it)")
    from search.budget import process_started
    from search.resume import resume_search

    return _report(resume_search(args.run_id, started=process_started()))


def _evaluate(args: argparse.Namespace) -> int:
    from search.assessment import evaluate_model

    evaluate_model(args.model_uri, args.data)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from search import tracking
    from search.serving import images, predict

    names, digits = images.read_inputs(args.input)  # bad input fails before the model loads
    model = tracking.load_pyfunc_model(args.model_uri)
    for prediction in predict.predict(model, names, digits):
        print(prediction.line(as_json=args.json))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from search import tracking
    from search.serving.pyfunc_model import MAX_BODY_BYTES

    tracking.serve(args.model_uri, args.host, args.port, MAX_BODY_BYTES)
    return 0


def _report(result) -> int:
    print(
        f"search run {result.run_id}: {result.completed_trials}/{result.trials} trials completed, best val_accuracy {result.best_val_accuracy:.4f}"
    )
    return 0


def start_tensorflow_quietly() -> None:
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
    from search.locking import LockedError
    from search.serving.images import InputError
    from search.tracking import TrackingError
    from search.tuner_state import TunerStateError

    return isinstance(err, (ConfigError, DataError, InputError, LockedError, TrackingError, TunerStateError))
