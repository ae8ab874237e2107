"""Fast checks of the suite's planning (heartlora_bench) and the benchmark scripts on fake records: plan and
resume logic, selection on val, the table maths of the report, and where a trial report goes. No training and no
timing."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import report

import heartlora_bench as suite

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


def test_engine_flags_runs_never_reuse_the_default_runs_folders(monkeypatch):
    import argparse

    import suite as script  # benchmarks/suite.py, the command line over heartlora_bench

    monkeypatch.setattr(script, "RUNS", script.ROOT / "runs" / "suite")
    monkeypatch.setattr(script, "RESULTS", script.RESULTS)
    args = argparse.Namespace(profile="cpu", seeds=None, tasks=None, methods=None, results=None, runs=None)
    script._profile(args)
    default, docs = script.RUNS, script.RESULTS
    assert docs == script.ROOT / "benchmarks" / "records" / "results.json"
    places = set()
    for flags in ({"heart-lora": ["--score-steps", "2"]}, {"heart-lora": ["--score-steps", "4"]}):
        monkeypatch.setattr(script, "RUNS", default)
        monkeypatch.setattr(script, "RESULTS", docs)
        monkeypatch.setattr(script, "ENGINE_FLAGS", dict(flags))
        script._profile(args)
        assert script.RESULTS.parent.parent == script.RUNS  # its records beside its runs, never in docs/
        places.add((script.RUNS, script.RESULTS))
    # a finished default run is neither "resumed" with other flags nor counted as done, nor replaced in docs/
    assert len(places) == 2 and not {default, docs} & {p for pair in places for p in pair}
    monkeypatch.setattr(script, "RESULTS", docs)
    script._profile(argparse.Namespace(**{**vars(args), "results": "mine.json", "runs": "r"}))
    assert (script.RUNS, script.RESULTS) == (Path("r"), Path("mine.json"))  # given places are kept


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


# ---------------------------------------------------------------------------------------------------------------------
# The runner (benchmarks/suite.py) with a fake training command: resumption, --jobs, --status, subsets.

SMALL = suite.Profile(name="small", img_size=28, epochs=2, batch_size=32, seeds=(1, 2),
                      tasks=("digits", "dsprites_loc"), methods=("hf-peft", "lora", "bi-lora"),
                      method_seeds={"bi-lora": (1,)}, threads=1)

FAKE_RUN = '''
import json, sys
from pathlib import Path
out, task, how, log = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
with open(log, "a") as f:
    f.write(f"{out.parent.name}/{out.name} {how}\\n")
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({"task": task, "accuracy": 0.5, "accuracy_split": "test",
                                              "adapter_bytes": 100, "wall_s": 60.0, "history": []}))
'''


@pytest.fixture
def runner(tmp_path, monkeypatch):
    """benchmarks/suite.py with its outputs in tmp_path and every run replaced by FAKE_RUN (which logs how the real
    command would have started it: fresh, resume or overwrite)."""
    import importlib

    script = importlib.import_module("suite")
    monkeypatch.setitem(suite.PROFILES, "small", SMALL)
    monkeypatch.setattr(script, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(script, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(script, "POLL_S", 0.02)
    reports = []
    monkeypatch.setattr(script, "report", reports.append)
    fake = tmp_path / "fake_run.py"
    fake.write_text(FAKE_RUN)
    log = tmp_path / "launched.txt"
    real = script.run_command

    def fake_command(profile, protocol, task, method, settings, seed, out, device, threads):
        cmd = real(profile, protocol, task, method, settings, seed, out, device, threads)
        how = "resume" if "--resume" in cmd else "overwrite" if "--overwrite" in cmd else "fresh"
        return [sys.executable, str(fake), str(out), task, how, str(log)]

    monkeypatch.setattr(script, "run_command", fake_command)
    return script, log, tmp_path


def short(run: str) -> str:
    return "/".join(run.split("/")[-2:])


def launched(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.is_file() else []


def test_runner_skips_finished_runs_and_resumes_a_killed_one(runner):
    script, log, tmp = runner
    runs = tmp / "runs"
    ids = [suite.run_id(SMALL, *item[:5]) for item in suite.plan(SMALL, {"records": []})]
    assert len(ids) == 2 * (2 + 2 + 1)  # hf-peft and lora on seeds 1, 2; bi-lora on seed 1 only
    finished = ids[0]
    killed = next(i for i in ids if "/lora_s" in i)
    unstarted = next(i for i in ids if "/bi-lora_s" in i)
    (runs / finished).mkdir(parents=True)  # finished, but the suite stopped before writing its record
    (runs / finished / "metrics.json").write_text('{"task": "digits", "accuracy": 0.9, "accuracy_split": "test", '
                                                  '"adapter_bytes": 0, "wall_s": 5.0}')
    (runs / killed).mkdir(parents=True)  # killed after a checkpoint
    (runs / killed / "checkpoint.pt").write_bytes(b"x")
    (runs / unstarted).mkdir(parents=True)  # killed before its first checkpoint
    (runs / unstarted / "train.log").write_text("")
    assert script.main(["run", "--profile", "small", "--jobs", "2"]) == 0
    data = suite.load_results(tmp / "results.json")
    assert sorted(r["id"] for r in data["records"]) == sorted(ids)
    assert {r["id"]: r["accuracy"] for r in data["records"]}[finished] == 0.9  # read back, not redone
    starts = dict(line.split() for line in launched(log))
    assert len(launched(log)) == len(ids) - 1 and short(finished) not in starts
    assert starts[short(killed)] == "resume"
    assert starts[short(unstarted)] == "overwrite"
    assert sum(1 for v in starts.values() if v == "resume") == 1
    # a later invocation finds every record and starts nothing
    assert script.main(["run", "--profile", "small", "--jobs", "2"]) == 0
    assert len(launched(log)) == len(ids) - 1


def test_run_command_resumes_engine_runs_and_leaves_baselines_to_resume_themselves(tmp_path):
    import importlib

    script = importlib.import_module("suite")
    out = tmp_path / "r"
    lora = script.run_command(SMALL, "final", "digits", "lora", {}, 1, out, "cpu", 1)
    assert "--resume" not in lora and "--overwrite" not in lora and lora[1:4] == ["-m", "heartlora", "train"]
    out.mkdir()
    (out / "train.log").write_text("")
    assert "--overwrite" in script.run_command(SMALL, "final", "digits", "lora", {}, 1, out, "cpu", 1)
    (out / "checkpoint.pt").write_bytes(b"x")
    assert "--resume" in script.run_command(SMALL, "final", "digits", "lora", {}, 1, out, "cpu", 1)
    base = script.run_command(SMALL, "final", "digits", "hf-peft", {}, 1, out, "cpu", 1)
    assert base[1].endswith("hf_peft.py") and "--resume" not in base
    assert base[base.index("--method") + 1] == "hf-peft" and base[base.index("--img-size") + 1] == "28"


def test_status_counts_and_time_left(runner):
    script, _, _ = runner
    data = {"format": suite.FORMAT, "records": []}
    for task, method, seed, wall in (("digits", "lora", 1, 1200.0), ("digits", "lora", 2, 1200.0),
                                     ("digits", "bi-lora", 1, 600.0)):
        rec = fake(SMALL, "final", task, method, {}, seed, 0.5)
        rec["wall_s"] = wall
        data["records"].append(rec)
    data["records"].append({**fake(suite.PROFILES["quick"], "final", "digits", "lora", {}, 42, 0.5), "wall_s": 1.0})
    lines = script.status_lines(SMALL, data, jobs=2)
    assert lines[0].endswith("3 of 10 runs done, 7 left")
    # left: hf-peft 4 runs (no wall time yet: the mean of all, 1000 s), lora 2 × 1200 s, bi-lora 1 × 600 s; 2 jobs
    assert "about 58 min left at --jobs 2" in lines[1]  # (4000 + 2400 + 600) s / 2
    assert "  hf-peft: 4 left" in lines and "  lora: 2 left" in lines and "  bi-lora: 1 left" in lines
    # runs made on a machine like this one count alone when there are any: here the fast GPU's 60 s
    gpu, cpu = {"cpu": "x", "cores": 16, "gpu": "H200"}, {"cpu": "y", "cores": 2, "gpu": None}
    for rec in data["records"]:
        rec["machine"] = cpu
    data["records"][0]["machine"] = gpu
    data["records"][0]["wall_s"] = 60.0
    lines = script.status_lines(SMALL, data, jobs=1, here=gpu)
    assert "about 7 min left at --jobs 1" in lines[1] and "1 finished runs on this kind of machine" in lines[1]


def test_subset_run_never_touches_docs(runner, capsys):
    script, log, tmp = runner
    docs_before = {p.name: p.stat().st_mtime_ns for p in report.DOCS.iterdir()}
    standin = tmp / "benchmarks" / "records" / "results.json"  # where a plain invocation would write
    script.RESULTS = standin
    assert script.main(["run", "--profile", "small", "--tasks", "dsprites_loc", "--methods", "lora"]) == 0
    assert len(launched(log)) == 2  # lora on dsprites_loc, seeds 1 and 2
    subset = tmp / "runs" / "small-subset" / "results.json"
    assert len(suite.load_results(subset)["records"]) == 2
    assert not standin.parent.exists()
    assert {p.name: p.stat().st_mtime_ns for p in report.DOCS.iterdir()} == docs_before
    with pytest.raises(SystemExit, match="not in profile small"):
        script.main(["run", "--profile", "small", "--tasks", "cifar"])


def test_cpu_profile_shape():
    cpu = suite.PROFILES["cpu"]
    groups = {suite.group_of(t) for t in cpu.tasks}
    assert len(cpu.tasks) >= 7 and groups == set(suite.GROUPS) and cpu.seeds == (42, 43, 44)
    assert not cpu.grids and cpu.engine_profile == "cpu" and cpu.epochs >= 10
    assert cpu.seeds_of("bi-lora") == (42,) and cpu.seeds_of("heart-lora") == (42, 43, 44)
    _, total = suite.count_runs(cpu, {"records": []})
    assert total == len(suite.plan(cpu, {"records": []})) == len(cpu.tasks) * (5 * 3 + 2)


def fill_small(acc_of) -> dict:
    data = {"format": suite.FORMAT, "records": []}
    for item in suite.plan(SMALL, data):
        protocol, task, method, settings, seed, _ = item
        data["records"].append(fake(SMALL, protocol, task, method, settings, seed, acc_of(task, method, seed),
                                    {"hf-peft": 800, "lora": 1000, "bi-lora": 40}[method]))
    return data


def test_gap_pairs_seeds_and_the_readme_table_renders(monkeypatch):
    monkeypatch.setitem(suite.PROFILES, "small", SMALL)
    base = {"digits": 0.8, "dsprites_loc": 0.6}
    delta = {("lora", 1): 0.0, ("lora", 2): 0.02, ("hf-peft", 1): -0.01, ("hf-peft", 2): -0.03, ("bi-lora", 1): -0.05}
    data = fill_small(lambda task, method, seed: base[task] + delta[(method, seed)])
    acc = report.per_task_seed(report.finals(data["records"], "small"))
    g = report.gap(acc, "hf-peft", "lora", list(SMALL.tasks), [1, 2])
    assert g[0] == pytest.approx(-0.03) and g[1] == pytest.approx(0.04 / 2 ** 0.5)  # per seed: -0.01, -0.05
    assert report.gap(acc, "bi-lora", "lora", list(SMALL.tasks), [1, 2]) == (pytest.approx(-0.05), None)
    lines = report.readme_table(data, SMALL)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert rows["LoRA (heartlora)"].endswith("| 71.0 ± 1.4 | 1,000 | 1.000 |")
    assert rows["HF + PEFT (plain recipe)"].endswith("| 68.0 ± 1.4 | 800 | 0.800 |")
    assert rows["Bi-LoRA (1 bit) (seed 1)"].endswith("| 65.0 | 40 | 0.040 |")
    assert "benchmarks/suite.py run --profile small" in lines[-1]
    # a missing run: no table (a mean over part of the tasks would not compare)
    data["records"] = [r for r in data["records"] if not (r["suite_method"] == "lora" and r["seed"] == 2
                                                          and r["task"] == "digits")]
    assert report.readme_table(data, SMALL) == []


def test_scoring_suite_check_pairs_runs_by_task_and_seed(tmp_path):
    import json

    import scoring

    def rec(task, seed, acc, steps, off, method="heart-lora", epochs=10):
        return {"profile": "cpu", "suite_method": method, "role": "final", "task": task, "seed": seed,
                "accuracy": acc, "heads_off_count": off, "settings": {"score_steps": steps, "epochs": epochs}}

    base = [rec("a", 42, 0.80, None, 12), rec("a", 43, 0.84, None, 12), rec("b", 42, 0.50, None, 0),
            rec("b", 43, 0.60, None, 0), rec("b", 44, 0.70, None, 0), rec("a", 42, 0.99, None, 0, method="lora")]
    probe = [rec("a", 42, 0.82, 2, 24), rec("a", 43, 0.84, 2, 12), rec("b", 42, 0.49, 2, 0), rec("b", 43, 0.57, 2, 0),
             rec("b", 42, 0.10, None, 0),  # a default run in the check file is not a probe run
             rec("b", 44, 0.10, 2, 0, epochs=1)]  # nor pairs a run of another schedule
    (tmp_path / "base.json").write_text(json.dumps({"records": base}))
    (tmp_path / "probe.json").write_text(json.dumps({"records": probe}))
    text = scoring.suite_check(tmp_path / "probe.json", tmp_path / "base.json", tmp_path / "out.md")
    assert (tmp_path / "out.md").read_text() == text
    assert "| a | 2 | 82.0 ± 2.8 | 83.0 ± 1.4 | +1.0 | 12→24, 12→12 | None→None |" in text
    assert "| b | 2 | 55.0 ± 7.1 | 53.0 ± 5.7 | -2.0 | 0→0, 0→0 | None→None |" in text  # seed 44: no probe run
    # per seed: 42: (+2 - 1) / 2 = +0.5; 43: (0 - 3) / 2 = -1.5 (std 1.41); the full warmup's means 65 and 72: 4.95
    assert "mean of probe − full warmup: -0.50 points (per seed 42: +0.50, 43: -1.50; their std 1.41)" in text
    assert "± 4.95" in text
    # unbalanced: a third task on seed 42 only leaves the summary on the tasks both seeds have
    extra = [rec("c", 42, 0.99, None, 0)], [rec("c", 42, 0.50, 2, 0)]
    (tmp_path / "base.json").write_text(json.dumps({"records": base + extra[0]}))
    (tmp_path / "probe.json").write_text(json.dumps({"records": probe + extra[1]}))
    text = scoring.suite_check(tmp_path / "probe.json", tmp_path / "base.json", None)
    assert "| c | 1 | 99.0 | 50.0 | -49.0 |" in text and "Over the 2 task(s) every compared seed has (a, b)" in text
    assert "± 4.95" in text
    with pytest.raises(SystemExit, match="no task and seed"):
        scoring.suite_check(tmp_path / "base.json", tmp_path / "base.json", None)


def test_scoring_suite_check_compares_the_random_ranking_control_with_the_taylor_one(tmp_path):
    import json

    import scoring

    def rec(task, seed, acc, mode, ne=24, steps=None):
        return {"profile": "cpu", "suite_method": "heart-lora", "role": "final", "task": task, "seed": seed,
                "accuracy": acc, "heads_off_count": ne, "settings": {"score_mode": mode, "ne": ne,
                                                                      "score_steps": steps}}

    taylor = [rec("a", 42, 0.80, "abs_sum"), rec("a", 43, 0.70, "abs_sum"), rec("a", 44, 0.75, "abs_sum", ne=12)]
    random_ = [rec("a", 42, 0.78, "random"), rec("a", 43, 0.66, "random"),
               rec("a", 44, 0.60, "random", steps=2)]  # a probe run differs in more than the ranking: not paired
    (tmp_path / "taylor.json").write_text(json.dumps({"records": taylor}))
    (tmp_path / "random.json").write_text(json.dumps({"records": random_}))
    text = scoring.suite_check(tmp_path / "random.json", tmp_path / "taylor.json", None, key="score_mode")
    assert "heads switched off at random (random) against the Taylor ranking" in text
    assert "| a | 2 | 75.0 ± 7.1 | 72.0 ± 8.5 | -3.0 | 24→24, 24→24 | None→None |" in text
    assert "mean of random − Taylor: -3.00 points (per seed 42: -2.00, 43: -4.00; their std 1.41)" in text
    assert "--differ-in score_mode" in text
    # the count must match: a Taylor run at another ne (an auto choice) is no control for a random one
    taylor[0]["settings"]["ne"] = "auto"
    (tmp_path / "taylor.json").write_text(json.dumps({"records": taylor}))
    text = scoring.suite_check(tmp_path / "random.json", tmp_path / "taylor.json", None, key="score_mode")
    assert "| a | 1 | 70.0 | 66.0 | -4.0 | 24→24 | None→None |" in text
    # a sum_abs run is not the random control
    (tmp_path / "sum_abs.json").write_text(json.dumps({"records": [rec("a", 43, 0.5, "sum_abs")]}))
    with pytest.raises(SystemExit, match="no task and seed"):
        scoring.suite_check(tmp_path / "sum_abs.json", tmp_path / "taylor.json", None, key="score_mode")
    # the Taylor runs are not a random-ranking run, whatever file they are in
    with pytest.raises(SystemExit, match="no task and seed"):
        scoring.suite_check(tmp_path / "taylor.json", tmp_path / "taylor.json", None, key="score_mode")


def test_cpu_suite_leaves_the_schedule_to_the_engine_profile_so_kshot_runs_get_the_step_floor(tmp_path):
    import importlib

    from heartlora.engine import TrainConfig, resolve
    from heartlora.engine.settings import MIN_FEWSHOT_STEPS

    script = importlib.import_module("suite")
    cpu = suite.PROFILES["cpu"]
    cmd = script.run_command(cpu, "final", "fashion_mnist@4shot", "lora", {}, 42, tmp_path / "r", "cpu", 1)
    assert cmd[cmd.index("--profile") + 1] == "cpu"
    assert not {"--epochs", "--img-size", "--batch-size"} & set(cmd)  # the engine profile's own values
    cfg = resolve(TrainConfig(task="fashion_mnist@4shot", method="lora", profile="cpu"))
    assert (cfg.img_size, cfg.batch_size) == (cpu.img_size, cpu.batch_size)
    assert cfg.epochs * 2 >= MIN_FEWSHOT_STEPS > cpu.epochs * 2  # 40 images: 2 steps an epoch at batch 32
    # a schedule the engine profile does not set is passed on
    odd = replace(cpu, epochs=3)
    cmd = script.run_command(odd, "final", "digits", "lora", {}, 42, tmp_path / "r", "cpu", 1)
    assert cmd[cmd.index("--epochs") + 1] == "3" and "--img-size" not in cmd


def test_partial_table_uses_one_task_set_and_seed_for_every_method():
    acc = {"lora": {"a": {1: 0.80, 2: 0.10}, "b": {1: 0.60}, "c": {1: 0.99}},
           "heart-lora": {"a": {1: 0.82}, "b": {1: 0.60}},  # no c yet: c is left out for every method
           "hf-peft": {"a": {1: 0.70}, "b": {1: 0.50}, "c": {2: 0.90}}}
    recs = [{"suite_method": m, "task": t, "seed": s, "adapter_bytes": b} for m, t, s, b in (
        ("lora", "a", 1, 100), ("lora", "b", 1, 100), ("lora", "c", 1, 100), ("lora", "a", 2, 999),
        ("heart-lora", "a", 1, 80), ("heart-lora", "b", 1, 60), ("hf-peft", "a", 1, 100), ("hf-peft", "b", 1, 100))]
    lines = report.partial_lines(acc, recs, ["hf-peft", "lora", "heart-lora"], ["a", "b", "c"], 1, "tiny")
    text = "\n".join(lines)
    assert "the mean over the 2 of 3 tasks that every method has run on seed 1 (a, b)" in text
    assert "| LoRA (heartlora) | 70.00 | 1.000 |" in text  # (80 + 60) / 2; seed 2 and task c left out
    assert "| Heart-LoRA (global) | 71.00 | 0.700 |" in text  # bytes (80 + 60) / 2 ÷ 100
    assert "| HF + PEFT (plain recipe) | 60.00 | 1.000 |" in text
    assert "+11.00 | so far |" in text  # heart-lora − hf-peft ≥ +1
    assert "+1.00 at 0.700× | so far |" in text  # heart-lora − lora ≥ -0.3 at ≤ 0.8× the bytes
    assert report.partial_lines(acc, recs, ["lora", "heart-lora"], ["c"], 1, "tiny") == []


def test_sweep_rule_prefers_heart_rows_at_the_chosen_scale_once_they_are_complete():
    import sweep_defaults as sw

    tasks, seeds = ("a", "b"), (42,)

    def row(acc):
        return {t: {"42": {"val200": acc}} for t in tasks}

    rows = {name: row(0.5) for name in sw.CONFIGS}
    rows["lora, cls+mean, drop-path 0, scale 4"] = row(0.9)  # the lora rule picks scale 4
    rows["heart-lora, cls+mean, drop-path 0, ne auto tolerance 0.05"] = row(0.8)  # the best row, but at scale 1
    rows["heart-lora, cls+mean, drop-path 0, scale 4, ne auto tolerance 0.05"] = row(0.6)
    rows["heart-lora-fixed, cls+mean, drop-path 0, scale 4, ne 24"] = row(0.99)  # never competes
    chosen = sw.choose(rows, tasks, seeds)
    assert chosen["settings"]["scale"] == "4"
    assert chosen["heart-lora"] == "heart-lora, cls+mean, drop-path 0, scale 4, ne auto tolerance 0.05"
    assert chosen["ne_tolerance"] == "0.05"
    # until every scale-4 row is complete (here one of two), all complete rows compete: the first round's best wins
    del rows["heart-lora, cls+mean, drop-path 0, scale 4, ne auto tolerance 0.02"]["b"]
    chosen = sw.choose(rows, tasks, seeds)
    assert chosen["heart-lora"] == "heart-lora, cls+mean, drop-path 0, ne auto tolerance 0.05"
    assert sw.caveats(chosen)[-1].endswith("every method's default since.")  # a complete row ran at scale 4
    del rows["heart-lora, cls+mean, drop-path 0, scale 4, ne auto tolerance 0.05"]["b"]
    chosen = sw.choose(rows, tasks, seeds)
    assert sw.caveats(chosen)[-1].endswith("and no heart-lora row ran at scale 4.")  # listed rows do not count


def test_sweep_round3_changes_the_defaults_only_for_a_clear_lead_on_most_seeds():
    import sweep_defaults as sw

    tasks, seeds = ("a", "b"), (42, 43, 44)
    wd = "lora, scale 4, weight-decay 1e-2"

    def row(per_seed):  # seed -> accuracy on every task
        return {t: {str(s): {"val200": acc} for s, acc in per_seed.items()} for t in tasks}

    rows = {n: row({42: 0.70, 43: 0.70, 44: 0.70}) for n in sw.ROUND3}
    rows[wd] = row({42: 0.72, 43: 0.69, 44: 0.72})  # +0.67 points on the mean, ahead on 2 of 3 seeds
    chosen = sw.choose_round3(rows, tasks, seeds)
    assert chosen["winner"] == wd and chosen["settings"]["weight_decay"] == "1e-2"
    assert chosen["settings"]["targets"] == "q,v" and chosen["settings"]["scale"] == "4"
    assert chosen["per_seed"][wd][43] == pytest.approx(-0.01)
    rows[wd] = row({42: 0.715, 43: 0.70, 44: 0.70})  # +0.5 points on the mean, but from one seed only
    chosen = sw.choose_round3(rows, tasks, seeds)
    assert chosen["winner"] is None and chosen["verdict"].startswith("the defaults stay: the best row, " + wd)
    rows[wd] = row({42: 0.704, 43: 0.704, 44: 0.704})  # ahead on every seed, by less than the margin
    assert sw.choose_round3(rows, tasks, seeds)["winner"] is None
    rows[wd] = row({42: 0.72, 43: 0.69, 44: 0.72})
    rows[wd]["a"]["43"]["device"] = "cuda:0"  # one GPU cell among CPU cells: nothing is decided
    verdict = sw.choose_round3(rows, tasks, seeds)["verdict"]
    assert verdict.startswith("not decided: the lora rows mix devices (cpu, cuda)")
    for name in sw.ROUND3:  # every cell from the GPU: decided as on the CPU
        for t in tasks:
            for s in seeds:
                rows[name][t][str(s)]["device"] = "cuda"
    assert sw.choose_round3(rows, tasks, seeds)["winner"] == wd
    del rows["lora, scale 2"]["b"]  # an incomplete lora row: nothing is decided
    assert sw.choose_round3(rows, tasks, seeds)["verdict"].startswith("not decided: 1 of 5")
    # the plan: every row, task and seed, each run pinning what the round compares
    plan = sw.plan(Path("/tmp/x"), tasks, seeds, configs=sw.ROUND3)
    assert len(plan) == len(sw.ROUND3) * len(tasks) * len(seeds)
    qkvo = next(cmd for name, *_, cmd in plan if name.endswith("rank 4"))
    assert qkvo[qkvo.index("--targets") + 1] == "q,k,v,o" and qkvo[qkvo.index("--weight-decay") + 1] == "1e-4"


def test_sweep_report_compares_partial_rows_on_the_cells_they_share(tmp_path):
    import json

    import sweep_defaults as sw

    tasks, seeds = ("a", "b", "c"), (42, 43)
    rows = {n: {"a": {"42": {"val200": 0.80}, "43": {"val200": 0.60}}} for n in sw.ROUND3}
    rows["hf-peft"]["b"] = {"42": {"val200": 0.20}}  # a task the other rows have not reached
    rows[sw.REFERENCE3]["a"]["44"] = {"val200": 0.0}  # a seed outside the table: never read
    del rows["lora, scale 2"]["a"]["43"]  # one row lacks seed 43 on "a": the shared cells are seed 42's
    sw.report(rows, tmp_path / "r3.md", tasks, seeds, round3=True)
    text = (tmp_path / "r3.md").read_text()
    assert "| hf-peft | 70.0 | 20.0 |  | 45.0 (partial) |" in text  # its own mean mixes tasks: not comparable
    assert "Rows compared on the cells every row has (seed 42 on a), mean val200 %:" in text
    assert "| hf-peft | 80.0 |" in text and "| lora, scale 2, " in text
    assert text.count(" | 80.0 |\n") == len(sw.ROUND3)  # every row on the same cells: 80.0, not 70.0
    assert json.loads((tmp_path / "r3.json").read_text())["results"] == rows
    assert not list(tmp_path.glob(".*.tmp"))  # written by rename, nothing left behind
    rows = {n: {t: {"42": {"val200": 0.5}} for t in tasks} for n in sw.ROUND3}  # one seed everywhere: no extra table
    sw.report(rows, tmp_path / "r3.md", tasks, seeds, round3=True)
    assert "Rows compared" not in (tmp_path / "r3.md").read_text()
    rows["hf-peft"]["a"]["43"] = {"val200": 0.9}  # one row ran a second seed on every task it has: compare on 42
    rows[sw.REFERENCE3]["b"]["43"] = {"val200": 0.1}
    for n in sw.ROUND3:
        rows[n]["c"]["43"] = {"val200": 0.3}  # ... and every row ran seed 43 on "c": that cell is shared
    sw.report(rows, tmp_path / "r3.md", tasks, seeds, round3=True)
    text = (tmp_path / "r3.md").read_text()
    assert "(seed 42 on a, b; seeds 42, 43 on c)" in text
    # a, b: 0.5; c: (0.5 + 0.3) / 2; for every row
    assert text.split("Rows compared")[1].count(" | 46.7 |\n") == len(sw.ROUND3)


def test_sweep_report_keeps_committed_cells_over_local_runs_unless_told(tmp_path):
    import json

    import sweep_defaults as sw

    name = "lora, cls+mean, drop-path 0, scale 4"
    dest = tmp_path / "defaults.md"
    committed = {"results": {name: {"a": {"42": {"val200": 0.9, "device": "cuda"}}}}}
    dest.with_suffix(".json").write_text(json.dumps(committed))
    runs = tmp_path / "runs"
    for task, acc in (("a", 0.5), ("b", 0.7)):  # "a" is committed, "b" is not
        folder = sw.folder_of(runs, task, name, 42)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"accuracy": acc, "device": "cpu"}))
    rows = sw.collect(runs, dest, ("a", "b"), (42,))
    assert rows[name]["a"]["42"] == {"val200": 0.9, "device": "cuda"}  # the old local run did not overwrite it
    assert rows[name]["b"]["42"]["val200"] == 0.7 and rows[name]["b"]["42"]["device"] == "cpu"
    rows = sw.collect(runs, dest, ("a", "b"), (42,), replace=True)
    assert rows[name]["a"]["42"]["val200"] == 0.5


def test_report_pools_group_correlations_once_two_seeds_are_there():
    one = {("digits", 1): {"l0": [1.0, 2.0], "l1": [3.0, 4.0]},
           ("dsprites_loc", 1): {"l0": [4.0, 3.0], "l1": [2.0, 1.0]}}
    assert report.pooled_group_lines(one) == []  # one seed: no pair of different seeds
    two = {**one, ("digits", 2): {"l0": [2.0, 4.0], "l1": [6.0, 8.0]}}  # natural vs structured: other groups
    text = "\n".join(report.pooled_group_lines(two))
    assert "| same task, another seed (the noise floor) | 1.00 [1.00, 1.00] |" in text
    assert "| tasks of different groups | -1.00 [-1.00, -1.00] |" in text
    assert "two tasks of one group" not in text and "Permutation test" not in text  # no same-group pair yet
    three = {**two, ("mnist", 2): {"l0": [1.0, 2.0], "l1": [4.0, 3.0]}}  # natural, like digits
    text = "\n".join(report.pooled_group_lines(three))
    assert "| two tasks of one group |" in text
    assert "Permutation test over the tasks' groups (3 regroupings into groups of the same sizes" in text


def test_readme_partial_table_waits_for_every_task_of_the_first_seed(monkeypatch):
    monkeypatch.setitem(suite.PROFILES, "small", SMALL)
    base = {"digits": 0.8, "dsprites_loc": 0.6}
    delta = {("lora", 1): 0.0, ("lora", 2): 0.02, ("hf-peft", 1): -0.01, ("hf-peft", 2): -0.03, ("bi-lora", 1): -0.05}
    data = fill_small(lambda task, method, seed: base[task] + delta[(method, seed)])
    data["records"] = [r for r in data["records"] if r["seed"] == 1]  # seed 2 missing: no full table
    assert report.readme_table(data, SMALL) == []
    lines = report.readme_partial_table(data, SMALL)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert rows["LoRA (heartlora)"].endswith("| 70.0 | 1,000 | 1.000 |")  # (80 + 60) / 2 on seed 1
    assert rows["HF + PEFT (plain recipe)"].endswith("| 69.0 | 800 | 0.800 |")
    assert lines[-1].startswith("PARTIAL: seed 1 only")
    data["records"] = [r for r in data["records"] if not (r["suite_method"] == "bi-lora" and r["task"] == "digits")]
    assert report.readme_partial_table(data, SMALL) == []


def test_auto_ne_cost_is_reported_as_a_share_of_the_run():
    recs = [{"ne_choice": {"seconds": s}, "wall_s": 100.0} for s in (1.0, 3.0, 2.0)] + [
        {"ne_choice": {"ne": 0}, "wall_s": 100.0}, {"ne_choice": None, "wall_s": 50.0}]
    (line, _) = report.auto_ne_cost_lines(recs)
    assert "median 2.0 % of a run's wall time, at most 3.0 %, over the 3 heart runs" in line
    assert report.auto_ne_cost_lines(recs[3:]) == []


def test_ne_refine_probes_first_and_judges_with_zeros_where_the_rules_agree(tmp_path: Path, monkeypatch) -> None:
    import json

    import ne_refine

    monkeypatch.setattr(ne_refine, "TASKS", ("digits", "mnist"))
    monkeypatch.setattr(ne_refine, "SEEDS", (1,))
    monkeypatch.setattr(ne_refine, "DEST", tmp_path / "ne_refine")  # no committed cells
    cand = [{"ne": 0, "passes": True, "refine": False}, {"ne": 12, "passes": False, "refine": False}]
    agree = {"ne": 0, "candidates": [*cand, {"ne": 6, "passes": False, "refine": True}]}
    differ = {"ne": 6, "candidates": [*cand, {"ne": 6, "passes": True, "refine": True}]}
    assert ne_refine.coarse_of(agree) == ne_refine.coarse_of(differ) == 0
    # nothing probed yet: a probe per cell, to the end of the warmup, with the refined search
    left = ne_refine.todo(tmp_path)
    assert [w for w, _, _ in left] == ["probe digits s1", "probe mnist s1"]
    assert all("--no-ne-refine" not in c and c[c.index("--stop-after-epoch") + 1] == "1" for _, c, _ in left)
    # probed: where the choices agree nothing more runs; where they differ, the refined run resumes and the coarse
    # one runs in full as --ne N (no --ne auto flags)
    for task, choice in (("digits", agree), ("mnist", differ)):
        folder = ne_refine.folders(tmp_path, task, 1)[0]
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"ne_choice": choice}))  # read as the probe's choice
    monkeypatch.setattr(ne_refine, "probe_choice", lambda f: (
        json.loads((f / "metrics.json").read_text())["ne_choice"] if (f / "metrics.json").is_file() else None))
    left = ne_refine.todo(tmp_path)
    assert [w for w, _, _ in left] == ["coarse mnist s1"]  # the refined one has a metrics.json here
    coarse_cmd = left[0][1]
    assert coarse_cmd[coarse_cmd.index("--ne") + 1] == "0" and "--ne-tolerance" not in coarse_cmd
    data = {"cells": {"digits s1": {"coarse_ne": 0, "refined_ne": 0},
                      "mnist s1": {"coarse_ne": 0, "refined_ne": 6, "coarse_acc": 0.90, "refined_acc": 0.89}}}
    v = ne_refine.verdict(data)
    assert v["changed"] == 1 and v["heads_saved"] == 6 and v["mean_change"] == pytest.approx(-0.005)
    assert v["decision"].startswith("--ne-refine stays an option")  # -0.5 points on the mean: below -0.3
    data["cells"]["mnist s1"]["refined_acc"] = 0.897
    assert ne_refine.verdict(data)["decision"] == "--ne-refine becomes the default"  # -0.15 points
    del data["cells"]["mnist s1"]["coarse_acc"]
    assert "decision" not in ne_refine.verdict(data)  # a cell still running decides nothing
    # a fresh machine (no runs/): the committed cells are kept; a half-done one runs its missing half only
    (tmp_path / "ne_refine.json").write_text(json.dumps({"cells": {
        "digits s1": {"coarse_ne": 0, "refined_ne": 0, "candidates": agree["candidates"]},
        "mnist s1": {"coarse_ne": 0, "refined_ne": 6, "candidates": differ["candidates"], "refined_acc": 0.9}}}))
    left = ne_refine.todo(tmp_path / "elsewhere")
    assert [w for w, _, _ in left] == ["coarse mnist s1"]


def test_ne_refine_keeps_the_probes_figures_when_a_redone_run_replaces_its_folder(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import json

    import ne_refine

    monkeypatch.setattr(ne_refine, "DEST", tmp_path / "ne_refine")
    monkeypatch.setattr(ne_refine, "SUITE_RUNS", tmp_path / "runs")
    full = 2.0
    redone = {"ne": 12, "candidates": [
        {"ne": 0, "loss": full, "increase": 0.0, "passes": True, "refine": False},
        {"ne": 12, "loss": 2.03, "increase": 0.03, "passes": True, "refine": False},
        {"ne": 24, "loss": 2.2, "increase": 0.2, "passes": False, "refine": False},
        {"ne": 18, "loss": 2.05, "increase": 0.05, "passes": False, "refine": True}]}
    coarse_rec = {"heads_off_count": 12, "device": "cpu", "ne_choice": {"ne": 12, "candidates": [
        {"ne": 0, "passes": True}, {"ne": 12, "passes": True}, {"ne": 24, "passes": False}]}}
    new_rec = {"heads_off_count": 12, "device": "cpu", "machine": {"cpu": "Other CPU"}, "ne_choice": redone,
               "settings": {"ne_tolerance": 0.02}}
    items = [("a", "digits", 1, "heart-lora", coarse_rec), ("b", "mnist", 1, "heart-lora", coarse_rec)]
    monkeypatch.setattr(ne_refine, "final_items", lambda: items)
    probes = {"a": {"ne": 18, "candidates": [*coarse_rec["ne_choice"]["candidates"],
                                             {"ne": 18, "passes": True, "refine": True}]},
              "b": {"ne": 12, "candidates": coarse_rec["ne_choice"]["candidates"]}}
    monkeypatch.setattr(ne_refine, "probe_choice", lambda folder: probes.get(folder.name))
    cells = ne_refine.final_cells()
    assert cells["a"] == {"coarse_ne": 12, "refined_ne": 18, "record_ne": 12, "record_device": "cpu", "rerun": False}
    assert cells["b"]["coarse_ne"] == cells["b"]["refined_ne"] == 12 and not cells["b"]["rerun"]
    (tmp_path / "ne_refine.json").write_text(json.dumps({"final": cells}))
    # run a is redone (on another machine, which chose 12): its folder now holds the finished run, and its record
    # is replaced; the probe's figures stay, and the redone choice goes beside them with the reason it moved
    items[0] = ("a", "digits", 1, "heart-lora", new_rec)
    probes["a"] = redone
    cells = ne_refine.final_cells()
    assert (cells["a"]["coarse_ne"], cells["a"]["refined_ne"], cells["a"]["record_ne"]) == (12, 18, 12)
    assert cells["a"]["rerun"] and cells["a"]["redone_ne"] == 12 and cells["a"]["redone_cpu"] == "Other CPU"
    assert "2.50 % of its value with every head, over the 2 % tolerance" in ne_refine.why_moved(cells["a"])
    assert not cells["b"]["rerun"]  # a record that agreed with its probe is never marked redone


def test_ne_refine_probes_a_test_run_with_the_suites_own_command(tmp_path: Path) -> None:
    import importlib

    import ne_refine

    bench_suite = importlib.import_module("suite")  # benchmarks/suite.py (this module's `suite` is the library's)
    profile = replace(suite.PROFILES["cpu"], seeds=(42, 43, 44))
    for method in ne_refine.FINAL_METHODS:
        for task in ("mnist", "fashion_mnist@4shot"):
            out = tmp_path / method / task
            want = bench_suite.run_command(profile, "final", task, method, {}, 43, out, "auto", profile.threads)
            got = ne_refine.final_probe_command(task, 43, method, out)
            assert got[:-2] == want and got[-2] == "--stop-after-epoch"
            assert got[-1] == str(ne_refine.warmup_epochs(task))  # 1 of 10 epochs; 5 of the 4-shot task's 50


def test_runner_redoes_recorded_runs_on_request_and_replaces_their_records(runner):
    script, log, tmp = runner
    assert script.main(["run", "--profile", "small", "--jobs", "2"]) == 0
    ids = sorted(r["id"] for r in suite.load_results(tmp / "results.json")["records"])
    first = len(launched(log))
    again = next(i for i in ids if "/lora_s" in i)
    (tmp / "runs" / again / "metrics.json").unlink()  # its folder keeps a checkpoint (a probe's, say): it resumes
    (tmp / "runs" / again / "checkpoint.pt").write_bytes(b"x")
    old = {r["id"]: r["recorded_at"] for r in suite.load_results(tmp / "results.json")["records"]}
    import time as _time

    _time.sleep(1.1)  # records are stamped to the second
    assert script.main(["run", "--profile", "small", "--jobs", "2", "--redo", again]) == 0
    assert launched(log)[first:] == [f"{short(again)} resume"]  # that run only, once
    data = suite.load_results(tmp / "results.json")
    assert sorted(r["id"] for r in data["records"]) == ids  # replaced, not added
    assert {r["id"]: r["recorded_at"] for r in data["records"]}[again] > old[again]
    # refused before anything runs: an id with no record, or a folder that holds a finished run
    with pytest.raises(SystemExit, match="no record"):
        script.main(["run", "--profile", "small", "--redo", "small/nope_s1"])
    with pytest.raises(SystemExit, match="holds a finished run"):
        script.main(["run", "--profile", "small", "--redo", next(i for i in ids if i != again)])
    assert len(launched(log)) == first + 1


def test_docs_results_md_is_what_the_report_writes(tmp_path: Path) -> None:
    """docs/research/RESULTS.md is generated: its tables from benchmarks/records/results.json, its reading from
    benchmarks/results_notes.md.
    An edit made to the page by hand is lost at the next `suite.py report`, so the page must equal the report's."""
    (tmp_path / "results.json").write_bytes((report.RECORDS / "results.json").read_bytes())
    written = report.write_all("cpu", tmp_path / "results.json").read_text()
    assert written == (report.DOCS / "RESULTS.md").read_text(), (
        "docs/research/RESULTS.md differs from what `benchmarks/suite.py report --profile cpu` writes: edit "
        "benchmarks/results_notes.md (the hand-written part), not the page, and run the report")


def test_heldout_profile_runs_only_tasks_no_default_was_chosen_on() -> None:
    import ne_refine
    import sweep_defaults

    held = set(suite.PROFILES["heldout"].tasks)
    chosen_on = set(sweep_defaults.TASKS) | set(ne_refine.TASKS) | set(suite.PROFILES["cpu"].tasks)
    assert held and not held & chosen_on
    # the other half of a visible source counts too: no held-out task is a K-shot view of a visible one
    assert not {t.split("@")[0] for t in held} & {t.split("@")[0] for t in chosen_on}
    assert suite.PROFILES["heldout"].engine_profile == suite.PROFILES["cpu"].engine_profile  # same settings


def test_prune_table_names_what_ne_auto_tried() -> None:
    import prune

    row = {"ne": 0, "ne_choice": {"candidates": [{"ne": 0, "loss": 0.05, "increase": 0.0},
                                                 {"ne": 12, "loss": 0.06, "increase": 0.01},
                                                 {"ne": 6, "loss": 0.051, "increase": 0.001}]}}
    assert prune.auto_tried(row) == " (tried 12: +20 %, 6: +2 %)"
    assert prune.auto_tried({"ne": 0}) == ""  # a row from before ne_choice was kept
