"""``heartlora serve``: an HTTP server (Starlette on uvicorn) over an :class:`~heartlora.bank.AdapterBank`.

Endpoints:
  ``GET /health``  -> ``{"status": "ok", "tasks": N}``
  ``GET /tasks``   -> ``[{"name", "num_classes", "class_names"}, …]``
  ``POST /predict?task=T&top_k=K`` with the image file's bytes as the body -> ``{"task", "top": [{"label", "index",
  "prob"}, …]}``. A bad image, a missing or unknown task or a bad ``top_k`` answer 4xx with ``{"error": one line}``.

Requests are batched across tasks: a :class:`Batcher` gathers what arrives within ``max_wait_ms`` of the first
request (up to ``max_batch``) and runs one bank call for all of them, in a worker thread so the event loop keeps
accepting requests. Install the extra: ``pip install '/path/to/heartlora[serve]'``. ``heartlora serve`` itself
runs the FastAPI version of this app (:mod:`heartlora.serve_api`: OpenAPI schema, /docs, form uploads, adapters
added and removed while serving), with the same endpoints and JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from heartlora.bank import AdapterBank
from heartlora.data.base import ImageTooLargeError, open_image, resize_image
from heartlora.errors import ConfigError, HeartLoRAError, TaskError

MAX_BODY_BYTES = 20 * 2**20
# what heartlora serve needs (pyproject.toml's serve extra), named as pip takes it: heartlora is installed from its
# checkout, so `pip install 'heartlora[serve]'` would ask PyPI for another package
SERVE_INSTALL = ("pip install 'fastapi>=0.115' 'starlette>=0.40' 'uvicorn>=0.30' 'python-multipart>=0.0.9' "
                 "(the serve extra)")
MAX_TOP_K = 1000
# A posted image's pixels, checked from its header before decoding: a PNG of a few hundred KB can declare 90 million
# pixels (PIL's own limit), which take about 0.6 GB to decode. 40 million is a 40-megapixel camera's photo.
MAX_POSTED_PIXELS = 40_000_000
# Images decoded at once (each in a thread of its own pool): what bounds the memory a burst of requests can take
DECODE_THREADS = 4
_decoders: ThreadPoolExecutor | None = None


async def decode_image_async(data: bytes, img_size: int) -> torch.Tensor:
    """:func:`decode_image` in a pool of ``DECODE_THREADS`` threads: decoding a large image takes seconds, and the
    event loop must go on answering other requests (and the batcher's timer) meanwhile; the pool's size bounds how
    many images are decoded, so how much memory they take, however many requests arrive."""
    global _decoders
    if _decoders is None:
        _decoders = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="heartlora-decode")
    return await asyncio.get_running_loop().run_in_executor(_decoders, decode_image, data, img_size)


def internal_error(exc: BaseException) -> str:
    """The one line a client gets for a failure that is not its request's fault (the traceback goes to the log)."""
    return (f"the server failed on this request ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "its log has the details")


def decode_image(data: bytes, img_size: int) -> torch.Tensor:
    """Image file bytes -> float (3, S, S) in [0, 1], decoded and resized by the code that made the training data
    (as ``heartlora predict`` does); a one-line ConfigError when the bytes are not an image."""
    if not data:
        raise ConfigError("the request body is empty: POST the image file's bytes")
    try:
        # refuses decompression bombs before decoding; the message is for the client, not the server's operator
        with open_image(io.BytesIO(data), name="the posted image", max_pixels=MAX_POSTED_PIXELS,
                        hint="send a smaller image (resize it first)") as im:
            array = resize_image(im, img_size)
    except ImageTooLargeError:
        raise
    except TaskError as exc:  # a mode the data part refuses (LAB, NaN floats)
        raise ConfigError(f"the posted image: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ConfigError(f"the body is not an image PIL can read ({type(exc).__name__}): POST a PNG, JPEG or other "
                          "image file") from None
    return torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)


class TaskRefused(HeartLoRAError):
    """A request's task is known but its adapter could not be loaded (a damaged file, another backbone): the
    server answers it 500 with this one line."""


def task_rows(bank: AdapterBank) -> list[dict[str, Any]]:
    """GET /tasks: every task a request may name, ``{"name", "num_classes", "class_names", "loaded"}``; a folder
    bank's tasks not in memory have ``num_classes`` null and no class names until their first request."""
    rows = []
    for name in bank.available():
        t = bank.tasks.get(name)
        rows.append({"name": name, "num_classes": t.num_classes, "class_names": list(t.class_names), "loaded": True}
                    if t is not None else {"name": name, "num_classes": None, "class_names": [], "loaded": False})
    return rows


@dataclass
class BatchStats:
    """What the batcher has done: requests answered and bank calls made (requests / calls = mean batch size)."""

    requests: int = 0
    calls: int = 0
    largest: int = 0


class Batcher:
    """Gathers (image, task, top_k) requests for up to ``max_wait_ms`` after the first and answers them with one
    bank call. Start it inside the running event loop (:meth:`start`); :meth:`submit` awaits one request's answer."""

    def __init__(self, bank: AdapterBank, max_batch: int = 32, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ConfigError(f"max_batch must be >= 1 and max_wait_ms >= 0 (got {max_batch}, {max_wait_ms})")
        self.bank, self.max_batch, self.max_wait = bank, max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heartlora-bank")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, image: torch.Tensor, task: str, top_k: int) -> list[dict[str, Any]]:
        if self._queue is None:
            raise RuntimeError("the batcher is not started: call start() inside the event loop")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, task, top_k, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                answers = await loop.run_in_executor(self._pool, self._answer, items)
            except Exception as exc:  # noqa: BLE001 (one failing call answers every request in it with the error)
                for *_, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (*_, future), answer in zip(items, answers):
                if future.done():  # the client may have gone
                    continue
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)

    @contextlib.asynccontextmanager
    async def running(self) -> Any:
        """Started inside the block, stopped after it: an ASGI app's lifespan."""
        self.start()
        try:
            yield
        finally:
            await self.stop()

    async def run_exclusive(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the bank's worker thread, between two bank calls: how adapters are added to or removed
        from a running server without disturbing the batches around it."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _answer(self, items: Sequence[tuple]) -> list[list[dict[str, Any]] | None | TaskRefused]:
        """The top labels of each request; None for one whose task was removed while it waited; a
        :class:`TaskRefused` for one whose adapter could not be loaded (a folder bank loads here what the batch
        needs: the other tasks of the batch get their answers)."""
        answers = self.bank.answer(torch.stack([i[0] for i in items]), [i[1] for i in items],
                                   k=max(i[2] for i in items))
        self.stats.requests += len(items)
        self.stats.calls += 1
        self.stats.largest = max(self.stats.largest, len(items))
        gone = {task: not self.bank.has_task(task) for (_, task, _, _), a in zip(items, answers) if isinstance(a, str)}
        return [a[:k] if not isinstance(a, str) else None if gone[task] else TaskRefused(a)
                for a, (_, task, k, _) in zip(answers, items)]


def create_app(bank: AdapterBank, img_size: int, max_batch: int = 32, max_wait_ms: float = 5.0) -> Any:
    """The Starlette application for ``bank``; images are resized to ``img_size``. ``app.state.batcher`` holds the
    :class:`Batcher` (its ``stats`` say how requests were grouped)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    bank.serve_at(img_size)
    batcher = Batcher(bank, max_batch, max_wait_ms)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status_code=status)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "tasks": len(bank.available())})

    async def tasks(request: Request) -> JSONResponse:
        return JSONResponse(task_rows(bank))

    async def predict(request: Request) -> JSONResponse:
        task = request.query_params.get("task")
        if not task:
            return error(400, "name the task: POST /predict?task=NAME (the tasks: GET /tasks)")
        if not bank.has_task(task):
            return error(404, bank.unknown(task))
        raw_k = request.query_params.get("top_k", "5")
        if not (raw_k.isascii() and raw_k.isdigit()) or not 1 <= int(raw_k) <= MAX_TOP_K:  # isdigit alone takes "²"
            return error(400, f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {raw_k!r}")
        size = request.headers.get("content-length")
        if size is not None and size.isascii() and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return error(413, f"the image is {int(size):,} bytes, more than {MAX_BODY_BYTES:,}: send a smaller file")
        chunks, read = [], 0
        try:  # the limit holds while reading, for a chunked body (no Content-Length) too
            async for chunk in request.stream():
                read += len(chunk)
                if read > MAX_BODY_BYTES:
                    return error(413, f"the image is more than {MAX_BODY_BYTES:,} bytes: send a smaller file")
                chunks.append(chunk)
        except ClientDisconnect:  # the client hung up mid-upload: one line in the server's log, no traceback
            logging.getLogger("uvicorn.error").info("a client hung up after %s bytes of its image (POST /predict)",
                                                    f"{read:,}")
            return error(400, "the client hung up before the image was read")
        body = b"".join(chunks)
        try:
            image = await decode_image_async(body, img_size)
        except ImageTooLargeError as exc:  # more pixels than MAX_POSTED_PIXELS
            return error(413, str(exc))
        except HeartLoRAError as exc:
            return error(400, str(exc))
        try:
            top = await batcher.submit(image, task, int(raw_k))
        except TaskRefused as exc:
            return error(500, str(exc))
        if top is None:
            return error(404, bank.unknown(task))
        return JSONResponse({"task": task, "top": top})

    @asynccontextmanager
    async def lifespan(app: Any):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """The router's own 404 and 405 as one-line JSON, like every other error (405 keeps its Allow header)."""
        response = error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; this server answers "
                         "GET /health, GET /tasks and POST /predict?task=NAME")
        response.headers.update(exc.headers or {})
        return response

    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        """Anything else (a bank call that failed, say) as one-line JSON too; Starlette logs the traceback."""
        return error(500, internal_error(exc))

    app = Starlette(routes=[Route("/health", health), Route("/tasks", tasks),
                            Route("/predict", predict, methods=["POST"])], lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: crashed})
    app.state.batcher = batcher
    return app


def serve(bank: AdapterBank, img_size: int, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
          max_wait_ms: float = 5.0, log_level: str = "info",
          on_listening: Callable[[str, int], None] | None = None, app: Any = None) -> None:
    """Run the server until interrupted (uvicorn). ``on_listening(host, port)`` is called once the port is bound
    (with the port the OS chose for ``port=0``): a startup line printed there is never a promise the server breaks.
    ``app``: another ASGI app over ``bank`` (heartlora serve runs :func:`heartlora.serve_api.create_api`), else
    :func:`create_app`'s."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port: choose one from 1 to 65535 (0: any free port)")
    app = app if app is not None else create_app(bank, img_size, max_batch, max_wait_ms)  # checks its settings first

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and on_listening is not None:
                bound = [s.getsockname()[1] for srv in self.servers for s in (srv.sockets or [])]
                on_listening(host, bound[0] if bound else port)

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
    except SystemExit as exc:  # uvicorn exits 3 when it cannot start (the port in use, an address not here)
        if exc.code not in (0, None):
            raise HeartLoRAError(f"the server could not start on {host}:{port} (uvicorn's error above says why, e.g. "
                                 "the port is in use): choose another --port or --host") from None
        raise


def require_serving() -> None:
    """A one-line error when the serving extra is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"heartlora serve needs {exc.name}: {SERVE_INSTALL}") from None


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and max of request latencies, in milliseconds."""
    ms = np.sort(np.asarray(seconds, dtype=float)) * 1000.0
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)} | {"max": float(ms[-1]), "n": len(ms)}

