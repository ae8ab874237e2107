"""``heartlora serve``: real HTTP requests on 127.0.0.1 (a free port), errors, cross-task batching, a bounded load
test."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_bank import _make_adapter, _vit

import heartlora as hl
import heartlora.serve as serve_module

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")

from heartlora.serve import Batcher, create_app, decode_image, latency_summary

HOST = "127.0.0.1"  # the tests never use another address
TASKS = {"digits": 4, "shapes": 3, "textures": 6}


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    bank = hl.AdapterBank(_vit(10))
    for i, (task, classes) in enumerate(TASKS.items()):
        bank.add(_make_adapter(tmp, _vit, task, classes, 32 if i != 1 else 1, 4, 3 * i, seed=i))
    return bank


@pytest.fixture(scope="module")
def server(bank):
    app = create_app(bank, img_size=32, max_batch=16, max_wait_ms=20)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))  # a free port, chosen by the OS
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield sock.getsockname()[1], app.state.batcher
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, object]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"} if body else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _expected(bank, data: bytes, task: str, k: int):
    return bank.top_k(decode_image(data, 32)[None], [task], k)[0]


def _same_top(got: list[dict], want: list[dict]) -> None:
    assert [t["label"] for t in got] == [t["label"] for t in want]
    np.testing.assert_allclose([t["prob"] for t in got], [t["prob"] for t in want], atol=1e-5)


def test_health_and_tasks(server):
    port, _ = server
    assert _request(port, "GET", "/health") == (200, {"status": "ok", "tasks": 3})
    status, tasks = _request(port, "GET", "/tasks")
    assert status == 200
    assert [(t["name"], t["num_classes"]) for t in tasks] == list(TASKS.items())
    assert tasks[1]["class_names"] == ["shapes-0", "shapes-1", "shapes-2"]


def test_predict_matches_the_bank(server, bank):
    port, _ = server
    data = _png(1)
    for task in TASKS:
        status, out = _request(port, "POST", f"/predict?task={task}&top_k=2", data)
        assert status == 200 and out["task"] == task
        _same_top(out["top"], _expected(bank, data, task, 2))
    status, out = _request(port, "POST", "/predict?task=shapes&top_k=50", data)  # k above the class count: all
    assert status == 200 and len(out["top"]) == TASKS["shapes"]


@pytest.mark.parametrize("path, body, status, words", [
    ("/predict?task=nope", b"png", 404, "unknown task 'nope'"),
    ("/predict", b"png", 400, "name the task"),
    ("/predict?task=digits", b"this is not an image", 400, "not an image"),
    ("/predict?task=digits", b"", 400, "body is empty"),
    ("/predict?task=digits&top_k=0", b"png", 400, "top_k must be"),
    ("/predict?task=digits&top_k=x", b"png", 400, "top_k must be"),
    ("/predict?task=digits&top_k=%C2%B2", b"png", 400, "top_k must be"),  # "²" passes str.isdigit, not int()
])
def test_bad_requests_get_a_one_line_reason(server, path, body, status, words):
    port, _ = server
    got, out = _request(port, "POST", path, body or None)
    assert got == status
    assert words in out["error"] and "\n" not in out["error"]


def test_get_on_predict_is_refused(server):
    port, _ = server
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", "/predict?task=digits")
    resp = conn.getresponse()
    assert resp.status == 405 and "POST" in resp.getheader("Allow", "")
    assert "GET /predict: Method Not Allowed" in json.loads(resp.read())["error"]  # JSON like every other error
    conn.close()
    got, out = _request(port, "GET", "/nowhere")
    assert got == 404 and "GET /nowhere: Not Found; this server answers" in out["error"]


def test_an_image_too_large_to_decode_is_named_for_the_client(server, monkeypatch):
    import io

    from PIL import Image

    port, _ = server
    buf = io.BytesIO()
    Image.new("L", (64, 64)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # the server runs in this process (below 2x: our check)
    got, out = _request(port, "POST", "/predict?task=digits", buf.getvalue())
    assert got == 413 and out["error"].startswith("the posted image is 64x64 = 4,096 pixels, above the limit of 3,000")
    assert "send a smaller image" in out["error"] and "BytesIO" not in out["error"]
    # the server's own cap, below PIL's: a small file can declare tens of millions of pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(serve_module, "MAX_POSTED_PIXELS", 4000)
    got, out = _request(port, "POST", "/predict?task=digits", buf.getvalue())
    assert got == 413 and "above the limit of 4,000" in out["error"]


def test_serve_refuses_a_port_out_of_range_or_in_use(bank, server):
    from heartlora.errors import ConfigError, HeartLoRAError
    from heartlora.serve import serve

    with pytest.raises(ConfigError, match="--port 99999 is not a TCP port"):
        serve(bank, 32, port=99999)
    with pytest.raises(HeartLoRAError, match=f"could not start on {HOST}:{server[0]}"):
        serve(bank, 32, host=HOST, port=server[0], log_level="critical")  # the test server holds that port


def test_batcher_groups_requests_across_tasks(bank):
    images = [decode_image(_png(s), 32) for s in range(5)]
    tasks = ["digits", "shapes", "textures", "digits", "shapes"]

    async def run():
        batcher = Batcher(bank, max_batch=8, max_wait_ms=200)
        batcher.start()
        try:
            answers = await asyncio.gather(*(batcher.submit(im, t, 3) for im, t in zip(images, tasks)))
        finally:
            await batcher.stop()
        return answers, batcher.stats

    answers, stats = asyncio.run(run())
    assert (stats.requests, stats.calls) == (5, 1)  # five requests of three tasks, one bank call
    for im, t, got in zip(images, tasks, answers):
        _same_top(got, bank.top_k(im[None], [t], 3)[0])


def test_bounded_load(server, bank):
    """8 concurrent clients × 12 requests over the three tasks: every request answered, correctly; prints latency
    percentiles."""
    port, batcher = server
    clients, per_client = 8, 12
    payloads = [_png(100 + i) for i in range(4)]
    names = list(TASKS)
    want = {(p, t): _expected(bank, payloads[p], t, 3) for p in range(len(payloads)) for t in names}
    results: list[tuple[int, int, str, int, object, float]] = []
    lock = threading.Lock()
    before = batcher.stats.requests, batcher.stats.calls

    def client(c: int) -> None:
        for r in range(per_client):
            p, task = (c + r) % len(payloads), names[(c * per_client + r) % len(names)]
            t0 = time.perf_counter()
            try:
                status, out = _request(port, "POST", f"/predict?task={task}&top_k=3", payloads[p])
            except OSError as exc:
                status, out = -1, str(exc)
            with lock:
                results.append((c, p, task, status, out, time.perf_counter() - t0))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == clients * per_client  # no request lost
    assert all(status == 200 for *_, status, _, _ in results), [r for r in results if r[3] != 200][:2]
    for _, p, task, _, out, _ in results:
        assert out["task"] == task
        _same_top(out["top"], want[(p, task)])
    requests, calls = batcher.stats.requests - before[0], batcher.stats.calls - before[1]
    assert requests == clients * per_client
    summary = latency_summary([r[-1] for r in results])
    print(f"\nload test: {requests} requests from {clients} clients in {calls} bank calls; latency ms "
          + ", ".join(f"{k} {v:.1f}" for k, v in summary.items() if k != "n"))
    assert summary["n"] == requests and summary["p50"] <= summary["p99"] <= summary["max"]


def test_decode_image_resizes_to_rgb_in_unit_range():
    gray = io.BytesIO()
    Image.fromarray(np.full((10, 20), 255, dtype=np.uint8)).save(gray, format="PNG")
    x = decode_image(gray.getvalue(), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))


def _asgi_post(app, messages, headers: tuple = ()) -> tuple[list[dict], int]:
    """POST /predict?task=digits straight to the ASGI app with ``messages`` (an iterator of receive() events) and
    ``headers`` besides a chunked transfer; returns what the app sent and how many events it asked for."""
    sent: list[dict] = []
    asked = [0]

    async def receive():
        asked[0] += 1
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"task=digits", "root_path": "",
             "headers": [(b"transfer-encoding", b"chunked"), *headers], "client": ("127.0.0.1", 1),
             "server": (HOST, 80)}
    asyncio.run(app(scope, receive, send))
    return sent, asked[0]


def test_a_client_that_hangs_up_is_one_log_line(bank, caplog):
    """Issue 36: every client that hung up mid-upload left a ClientDisconnect traceback in the log."""
    import logging

    app = create_app(bank, img_size=32)
    events = iter([{"type": "http.request", "body": b"\x89PNG", "more_body": True}, {"type": "http.disconnect"}])
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        sent, _ = _asgi_post(app, events)
    assert sent[0]["status"] == 400
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["a client hung up after 4 bytes of its image (POST /predict)"]
    assert not any(r.exc_info for r in caplog.records)


def test_the_body_limit_holds_while_a_chunked_body_is_read(bank):
    """Issue 36: a chunked body was read whole before the 20 MiB limit was checked."""
    from heartlora.serve import MAX_BODY_BYTES

    chunk = b"x" * 2**20
    endless = ({"type": "http.request", "body": chunk, "more_body": True} for _ in range(10**6))
    sent, asked = _asgi_post(create_app(bank, img_size=32), endless)
    assert sent[0]["status"] == 413 and asked == MAX_BODY_BYTES // len(chunk) + 1  # stopped just past the limit


def test_a_content_length_that_is_no_ascii_number_is_left_to_the_streamed_limit(bank):
    """A Content-Length of "²" (str.isdigit() takes it, int() does not) was a 500; the body's own size decides."""
    from heartlora.serve import MAX_BODY_BYTES

    chunk = b"x" * 2**20
    endless = ({"type": "http.request", "body": chunk, "more_body": True} for _ in range(10**6))
    header = (b"content-length", "²".encode("latin-1"))  # HTTP headers are latin-1
    sent, asked = _asgi_post(create_app(bank, img_size=32), endless, headers=(header,))
    assert sent[0]["status"] == 413 and asked == MAX_BODY_BYTES // len(chunk) + 1


def test_no_startup_line_when_the_port_is_taken(bank, server):
    """The line comes only once the port is bound (the bound case with the port the OS chose:
    test_the_cli_says_where_it_serves_once_it_listens)."""
    from heartlora.errors import HeartLoRAError
    from heartlora.serve import serve

    said: list[tuple[str, int]] = []
    with pytest.raises(HeartLoRAError, match="could not start"):  # the port is the test server's: never announced
        serve(bank, 32, host=HOST, port=server[0], log_level="critical", on_listening=lambda h, p: said.append(p))
    assert said == []


def test_the_cli_says_where_it_serves_once_it_listens(tmp_path):
    """`heartlora serve --port 0`: the startup line names the port the OS chose, and that port answers."""
    import os
    import subprocess
    import sys

    path = _make_adapter(tmp_path, _vit, "digits", 4, 32, 4, 0, seed=0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "heartlora", "serve", "--adapter", str(path), "--port", "0",
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "serving" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            line = proc.stderr.readline()
        port = int(line.split(f"http://{HOST}:")[1].split()[0])
        assert port > 0 and _request(port, "GET", "/health") == (200, {"status": "ok", "tasks": 1})
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_starlette_app_refuses_a_size_other_than_its_banks() -> None:
    """create_api refused a server size other than the bank's, create_app did not: 48 px images then reached a 32 px
    task and were answered (a backbone that interpolates its position embeddings takes them), wrongly."""
    from heartlora.errors import ConfigError

    bank = hl.AdapterBank(_vit(4), img_size=32)
    with pytest.raises(ConfigError, match="the bank runs 32 px and the server would resize images to 48 px"):
        create_app(bank, img_size=48)
    fresh = hl.AdapterBank(_vit(4))
    create_app(fresh, img_size=32)
    assert fresh.img_size == 32  # a bank with no size takes the server's, and refuses adapters of another
