"""A network that loses answers after the server acted: a real `mlflow server` behind a
TCP proxy of this test's own that forwards every creation (experiment, run, logged
model, registered model, model version) and drops the server's first answer to each. The search, which
looks for what a lost creation made before it tries again (search/tracking/store.py),
leaves no duplicate run or version, nothing RUNNING, and the aliases right."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections import Counter

import mlflow
import pytest

from tests.helpers import SMALL_SEARCH
from tests.test_faults import Executor, Search, Server, trial_runs

pytestmark = pytest.mark.e2e

CREATION = re.compile(rb"^POST /api/2\.0/mlflow/([a-z-]+/create|logged-models) ")
TINY = (*SMALL_SEARCH, "max_trials=2", "threshold=0.5", "robust_threshold=0.3")


class AnswerDropper:
    """127.0.0.1:`port` forwards to 127.0.0.1:`upstream`; the first answer to each distinct
    creation request (line and body) is read from the server, so it has acted, and then the
    client's connection is closed instead of answered."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped: list[str] = []  # the request lines whose answers were lost
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()

    def _connection(self, client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", self.upstream))
        drop_next_answer = threading.Event()

        def answers() -> None:
            while data := _recv(server):
                if drop_next_answer.is_set():  # the server acted and answered: the client never hears it
                    break
                client.sendall(data)
            for each in (client, server):  # shut down first: that ends the other thread's recv and tells the client now
                with contextlib.suppress(OSError):
                    each.shutdown(socket.SHUT_RDWR)
                each.close()

        threading.Thread(target=answers, daemon=True).start()
        buffer = b""
        while True:
            request, buffer = _one_request(client, buffer)
            if request is None:
                break
            line = request.split(b"\r\n", 1)[0]
            with self._lock:
                first_time = CREATION.match(line) is not None and request not in self._seen
                if first_time:
                    self._seen.add(request)
                    self.dropped.append(line.decode().split()[1])
            if first_time:
                drop_next_answer.set()
            try:
                server.sendall(request)
            except OSError:
                break
        server.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _one_request(client: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """The next whole HTTP request on `client` (headers and Content-Length body), and what
    came after it; None when the client is gone."""
    while b"\r\n\r\n" not in buffer:
        if not (data := _recv(client)):
            return None, b""
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    size = int(length.group(1)) if length else 0
    while len(rest) < size:
        if not (data := _recv(client)):
            return None, b""
        rest += data
    return head + b"\r\n\r\n" + rest[:size], rest[size:]


def test_answers_lost_after_every_creation_leave_no_duplicate_and_nothing_running(tmp_path, mnist_12k):
    server = Server(tmp_path)
    server.start()
    try:
        proxy = AnswerDropper(server.port)
        through_proxy = Server(tmp_path)  # what the searches are told: the proxy's address
        through_proxy.url = f"http://127.0.0.1:{proxy.port}"
        first = Search(tmp_path, through_proxy, Executor("in-process"), mnist_12k, "run", *TINY)
        assert first.wait() == 0, first.output()
        second = Search(tmp_path, through_proxy, Executor("in-process"), mnist_12k, "run", *TINY, "max_trials=1", "seed=7")
        assert second.wait() == 0, second.output()

        assert {"/api/2.0/mlflow/experiments/create", "/api/2.0/mlflow/runs/create"} <= set(proxy.dropped), proxy.dropped
        assert {"/api/2.0/mlflow/registered-models/create", "/api/2.0/mlflow/model-versions/create"} <= set(proxy.dropped), proxy.dropped
        assert "/api/2.0/mlflow/logged-models" in proxy.dropped, proxy.dropped
        client = mlflow.MlflowClient(server.url)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, max_results=1000)
        parents = [r for r in runs if "trial_id" not in r.data.tags]
        assert len(parents) == 2 and {r.info.status for r in runs} == {"FINISHED"}, Counter(r.info.status for r in runs)
        for parent, trials in zip(sorted(parents, key=lambda r: r.info.start_time), (["0", "1"], ["0"])):
            trial_ids = [r.data.tags["trial_id"] for r in trial_runs(client) if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
            assert sorted(trial_ids) == trials  # each trial one run
        for parent in parents:  # one logged model each, the one with files: none left PENDING by a lost answer
            models = client.search_logged_models([parent.info.experiment_id], filter_string=f"source_run_id = '{parent.info.run_id}'")
            assert [str(m.status) for m in models] == ["READY"], [(m.model_id, str(m.status)) for m in models]
        versions = client.search_model_versions("name = 'mnist-cnn'")
        assert sorted(v.run_id for v in versions) == sorted(p.info.run_id for p in parents)  # one version per search
        champion = client.get_model_version_by_alias("mnist-cnn", "champion")
        aliases = {alias: v.version for v in versions for alias in client.get_model_version("mnist-cnn", v.version).aliases}
        if champion.run_id == min(parents, key=lambda r: r.info.start_time).info.run_id:
            assert aliases == {"champion": champion.version}
        else:  # the second search won: the first's version is the one to roll back to
            assert aliases == {"champion": champion.version, "previous_champion": "1"}
        print(f"answers dropped: {Counter(proxy.dropped)}; champion version {champion.version}, aliases {aliases}")
    finally:
        server.stop()
