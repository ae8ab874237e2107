"""``heartlora serve``'s HTTP API on FastAPI: the same endpoints and JSON as :func:`heartlora.serve.create_app`, with
FastAPI's OpenAPI schema (``/openapi.json``) and interactive docs (``/docs``), form uploads, and adapters added and
removed while the server runs.

Endpoints:
  ``GET /``                 what the server is, and where its docs are
  ``GET /health``, ``GET /tasks``
  ``POST /predict?task=T&top_k=K``  the image as the raw body, or as a multipart form field (``curl -F
  file=@img.png``); -> ``{"task", "top": [{"label", "index", "prob"}, …]}``
  ``POST /adapters?name=N``  an adapter file (raw body or form field), with ``Authorization: Bearer TOKEN``
  ``DELETE /adapters/{name}``  with the same header

Every error answers ``{"error": one line}``. Adding and removing run in the bank's worker thread between two batches
(:meth:`heartlora.serve.Batcher.run_exclusive`): requests in flight are answered; one that waited for a task removed
meanwhile gets 404. The admin endpoints exist only when a token was given at start (``--admin-token``, or the
``HEARTLORA_ADMIN_TOKEN`` environment variable); without one they answer 403.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, whose models are local.
import hmac
import os
import tempfile
from pathlib import Path
from typing import Any

import heartlora
from heartlora.bank import AdapterBank, trained_task
from heartlora.data.base import ImageTooLargeError
from heartlora.errors import ConfigError, HeartLoRAError
from heartlora.method.storage import read_adapter_info
from heartlora.serve import (
    MAX_BODY_BYTES,
    MAX_TOP_K,
    SERVE_INSTALL,
    Batcher,
    TaskRefused,
    decode_image_async,
    internal_error,
    task_rows,
)

MAX_ADAPTER_BYTES = 512 * 2**20
FORM_SLACK_BYTES = 64 * 2**10  # a multipart body's boundaries and part headers, beyond the file itself
MIN_TOKEN_CHARS = 16
TOKEN_ENV = "HEARTLORA_ADMIN_TOKEN"
BINARY = {"type": "string", "format": "binary"}


def require_api() -> None:
    """A one-line error when FastAPI or python-multipart (the serve extra) is missing."""
    for module, package in (("fastapi", "fastapi"), ("multipart", "python-multipart"), ("uvicorn", "uvicorn")):
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"heartlora serve needs {package}: {SERVE_INSTALL}") from None


def check_token(token: str | None) -> str | None:
    """The admin token (``token``, else $HEARTLORA_ADMIN_TOKEN), refused when too short to guess at, or empty: an
    empty one (``--admin-token "$UNSET"``) would turn the admin endpoints off where they were asked for."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if token == "":
        raise ConfigError(f"the admin token is empty (--admin-token or ${TOKEN_ENV}; an unset shell variable?): give "
                          f"one of at least {MIN_TOKEN_CHARS} characters, or neither to serve without admin endpoints")
    if token is not None and (len(token) < MIN_TOKEN_CHARS or token != token.strip()):
        raise ConfigError(f"the admin token has {len(token)} characters: give at least {MIN_TOKEN_CHARS}, without "
                          "surrounding spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    return token


def _body_schema(field: str, what: str) -> dict[str, Any]:
    """OpenAPI request body: the file as the raw body, or as the form field ``field``."""
    return {"requestBody": {"required": True, "description": what, "content": {
        "application/octet-stream": {"schema": BINARY},
        "multipart/form-data": {"schema": {"type": "object", "properties": {field: BINARY}, "required": [field]}}}}}


def create_api(bank: AdapterBank, img_size: int, max_batch: int = 32, max_wait_ms: float = 5.0,
               admin_token: str | None = None) -> Any:
    """The FastAPI application for ``bank`` (images resized to ``img_size``); ``app.state.batcher`` holds the
    :class:`~heartlora.serve.Batcher`. ``admin_token`` enables POST and DELETE /adapters. A bank made without an
    ``img_size`` takes this one: its tasks, and every adapter added later, must have been trained at it."""
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException


    admin_token = check_token(admin_token)
    bank.serve_at(img_size)
    batcher = Batcher(bank, max_batch, max_wait_ms)

    class Failure(Exception):
        def __init__(self, status: int, message: str) -> None:
            self.status, self.message = status, " ".join(message.split())

    class Error(BaseModel):
        error: str

    class Health(BaseModel):
        status: str
        tasks: int

    class Task(BaseModel):
        name: str
        num_classes: int | None  # null: a folder's task not loaded yet
        class_names: list[str]

    class Listed(Task):
        loaded: bool  # false: a folder's task not in memory (loaded by its first request)

    class Label(BaseModel):
        label: str
        index: int
        prob: float

    class Prediction(BaseModel):
        task: str
        top: list[Label]

    class Removed(BaseModel):
        removed: str
        tasks: int

    errors = {code: {"model": Error} for code in (400, 404, 413, 500)}
    admin_errors = {code: {"model": Error} for code in (400, 401, 403, 404, 409, 413)}

    app = FastAPI(title="heartlora", version=heartlora.__version__, lifespan=lambda app: batcher.running(),
                  description="Image classification with Heart-LoRA adapters on one shared backbone: every task is "
                              "an adapter file; requests of different tasks are batched together.")
    app.state.batcher = batcher
    schema = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without the 422 it lists for every endpoint with parameters: invalid parameters are
        answered 400 with the one-line ``{"error"}`` every other error has (``invalid`` below)."""
        out = schema()
        for operations in out.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            out.get("components", {}).get("schemas", {}).pop(name, None)
        return out

    app.openapi = openapi  # type: ignore[method-assign]

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status_code=status)

    @app.exception_handler(Failure)
    async def failure(request: Request, exc: Failure) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "the request"
        return error(400, f"{where}: {first.get('msg', 'invalid')} (see /docs)")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        """Anything else (a bank call that failed, say) as one-line JSON too; Starlette logs the traceback."""
        return error(500, internal_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        response = error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; see /docs for the "
                                          "endpoints")
        response.headers.update(exc.headers or {})
        return response

    async def read_body(request: Request, limit: int, what: str, slack: int = 0) -> bytes:
        """The request's body, refused (413) as soon as it passes ``limit`` (+ ``slack``: a form's boundaries and
        part headers) bytes: for a chunked body (no Content-Length) too, before a form's file part is stored."""
        size = request.headers.get("content-length")
        if size is not None and size.isascii() and size.isdigit() and int(size) > limit + slack:
            raise Failure(413, f"the {what} is {int(size):,} bytes, more than {limit:,}: send a smaller file")
        chunks, read = [], 0
        async for chunk in request.stream():
            read += len(chunk)
            if read > limit + slack:
                raise Failure(413, f"the {what} is more than {limit:,} bytes: send a smaller file")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_file(request: Request, field: str, limit: int, what: str) -> bytes:
        """The raw body, or the form's ``field`` (else its only file), at most ``limit`` bytes."""
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):  # any case (RFC 2045)
            body = await read_body(request, limit, what, FORM_SLACK_BYTES)

            async def replay() -> dict[str, Any]:  # the form is parsed from the body read within the limit
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(request.scope, replay).form(max_files=1, max_fields=4, max_part_size=limit)
            upload = form.get(field)
            files = [v for v in form.values() if hasattr(v, "read")]
            if not hasattr(upload, "read"):
                if len(files) != 1:
                    raise Failure(400, f"send the {what} as the form field {field!r} (curl -F {field}=@FILE)")
                upload = files[0]
            data = await upload.read(limit + 1)
        else:
            data = await read_body(request, limit, what)
        if len(data) > limit:
            raise Failure(413, f"the {what} is more than {limit:,} bytes: send a smaller file")
        return data

    def admin(credentials: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))) -> None:
        if admin_token is None:
            raise Failure(403, "adding and removing adapters is off: start the server with --admin-token (or "
                               f"${TOKEN_ENV})")
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            raise Failure(401, "send the server's admin token: Authorization: Bearer TOKEN")

    def task_info(name: str) -> Task:
        t = bank.tasks[name]
        return Task(name=t.name, num_classes=t.num_classes, class_names=list(t.class_names))

    @app.get("/", summary="What this server is")
    async def index() -> dict[str, Any]:
        return {"service": "heartlora", "version": heartlora.__version__, "tasks": len(bank.available()),
                "docs": "/docs", "openapi": "/openapi.json"}

    @app.get("/health", response_model=Health, summary="Liveness and the number of tasks")
    async def health() -> Health:
        return Health(status="ok", tasks=len(bank.available()))

    @app.get("/tasks", response_model=list[Listed], summary="The tasks served, with their class names")
    async def tasks() -> list[Listed]:
        return [Listed(**row) for row in task_rows(bank)]

    @app.post("/predict", response_model=Prediction, responses=errors, openapi_extra=_body_schema(
              "file", "the image file (PNG, JPEG, …): the raw body, or the multipart form field `file`"),
              summary="The most probable labels of one image under one task")
    async def predict(request: Request, task: str | None = Query(None, description="the task (GET /tasks)"),
                      top_k: int = Query(5, ge=1, le=MAX_TOP_K, description="how many labels")) -> Prediction:
        if not task:
            raise Failure(400, "name the task: POST /predict?task=NAME (the tasks: GET /tasks)")
        if not bank.has_task(task):
            raise Failure(404, bank.unknown(task))
        data = await read_file(request, "file", MAX_BODY_BYTES, "image")
        try:
            image = await decode_image_async(data, img_size)
        except ImageTooLargeError as exc:  # more pixels than MAX_POSTED_PIXELS
            raise Failure(413, str(exc)) from None
        except HeartLoRAError as exc:
            raise Failure(400, str(exc)) from None
        try:
            top = await batcher.submit(image, task, top_k)
        except TaskRefused as exc:
            raise Failure(500, str(exc)) from None
        if top is None:
            raise Failure(404, f"task {task!r} was removed while this request waited")
        return Prediction(task=task, top=top)

    @app.post("/adapters", response_model=Task, status_code=201, responses=admin_errors,
              dependencies=[Depends(admin)], openapi_extra=_body_schema(
                  "file", "a heartlora adapter file (.safetensors) for this server's backbone"),
              summary="Add an adapter while the server runs (admin token)")
    async def add_adapter(request: Request, name: str | None = Query(None, description=(
            "the task's name (default: the task the file was trained on)"))) -> Task:
        def taken(name: str) -> None:
            if bank.has_task(name):  # a folder bank's file not in memory yet included
                first = ("remove its file from the served folder" if bank.served_from_folder(name)
                         else f"DELETE /adapters/{name} first")
                raise Failure(409, f"a task named {name!r} is served already: {first}, or choose another ?name=")

        if name is not None and not name.strip():  # the bank would fall back to the upload's temporary file name
            raise Failure(400, "?name= is empty: give the task a name, or leave ?name= out for the task the file was "
                               "trained on")
        if name is not None:
            taken(name)
        data = await read_file(request, "file", MAX_ADAPTER_BYTES, "adapter file")
        fd, tmp = tempfile.mkstemp(prefix="heartlora-upload-", suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            info = await batcher.run_exclusive(read_adapter_info, Path(tmp))
            if name is None:  # the task the file was trained on; never the upload's temporary file name
                name = trained_task(info)
                if not name:
                    raise Failure(400, "the adapter file names no task (saved with save_adapter): give its name "
                                       "with POST /adapters?name=NAME")
                taken(name)
            added = await batcher.run_exclusive(bank.add, Path(tmp), name)
        except HeartLoRAError as exc:  # named as the client knows it, not by the server's temporary path
            message = str(exc).replace(tmp, "the uploaded adapter file")
            raise Failure(409 if "already holds a task" in message else 400, message) from None
        finally:
            os.unlink(tmp)
        return task_info(added.name)

    @app.delete("/adapters/{name}", response_model=Removed, responses=admin_errors, dependencies=[Depends(admin)],
                summary="Remove a task while the server runs (admin token); its requests in flight get 404")
    async def remove_adapter(name: str) -> Removed:
        if bank.served_from_folder(name):
            raise Failure(409, f"task {name!r} is served from its file in the adapter folder: remove the file there "
                               "(this server then stops answering it)")
        unknown = f"unknown task {name!r}: this server holds {', '.join(bank.available()[:20]) or 'no tasks'}"
        if name not in bank.tasks:
            raise Failure(404, unknown)
        try:
            await batcher.run_exclusive(bank.remove, name)
        except ConfigError:  # a DELETE of the same task just before this one
            raise Failure(404, unknown) from None
        return Removed(removed=name, tasks=len(bank.available()))

    return app
