"""Logged models: the Keras model with a pyfunc flavor shipped beside it, and loading a
model by URI (`models:/mnist-cnn@champion`) as Keras or as MLflow's pyfunc."""

from __future__ import annotations

import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Mapping

import mlflow
import numpy as np
from mlflow.entities import LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from .store import TrackingError, check_reachable, patient

# What the logged model needs to be loaded and served; given explicitly
# because inferring it costs seconds per call.
MODEL_REQUIREMENTS = tuple(f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "tensorflow", "keras"))
LOGGED_MODEL_NAME = "model"  # the search run's one logged model
# The Keras model's own tensors (mlflow.keras.save_model requires an input schema).
KERAS_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1), "digits")]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10), "probabilities")]),
)
# The registered model's pyfunc (search/serving/pyfunc_model.py): its input is left open, as it takes
# (N, 28, 28), (N, 28, 28, 1) or (N, 784) digits, integers 0..255 or floats 0..1.
MODEL_SIGNATURE = ModelSignature(
    inputs=None,
    outputs=Schema([ColSpec("long", "digit"), *(ColSpec("float", f"probability_{d}") for d in range(10))]),
)


def log_keras_with_pyfunc(
    run_id: str,
    keras_model,
    code: Mapping[str, Path],
    loader_module: str,
    files: Mapping[str, bytes],
    card: str,
    loader_config: Mapping[str, str],
) -> str:
    """Log `keras_model` as an MLflow logged model of run `run_id`, named `model`: MLflow's
    keras flavor, and a pyfunc flavor served by the module `loader_module` (`code` maps
    module names to the files shipped with the model as `code/<name>.py`), reading `files` under `data/`, configured by
    `loader_config`, which `load_model(..., model_config=)` can override); `card`
    beside it as `model_card.md`. MLflow links the run's metrics of step 0 (the
    test and robustness metrics) to it. Returns its `models:/` URI."""
    info = patient(Model.log)(
        artifact_path=None,
        name=LOGGED_MODEL_NAME,
        flavor=_KerasWithPyfunc,
        run_id=run_id,
        keras_model=keras_model,
        code=code,
        loader_module=loader_module,
        files=files,
        card=card,
        loader_config=loader_config,
    )
    _delete_unfinished_models(run_id, info.model_id)
    return info.model_uri


def _delete_unfinished_models(run_id: str, logged_id: str) -> None:
    """A log retried because its creation's answer was lost (after the server acted) leaves
    the first model PENDING, without files, beside the one logged: deleted, so that the run
    holds one model. Finished models of the run, an earlier attempt's included, are kept."""
    client = mlflow.MlflowClient()
    experiment_id = patient(client.get_run)(run_id).info.experiment_id
    models = patient(client.search_logged_models)([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    for model in models:
        if model.model_id != logged_id and model.name == LOGGED_MODEL_NAME and model.status != LoggedModelStatus.READY:
            patient(client.delete_logged_model)(model.model_id)


class _KerasWithPyfunc:
    """A flavor for `mlflow.models.Model.log`: MLflow's keras flavor (float32, for
    `mlflow.keras.load_model`), with a pyfunc flavor whose loader module is shipped with the model."""

    @staticmethod
    def save_model(
        path,
        mlflow_model: Model,
        keras_model,
        code: Mapping[str, Path],
        loader_module: str,
        files: Mapping[str, bytes],
        card: str,
        loader_config: Mapping[str, str],
    ) -> None:
        import mlflow.keras  # noqa: PLC0415 - TensorFlow glue only when a model is logged

        mlflow.keras.save_model(
            keras_model, path, mlflow_model=mlflow_model, signature=KERAS_SIGNATURE, pip_requirements=list(MODEL_REQUIREMENTS)
        )
        folder = Path(path)
        for name, content in files.items():
            (folder / "data" / name).write_bytes(content)
        (folder / "code").mkdir()
        for module, source in code.items():
            shutil.copy(source, folder / "code" / f"{module}.py")
        if card:
            (folder / "model_card.md").write_text(card)
        keras_env = mlflow_model.flavors["python_function"]["env"]
        mlflow.pyfunc.add_to_model(
            mlflow_model,
            loader_module=loader_module,
            code="code",
            data="data",
            conda_env=keras_env["conda"],
            python_env=keras_env["virtualenv"],
            model_config=dict(loader_config),
        )
        mlflow_model.signature = MODEL_SIGNATURE
        mlflow_model.save(str(folder / "MLmodel"))


def load_keras_model(model_uri: str):
    """The Keras model at `model_uri` (e.g. `models:/mnist-cnn@champion`), loaded with Keras' safe mode."""
    import mlflow.keras  # noqa: PLC0415 - TensorFlow glue only when a model is loaded

    return _load(mlflow.keras.load_model, model_uri)


def load_pyfunc_model(model_uri: str):
    """The model at `model_uri` as MLflow's generic pyfunc, as a serving process loads it."""
    return _load(mlflow.pyfunc.load_model, model_uri)


def _load(loader, model_uri: str):
    check_reachable()
    try:
        return loader(model_uri)
    except Exception as err:  # MLflow raises several types for a missing model or alias
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrackingError(f"cannot load model {model_uri!r}: {first_line[:300]}") from None
