"""Resuming a search: which runs can be resumed, and continuing one from its logged
settings, data and tuner state (run_search does the rest, skipping what is done)."""

from __future__ import annotations

from pathlib import Path

from experiments import ConfigError, from_params
from search import locking, tracking
from search.pipeline import Resume, SearchResult, run_search
from search.tracking import TrackingError


def resume_search(run_id: str, verbose: int | None = None, started: float | None = None) -> SearchResult:
    """Continue the interrupted search whose parent run is `run_id`, with the settings it
    logged: from its tuner state, or from the start when it was stopped before its first trial.
    Its time budget counts anew from `started` (a `time.monotonic()`; default: now)."""
    params = resumable_params(run_id)
    try:
        config = from_params(params)
    except ConfigError:
        tracking.end_run(run_id, "KILLED")
        raise TrackingError(
            f"search run {run_id} stopped before it logged its settings: nothing to continue, marked KILLED; start a new search"
        ) from None
    folder = Path(config.output_dir) / run_id
    if not folder.is_dir():
        raise TrackingError(f"no outputs of search run {run_id} at {folder}: resume from the directory the search ran in")
    # Before the run is reopened: a second resume must not touch the first one's runs.
    with locking.holding(folder, run_id):
        return run_search(config, verbose, Resume(run_id, params.get("data_sha256", ""), params.get("precision_used", "")), started=started)


def resumable_params(run_id: str) -> dict[str, str]:
    """The params of search run `run_id`, checked to be a search that has not finished."""
    run = tracking.run_record(run_id)
    if "trial_id" in run.tags and "mlflow.parentRunId" in run.tags:
        raise TrackingError(f"run {run_id} is a trial run; resume its search run {run.tags['mlflow.parentRunId']}")
    if "registry_decision" in run.tags:
        raise TrackingError(f"search run {run_id} has already finished: {run.tags['registry_decision']}")
    if run.tags.get(tracking.COMMAND_TAG) != "search" and "config.profile" not in run.params:
        raise TrackingError(f"run {run_id} (experiment {run.experiment!r}) is not a search run: nothing to resume")
    return run.params
