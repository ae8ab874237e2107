"""Fast checks of the suite's planning (heartlora.experiments) and the benchmark scripts on fake records: plan and
resume logic, selection on val, the table maths of the report, and where a trial report goes. No training and no
timing."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import report

import heartlora.experiments as suite

TINY = suite.Profile(name="tiny", img_size=28, epochs=2, batch_size=32, seeds=(1, 2), tasks=("digits", "dsprites_loc"),
                     methods=("linear", "heart-lora", "heart-lora-layer"),
                     grids={"heart-lora": {"ne": [12, 36]}, "heart-lora-layer": {"ne": "from:heart-lora/12"}})


def fake(profile: suite.Profile, protocol: str, task: str, method: str, settings: dict, seed: int, acc: float,
         nbytes: int = 0) -> dict:
    rid = suite.run_id(profile, protocol, task, method, settings, seed)
    return {"id": rid, "profile": profile.name, "role": "select" if protocol == "val" else "final", "task": task,
            "suite_method": method, "seed": seed, "accuracy": acc, "adapter_bytes": nbytes,
            "group": suite.group_of(task), "selection_info": None}


def complete(profile: suite.Profile, data: dict, acc: float = 0.5) -> int:
    """Fill ``data`` by following the plan with fake results; returns how many runs it took."""
    n = 0
    while (item := suite.next_run(profile, data)) is not None:
        protocol, task, method, settings, seed, _ = item
        # val: ne 36 is better on digits, ne 12 on dsprites_loc
        a = acc + (0.1 if protocol == "val" and (settings.get("ne") == 36) == (task == "digits") else 0.0)
        data["records"].append(fake(profile, protocol, task, method, settings, seed, a))
        n += 1
        assert n < 100
    return n


def test_plan_runs_everything_once_and_resumes():
    data = {"format": suite.FORMAT, "records": []}
    n = complete(TINY, data)
    # per task: 2 val runs (heart-lora ne grid, first seed only) + 3 methods × 2 seeds final runs
    assert n == 2 * (2 + 3 * 2)
    assert suite.next_run(TINY, data) is None
    assert len({r["id"] for r in data["records"]}) == n  # no run twice
    # a run lost from the file (e.g. never committed) is the only one redone
    lost = data["records"].pop(5)
    item = suite.next_run(TINY, data)
    assert suite.run_id(TINY, item[0], item[1], item[2], item[3], item[4]) == lost["id"]


def test_selection_uses_val_only_and_feeds_dependent_methods():
    data = {"format": suite.FORMAT, "records": []}
    complete(TINY, data)
    finals = {(r["task"], r["suite_method"]): r["id"] for r in data["records"] if r["role"] == "final"}
    assert "heart-lora_ne36_s" in finals[("digits", "heart-lora")]
    assert "heart-lora_ne12_s" in finals[("dsprites_loc", "heart-lora")]
    # the per-layer variant reuses the global choice divided by the 12 layers
    assert "heart-lora-layer_ne3_s" in finals[("digits", "heart-lora-layer")]
    assert "heart-lora-layer_ne1_s" in finals[("dsprites_loc", "heart-lora-layer")]
    # test accuracy of final runs never enters: changing it does not change the plan
    for r in data["records"]:
        if r["role"] == "final":
            r["accuracy"] = 0.0
    assert suite.next_run(TINY, data) is None


def test_choose_breaks_ties_by_grid_order():
    best, table = suite.choose([({"ne": 6}, [0.5]), ({"ne": 12}, [0.7, 0.5]), ({"ne": 24}, [0.6])])
    assert best == {"ne": 12} and [round(t["val_acc"], 3) for t in table] == [0.5, 0.6, 0.6]


def test_grid_points_from_and_product():
    assert suite.grid_points({"ne": [1, 2]}, {}, "m") == [{"ne": 1}, {"ne": 2}]
    assert suite.grid_points({"ne": "from:a/12"}, {"a": {"ne": 6}}, "m") == [{"ne": 1}]  # at least 1
    assert suite.grid_points({"ne": "from:a"}, {}, "m") is None
    pts = suite.grid_points({"scale": "from:b", "ne": [6, 12]}, {"b": {"scale": 10.0}}, "m")
    assert pts == [{"scale": 10.0, "ne": 6}, {"scale": 10.0, "ne": 12}]


def test_run_id_changes_with_the_schedule():
    a = suite.run_id(TINY, "final", "digits", "lora", {}, 1)
    b = suite.run_id(replace(TINY, img_size=56), "final", "digits", "lora", {}, 1)
    assert a != b and a.startswith("tiny/28px-2ep-b32/final/digits/lora_s1")


def test_table_maths():
    acc = {"a": {1: 0.5, 2: 0.7}, "b": {1: 0.9, 2: 0.9}, "c": {1: 0.1, 2: 0.3}}
    m, s = report.aggregate(acc, ["a", "b", "c"], [1, 2])
    assert m == pytest.approx((0.5 + 0.9 + 0.1 + 0.7 + 0.9 + 0.3) / 6)
    assert s == pytest.approx(abs((0.5 + 0.9 + 0.1) / 3 - (0.7 + 0.9 + 0.3) / 3) / 2 ** 0.5)
    # mean of group means weights groups equally, unlike the mean of all tasks
    g, _ = report.mean_of_groups(acc, {"x": ["a", "b"], "y": ["c"]}, [1, 2])
    assert g == pytest.approx(((0.5 + 0.9) / 2 + 0.1 + (0.7 + 0.9) / 2 + 0.3) / 4)
    assert report.aggregate(acc, ["a", "missing"], [1, 2]) is None
    assert report.mean_std([0.4]) == (0.4, None)
    assert report.fmt((0.123, None)) == "12.3" and report.fmt((0.5, 0.01)) == "50.0 ± 1.0"


def test_report_marks_partial_results(tmp_path, monkeypatch):
    monkeypatch.setitem(suite.PROFILES, "tiny", TINY)
    data = {"format": suite.FORMAT, "records": []}
    complete(TINY, data)
    data["records"] = [r for r in data["records"] if not (r["task"] == "digits" and r["suite_method"] == "linear"
                                                          and r["seed"] == 2)]
    path = tmp_path / "results.json"
    suite.save_results(data, path)
    docs_before = {p.name: p.stat().st_mtime_ns for p in report.DOCS.iterdir()}
    written = report.write_all("tiny", path)
    assert written.parent == tmp_path  # a trial report goes beside its results file, never into docs/
    assert {p.name: p.stat().st_mtime_ns for p in report.DOCS.iterdir()} == docs_before
    text = written.read_text()
    assert "PARTIAL: 11 of 12 final runs recorded" in text
    assert "mean of the 2 group means" in text and "mean of all 2 tasks" in text


def test_storage_spreads_heads_over_layers():
    from types import SimpleNamespace

    import storage

    layers = [SimpleNamespace(name=f"l{i}", num_heads=6) for i in range(12)]
    heads = storage.spread_heads(layers, 14)
    assert len(set(heads)) == 14 and {n for n, _ in heads} == {f"l{i}" for i in range(12)}


def test_scripts_import_heartlora_only():
    import ast

    scripts = {p.stem for p in report.HERE.glob("*.py")}
    for path in report.HERE.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & scripts, f"{path.name} imports {names & scripts}"
        assert "sys.path" not in path.read_text(), path.name
