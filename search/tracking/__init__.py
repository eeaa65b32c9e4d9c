"""The MLflow adapter: every MLflow call of the project, and the only package that imports
mlflow (the pyfunc shipped inside each model aside). It imports nothing else of the
project; what to register is search/registry.py's decision.

- runs: the search's parent run, one nested run per trial, the registry's primitives;
- models: logging a Keras model with its pyfunc, loading a model by URI;
- serving: MLflow's scoring server behind a body-size guard;
- store: reaching the store, and waiting out a sqlite lock or a server that does not answer.
"""

from .models import load_keras_model, load_pyfunc_model
from .runs import COMMAND_TAG, RunRecord, SearchTracker, attach, run_record, tracked_run
from .serving import serve
from .store import PatientClient, TrackingError, TrackingUnavailable, check_reachable, end_run, tracking_uri

__all__ = [
    "COMMAND_TAG",
    "PatientClient",
    "RunRecord",
    "SearchTracker",
    "TrackingError",
    "TrackingUnavailable",
    "attach",
    "check_reachable",
    "end_run",
    "load_keras_model",
    "load_pyfunc_model",
    "run_record",
    "serve",
    "tracked_run",
    "tracking_uri",
]
