"""Serving a model over REST: MLflow's own scoring server (/invocations, /ping, /health,
/version, the same JSON as `mlflow models serve`), behind a guard that refuses a body over
a size limit from its Content-Length, before reading it, or as soon as a streamed body
passes the limit; and that answers errors with their message only, no stack trace."""

from __future__ import annotations

import json

from mlflow.pyfunc import scoring_server

from .models import load_pyfunc_model


def serve(model_uri: str, host: str, port: int, max_body_bytes: int) -> None:
    """Serve `model_uri` on `host`:`port` until interrupted."""
    import uvicorn  # noqa: PLC0415 - installed with MLflow's scoring server

    app = BodyGuard(scoring_server.init(load_pyfunc_model(model_uri)), max_body_bytes)
    print(f"serving {model_uri} at http://{host}:{port}/invocations", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


class BodyTooLarge(Exception):
    pass


class BodyGuard:
    """An ASGI app in front of `app`: bodies over `max_bytes` answered 413, errors (4xx, 5xx)
    without MLflow's `stack_trace` field."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await _answer(
                send, 413, "BAD_REQUEST", f"request body of {length.decode(errors='replace')} bytes: at most {self.max_bytes:,}"
            )
        received, over_limit, answered = 0, f"request body over {self.max_bytes:,} bytes", False

        async def capped_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a streamed (chunked) body carries no Content-Length
                raise BodyTooLarge
            return message

        started, error = {}, bytearray()

        async def without_stack_trace(message):
            nonlocal answered
            if message["type"] == "http.response.start" and message["status"] >= 400:
                started.update(message)
                return None
            if started and message["type"] == "http.response.body":
                error.extend(message.get("body", b""))
                if not message.get("more_body"):
                    # The app turns the guard's exception into a 500 of its own: it is a 413.
                    status, answer = (
                        (413, ("BAD_REQUEST", over_limit))
                        if received > self.max_bytes
                        else (started["status"], _code_and_message(bytes(error)))
                    )
                    answered = True
                    await _answer(send, status, *answer)
                return None
            return await send(message)

        try:
            await self.app(scope, capped_receive, without_stack_trace)
        except BodyTooLarge:
            if not answered:
                await _answer(send, 413, "BAD_REQUEST", over_limit)


def _code_and_message(body: bytes) -> tuple[str, str]:
    """The error code and message of MLflow's JSON error `body`, without its stack trace."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and "message" in answer:
        return str(answer.get("error_code", "BAD_REQUEST")), str(answer["message"])
    return "BAD_REQUEST", body.decode(errors="replace")


async def _answer(send, status: int, code: str, message: str) -> None:
    """A JSON error answer in MLflow's form."""
    body = json.dumps({"error_code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
