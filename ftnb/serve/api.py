"""The HTTP layer: OpenAI-compatible request bodies, errors and routes, as a FastAPI app.

Usage: uvicorn.run(create_app(["runs/x/adapter", "legal=runs/y/adapter"]), host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ftnb.serve.batching import Batcher, GenerationRequest, Job, ModelError
from ftnb.serve.models import Served, ServedClassifier, ServedGenerator, load_models
from ftnb.tasks import classify

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unsupported parameter is an error, not silently ignored


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extra parameter
    user: str | None = None


class ClassifyRequest(_Body):
    model: str
    input: str | dict[str, Any] | list[str | dict[str, Any]]


class APIError(Exception):
    """A request the server refuses, answered as OpenAI does: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _validation_error(errors: list[dict]) -> APIError:
    """The body's problems in one message, each with where it is (messages.0.role)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
                        code="invalid_json")
    where = lambda e: ".".join(str(p) for p in e["loc"] if p != "body") or "body"  # noqa: E731
    problems = [f"{where(e)}: unsupported parameter" if e["type"] == "extra_forbidden" else f"{where(e)}: {e['msg']}"
                for e in errors[:5]]
    return APIError(400, "; ".join(problems) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""),
                    param=where(first), code="invalid_request")


# ---------------------------------------------------------------- routes
class Service:
    """The routes, over the served models and the batcher."""

    def __init__(self, served: dict[str, Served], max_batch_size: int, max_new_tokens_limit: int,
                 batch_wait_ms: float):
        self.served, self.max_new_tokens_limit = served, max_new_tokens_limit
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_ms / 1000
        self.batcher: Batcher | None = None  # made in the server's event loop
        self.created = int(time.time())

    def lookup(self, name: str, kind: type) -> Served:
        if name not in self.served:
            raise APIError(404, f"the model {name!r} is not served here; served models: {', '.join(self.served)}",
                           param="model", code="model_not_found")
        found = self.served[name]
        if not isinstance(found, kind):
            route = "/v1/classify" if isinstance(found, ServedClassifier) else "/v1/chat/completions"
            raise APIError(400, f"{name!r} is a {_kind(found)}: send it to {route}", param="model",
                           code="wrong_route")
        return found

    async def submit(self, served: Served, payload: Any) -> Job:
        job = Job(served, payload, asyncio.get_running_loop())
        await self.batcher.queue.put(job)
        return job

    async def health(self) -> dict:
        return {"status": "ok", "models": list(self.served), "batching": self.batcher.stats}

    async def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "ftnb", "kind": _kind(m),
             "parent": getattr(m, "parent", None)} for name, m in self.served.items()]}

    async def chat_completions(self, body: ChatRequest):
        served = self.lookup(body.model, ServedGenerator)
        default = min(served.decoding.get("max_new_tokens", self.max_new_tokens_limit), self.max_new_tokens_limit)
        max_tokens = body.max_completion_tokens or body.max_tokens or default
        if max_tokens > self.max_new_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, but this server generates at most "
                                f"{self.max_new_tokens_limit} tokens per request (--max-new-tokens-limit)",
                           param="max_tokens", code="max_tokens_too_large")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "\n".join(part.text for part in m.content)} for m in body.messages]
        try:
            prompt_ids = served.prompt_ids(messages)
        except TemplateError as e:  # e.g. a template that wants user and assistant turns to alternate
            raise APIError(400, f"the model's chat template refuses these messages: {e}", param="messages",
                           code="invalid_messages") from e
        limit = served.engine.context_length
        if len(prompt_ids) + max_tokens > limit:
            raise APIError(400, f"this model's context is {limit} tokens, but the request needs "
                                f"{len(prompt_ids) + max_tokens}: {len(prompt_ids)} in the messages (chat template "
                                f"included) and {max_tokens} for the answer; shorten the messages or max_tokens",
                           param="messages", code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop", code="invalid_stop")
        request = GenerationRequest(prompt_ids, max_tokens, stops, _decoding(served.decoding, body), body.stream)
        job = await self.submit(served, request)
        reply = _Reply(body.model)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(reply.events(job, include_usage))
        return reply.completion(await job.outcome())

    async def classify(self, body: ClassifyRequest) -> dict:
        served = self.lookup(body.model, ServedClassifier)
        records = [body.input] if isinstance(body.input, (str, dict)) else body.input
        if not records:
            raise APIError(400, "input is empty: send a text, a list of texts, or records with the fields "
                                f"{served.classifier.text_fields}", param="input", code="empty_input")
        for i, record in enumerate(records):
            try:
                text = classify.record_text(record, served.classifier.text_fields)
            except (TypeError, ValueError) as e:
                raise APIError(400, f"input[{i}]: {e}", param=f"input.{i}", code="invalid_record") from e
            if not text.strip():
                raise APIError(400, f"input[{i}] has no text to classify", param=f"input.{i}", code="empty_input")
        probabilities = await (await self.submit(served, records)).outcome()
        return {"object": "list", "model": body.model, "data": [
            {"index": i, "label": max(p, key=p.get), "probabilities": p} for i, p in enumerate(probabilities)]}


def _kind(served: Served) -> str:
    return "classifier" if isinstance(served, ServedClassifier) else "generator"


def _decoding(saved_decoding: dict, body: ChatRequest) -> dict:
    """generate's settings: the model's saved decoding, with what the request sets on top. Spelled
    out in full (do_sample always present), since requests batch together only on equal settings."""
    decoding = {k: v for k, v in saved_decoding.items() if k != "max_new_tokens"}
    if body.repetition_penalty is not None:
        decoding["repetition_penalty"] = body.repetition_penalty
    if body.temperature is not None:
        decoding = {k: v for k, v in decoding.items() if k not in ("do_sample", "temperature", "top_p", "top_k")}
        # as vLLM: a temperature this small is greedy (dividing logits by ~0 would overflow to inf)
        if body.temperature >= GREEDY_BELOW:
            decoding.update(do_sample=True, temperature=body.temperature)
    if body.top_p is not None and decoding.get("do_sample"):
        decoding["top_p"] = body.top_p
    decoding.setdefault("do_sample", False)
    return decoding


class _Reply:
    """OpenAI's response objects for one chat request."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, result: dict) -> dict:
        return {**self._head("chat.completion"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": result["text"]},
             "finish_reason": result["finish_reason"]}], "usage": _usage(result)}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        return _event({**self._head("chat.completion.chunk"),
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    async def events(self, job: Job, include_usage: bool):
        """The server-sent events of a streamed answer: role, text pieces, finish, [usage,] [DONE]."""
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield self._chunk({"content": value})
                elif kind == "error":
                    yield _event(error_body(value, "server_error", code="model_error"))
                    break
                else:
                    yield self._chunk({}, value["finish_reason"])
                    if include_usage:
                        yield _event({**self._head("chat.completion.chunk"), "choices": [], "usage": _usage(value)})
                    break
            yield format_sse_event(data_str="[DONE]")
        finally:
            job.cancelled = True  # ends its row at the next token if the client left early


def _event(data: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(data))


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


# ---------------------------------------------------------------- the app and the command
def create_app(specs: list[str], max_batch_size: int = 16, max_new_tokens_limit: int = 512,
               batch_wait_ms: float = 20.0) -> FastAPI:
    """A FastAPI app serving the saved models `specs` names (FOLDER or NAME=FOLDER); run it with uvicorn.

    Usage: uvicorn.run(create_app(["runs/x/adapter", "legal=runs/y/adapter"]), host="127.0.0.1", port=8000)
    """
    if max_batch_size < 1 or max_new_tokens_limit < 1:
        raise ValueError("max_batch_size and max_new_tokens_limit must be at least 1")
    service = Service(load_models(specs), max_batch_size, max_new_tokens_limit, batch_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher = Batcher(service.max_batch_size, service.batch_wait_s)
        collector = asyncio.create_task(service.batcher.run())
        yield
        collector.cancel()
        service.batcher.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ftnb serve", lifespan=lifespan)
    app.state.service = service  # the served models, for a caller that built the app in its own process
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    app.add_api_route("/v1/classify", service.classify, methods=["POST"])
    app.add_exception_handler(APIError, lambda request, error: error.response())
    app.add_exception_handler(ModelError, lambda request, error: APIError(
        500, str(error), kind="server_error", code="model_error").response())
    app.add_exception_handler(RequestValidationError,
                              lambda request, error: _validation_error(error.errors()).response())
    app.add_exception_handler(HTTPException, lambda request, error: APIError(
        error.status_code, f"{request.method} {request.url.path}: {error.detail}", code="not_found"
        if error.status_code == 404 else None).response())
    app.add_exception_handler(Exception, _server_error)
    return app


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    return APIError(500, f"{type(error).__name__}: {error}", kind="server_error").response()


def serve(specs: list[str], host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Load the models and serve them until interrupted (what `python -m ftnb serve` runs).

    Usage: serve(["runs/x/adapter"], port=8000, max_batch_size=16)
    """
    import uvicorn

    app = create_app(specs, **options)
    print(f"serving {', '.join(r.path for r in app.routes if r.path.startswith('/v1'))} on http://{host}:{port}",
          flush=True)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=5)
