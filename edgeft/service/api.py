"""The OpenAI fine-tuning and chat API, as the openai Python client calls it (FastAPI, served by uvicorn).

Every route needs `Authorization: Bearer KEY`. Errors are the API's shape, {"error": {"message", "type", "param",
"code"}}, with the status codes the client expects: 400 for a request that is wrong (never 409: the client
retries 409, and a retry cannot fix the request), 401 for the key, 404 for what does not exist, 413 for an upload
over the limit. No request names a path: files, jobs and models are looked up by id in the database and the
model registry, and every file the service writes is under its state folder, named by the ids it makes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from edgeft.core.atomic import atomic_path
from edgeft.core.errors import EdgeftError
from edgeft.service import worker as worker_mod
from edgeft.service.models import ContextExceeded, Models, UnknownModel
from edgeft.service.store import ACTIVE, Store, new_id, upload_path, uploads

ID = re.compile(r"(file|ftjob)-[0-9a-f]{24}")
PURPOSES = ("fine-tune",)
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _not_found(what: str, given: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such {what}: {given!r}", param, None)


@dataclass(frozen=True)
class Service:
    """What the routes work with (app.state.service)."""
    store: Store
    models: Models
    worker: Any
    state: Path
    api_key: str
    max_upload_bytes: int


def create_app(store: Store, models: Models, worker, state: Path, api_key: str, max_upload_bytes: int) -> FastAPI:
    app = FastAPI(title="edgeft", docs_url=None, redoc_url=None, openapi_url=None)
    uploads(state).mkdir(parents=True, exist_ok=True)
    app.state.service = Service(store, models, worker, Path(state), api_key, max_upload_bytes)
    app.middleware("http")(_authenticate)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.include_router(router)
    return app


async def _authenticate(request: Request, call_next):
    expected = f"Bearer {request.app.state.service.api_key}".encode()
    given = request.headers.get("authorization", "").encode()
    if request.url.path != "/health" and not hmac.compare_digest(given, expected):
        return JSONResponse(error_body("Incorrect API key provided; pass the key the server was started with "
                                       "(--api-key) as the client's api_key", "invalid_request_error", None,
                                       "invalid_api_key"), status_code=401)
    return await call_next(request)


async def _api_error(_request, e: ApiError):
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)


async def _invalid(_request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    return JSONResponse(error_body(f"Invalid request: {first.get('msg', 'malformed')}" + (f" ({where})" if where else ""),
                                   "invalid_request_error", where), status_code=400)


async def _http_error(_request, e: HTTPException):
    return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)


router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


@router.get("/health")
def health() -> dict:
    return {"status": "ok"}


# -- files ---------------------------------------------------------------------------------------------------
@router.post("/v1/files")
async def upload(request: Request) -> dict:
    return await _upload(request, _service(request))


@router.get("/v1/files")
def list_files(request: Request, purpose: str | None = None) -> dict:
    return {"object": "list", "data": _service(request).store.files(purpose), "has_more": False}


@router.get("/v1/files/{file_id}")
def get_file(request: Request, file_id: str) -> dict:
    return _file(_service(request).store, file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(request: Request, file_id: str) -> Response:
    service = _service(request)
    _file(service.store, file_id)
    return Response(upload_path(service.state, file_id).read_bytes(), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
def delete_file(request: Request, file_id: str) -> dict:
    service = _service(request)
    _file(service.store, file_id)
    service.store.delete_file(file_id)
    upload_path(service.state, file_id).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


# -- fine-tuning jobs ----------------------------------------------------------------------------------------
@router.post("/v1/fine_tuning/jobs")
def create_job(request: Request, body: dict[str, Any]) -> dict:
    service = _service(request)
    job = _job_request(body, service.store, service.models)
    created = service.store.add_job(job)
    service.store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
    service.worker.wake.set()
    return created


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int = 20) -> dict:
    jobs, more = _service(request).store.jobs(after, _limit(limit))
    return {"object": "list", "data": jobs, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(request: Request, job_id: str) -> dict:
    return _job(_service(request).store, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str) -> dict:
    store = _service(request).store
    job = _job(store, job_id)
    if job["status"] not in ACTIVE:
        raise _bad(f"Job {job_id} has already {job['status']}; only a job that is validating its files, queued or "
                   "running can be cancelled", None, "job_not_cancellable")
    return store.request_cancel(job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def job_events(request: Request, job_id: str, after: str | None = None, limit: int = 20) -> dict:
    store = _service(request).store
    _job(store, job_id)
    events, more = store.events(job_id, after, _limit(limit))
    return {"object": "list", "data": events, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10) -> dict:
    store = _service(request).store
    _job(store, job_id)
    checkpoints, more = store.checkpoints(job_id, after, _limit(limit))
    return {"object": "list", "data": checkpoints, "has_more": more,
            "first_id": checkpoints[0]["id"] if checkpoints else None,
            "last_id": checkpoints[-1]["id"] if checkpoints else None}


# -- models and chat -----------------------------------------------------------------------------------------
@router.get("/v1/models")
def list_models(request: Request) -> dict:
    return {"object": "list", "data": _service(request).models.listing()}


@router.get("/v1/models/{model_id:path}")
def get_model(request: Request, model_id: str) -> dict:
    found = next((m for m in _service(request).models.listing() if m["id"] == model_id), None)
    if found is None:
        raise _not_found("model", model_id, "model")
    return found


@router.post("/v1/chat/completions")
def chat(request: Request, body: dict[str, Any]):
    return _chat(body, _service(request).models)


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise _bad(f"limit must be between 1 and 100, got {limit}", "limit")
    return limit


def _file_or_none(store: Store, file_id: str) -> dict | None:
    return store.file(file_id) if ID.fullmatch(file_id) else None


def _file(store: Store, file_id: str) -> dict:
    found = _file_or_none(store, file_id)
    if found is None:
        raise _not_found("File", file_id, "file_id")
    return found


def _job(store: Store, job_id: str) -> dict:
    found = store.job(job_id) if ID.fullmatch(job_id) else None
    if found is None:
        raise _not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return found


async def _upload(request: Request, service: Service) -> dict:
    """A multipart upload (fields `file` and `purpose`), streamed to a temporary file and renamed when whole and
    within the size limit."""
    store, limit = service.store, service.max_upload_bytes
    length = request.headers.get("content-length")
    if not (length and length.isdigit()):  # a body of undeclared length could fill the disk before any check
        raise ApiError(411, "send the upload with a Content-Length header (the openai client does)", "file",
                       "length_required")
    if int(length) > limit + 64 * 1024:
        raise ApiError(413, f"the upload is {int(length):,} bytes; this server takes files up to {limit:,} bytes "
                            "(serve --max-upload-mb)", "file", "file_too_large")
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=limit + 1)
    except Exception as e:  # noqa: BLE001 - python-multipart's errors: malformed, or a part over the limit
        raise ApiError(413 if "exceed" in str(e).lower() else 400, f"cannot read the upload: {e}", "file") from None
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose not in PURPOSES:
        raise _bad(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}", "purpose")
    if upload is None or isinstance(upload, str):
        raise _bad("the request has no file part; send the JSONL as multipart field 'file'", "file")
    file_id = new_id("file")
    digest, size = hashlib.sha256(), 0
    with atomic_path(upload_path(service.state, file_id)) as tmp:  # nothing under its name unless whole
        with open(tmp, "wb") as out:
            while block := await upload.read(1 << 20):
                size += len(block)
                if size > limit:
                    raise ApiError(413, f"the file is over {limit:,} bytes, this server's limit (serve "
                                        "--max-upload-mb)", "file", "file_too_large")
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if size == 0:
            raise _bad("the file is empty; upload a JSONL of training examples", "file")
    name = Path(str(upload.filename or "upload.jsonl")).name[:255]  # metadata only: never a path
    return store.add_file(file_id, name, str(purpose), size, digest.hexdigest())


def _job_request(body: dict, store: Store, models: Models) -> dict:
    """The job a create request asks for, checked: its model and files exist, its options are in range."""
    model = body.get("model")
    if not isinstance(model, str) or model not in models.bases:
        raise _bad(f"model {model!r} cannot be fine-tuned here; the base models are {', '.join(models.bases)}",
                   "model", "model_not_available")
    files = {}
    for param in ("training_file", "validation_file"):
        value = body.get(param)
        if value is None and param == "validation_file":
            files[param] = None
            continue
        if not isinstance(value, str) or not value.startswith("file-") or _file_or_none(store, value) is None:
            raise _bad(f"{param} {value!r} does not exist; upload it first (POST /v1/files, purpose fine-tune)",
                       param, f"invalid_{param}")
        files[param] = value
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise _bad("suffix: up to 64 letters, digits, '-' or '_'", "suffix")
    seed = body.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(3), "big")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**31 - 1:
        raise _bad("seed: an integer between 0 and 2147483647", "seed")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or any(
            not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512
            for k, v in metadata.items())):
        raise _bad("metadata: up to 16 string keys (64 characters) with string values (512)", "metadata")
    hyper = _hyperparameters(body)
    return {"id": new_id("ftjob"), "model": model, **files, "suffix": suffix, "seed": seed, "metadata": metadata,
            "hyperparameters": hyper}


RANGES = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 1e-3, 100.0)}


def _hyperparameters(body: dict) -> dict:
    method = body.get("method")
    given = body.get("hyperparameters")
    if method is not None:
        if not isinstance(method, dict) or method.get("type", "supervised") != "supervised":
            kind = method.get("type") if isinstance(method, dict) else method
            raise _bad(f"method {kind!r} is not supported; this server fine-tunes with method type 'supervised'",
                       "method.type")
        given = ((method.get("supervised") or {}).get("hyperparameters")) or given
    if given is not None and not isinstance(given, dict):
        raise _bad("hyperparameters: an object", "hyperparameters")
    given = given or {}
    for key, value in given.items():
        if key not in RANGES:
            raise _bad(f"hyperparameters.{key} is not supported; the supported ones are {', '.join(RANGES)}",
                       f"hyperparameters.{key}")
        kind, low, high = RANGES[key]
        if value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) \
                or not low <= value <= high:
            raise _bad(f"hyperparameters.{key} must be 'auto' or a{'n integer' if kind is int else ' number'} from "
                       f"{low:g} to {high:g}, got {value!r}", f"hyperparameters.{key}")
    return worker_mod.hyperparameters(given)


def _turns(messages) -> list[dict]:
    """The request's messages as the chat template takes them (text only; developer is system)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: a non-empty list of {role, content}", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}]: role must be system, developer, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content: a string", f"messages[{i}].content")
        turns.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return turns


def _generation(body: dict) -> tuple[int | None, list[str]]:
    """max_tokens (or max_completion_tokens) and the stop strings, checked."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _bad("max_tokens: a positive integer", "max_tokens")
    if body.get("n", 1) not in (1, None):
        raise _bad("n: this server returns one choice per request", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
        raise _bad("stop: a string or up to 4 non-empty strings", "stop")
    return max_tokens, stop


def _chat(body: dict, models: Models):
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model: the id of a model (GET /v1/models)", "model")
    turns, (max_tokens, stop) = _turns(body.get("messages")), _generation(body)
    try:
        reply = models.reply(model, turns, max_tokens, stop)
    except UnknownModel as e:
        raise ApiError(404, str(e), "model", "model_not_found") from None
    except ContextExceeded as e:
        raise _bad(str(e), "messages", "context_length_exceeded") from None
    except EdgeftError as e:
        raise ApiError(500, str(e), None, None, "server_error") from None
    completion_id, created = "chatcmpl-" + new_id("c")[2:], int(time.time())
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(reply, completion_id, created, model, include_usage),
                                 media_type="text/event-stream")
    text = "".join(reply)
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": reply.finish_reason, "logprobs": None}],
            "usage": _usage(reply)}


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def _stream(reply, completion_id: str, created: int, model: str, include_usage: bool):
    """Server-sent events: a role chunk, a chunk per piece of text, the finish reason, [DONE]."""
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices
                else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in reply:
        yield chunk({"content": piece})
    yield chunk({}, reply.finish_reason)
    if include_usage:
        yield chunk({}, usage=_usage(reply), choices=False)
    yield "data: [DONE]\n\n"
