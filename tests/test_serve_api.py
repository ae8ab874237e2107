"""``heartlora serve`` on FastAPI: its OpenAPI schema and /docs, the image as a raw body or a multipart form field
(the same JSON either way), adapters added and removed while it runs behind an admin token, errors as one line."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import shutil
import socket
import sys
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from test_bank import _make_adapter, _vit
from test_serve import HOST, TASKS, _asgi_post, _expected, _png, _same_top

import heartlora as hl

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("multipart", reason="the serve extra is not installed (pip install -e '.[serve]')")
uvicorn = pytest.importorskip("uvicorn")

from heartlora.errors import ConfigError  # noqa: E402
from heartlora.serve import Batcher, decode_image  # noqa: E402
from heartlora.serve_api import check_token, create_api  # noqa: E402

TOKEN = "test-token-0123456789"
DOC = Path(__file__).resolve().parents[1] / "docs" / "ECOSYSTEM.md"


def _bank(tmp: Path) -> hl.AdapterBank:
    bank = hl.AdapterBank(_vit(10))
    for i, (task, classes) in enumerate(TASKS.items()):
        bank.add(_make_adapter(tmp, _vit, task, classes, 32 if i != 1 else 1, 4, 3 * i, seed=i))
    return bank


@contextlib.contextmanager
def _running(app):
    """``app`` on uvicorn, on a free port of 127.0.0.1, in a thread; yields the port."""
    sock = socket.create_server((HOST, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    for _ in range(1000):
        if server.started:
            break
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A server with the admin token: (port, bank, the folder of the adapter files)."""
    tmp = tmp_path_factory.mktemp("serve_api")
    bank = _bank(tmp)
    with _running(create_api(bank, 32, max_batch=16, max_wait_ms=20, admin_token=TOKEN)) as port:
        yield port, bank, tmp


def _call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        kind = resp.getheader("content-type", "")
        return resp.status, json.loads(data) if kind.startswith("application/json") else data.decode()
    finally:
        conn.close()


def _form(field: str, data: bytes, filename: str = "img.png") -> tuple[bytes, dict]:
    boundary = "heartlora-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_schema_docs_and_index(api):
    port, _, _ = api
    status, index = _call(port, "GET", "/")
    assert status == 200 and index["docs"] == "/docs" and index["tasks"] == 3
    status, page = _call(port, "GET", "/docs")
    assert status == 200 and "swagger-ui" in page.lower() and "/openapi.json" in page
    status, schema = _call(port, "GET", "/openapi.json")
    assert status == 200 and schema["openapi"].startswith("3.")
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/octet-stream", "multipart/form-data"}
    assert {"/", "/health", "/tasks", "/predict", "/adapters", "/adapters/{name}"} <= set(schema["paths"])
    assert set(schema["paths"]["/predict"]["post"]["responses"]) >= {"200", "400", "404", "413"}
    # invalid parameters are answered 400 {"error"}, never FastAPI's 422 shape: the schema does not promise one
    assert not [op for ops in schema["paths"].values() for op in ops.values() if "422" in op.get("responses", {})]
    assert "HTTPValidationError" not in schema.get("components", {}).get("schemas", {})
    status, out = _call(port, "POST", "/predict?task=digits&top_k=0", _png(1))
    assert status == 400 and "top_k" in out["error"]


def test_raw_body_and_form_field_give_the_same_answer(api):
    port, bank, _ = api
    data = _png(3)
    for task in TASKS:
        raw = _call(port, "POST", f"/predict?task={task}&top_k=2", data, {"Content-Type": "image/png"})
        form = _call(port, "POST", f"/predict?task={task}&top_k=2", *_form("file", data))
        assert raw == form and raw[0] == 200 and raw[1]["task"] == task
        _same_top(raw[1]["top"], _expected(bank, data, task, 2))
    other_name = _call(port, "POST", "/predict?task=digits", *_form("image", data))  # the form's only file
    assert other_name[0] == 200
    body, headers = _form("file", data)  # a media type's case does not matter (RFC 2045)
    shouted = {"Content-Type": headers["Content-Type"].replace("multipart/form-data", "Multipart/Form-Data")}
    assert _call(port, "POST", "/predict?task=digits&top_k=2", body, shouted) == \
        _call(port, "POST", "/predict?task=digits&top_k=2", data)


@pytest.mark.parametrize("method, path, body, status, words", [
    ("POST", "/predict?task=nope", b"png", 404, "unknown task 'nope'"),
    ("POST", "/predict", b"png", 400, "name the task"),
    ("POST", "/predict?task=digits", b"this is not an image", 400, "not an image"),
    ("POST", "/predict?task=digits", b"", 400, "body is empty"),
    ("POST", "/predict?task=digits&top_k=0", b"png", 400, "top_k: Input should be greater than or equal to 1"),
    ("POST", "/predict?task=digits&top_k=x", b"png", 400, "top_k:"),
    ("GET", "/predict?task=digits", None, 405, "GET /predict: Method Not Allowed"),
    ("GET", "/nowhere", None, 404, "GET /nowhere: Not Found"),
])
def test_errors_are_one_line_json(api, method, path, body, status, words):
    got, out = _call(api[0], method, path, body)
    assert got == status and words in out["error"] and "\n" not in out["error"]


def test_adapters_are_added_and_removed_while_serving(api):
    port, bank, tmp = api
    extra = _make_adapter(tmp, _vit, "colors", 5, 32, 4, 2, seed=9)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _call(port, "POST", "/adapters", extra.read_bytes())[0] == 401
    assert _call(port, "POST", "/adapters", extra.read_bytes(), {"Authorization": "Bearer wrong-token"})[0] == 401
    status, task = _call(port, "POST", "/adapters", *_form("file", extra.read_bytes()))
    assert status == 401 and "Authorization: Bearer TOKEN" in task["error"]
    body, headers = _form("file", extra.read_bytes())
    status, task = _call(port, "POST", "/adapters", body, {**headers, **auth})
    assert status == 201 and task == {"name": "colors", "num_classes": 5, "class_names": [f"colors-{i}"
                                                                                         for i in range(5)]}
    data = _png(5)
    status, out = _call(port, "POST", "/predict?task=colors&top_k=3", data)
    own = hl.AdapterBank(_vit(10))
    own.add(extra)
    assert status == 200
    _same_top(out["top"], _expected(own, data, "colors", 3))
    status, again = _call(port, "POST", "/adapters", extra.read_bytes(), auth)
    assert status == 409 and again["error"] == ("a task named 'colors' is served already: DELETE /adapters/colors "
                                                "first, or choose another ?name=")
    status, out = _call(port, "POST", "/adapters?name=colors2", b"not an adapter", auth)
    assert status == 400 and "\n" not in out["error"] and "heartlora-upload" not in out["error"]  # no server path
    assert "the uploaded adapter file" in out["error"]
    status, out = _call(port, "POST", "/adapters?name=", extra.read_bytes(), auth)  # not the temporary file's name
    assert status == 400 and out["error"].startswith("?name= is empty")
    torch.manual_seed(0)
    wide = hl.create_backbone("vit_tiny_patch16_224", num_classes=5, img_size=64, pretrained=False)
    other = _make_adapter(tmp / "64px", lambda n: wide, "wide", 5, 32, 4, 2, seed=3)
    status, out = _call(port, "POST", "/adapters", other.read_bytes(), auth)
    assert status == 400 and out["error"] == ("the uploaded adapter file was trained at 64 px, and this bank runs 32 "
                                              "px: serve it from a bank of its own image size")
    assert "wide" not in bank.tasks
    assert _call(port, "DELETE", "/adapters/colors", None, auth) == (200, {"removed": "colors", "tasks": 3})
    status, out = _call(port, "POST", "/predict?task=colors", data)
    assert status == 404 and "unknown task 'colors'" in out["error"]
    assert _call(port, "DELETE", "/adapters/colors", None, auth)[0] == 404
    for task in TASKS:  # the other tasks answer as before
        _same_top(_call(port, "POST", f"/predict?task={task}&top_k=2", data)[1]["top"],
                  _expected(_bank_for(task, tmp), data, task, 2))


def _bank_for(task: str, tmp: Path) -> hl.AdapterBank:
    bank = hl.AdapterBank(_vit(10))
    bank.add(tmp / f"{task}.safetensors")
    return bank


def test_admin_endpoints_are_off_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HEARTLORA_ADMIN_TOKEN", raising=False)
    bank = _bank(tmp_path)
    with _running(create_api(bank, 32)) as port:
        status, out = _call(port, "DELETE", "/adapters/digits", None, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 403 and "start the server with --admin-token" in out["error"]
    assert list(bank.tasks) == list(TASKS)
    with pytest.raises(ConfigError, match="the admin token has 5 characters: give at least 16"):
        check_token("short")
    assert check_token(None) is None
    with pytest.raises(ConfigError, match="the admin token is empty"):  # --admin-token "$UNSET": not silently off
        check_token("")
    monkeypatch.setenv("HEARTLORA_ADMIN_TOKEN", "")
    with pytest.raises(ConfigError, match="the admin token is empty"):
        check_token(None)
    monkeypatch.setenv("HEARTLORA_ADMIN_TOKEN", TOKEN)
    assert check_token(None) == TOKEN


def test_a_request_waiting_for_a_removed_task_gets_404_and_the_others_their_answer(tmp_path):
    bank = _bank(tmp_path)
    images = [decode_image(_png(s), 32) for s in range(3)]

    async def run():
        batcher = Batcher(bank, max_batch=8, max_wait_ms=300)
        batcher.start()
        try:
            waiting = [asyncio.ensure_future(batcher.submit(im, t, 2))
                       for im, t in zip(images, ["digits", "shapes", "digits"])]
            await asyncio.sleep(0.05)  # the batch is gathering; the removal runs before its bank call
            await batcher.run_exclusive(bank.remove, "shapes")
            return await asyncio.gather(*waiting), batcher.stats
        finally:
            await batcher.stop()

    (first, gone, third), stats = asyncio.run(run())
    assert gone is None and stats.calls == 1
    _same_top(first, _bank_for("digits", tmp_path).top_k(images[0][None], ["digits"], 2)[0])
    _same_top(third, _bank_for("digits", tmp_path).top_k(images[2][None], ["digits"], 2)[0])


def test_bank_remove_keeps_the_other_tasks_exact(tmp_path):
    bank = _bank(tmp_path)
    x = torch.rand(6, 3, 32, 32)
    tasks = ["digits", "textures", "shapes", "textures", "digits", "shapes"]
    before = bank(x, tasks)
    bank.remove("shapes")
    assert list(bank.tasks) == ["digits", "textures"]
    keep = [i for i, t in enumerate(tasks) if t != "shapes"]
    after = bank(x[keep], [tasks[i] for i in keep])
    for i, got in zip(keep, after):
        torch.testing.assert_close(got, before[i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown task 'shapes'"):
        bank(x[:1], ["shapes"])
    bank.add(tmp_path / "shapes.safetensors")  # back under its name: the same logits as before
    for i, got in enumerate(bank(x, tasks)):
        torch.testing.assert_close(got, before[i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        bank.remove("nope")


def test_the_documented_curl_examples_run(api):
    """docs/ECOSYSTEM.md's curl lines, against this test's server and files."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port, _, tmp = api
    block = re.search(r"```bash\n(curl .*?)```", DOC.read_text(), re.DOTALL).group(1)
    (tmp / "img.png").write_bytes(_png(7))
    _make_adapter(tmp, _vit, "flowers", 4, 32, 4, 1, seed=11)
    outputs = []
    for line in block.strip().splitlines():
        cmd = line.split("  #")[0].replace("localhost:8000", f"{HOST}:{port}").replace("$TOKEN", TOKEN)
        cmd = cmd.replace("@img.png", f"@{tmp / 'img.png'}").replace("@runs/flowers/adapter.safetensors",
                                                                       f"@{tmp / 'flowers.safetensors'}")
        done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1] and outputs[0]["task"] == "digits"  # raw body and form field
    assert outputs[2]["name"] == "flowers" and outputs[3] == {"removed": "flowers", "tasks": 3}


def test_serve_refuses_a_short_admin_token_before_loading(tmp_path, capsys):
    from heartlora.cli.main import EXIT_ERROR, main

    missing = tmp_path / "none.safetensors"  # never read: the token is checked first
    assert main(["serve", "--adapter", str(missing), "--admin-token", "short"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the admin token has 5 characters")


def test_a_form_upload_is_refused_just_past_the_limit_before_it_is_parsed(tmp_path):
    """A chunked multipart body was spooled whole to a temporary file before its size was checked (80 MiB written
    for a 20 MiB limit): now the body stops being read just past the limit and its form's slack."""
    from heartlora.serve import MAX_BODY_BYTES
    from heartlora.serve_api import FORM_SLACK_BYTES

    chunk = b"x" * 2**20
    endless = ({"type": "http.request", "body": chunk, "more_body": True} for _ in range(10**6))
    form = (b"content-type", b"multipart/form-data; boundary=heartlora-test-boundary")
    sent, asked = _asgi_post(create_api(_bank(tmp_path), 32), endless, (form,))
    assert sent[0]["status"] == 413 and asked == (MAX_BODY_BYTES + FORM_SLACK_BYTES) // len(chunk) + 1
    assert "more than 20,971,520 bytes" in json.loads(sent[1]["body"])["error"]


def test_a_failure_that_is_not_the_requests_fault_is_one_line_json(tmp_path, monkeypatch):
    bank = _bank(tmp_path)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\non the device")

    with _running(create_api(bank, 32, admin_token=TOKEN)) as port:
        monkeypatch.setattr(bank, "answer", broken)
        status, out = _call(port, "POST", "/predict?task=digits", _png(1))
        assert status == 500 and out["error"].startswith("the server failed on this request (RuntimeError: out of "
                                                         "memory on the device)")
        monkeypatch.setattr(bank, "remove", lambda name: (_ for _ in ()).throw(ConfigError("unknown task")))
        status, out = _call(port, "DELETE", "/adapters/digits", None, auth)  # another DELETE got there first
        assert status == 404 and "unknown task 'digits'" in out["error"]


def test_a_folder_servers_admin_endpoints_and_odd_names(tmp_path):
    """--adapter-dir: a task in the folder is not in memory until asked for, yet it is served: POST under its name
    is 409, DELETE says to remove its file (an eviction would only reload it); a name too long for the file system is
    404; an uploaded file that names no task needs ?name=."""
    folder = tmp_path / "adapters"
    folder.mkdir()
    for i, (task, classes) in enumerate(list(TASKS.items())[:2]):
        _make_adapter(folder, _vit, task, classes, 32, 4, i, seed=i)
    bank = hl.AdapterBank.from_folder(_vit(10), folder)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first, second = list(TASKS)[:2]
    bare = tmp_path / "bare.safetensors"
    hl.save_adapter(hl.attach(_vit(10), hl.HeartLoRAConfig(), verify=False), bare)
    with _running(create_api(bank, 32, admin_token=TOKEN)) as port:
        status, out = _call(port, "POST", "/predict?task=" + "a" * 300, _png(1))
        assert status == 404 and "unknown task" in out["error"]
        status, out = _call(port, "POST", "/predict?task=nope", _png(1))
        assert status == 404 and "folder 'adapters' holds no nope" in out["error"]
        assert str(tmp_path) not in out["error"]  # the server's own path stays on the server
        status, out = _call(port, "DELETE", f"/adapters/{first}", None, auth)
        assert status == 409 and "remove the file there" in out["error"]
        assert _call(port, "POST", f"/predict?task={first}", _png(1))[0] == 200  # loaded now: still the file's
        assert _call(port, "DELETE", f"/adapters/{first}", None, auth)[0] == 409
        status, out = _call(port, "POST", f"/adapters?name={second}", bare.read_bytes(), auth)
        assert status == 409 and "served already: remove its file" in out["error"] and second not in bank.tasks
        status, out = _call(port, "POST", "/adapters", bare.read_bytes(), auth)
        assert status == 400 and "?name=NAME" in out["error"]
        status, out = _call(port, "POST", "/adapters?name=extra", bare.read_bytes(), auth)
        assert status == 201 and out["name"] == "extra"
        assert _call(port, "DELETE", "/adapters/extra", None, auth)[0] == 200  # added, not a file: removed


@pytest.mark.parametrize(("module", "package"), [("fastapi", "fastapi"), ("multipart", "python-multipart")])
def test_a_missing_serve_package_names_the_install_that_works(monkeypatch: pytest.MonkeyPatch, module: str,
                                                             package: str) -> None:
    """heartlora is installed from its checkout: the way out names the packages, not `heartlora[serve]` (a name PyPI
    would answer with someone else's package)."""
    from heartlora.serve_api import require_api

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError, match=f"heartlora serve needs {package}: pip install 'fastapi>=0.115'") as e:
        require_api()
    assert "heartlora[" not in str(e.value) and "python-multipart>=0.0.9" in str(e.value)


def test_the_server_and_its_bank_serve_one_image_size(tmp_path):
    torch.manual_seed(0)
    wide = hl.create_backbone("vit_tiny_patch16_224", num_classes=5, img_size=64, pretrained=False)
    at_64 = _make_adapter(tmp_path / "64px", lambda n: wide, "wide", 5, 32, 4, 2, seed=3)
    bank = _bank(tmp_path)  # made in Python without an image size: its tasks were trained at 32 px
    with pytest.raises(ConfigError, match="^the bank runs 64 px and the server would resize images to 32 px"):
        create_api(hl.AdapterBank(_vit(10), img_size=64), 32)
    with pytest.raises(ConfigError, match=r"digits\.safetensors was trained at 32 px, and this bank runs 64 px"):
        create_api(_bank(tmp_path / "again"), 64)  # the server would resize every image to a size no task knows
    create_api(bank, 32)
    assert bank.img_size == 32  # taken from the server: the adapters added later are checked against it
    with pytest.raises(ConfigError, match=r"64px.*was trained at 64 px, and this bank runs 32 px"):
        bank.add(at_64)
    assert list(bank.tasks) == list(TASKS)
