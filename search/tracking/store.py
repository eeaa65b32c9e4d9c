"""The tracking store itself: is it reachable (and are the credentials right), and calls
that wait while another process holds the sqlite lock or while the server does not answer."""

from __future__ import annotations

import os
import sys
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Mapping

import mlflow

# Waits between retries while another process holds the sqlite write lock
# (MLflow already waits 20 s inside each attempt).
LOCK_RETRY_DELAYS_S = (0.5, 1, 2, 4, 8)
# The reachability probe gives up within ~30 s rather than MLflow's minutes of retries.
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# During a search, MLflow does not retry a request itself: it would send a creation again after
# its answer was lost, making a second run or version. `patient` retries instead, looking first
# for what a lost attempt made, and waits as long as `tracking_wait_s`, saying so.
SEARCH_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
SERVER_RETRY_DELAY_S = 3  # between attempts while the tracking server does not answer
CREATE_KEY = "create_key"  # tag of a run: finds it when the answer to its creation was lost


class TrackingError(RuntimeError):
    """The tracking store cannot be used, or the run asked for cannot be resumed."""


class TrackingUnavailable(RuntimeError):
    """The tracking server stopped answering mid-search for longer than the search waits."""


class _ServerWait:
    """How long calls wait for a tracking server that stops answering, saying so once per
    outage; after one outage outlasts `limit_s`, later calls fail at once."""

    limit_s = 600.0
    gave_up = False

    def wait(self, since: float | None) -> float:
        """Sleep before the next attempt of a call that found the server gone at `since`
        (None: just now); raise TrackingUnavailable when the limit is reached."""
        now = time.monotonic()
        if since is None and not self.gave_up:
            print(
                f"tracking server {mlflow.get_tracking_uri()} does not answer: waiting up to {self.limit_s:.0f} s for it",
                file=sys.stderr,
                flush=True,
            )
            since = now
        if self.gave_up or now - since >= self.limit_s:
            self.gave_up = True
            raise TrackingUnavailable(f"tracking server {mlflow.get_tracking_uri()} did not answer for {self.limit_s:.0f} s")
        time.sleep(SERVER_RETRY_DELAY_S)
        return since

    @staticmethod
    def back(since: float) -> None:
        print(f"tracking server answers again after {time.monotonic() - since:.0f} s", file=sys.stderr, flush=True)


SERVER = _ServerWait()
DEFAULT_SERVER_WAIT_S = _ServerWait.limit_s


def wait_for_server(seconds: float) -> None:
    """From now on in this process, calls wait up to `seconds` for a server that stops
    answering; MLflow's own HTTP retries, shortened, hand over to that wait within seconds."""
    for key, value in SEARCH_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    SERVER.limit_s, SERVER.gave_up = seconds, False


def tracking_uri() -> str:
    """This process's tracking URI, as another process started elsewhere must be given it
    (a relative sqlite path made absolute; credentials never in it)."""
    credentials_out_of_uri()
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def end_run(run_id: str, status: str) -> None:
    """End run `run_id` with `status` (e.g. KILLED), from any process."""
    PatientClient().set_terminated(run_id, status)


def credentials_out_of_uri() -> None:
    """Move a user and password written into the tracking URI (`http://user:pw@host`) into
    MLflow's own MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, which it sends the
    same way: the URI, printed in messages and by MLflow, and given to Ray workers, then
    carries no secret."""
    uri = mlflow.get_tracking_uri()
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        os.environ["MLFLOW_TRACKING_URI"] = bare  # what MLflow reads when no URI was set in code
    else:
        mlflow.set_tracking_uri(bare)


def check_reachable() -> None:
    """Fail fast, with one clear error, if the tracking store cannot be reached."""
    credentials_out_of_uri()
    saved = {k: os.environ.get(k) for k in PROBE_ENV}
    os.environ.update({k: os.environ.get(k) or v for k, v in PROBE_ENV.items()})
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as err:
        text = str(err)
        for code, what in (("401", "refused the credentials"), ("403", "refused this user")):
            if f"error code {code} " in text:
                raise TrackingError(
                    f"tracking server {mlflow.get_tracking_uri()} {what} (HTTP {code}): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                ) from None
        reason = (
            "no connection"
            if "Max retries exceeded" in text or "Connection" in text
            else (text.strip().splitlines() or [type(err).__name__])[0][:200]
        )
        raise TrackingError(f"tracking store {mlflow.get_tracking_uri()} is unreachable ({reason})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class PatientClient:
    """`MlflowClient` whose calls wait and retry while another process holds the sqlite lock,
    so two searches sharing one sqlite store lose no metric."""

    def __init__(self) -> None:
        self._client = mlflow.MlflowClient()

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        return patient(attribute) if callable(attribute) else attribute

    def create_run(self, experiment_id: str, run_name: str | None = None, tags: Mapping[str, str] | None = None):
        """A new run, created once even when the answer to its creation is lost: it carries
        a fresh CREATE_KEY tag, looked for before the creation is tried again."""
        key = uuid.uuid4().hex

        def find():
            runs = self._client.search_runs([experiment_id], f"tags.{CREATE_KEY} = '{key}'", max_results=1)
            return runs[0] if runs else None

        return patient(self._client.create_run, find)(experiment_id, run_name=run_name, tags={**(tags or {}), CREATE_KEY: key})


def patient(call, find=None):
    """`call`, retried while another process holds the sqlite lock and while the tracking
    server does not answer (SERVER says how long). With `find`, an attempt the server may
    have carried out before its answer was lost is looked for first: what `find()` returns,
    unless None, is the result, so what a call creates is created once."""

    def patient_call(*args, **kwargs):
        lock_delays, server_gone_since, maybe_done = iter(LOCK_RETRY_DELAYS_S), None, False
        while True:
            try:
                found = find() if maybe_done and find is not None else None
                result = found if found is not None else call(*args, **kwargs)
            except Exception as err:
                if _lost_race(err) and (delay := next(lock_delays, None)) is not None:
                    time.sleep(delay)
                elif _server_gone(err):
                    if maybe_done:  # the first time, at once: one lost answer or stale connection is no outage
                        server_gone_since = SERVER.wait(server_gone_since)
                    maybe_done = True
                else:
                    raise
                continue
            if server_gone_since is not None:
                SERVER.back(server_gone_since)
            return result

    return patient_call


def _lost_race(err: Exception) -> bool:
    """Whether another process holds the sqlite write lock, or inserted the same row (a
    dataset both searches log) between MLflow's lookup and its insert: the next attempt
    finds that row."""
    text = str(err)
    return "database is locked" in text or "UNIQUE constraint failed: datasets." in text


def _server_gone(err: Exception) -> bool:
    """Whether `err` says the tracking server could not be reached (refused, reset, or
    answering 5xx while it starts), not that it refused the request."""
    import requests  # noqa: PLC0415 - installed with MLflow, which raises its errors

    text = str(err)
    return isinstance(err, requests.exceptions.ConnectionError) or "Max retries exceeded" in text or "Connection aborted" in text
