"""A bank over a folder of adapter files (``AdapterBank.from_folder``, ``heartlora serve --adapter-dir``): each task
loaded on first use, the most recently used kept within a byte budget, files added later found, removed ones
unknown, a bad file refused in one line for its own task only, concurrent requests for an evicted task loading it
once."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from test_bank import _make_adapter, _own_logits, _vit

import heartlora as hl
import heartlora.bank
from heartlora.bank_folder import FolderBank
from heartlora.errors import ConfigError

TASKS = {"a": (4, 32, 0), "b": (3, 1, 5), "c": (5, 32, 9), "d": (2, 1, 2)}  # name -> (classes, bits, heads off)
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    for i, (task, (classes, bits, off)) in enumerate(TASKS.items()):
        _make_adapter(tmp, _vit, task, classes, bits, 4, off, seed=i)
    return tmp


@pytest.fixture(scope="module")
def own(folder):
    """Each task's own loaded model's logits on X."""
    return {t: _own_logits(_vit, folder / f"{t}.safetensors", classes, X) for t, (classes, _, _) in TASKS.items()}


def _check(bank, tasks, own) -> None:
    for row, (got, task) in enumerate(zip(bank(X[:len(tasks)], tasks), tasks)):
        torch.testing.assert_close(got, own[task][row], atol=1e-5, rtol=1e-5)


def _one_task_bytes(folder) -> int:
    probe = hl.AdapterBank(_vit(10))
    return max(probe.add(folder / f"{t}.safetensors").resident_bytes for t in TASKS)


def test_a_task_is_loaded_on_its_first_call_and_answered(folder, own):
    bank = hl.AdapterBank.from_folder(_vit(10), folder)
    assert isinstance(bank, FolderBank) and not bank.tasks and bank.available() == sorted(TASKS)
    assert all(bank.has_task(t) for t in TASKS) and not bank.has_task("zz") and not bank.has_task("../a")
    _check(bank, ["b", "a", "b"], own)
    assert sorted(bank.tasks) == ["a", "b"] and bank.loads == 2
    _check(bank, ["a", "b", "a", "b"], own)
    assert bank.loads == 2  # in memory now: not loaded again


def test_each_load_reads_its_file_once(folder, own, monkeypatch):
    """A load read and hashed the whole file twice (its metadata, then its weights): once now, so a file replaced
    between the two reads can no longer mix one version's class names with another's weights."""
    from heartlora.method import storage

    reads = []
    read = storage._read
    monkeypatch.setattr(storage, "_read", lambda path: (reads.append(path), read(path))[1])
    bank = hl.AdapterBank.from_folder(_vit(10), folder)
    _check(bank, ["a", "b"], own)
    assert sorted(p.name for p in reads) == ["a.safetensors", "b.safetensors"]
    plain = hl.AdapterBank(_vit(10))
    plain.add(folder / "c.safetensors")
    assert len(reads) == 3


@pytest.mark.parametrize("gather_from", [1, 99], ids=["batched", "per-group"])
def test_least_recently_used_tasks_are_evicted_within_the_budget_and_reloaded(folder, own, gather_from, monkeypatch):
    from heartlora.bank import BankLinear

    monkeypatch.setattr(BankLinear, "GATHER_FROM", gather_from)
    budget = 2.5 * _one_task_bytes(folder)  # two tasks fit, three do not
    bank = hl.AdapterBank.from_folder(_vit(10), folder, cache_mb=budget / 2**20)
    _check(bank, ["a"], own)
    _check(bank, ["b"], own)
    base = bank.resident_bytes() - bank.cached_bytes() - bank.routing_bytes()  # the backbone
    _check(bank, ["c"], own)
    assert bank.resident() == ["b", "c"] and bank.evictions == 1  # a: the least recently used
    _check(bank, ["b"], own)  # b is now the most recent: d evicts c
    _check(bank, ["d"], own)
    assert bank.resident() == ["b", "d"] and bank.cached_bytes() <= budget
    _check(bank, ["a", "c", "a"], own)  # evicted tasks are answered again, loaded anew
    assert bank.loads == 6 and bank.resident() == ["a", "c"]
    bank.remove("c")  # removed by hand: freed, and loaded again by its next call
    assert bank.resident() == ["a"] and "c" not in bank.tasks
    _check(bank, ["c", "a"], own)
    assert bank.loads == 7 and bank.resident() == ["c", "a"]
    # every byte held is accounted for: the evicted tasks' factors and classifiers were freed
    assert bank.resident_bytes() == base + bank.cached_bytes() + bank.routing_bytes()
    assert bank.cached_bytes() == sum(bank.tasks[t].resident_bytes for t in ("a", "c"))


def test_one_call_may_exceed_the_budget_for_its_own_tasks(folder, own):
    bank = hl.AdapterBank.from_folder(_vit(10), folder, cache_mb=0.01)
    _check(bank, ["a", "b", "c", "d"], own)  # all four in one call: none evicted before its rows ran
    assert sorted(bank.resident()) == sorted(TASKS)
    _check(bank, ["a"], own)  # the next call trims to the budget, keeping its own task
    assert bank.resident() == ["a"]


def test_a_file_added_later_is_served_and_a_removed_one_is_unknown(tmp_path, folder, own):
    for t in ("a", "b"):
        (tmp_path / f"{t}.safetensors").write_bytes((folder / f"{t}.safetensors").read_bytes())
    bank = hl.AdapterBank.from_folder(_vit(10), tmp_path)
    _check(bank, ["a", "b"], own)
    with pytest.raises(ConfigError, match=r"unknown task 'c': .* holds no c.safetensors"):
        bank(X[:1], ["c"])
    run = tmp_path / "c"  # a run folder: task c
    run.mkdir()
    (run / "adapter.safetensors").write_bytes((folder / "c.safetensors").read_bytes())
    assert bank.available() == ["a", "b", "c"]
    _check(bank, ["c", "a"], own)
    (tmp_path / "b.safetensors").unlink()  # b was in memory: its file gone, it is unknown and freed
    assert not bank.has_task("b") and bank.available() == ["a", "c"]
    with pytest.raises(ConfigError, match="unknown task 'b'"):
        bank(X[:2], ["a", "b"])
    assert "b" not in bank.tasks and "b" not in bank.resident()
    _check(bank, ["a", "c"], own)


def test_a_damaged_or_foreign_file_is_refused_in_one_line_and_the_other_tasks_run(tmp_path, folder, own):
    (tmp_path / "a.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    data = bytearray((folder / "b.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a flipped tensor byte: the payload checksum no longer holds
    (tmp_path / "damaged.safetensors").write_bytes(bytes(data))

    def other(num_classes):  # another backbone: other random weights
        torch.manual_seed(1)
        return hl.create_backbone("vit_tiny_patch16_224", num_classes=num_classes, img_size=32, pretrained=False)

    foreign = _make_adapter(tmp_path, other, "foreign", 3, 32, 4, 0, seed=7)
    bank = hl.AdapterBank.from_folder(_vit(10), tmp_path)
    with pytest.raises(ConfigError) as damaged:
        bank(X[:2], ["a", "damaged"])
    assert "damaged.safetensors" in str(damaged.value) and "checksum" in str(damaged.value)
    with pytest.raises(ConfigError) as refused:
        bank(X[:1], ["foreign"])
    message = str(refused.value)
    assert "\n" not in message and str(foreign) in message and "another backbone" in message
    assert bank.ensure(["a", "damaged", "foreign"]).keys() == {"damaged", "foreign"}  # a loads; the two refused
    _check(bank, ["a", "a"], own)
    assert sorted(bank.tasks) == ["a"]


def test_a_file_of_another_image_size_is_refused_before_its_tensors_load(folder, own, monkeypatch):
    bank = hl.AdapterBank.from_folder(_vit(10), folder, img_size=64)  # the folder's adapters were trained at 32 px
    monkeypatch.setattr(heartlora.bank, "load_adapter", lambda *a, **k: pytest.fail("loaded another image size"))
    failed = bank.ensure(["a"])
    assert failed["a"] == (f"{folder / 'a.safetensors'} was trained at 32 px, and this bank runs 64 px: serve it "
                           "from a bank of its own image size")
    assert not bank.tasks and bank.loads == 0
    monkeypatch.undo()
    same = hl.AdapterBank.from_folder(_vit(10), folder, img_size=32)
    _check(same, ["a", "c"], own)
    assert same.loads == 2


def test_answer_runs_the_batch_once_and_gives_each_refused_row_its_reason(tmp_path, folder, own, monkeypatch):
    (tmp_path / "a.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    (tmp_path / "c.safetensors").write_bytes((folder / "c.safetensors").read_bytes())
    (tmp_path / "damaged.safetensors").write_bytes(b"not an adapter")
    bank = hl.AdapterBank.from_folder(_vit(10), tmp_path)
    calls, runs = [], []
    ensure, run = bank.ensure, bank._run
    monkeypatch.setattr(bank, "ensure", lambda tasks: calls.append(list(tasks)) or ensure(tasks))
    monkeypatch.setattr(bank, "_run", lambda images, tasks: runs.append(list(tasks)) or run(images, tasks))
    tasks = ["a", "damaged", "zz", "c"]
    got = bank.answer(X, tasks, k=2)
    assert len(calls) == 1  # each task made ready once (a server's batch: one stat of each file, not two)
    assert runs == [["a", "c"]]  # one pass of the model, over the rows that run
    assert isinstance(got[1], str) and "damaged.safetensors" in got[1] and "\n" not in got[1]
    assert got[2] == bank.unknown("zz")
    for row in (0, 3):  # the rows of the tasks that run: their own model's ranking
        want = own[tasks[row]][row].softmax(0).topk(2)
        assert [t["index"] for t in got[row]] == want.indices.tolist()
        torch.testing.assert_close(torch.tensor([t["prob"] for t in got[row]]), want.values, atol=1e-5, rtol=1e-5)
    assert bank.answer(X[:2], ["zz", "damaged"]) == [bank.unknown("zz"), got[1]] and len(runs) == 1  # none runs
    monkeypatch.undo()
    assert bank.answer(X[:2], ["a", "c"], k=3) == bank.top_k(X[:2], ["a", "c"], k=3)
    plain = hl.AdapterBank(_vit(10))
    assert plain.answer(X[:1], ["a"]) == [plain.unknown("a")]  # no tasks: every row gets the reason, nothing raises
    plain.add(tmp_path / "a.safetensors")
    unknown, top = plain.answer(X[[1, 0]], ["zz", "a"], k=2)  # row 1 is X[0]
    assert unknown == plain.unknown("zz") and [t["index"] for t in top] == [t["index"] for t in got[0]]
    assert [t["prob"] for t in top] == pytest.approx([t["prob"] for t in got[0]], abs=1e-5)
    with pytest.raises(ConfigError, match="top_k must be at least 1"):
        bank.answer(X[:1], ["a"], k=0)
    with pytest.raises(ConfigError, match="2 task names for 1 images"):
        bank.answer(X[:1], ["a", "c"])


def test_concurrent_calls_for_an_evicted_task_load_it_once_and_all_are_answered(folder, own):
    bank = hl.AdapterBank.from_folder(_vit(10), folder, cache_mb=1.2 * _one_task_bytes(folder) / 2**20)
    _check(bank, ["a"], own)
    _check(bank, ["b"], own)  # a evicted
    assert bank.resident() == ["b"]
    loads, results, errors = bank.loads, [], []

    def call() -> None:
        try:
            results.append(bank(X[:1], ["a"])[0])
        except Exception as exc:  # noqa: BLE001 (any failure fails the test below)
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 8 and bank.loads == loads + 1
    for got in results:
        torch.testing.assert_close(got, own["a"][0], atol=1e-5, rtol=1e-5)


def test_the_server_loads_on_first_request_and_answers_404_and_500_in_one_line(tmp_path, folder, own):
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
    from test_serve import _png, _same_top
    from test_serve_api import _call, _running

    from heartlora.serve import Batcher, decode_image
    from heartlora.serve_api import create_api

    for t in ("a", "b"):
        (tmp_path / f"{t}.safetensors").write_bytes((folder / f"{t}.safetensors").read_bytes())
    (tmp_path / "bad.safetensors").write_bytes(b"not an adapter")
    bank = hl.AdapterBank.from_folder(_vit(10), tmp_path, cache_mb=1.2 * _one_task_bytes(folder) / 2**20)
    with _running(create_api(bank, 32, max_batch=16, max_wait_ms=20)) as port:
        status, tasks = _call(port, "GET", "/tasks")
        assert status == 200 and [(t["name"], t["loaded"]) for t in tasks] == [("a", False), ("b", False),
                                                                             ("bad", False)]
        status, out = _call(port, "POST", "/predict?task=a&top_k=2", _png(1))
        assert status == 200 and out["task"] == "a" and bank.loads == 1
        assert _call(port, "POST", "/predict?task=b&top_k=2", _png(1))[0] == 200  # a evicted
        status, out = _call(port, "POST", "/predict?task=bad", _png(1))
        assert status == 500 and "bad.safetensors is not a readable adapter file" in out["error"]
        assert "\n" not in out["error"]
        status, out = _call(port, "POST", "/predict?task=gone", _png(1))
        assert status == 404 and "unknown task 'gone'" in out["error"]
        (tmp_path / "b.safetensors").unlink()
        assert _call(port, "POST", "/predict?task=b", _png(1))[0] == 404
        assert _call(port, "GET", "/health")[1]["tasks"] == 2

    images = [decode_image(_png(s), 32) for s in range(6)]

    async def burst():  # a batch of an evicted task (a), a bad one and a good one: each gets its own answer
        batcher = Batcher(bank, max_batch=8, max_wait_ms=200)
        batcher.start()
        try:
            jobs = [batcher.submit(im, t, 2) for im, t in zip(images, ["a", "bad", "a", "a", "b", "a"])]
            return await asyncio.gather(*jobs, return_exceptions=True), batcher.stats
        finally:
            await batcher.stop()

    loads = bank.loads
    answers, stats = asyncio.run(burst())
    assert stats.calls == 1 and bank.loads == loads + 1  # a loaded once for its four requests
    assert isinstance(answers[1], Exception) and "not a readable adapter file" in str(answers[1])
    assert answers[4] is None  # b's file is gone: 404
    ref = hl.AdapterBank(_vit(10))
    ref.add(folder / "a.safetensors")
    for i in (0, 2, 3, 5):
        _same_top(answers[i], ref.top_k(images[i][None], ["a"], 2)[0])


def test_cli_refuses_both_or_neither_source_and_a_budget_without_a_folder(tmp_path, capsys):
    from heartlora.cli.main import EXIT_ERROR, main

    for argv in (["serve"], ["serve", "--adapter", "x", "--adapter-dir", str(tmp_path)],
                 ["serve", "--adapter", "x", "--cache-mb", "10"], ["serve", "--adapter-dir", str(tmp_path)]):
        assert main(argv) == EXIT_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), argv
    assert main(["serve", "--adapter-dir", str(tmp_path / "none")]) == EXIT_ERROR
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_serving_benchmark_runs_real_servers_and_loses_no_request(tmp_path):
    """benchmarks/bank_serve.py --smoke: real `heartlora serve --adapter-dir` processes (every adapter in memory, and
    a cache of 10 %) and a merged-model server, over HTTP; the record names the machine and the command."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("httpx2")
    pytest.importorskip("fastapi")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bank_serve.py"
    out = tmp_path / "bank_serve.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(hl.__file__).parents[1]),
                                                                        os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert "--smoke" in record["command"] and record["machine"]["cores"] == os.cpu_count()
    for phase in ("merged", "resident", "cache"):
        closed = record[phase]["closed"]
        assert closed["answered"] == closed["requests"] == 24 and closed["lost"] == 0, phase
        assert closed["p50_ms"] <= closed["p99_ms"] and record[phase]["idle_rss_mib"] > 0
    assert record["goals"]["cache_ok"] and record["goals"]["cache_lost"] == 0
    assert 0 < record["cache_mb"] < record["adapter_resident_bytes"] * 12 / 2**20


def test_the_documented_folder_example_runs(tmp_path, capsys):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "ECOSYSTEM.md"
    code = next(b for b in re.findall(r"```python\n(.*?)```", doc.read_text(), re.DOTALL) if "from_folder" in b)
    exec(compile(code.replace("/tmp/hl-adapters", str(tmp_path)), str(doc), "exec"), {})  # noqa: S102 (the doc's)
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["[5, 3, 5, 4] ['birds', 'cars', 'cats']", "['cars', 'cats'] 3 1"]
    assert f"then `{out[-1]}`" in doc.read_text().replace("\n", " ")


def test_a_file_replaced_at_the_same_size_with_its_mtime_kept_is_reloaded(tmp_path, folder, own):
    """A retrained adapter has the same size, and a copy may keep the old mtime (cp -p, rsync -a): the bank looks
    at the file's inode and ctime too."""
    import os

    served = tmp_path / "served"
    served.mkdir()
    (served / "a.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    bank = hl.AdapterBank.from_folder(_vit(10), served)
    _check(bank, ["a"], own)
    retrained = _make_adapter(tmp_path, _vit, "a", 4, 32, 4, 0, seed=7)
    old = (served / "a.safetensors").stat()
    assert retrained.stat().st_size == old.st_size  # the case: nothing in size tells them apart
    os.utime(retrained, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(retrained, served / "a.safetensors")
    want = _own_logits(_vit, served / "a.safetensors", 4, X[:1])
    torch.testing.assert_close(bank(X[:1], ["a"])[0], want[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want[0], own["a"][0])  # the new file's answer, not the old one's


def test_an_added_adapter_cannot_take_the_name_of_a_folder_file_and_a_damaged_first_file_does_not_stop_the_bank(
        folder, own, tmp_path):
    """A folder file not loaded yet was hidden by an add of its name (its rows then got the added adapter's logits);
    bank_from_folder read the backbone from the first file by name, so a damaged one stopped the whole server."""
    import shutil

    from heartlora.bank_folder import bank_from_folder

    bank = hl.AdapterBank.from_folder(_vit(10), folder)
    with pytest.raises(ConfigError, match="already holds a task named 'a' \\(a file of its folder\\)"):
        bank.add(folder / "b.safetensors", name="a")
    assert "a" not in bank.tasks
    _check(bank, ["a"], own)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "0bad.safetensors").write_bytes(b"not an adapter")  # first by name
    served, size = bank_from_folder(copy)
    assert size == 32 and "0bad" in served.available()
    _check(served, ["c", "a"], own)
    assert "0bad" in served.ensure(["0bad"])  # refused for its own task only
