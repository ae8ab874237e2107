"""The accuracy-per-byte frontier (benchmarks/frontier.py) and the PEFT baselines it runs
(benchmarks/baselines/hf_peft.py): the learning-rate rule reads val200 only, the run order, reuse of the suite's
records, the byte count, and one real tiny run of a PEFT method with two learning rates in one optimizer."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "baselines"))

frontier = importlib.import_module("frontier")
hf_peft = importlib.import_module("hf_peft")
_plan = frontier.plan


@pytest.fixture(autouse=True)
def no_suite_records(tmp_path, monkeypatch):
    """Plans read the suite's records for reuse: the tests start from none (a test gives its own). The driver's lock
    and run folders go under the test's folder: a real `frontier.py run` working in the checkout holds its lock."""
    monkeypatch.setattr(frontier, "SUITE_RESULTS", tmp_path / "no-suite-results.json")
    monkeypatch.setattr(frontier, "RUNS", tmp_path / "runs")


def val_rec(point: str, task: str, lr: float, acc: float) -> dict:
    return {"id": frontier.run_id("val", task, point, lr, 42), "role": "select", "frontier_point": point,
            "task": task, "frontier_lr": lr, "accuracy": acc, "seed": 42}


def fill_val(data: dict, point: str, acc_of_lr) -> None:
    """Record every val run the plan asks of ``point`` until its rate is chosen."""
    for _ in range(10):
        chosen, missing, _ = frontier.choose_lr(point, frontier.val_index(data))
        if chosen is not None:
            return
        for lr in missing:
            for task in frontier.SELECT_TASKS:
                data["records"].append(val_rec(point, task, lr, acc_of_lr(lr)))
    raise AssertionError("the rate search did not end")


def test_rate_rule_picks_the_best_mean_val_and_grows_the_grid_at_an_edge():
    data = {"records": []}
    fill_val(data, "vera", lambda lr: {4e-2: 0.5}.get(lr, 0.4))  # the reference wins: no growth
    chosen, _, table = frontier.choose_lr("vera", frontier.val_index(data))
    assert chosen == 4e-2 and len(table) == 3
    data = {"records": []}
    # accuracy rises with the rate far past the grid and falls after: the grid grows upward until its cap
    # (MAX_EXTEND steps) and stops
    ref = frontier.POINTS["ia3"]["lr"]
    fill_val(data, "ia3", lambda lr: -abs(lr - ref * 3 ** 10))
    chosen, _, table = frontier.choose_lr("ia3", frontier.val_index(data))
    rates = sorted(r for r, _ in table)
    assert frontier.MAX_EXTEND == 5 and len(rates) == 3 + frontier.MAX_EXTEND
    assert chosen == pytest.approx(ref * 3 ** 6) and chosen == max(rates)  # the cap: best at the end, not grown again
    data = {"records": []}
    # a peak inside the grown grid: found, and the grid grows no further
    fill_val(data, "ia3", lambda lr: -abs(lr - ref * 27))
    chosen, _, table = frontier.choose_lr("ia3", frontier.val_index(data))
    assert chosen == pytest.approx(ref * 27) and len(table) == 6 and chosen < max(r for r, _ in table)


def test_rate_rule_sees_equal_counts_as_a_tie_despite_float32_accuracies():
    """Records hold accuracies as float32 values: 0.795 + 0.825 + 0.525 and 0.805 + 0.865 + 0.475 are the same
    count of val images but differ by 1e-8 as floats; the tie must go to the reference, not grow the grid."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    accs = {1e-3: (0.795, 0.825, 0.525), 3e-3: (0.805, 0.865, 0.475), 1e-3 / 3: (0.7, 0.7, 0.4)}
    data = {"records": [val_rec("lora-r2", t, lr, f32(a)) for lr, xs in accs.items()
                        for t, a in zip(frontier.SELECT_TASKS, xs)]}
    assert frontier.choose_lr("lora-r2", frontier.val_index(data))[0] == 1e-3


def test_rate_rule_breaks_ties_for_the_reference_and_shares_choices():
    data = {"records": []}
    fill_val(data, "heart-lora", lambda lr: 0.7)
    val = frontier.val_index(data)
    assert frontier.choose_lr("heart-lora", val)[0] == 1e-3
    assert frontier.choose_lr("lora", val)[0] == 1e-3
    assert frontier.choose_lr("bi-lora", val)[0] is None  # its leader (heart-bi-lora) has no val runs yet
    # another rank searches its own rate
    for own in ("heart-lora-r10-ne36", "heart-lora-r16-ne48", "heart-lora-r2", "heart-lora-r4", "heart-bi-lora-r16"):
        assert frontier.choose_lr(own, val)[0] is None


def test_plan_runs_val_first_then_seed_42_on_every_task_then_more_seeds_and_never_reads_test():
    data = {"records": []}
    first = frontier.plan(data)
    assert all(item[0] == "val" for item in first) and first[0][1] == frontier.SELECT_TASKS[0]
    searched = [p for p, s in frontier.POINTS.items() if "lr_from" not in s]
    assert len(first) == 3 * len(frontier.SELECT_TASKS) * len(searched)
    fill_val(data, "lora-r1", lambda lr: 0.5 if lr == 1e-3 else 0.4)
    # a test record with an absurd accuracy at another rate must not move the choice
    data["records"].append({"id": "x", "role": "final", "frontier_point": "lora-r1", "task": "digits",
                            "frontier_lr": 3e-3, "accuracy": 1.0, "seed": 42})
    finals = [item for item in frontier.plan(data) if item[0] == "final"]
    assert {item[2] for item in finals} == {"lora-r1"} and {item[3] for item in finals} == {1e-3}
    assert [item[1] for item in finals if item[4] == 42] == list(frontier.TASKS)
    assert {item[1] for item in finals if item[4] != 42} == set(frontier.CPU_TASKS)
    order = frontier.plan(data)
    assert max(i for i, it in enumerate(order) if it[0] == "val") < min(i for i, it in enumerate(order)
                                                                       if it[0] == "final")
    heldout = [i for i, it in enumerate(order) if it[1] in frontier.HELDOUT_TASKS]
    assert heldout and max(i for i, it in enumerate(order) if it[4] != 42) < min(heldout)  # they confirm, last


def final_rec(point: str, task: str, seed: int, acc: float, nbytes: int, lr: float = 1e-3) -> dict:
    return {"id": frontier.run_id("final", task, point, lr, seed), "role": "final", "frontier_point": point,
            "task": task, "frontier_lr": lr, "accuracy": acc, "seed": seed, "adapter_bytes_fp16": nbytes}


def settled_data(val_acc: dict, test_acc: dict, nbytes: dict) -> dict:
    """Records where every point's rate is chosen (1e-3 wins), every heartlora point has its val200 runs at that rate
    and every point its seed-42 finals; ``val_acc``/``test_acc``/``nbytes`` give a point's accuracy and bytes."""
    data = {"records": []}
    for point, spec in frontier.POINTS.items():
        if "lr_from" not in spec:
            spec_lr = spec["lr"]
            fill_val(data, point, lambda lr, ref=spec_lr, a=val_acc.get(point, 0.5): a if lr == ref else a - 0.1)
        chosen = frontier.choose_lr(point, frontier.val_index(data))[0]
        if "lr_from" in spec and point in frontier.HEART_POINTS:
            for task in frontier.SELECT_TASKS:
                data["records"].append(val_rec(point, task, chosen, val_acc.get(point, 0.5)))
        for task in frontier.TASKS:
            data["records"].append(final_rec(point, task, 42, test_acc.get(point, 0.6), nbytes.get(point, 10**6),
                                             chosen))
    return data


def test_all_heads_on_variants_run_val200_at_the_shared_rate_and_the_others_search_their_own():
    data = {"records": []}
    fill_val(data, "heart-lora", lambda lr: 0.7 if lr == 1e-3 else 0.6)
    ref = frontier.POINTS["fourierft-n400"]["lr"]
    fill_val(data, "fourierft", lambda lr: 0.7 if lr == frontier.POINTS["fourierft"]["lr"] else 0.6)
    vals = {(it[2], it[3]) for it in frontier.plan(data) if it[0] == "val"}
    assert ("lora", 1e-3) in vals and not any(p == "lora" and lr != 1e-3 for p, lr in vals)
    assert {lr for p, lr in vals if p == "fourierft-n400"} == set(frontier.grid(ref))  # its own search
    for own in ("heart-lora-r10-ne36", "heart-lora-r16-ne48"):
        assert {lr for p, lr in vals if p == own} == set(frontier.grid(1e-3))
    finals = {it[2] for it in frontier.plan(data) if it[0] == "final"}
    assert {"fourierft", "lora"} <= finals and not {"fourierft-n400", "heart-lora-r16-ne48"} & finals
    assert frontier.FOLLOWERS_NOTE.startswith("heartlora's all-heads-on variants (bi-lora, lora) train at the rate "
                                              "their heads-off method chose (heart-bi-lora's, heart-lora's)")


def test_heartlora_points_are_chosen_on_val200_within_the_budget_and_only_chosen_ones_get_more_seeds():
    # r16-ne48 is best on val but too big for ia3-kv's budget; heart-bi-lora fits every budget; lora is a byte over
    # LoRA r8's; test accuracy is made to favour the points val does not pick, so a choice read from test would
    # differ
    val_acc = {"heart-lora-r16-ne48": 0.9, "heart-bi-lora": 0.8, "bi-lora": 0.7, "heart-lora-r10-ne36": 0.6,
               "lora": 0.95}
    test_acc = {"heart-lora-r16-ne48": 0.5, "bi-lora": 0.99, "heart-lora-r10-ne36": 0.99}
    nbytes = {"heart-bi-lora": 15_000, "bi-lora": 19_000, "heart-lora-r16-ne48": 276_480,
              "heart-lora-r10-ne36": 276_480, "heart-lora": 245_760, "lora": 294_913, "lora-r8": 294_912,
              "ia3-kv": 18_432, "lora-r1": 36_864}
    data = settled_data(val_acc, test_acc, nbytes)
    fin, val = frontier.finals(data), frontier.val_index(data)
    rows = {(g, p): h for g, p, h, _ in frontier.comparisons(fin, val)}
    assert rows[("bytes", "ia3-kv")] == "heart-bi-lora" and rows[("small", "ia3-kv")] == "heart-bi-lora"
    assert rows[("bytes", "lora-r8")] == "heart-lora-r16-ne48" and rows[("bytes", "lora-r1")] == "heart-bi-lora"
    assert rows[("reallocation", "lora-r8")] == "heart-lora-r16-ne48"  # lora: better on val, a byte over budget
    assert ("small", "lora-r8") not in rows
    more = {it[2] for it in frontier.plan(data) if it[0] == "final" and it[4] != 42}
    assert set(frontier.PEFT_POINTS) <= more and {"heart-bi-lora", "heart-lora-r16-ne48"} <= more
    assert "heart-lora-r10-ne36" not in more  # never compared: no seeds 43 and 44
    assert all(it[1] in frontier.CPU_TASKS for it in frontier.plan(data) if it[0] == "final")
    # one heartlora point's seed-42 final missing: its choices are not made yet, so no heartlora seeds but reused ones
    data["records"] = [r for r in data["records"] if r["id"] != frontier.run_id("final", "digits", "bi-lora", 1e-3,
                                                                                 42)]
    waiting = {it[2] for it in frontier.plan(data) if it[0] == "final" and it[4] != 42}
    assert "heart-lora-r16-ne48" not in waiting and set(frontier.PEFT_POINTS) <= waiting


def test_goal_lines_judge_the_paired_difference_against_each_margin():
    nbytes = {"heart-bi-lora": 15_000, "ia3-kv": 18_432, "lora-r8": 294_912, "heart-lora-r16-ne48": 276_480}
    data = settled_data({"heart-bi-lora": 0.9}, {"heart-bi-lora": 0.62, "ia3-kv": 0.60}, nbytes)
    for point in frontier.POINTS:  # seeds 43 and 44 on the cpu tasks at seed 42's accuracy, +1 point on one task
        for r in [r for r in data["records"] if r["role"] == "final" and r["frontier_point"] == point
                  and r["task"] in frontier.CPU_TASKS]:
            for seed in (43, 44):
                extra = 0.01 if (point == "heart-bi-lora" and r["task"] == frontier.CPU_TASKS[0]) else 0.0
                data["records"].append({**r, "id": r["id"] + f"_{seed}", "seed": seed,
                                        "accuracy": r["accuracy"] + extra})
    fin, val = frontier.finals(data), frontier.val_index(data)
    cells = {(t, s) for t in frontier.CPU_TASKS for s in frontier.SEEDS}
    held = {(t, 42) for t in frontier.HELDOUT_TASKS}
    lines = frontier.goal_lines(fin, val, cells, held)
    row = next(x for x in lines if x.startswith("| +1 at") and "| ia3-kv |" in x)
    diffs = [2.0] * 21
    diffs[:2] = [3.0, 3.0]
    mean = sum(diffs) / 21
    assert f"{mean:+.1f}" in row and "(21)" in row and row.endswith("| yes, by more than 2 se |")
    # beside it, the standard error over the 7 task means (task 0: +8/3 over its seeds, the others +2)
    task_means = [8 / 3] + [2.0] * 6
    se = frontier.statistics.stdev(task_means) / 7 ** 0.5
    assert f"| {se:.1f} (7 tasks) |" in row and frontier.task_se(
        fin["ia3-kv"], fin["heart-bi-lora"], cells) == (round(se, 6), 7)
    assert frontier.task_se(fin["ia3-kv"], fin["heart-bi-lora"], {("mnist", 42), ("mnist", 43)}) is None
    small = next(x for x in lines if x.startswith("| +3 under") and "| ia3-kv |" in x)
    assert small.endswith(f"| no, by {3 - mean:.1f} |")


def test_a_point_over_the_budget_on_one_task_does_not_fit_it_though_its_mean_does():
    """`--ne auto` keeps a different number of heads per task: heart-bi-lora's mean (16,429 bytes) is under ia3-kv's
    18,432, but one task stores 25,000, so another point is heartlora's at that budget."""
    nbytes = {"heart-bi-lora": 15_000, "bi-lora": 18_000, "ia3-kv": 18_432}
    data = settled_data({"heart-bi-lora": 0.9, "bi-lora": 0.8}, {}, nbytes)
    rows = lambda d: {(g, p): h for g, p, h, _ in frontier.comparisons(frontier.finals(d), frontier.val_index(d))}  # noqa
    assert rows(data)[("bytes", "ia3-kv")] == "heart-bi-lora"
    big = next(r for r in data["records"] if r["role"] == "final" and r["frontier_point"] == "heart-bi-lora"
               and r["task"] == frontier.CPU_TASKS[0])
    big["adapter_bytes_fp16"] = 25_000
    assert frontier.mean_bytes(frontier.finals(data)["heart-bi-lora"]) < 18_432
    assert rows(data)[("bytes", "ia3-kv")] == "bi-lora"


def test_a_goal_met_within_two_task_standard_errors_is_not_called_clear_and_the_recipe_effect_is_shown():
    """The cells' standard error can be tiny while the tasks disagree: the verdict reads the larger of the two. A
    goal met by an all-heads-on point is said to be the recipe's, and the report gives the recipes' own difference
    on one adapter (lora − lora-r8) at their chosen rates."""
    nbytes = {"heart-bi-lora": 15_000, "ia3-kv": 18_432, "lora": 294_912, "lora-r8": 294_912}
    data = settled_data({"heart-bi-lora": 0.9}, {"ia3-kv": 0.60, "lora-r8": 0.78, "lora": 0.80}, nbytes)
    for r in [r for r in data["records"] if r["role"] == "final" and r["task"] in frontier.CPU_TASKS]:
        task = frontier.CPU_TASKS.index(r["task"])
        if r["frontier_point"] == "heart-bi-lora":  # +6 points on 4 tasks, −1 on 3: mean +3.0
            r["accuracy"] = 0.66 if task % 2 == 0 else 0.59
        for seed in (43, 44):
            data["records"].append({**r, "id": r["id"] + f"_{seed}", "seed": seed})
    fin, val = frontier.finals(data), frontier.val_index(data)
    cells = {(t, s) for t in frontier.CPU_TASKS for s in frontier.SEEDS}
    lines = frontier.goal_lines(fin, val, cells, {(t, 42) for t in frontier.HELDOUT_TASKS})
    row = next(x for x in lines if x.startswith("| +1 at") and "| ia3-kv |" in x)
    mean, cell_se, _ = frontier.paired(fin["ia3-kv"], fin["heart-bi-lora"], cells)
    task_se = frontier.task_se(fin["ia3-kv"], fin["heart-bi-lora"], cells)[0]
    assert mean - 2 * cell_se >= 1.0 > mean - 2 * task_se  # clear by the cells' se, not by the tasks'
    assert "| yes, within 2 se;" in row
    recipe = next(x for x in lines if x.startswith("The recipes alone"))
    assert "= +2.0 ± 0.0 (21) test points" in recipe


def test_the_rates_table_marks_a_choice_at_the_end_of_a_capped_grid_and_the_paper_table_reads_the_chosen_rate():
    data = {"records": []}
    ref = frontier.POINTS["ia3"]["lr"]
    fill_val(data, "ia3", lambda lr: lr)  # the higher the better: the grid grows to its cap
    fill_val(data, "vera", lambda lr: -abs(lr - frontier.POINTS["vera"]["lr"]))  # the reference: inside
    lines = frontier.rate_lines(frontier.val_index(data))
    ia3 = next(x for x in lines if x.startswith("| ia3 |"))
    assert f"| {frontier.lr_str(ref * 3 ** 6)} (at the grid's end" in ia3
    assert "grid's end" not in next(x for x in lines if x.startswith("| vera |"))
    val = frontier.val_index(data)

    def rec(lr, acc):
        return {"id": frontier.paper_id("digits", "vera", lr), "frontier_point": "vera", "task": "digits",
                "frontier_lr": lr, "accuracy": acc, "adapter_bytes_fp16": 30_720, "settings": {}}
    paper = {"records": [rec(frontier.POINTS["vera"]["lr"], 0.8), rec(0.12, 0.1)]}  # 0.12: a rate since dropped
    assert "| vera | 30,720 | 80.0 | 1 | cpu, None |" in frontier.paper_lines(paper, val)


def with_more_seeds(data: dict, bump: dict | None = None) -> dict:
    """Seeds 43 and 44 on the cpu tasks for every point, at seed 42's record (``bump``: point → (accuracy, bytes)
    added)."""
    for r in [r for r in data["records"] if r["role"] == "final" and r["task"] in frontier.CPU_TASKS]:
        da, db = (bump or {}).get(r["frontier_point"], (0.0, 0))
        for seed in (43, 44):
            data["records"].append({**r, "id": r["id"] + f"_{seed}", "seed": seed, "accuracy": r["accuracy"] + da,
                                    "adapter_bytes_fp16": r["adapter_bytes_fp16"] + db})
    return data


def test_goal_rows_say_what_is_pending_and_what_exceeds_the_budget():
    nbytes = {"heart-bi-lora": 15_000, "bi-lora": 19_000, "ia3-kv": 18_432, "lora-r8": 294_912, "lora": 294_912,
              "heart-lora-r16-ne48": 300_000, "heart-lora-r10-ne36": 300_000, "heart-lora": 400_000}
    val_acc = {"heart-bi-lora": 0.9, "lora": 0.95}
    test_acc = {"heart-bi-lora": 0.62, "ia3-kv": 0.60, "lora": 0.80, "lora-r8": 0.78}
    data = settled_data(val_acc, test_acc, nbytes)
    fin, val = frontier.finals(data), frontier.val_index(data)
    cells = {(t, s) for t in frontier.CPU_TASKS for s in frontier.SEEDS}
    held = {(t, 42) for t in frontier.HELDOUT_TASKS}
    # seed 42 only: 7 of the 21 cpu cells; the 3 heldout cells give a difference with its standard error
    row = next(x for x in frontier.goal_lines(fin, val, cells, held) if "| ia3-kv |" in x and x.startswith("| +1"))
    assert "(3) | not yet (7/21 cells) |" in row and "± n/a" not in row and "± 0.0 (3)" in row
    # every cpu cell in, the heldout cells not run
    data = with_more_seeds(data)
    data["records"] = [r for r in data["records"] if r["task"] not in frontier.HELDOUT_TASKS or r["role"] != "final"]
    fin = frontier.finals(data)
    lines = frontier.goal_lines(fin, val, cells, held)
    r8 = next(x for x in lines if x.startswith("| +1 at") and "| lora-r8 |" in x)
    assert "| lora (all heads on) | 294,912 |" in r8
    assert r8.endswith("| yes, by more than 2 se; heldout pending (0/3); by a point that switches no head off: the "
                       "recipe's doing, not the heads' |")
    # a PEFT method with no finals yet, and heartlora's choices while one of its points has no finals
    data["records"] = [r for r in data["records"] if not (r["role"] == "final" and r["frontier_point"] in
                                                          ("vera", "heart-lora-r10-ne36"))]
    lines = frontier.goal_lines(frontier.finals(data), val, cells, held)
    assert "| every goal | vera | … | pending: its final runs are not in | | | | | not yet |" in lines
    assert any("| ia3-kv |" in x and x.endswith("| not yet: heartlora's points are not all run |") for x in lines)
    assert frontier.fmt((1.0, float("nan"), 1)) == "+1.0 ± n/a (1)"
    # bytes over the compared cells above the budget are said, not hidden
    data = settled_data(val_acc, test_acc, nbytes)
    data = with_more_seeds(data, {"heart-bi-lora": (0.0, 12_000)})
    lines = frontier.goal_lines(frontier.finals(data), val, cells, held)
    small = next(x for x in lines if x.startswith("| +3 under") and "| ia3-kv |" in x)
    assert "| heart-bi-lora | 23,000 |" in small and small.endswith("exceed the budget by 3,000 |")
    # ... and a comparison over the budget is never met, however accurate (+2 points clears the +1 margin here)
    at = next(x for x in lines if x.startswith("| +1 at") and "| ia3-kv |" in x)
    assert "| +2.0 ± 0.0 (21) |" in at
    assert at.endswith("| no: its bytes over these cells exceed the budget by 4,568 (yes, by more than 2 se) |")


def test_a_difference_of_exactly_the_margin_meets_it_despite_float32_accuracies():
    """Accuracies are float32 (k / 1000 to ~1e-8): +10 images in 1,000 on every cell is +1.0 point, not 0.9999998."""
    import numpy as np

    cells = [(t, s) for t in frontier.CPU_TASKS for s in frontier.SEEDS]
    a = {c: {"accuracy": float(np.float32((301 + i) / 1000))} for i, c in enumerate(cells)}
    b = {c: {"accuracy": float(np.float32((311 + i) / 1000))} for i, c in enumerate(cells)}
    mean, se, n = frontier.paired(a, b)
    assert n == 21 and mean == 1.0 and mean >= frontier.GOALS["bytes"] and se == 0.0


def test_the_readme_waits_for_every_peft_method_and_its_advice_is_chosen_on_val():
    nbytes = {"heart-bi-lora": 15_000, "bi-lora": 19_000, "ia3-kv": 18_432, "vblora-v60": 17_664,
              "fourierft-n400": 19_200, "lora-r8": 294_912, "heart-lora": 245_760}
    val_acc = {"heart-bi-lora": 0.9, "heart-lora": 0.8, "ia3-kv": 0.95}
    test_acc = {"heart-bi-lora": 0.70, "ia3-kv": 0.66}  # val picks ia3-kv under 20 KB, test would pick heart-bi-lora
    data = with_more_seeds(settled_data(val_acc, test_acc, nbytes))
    cells = {(t, s) for t in frontier.CPU_TASKS for s in frontier.SEEDS}
    lines = frontier.readme_lines(frontier.finals(data), frontier.val_index(data), cells)
    assert lines[-3].startswith("**For adapters under 20 KB a task, use ia3-kv** (66.0 %, 18,432 bytes; ")
    # the advice's point must have every cell too
    held_back = [r for r in data["records"] if r["frontier_point"] == "ia3-kv" and r["seed"] == 44]
    data["records"] = [r for r in data["records"] if r not in held_back]
    assert frontier.readme_lines(frontier.finals(data), frontier.val_index(data), cells) is None
    data["records"] += held_back
    # heartlora's bytes are read over the same cells as its accuracy: more heads kept on seeds 43 and 44 show
    bumped = with_more_seeds(settled_data(val_acc, test_acc, nbytes), {"heart-bi-lora": (0.0, 6_000)})
    table = frontier.readme_lines(frontier.finals(bumped), frontier.val_index(bumped), cells)
    row = next(x for x in table if x.startswith("| ia3-kv |"))
    assert "| heart-bi-lora | 19,000 (568 over: `--ne auto` kept more heads on seeds 43–44) |" in row
    # a PEFT method without final runs (its rate search still open) is not in any comparison, yet the table waits
    kept = list(data["records"])
    data["records"] = [r for r in kept if not (r["frontier_point"] == "vera" and r["role"] == "final")]
    assert frontier.readme_lines(frontier.finals(data), frontier.val_index(data), cells) is None
    # every cell of every compared point in, but a heartlora point not run yet: it could be val200's choice, so wait
    assert frontier.readme_lines(frontier.finals({"records": kept}), frontier.val_index(data), cells) is not None
    data["records"] = [r for r in kept if not (r["frontier_point"] == "heart-lora-r10-ne36" and r["role"] == "final")]
    assert frontier.readme_lines(frontier.finals(data), frontier.val_index(data), cells) is None


def test_the_readme_says_none_fits_where_no_heartlora_point_fits_a_peft_methods_bytes():
    """The smallest PEFT method is smaller than every heartlora point: its row says so instead of the table waiting
    for a point that will never come."""
    nbytes = {"heart-bi-lora": 18_000, "bi-lora": 19_000, "ia3-kv": 18_432, "vblora-v60": 17_664,
              "fourierft-n400": 19_200, "lora-r8": 294_912, "heart-lora": 245_760}
    data = with_more_seeds(settled_data({"heart-bi-lora": 0.9}, {}, nbytes))
    cells = {(t, s) for t in frontier.CPU_TASKS for s in frontier.SEEDS}
    lines = frontier.readme_lines(frontier.finals(data), frontier.val_index(data), cells)
    assert lines is not None and "| vblora-v60 | 17,664 | 60.0 | none fits | | | |" in lines


def test_the_readme_table_waits_for_every_cell_then_replaces_only_its_block(tmp_path):
    nbytes = {"heart-bi-lora": 15_000, "bi-lora": 19_000, "ia3-kv": 18_432, "vblora-v60": 17_664,
              "fourierft-n400": 19_200, "lora-r8": 294_912, "heart-lora": 245_760}
    test_acc = {"heart-bi-lora": 0.70, "ia3-kv": 0.66, "heart-lora": 0.75, "lora-r8": 0.80}
    data = settled_data({"heart-bi-lora": 0.9, "heart-lora": 0.8}, test_acc, nbytes)
    cells = {(t, s) for t in frontier.CPU_TASKS for s in frontier.SEEDS}
    assert frontier.readme_lines(frontier.finals(data), frontier.val_index(data), cells) is None  # seed 42 only
    data = with_more_seeds(data)
    lines = frontier.readme_lines(frontier.finals(data), frontier.val_index(data), cells)
    ia3 = next(x for x in lines if x.startswith("| ia3-kv |"))
    assert "| heart-bi-lora | 15,000 | 70.0 | +4.0 ± 0.0 |" in ia3 and "| 18,432 | 66.0 |" in ia3
    assert lines[0].startswith("Offline DINOv2") and lines[-1].endswith("(docs/research/frontier.png)")
    assert lines[-3].startswith("**For adapters under 20 KB a task, use heart-bi-lora**")
    assert "at any size (points run on every seed) is lora-r8's (80.0 %, 294,912 bytes)" in lines[-3]
    readme = tmp_path / "README.md"
    begin, end = frontier.README_MARKS
    readme.write_text(f"# top\n{begin}\nold table\n{end}\nbelow\n")
    assert frontier.write_readme(lines, readme)
    text = readme.read_text()
    assert text.startswith(f"# top\n{begin}\nOffline DINOv2") and text.endswith(f"{end}\nbelow\n")
    assert "old table" not in text
    readme.write_text("no marks\n")
    assert not frontier.write_readme(lines, readme) and readme.read_text() == "no marks\n"


def test_the_projection_plays_every_phase_forward_and_costs_runs_from_the_records():
    searched = [p for p, spec in frontier.POINTS.items() if "lr_from" not in spec]
    followers = [p for p in frontier.HEART_POINTS if "lr_from" in frontier.POINTS[p]]
    # with no bytes recorded every heartlora point fits every budget and all tie on val: the first candidates win
    more = len(frontier.PEFT_POINTS) + 2  # + heart-bi-lora (the first point) and the first reallocation point
    total = (len(frontier.SELECT_TASKS) * (3 * len(searched) + len(followers)) + len(frontier.POINTS)
             * len(frontier.TASKS) + more * (len(frontier.SEEDS) - 1) * len(frontier.CPU_TASKS))
    got = frontier.projection({"records": []}, {})
    assert got == {"runs": total, "reused": 0, "seconds": 600.0 * total}
    rec = {"id": "cpu/112px-10ep-b32/final/digits/hf-peft_s42", "accuracy": 0.9, "settings": {"lr": 1e-3}}
    data = {"records": [val_rec("vera", frontier.SELECT_TASKS[0], 4e-2, 0.5) | {"wall_s": 100.0}]}
    got = frontier.projection(data, {rec["id"]: rec})
    assert got["reused"] == 1 and got["runs"] == total - 2  # one recorded, one reused
    vals = len(frontier.SELECT_TASKS) * (3 * len(searched) + len(followers))
    # val runs at their median; finals on that task at 1.25 × it (they train on 1,000 images, not 800); others 600 s
    task0 = len(frontier.POINTS) + more * (len(frontier.SEEDS) - 1)  # SELECT_TASKS[0] is a cpu task
    assert got["seconds"] == pytest.approx(100.0 * (vals - 1) + 125.0 * task0 + 600.0 * (total - vals - 1 - task0))
    # a GPU session's merged run costs nothing here: two CPU cores are costed at CPU times only
    data["records"].append(val_rec("vera", frontier.SELECT_TASKS[1], 4e-2, 0.5) | {
        "wall_s": 5.0, "machine": {"device": "cuda"}})
    assert frontier.projection(data, {rec["id"]: rec})["seconds"] == pytest.approx(got["seconds"] - 100.0)


def test_final_runs_reuse_the_suites_record_only_at_the_reference_rate():
    rec = {"id": "cpu/112px-10ep-b32/final/digits/heart-lora_s43", "accuracy": 0.9,
           "settings": {"ne_refine": True, "lr": 1e-3}}
    suite = {rec["id"]: rec}
    assert frontier.suite_record(suite, "digits", "heart-lora", 1e-3, 43) is rec
    assert frontier.suite_record(suite, "digits", "heart-lora", 3e-3, 43) is None  # another rate: run it
    assert frontier.suite_record(suite, "digits", "heart-lora-r10-ne36", 1e-3, 43) is None  # not a suite method
    held = {"heldout/112px-10ep-b32/final/clevr_dist/lora_s42": {"id": "h", "settings": {"lr": 1e-3}}}
    assert frontier.suite_record(held, "clevr_dist", "lora", 1e-3, 42) is held[next(iter(held))]


def test_a_suite_record_made_otherwise_is_not_reused():
    """Suite ids do not name the device, precision, extra flags or the heads-off rule: the record must."""
    base = {"id": "cpu/112px-10ep-b32/final/digits/heart-lora_s42", "accuracy": 0.9,
            "settings": {"precision": "auto", "ne_refine": True, "lr": 1e-3}, "machine": {"gpu": None}}
    variants = {"tf32 on a GPU": {"settings": {"precision": "tf32", "ne_refine": True, "lr": 1e-3},
                                  "machine": {"gpu": "NVIDIA H200"}},
                "extra engine flags": {"engine_flags": ["--drop-path", "0"]},
                "the earlier heads-off rule": {"settings": {"precision": "auto", "ne_refine": None, "lr": 1e-3}},
                "another rate than its id's": {"settings": {"precision": "auto", "ne_refine": True, "lr": 3e-3}},
                "no rate recorded": {"settings": {"precision": "auto", "ne_refine": True}}}
    assert frontier.suite_record({base["id"]: base}, "digits", "heart-lora", 1e-3, 42) is base
    for why, change in variants.items():
        rec = base | change
        assert frontier.suite_record({rec["id"]: rec}, "digits", "heart-lora", 1e-3, 42) is None, why
    lora = {"id": "cpu/112px-10ep-b32/final/digits/lora_s42", "settings": {"precision": "auto", "lr": 1e-3}}
    assert frontier.suite_record({lora["id"]: lora}, "digits", "lora", 1e-3, 42) is lora  # no heads off


def test_only_suite_points_whose_every_extra_seed_is_reused_get_more_seeds():
    data = {"records": []}
    fill_val(data, "heart-bi-lora", lambda lr: 0.7 if lr == 1e-3 else 0.6)
    cells = {f"cpu/112px-10ep-b32/final/{t}/{m}_s{s}": {"id": "x", "settings": {"ne_refine": True, "lr": 1e-3}}
             for t in frontier.CPU_TASKS for s in (43, 44) for m in ("heart-bi-lora", "bi-lora")}
    cells.pop(f"cpu/112px-10ep-b32/final/{frontier.CPU_TASKS[0]}/bi-lora_s44")
    decide = frontier.deciding(data, cells)
    assert "heart-bi-lora" in decide and "bi-lora" not in decide  # one bi-lora cell would have to be trained


def test_runner_records_reused_runs_and_never_reruns_them(tmp_path, monkeypatch):
    monkeypatch.setattr(frontier, "RECORDS", tmp_path / "frontier.json")
    monkeypatch.setattr(frontier, "report", lambda: None)
    suite = {"format": "heartlora-suite-results", "records": []}
    for task in frontier.CPU_TASKS:
        for seed in frontier.SEEDS:
            suite["records"].append({"id": f"cpu/112px-10ep-b32/final/{task}/lora_s{seed}", "task": task,
                                     "seed": seed, "accuracy": 0.8, "accuracy_split": "test", "num_classes": 10,
                                     "adapter_bytes": 589824, "settings": {"bits": 32, "lr": 1e-3}})
    (tmp_path / "results.json").write_text(json.dumps(suite))
    monkeypatch.setattr(frontier, "SUITE_RESULTS", tmp_path / "results.json")
    data = {"format": "heartlora-suite-results", "records": []}
    fill_val(data, "heart-lora", lambda lr: 0.7)
    (tmp_path / "frontier.json").write_text(json.dumps(data))
    started = []
    monkeypatch.setattr(frontier, "launch", lambda *a, **k: started.append(a) or pytest.fail("ran"))
    monkeypatch.setattr(frontier, "plan", lambda d: [it for it in _plan(d) if it[2] == "lora" and it[0] == "final"
                                                      and it[1] in frontier.CPU_TASKS])
    args = frontier.argparse.Namespace(jobs=2, threads=1, max_runs=None, deadline_s=None, device="cpu")
    assert frontier.cmd_run(args) == 0
    recs = {r["id"]: r for r in json.loads((tmp_path / "frontier.json").read_text())["records"]}
    reused = [r for r in recs.values() if r.get("reused_from")]
    assert len(reused) == len(frontier.CPU_TASKS) * len(frontier.SEEDS) and not started
    one = reused[0]
    assert one["adapter_bytes_fp16"] == 589824 // 2 and one["classifier_bytes"] == (768 * 10 + 10) * 4



def test_a_gpu_runs_the_same_protocol_in_fp32_and_its_new_records_merge_into_the_committed_ones(tmp_path,
                                                                                                 monkeypatch):
    """``run --device cuda``: both kinds of run get ``--device cuda --precision fp32`` (the engine would choose
    bf16 or TF32 there) and their records say so, a run found finished but unrecorded too; ``merge`` adds the runs
    the committed file lacks, keeps the committed record of a run both hold, and refuses a file of other runs."""
    import subprocess

    gpu_file = tmp_path / "gpu" / "frontier.json"
    monkeypatch.setattr(frontier, "RECORDS", gpu_file)
    monkeypatch.setattr(frontier, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(frontier, "report", lambda: None)
    items = [("final", "digits", "heart-lora", 1e-3, 42), ("final", "digits", "vera", 0.04, 42),
             ("final", "mnist", "vera", 0.04, 42)]
    monkeypatch.setattr(frontier, "plan", lambda d: [it for it in items if frontier.run_id(*it) not in
                                                     {r["id"] for r in d["records"]}])
    commands = []

    def fake_launch(cmd, log_path, cwd, threads):
        commands.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({
            "task": "digits", "accuracy": 0.9, "accuracy_split": "test", "num_classes": 10, "adapter_bytes": 4096,
            "settings": {"bits": 32}}))
        return subprocess.Popen([sys.executable, "-c", ""]), open(log_path, "a")

    monkeypatch.setattr(frontier, "launch", fake_launch)
    args = frontier.argparse.Namespace(jobs=2, threads=1, max_runs=None, deadline_s=None, device="cuda")
    fake_launch(["--out", str(tmp_path / "runs" / frontier.run_id(*items[2]))], tmp_path / "x.log", None, 1)
    commands.clear()  # that run finished before the driver stopped; its record was never written
    assert frontier.cmd_run(args) == 0
    assert len(commands) == 2
    for cmd in commands:
        assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--precision") + 1] == "fp32"
    assert "--precision" not in frontier.command(*items[0], tmp_path / "x", 1, device="cpu",
                                                 precision=frontier.run_precision("cpu"))
    gpu = json.loads(gpu_file.read_text())["records"]
    assert len(gpu) == 3 and {r["machine"]["device"] for r in gpu} == {"cuda"}
    assert all(r["command"].endswith("--device cuda") for r in gpu)

    committed = tmp_path / "frontier.json"
    mine = {**gpu[0], "accuracy": 0.5}
    committed.write_text(json.dumps({"format": "heartlora-suite-results", "records": [mine]}))
    monkeypatch.setattr(frontier, "RECORDS", committed)
    monkeypatch.setattr(frontier, "PAPER_RECORDS", tmp_path / "frontier-paper.json")
    assert frontier.main(["merge", str(gpu_file)]) == 0
    merged = {r["id"]: r for r in json.loads(committed.read_text())["records"]}
    assert set(merged) == {r["id"] for r in gpu} and merged[mine["id"]]["accuracy"] == 0.5
    assert not (tmp_path / "frontier-paper.json").exists()
    assert frontier.main(["merge", str(gpu_file)]) == 0  # nothing new: nothing changes
    assert json.loads(committed.read_text())["records"] == list(merged.values())
    stray = tmp_path / "suite.json"
    suite_run = {"id": "cpu/112px-10ep-b32/final/digits/lora_s42"}
    stray.write_text(json.dumps({"format": "heartlora-suite-results", "records": [suite_run]}))
    with pytest.raises(SystemExit, match="not frontier runs"):
        frontier.main(["merge", str(stray)])


def test_a_report_from_other_records_never_writes_the_readme(tmp_path, monkeypatch):
    """``--records`` (a GPU session's copy, a scratch file): FRONTIER.md goes to ``--doc``, and the README's table,
    which only the committed records may write, is left as it is even when the table is complete."""
    monkeypatch.setattr(frontier, "readme_lines", lambda *a: ["a complete table"])
    written = []
    monkeypatch.setattr(frontier, "write_readme", lambda lines, path=None: written.append(lines) or True)
    monkeypatch.setattr(frontier, "plot", lambda fin: None)
    monkeypatch.setattr(frontier, "RECORDS", tmp_path / "frontier.json")
    monkeypatch.setattr(frontier, "DOC", tmp_path / "FRONTIER.md")
    frontier.report()
    assert (tmp_path / "FRONTIER.md").is_file() and written == []
    monkeypatch.setattr(frontier, "COMMITTED", tmp_path / "frontier.json")  # the same call on the committed file
    frontier.report()
    assert written == [["a complete table"]]


def test_the_report_counts_the_final_runs_each_kind_of_machine_made():
    cpu = {"machine": {"cpu": "AMD EPYC", "gpu": None}}
    gpu = {"machine": {"cpu": "Xeon", "gpu": "NVIDIA H100", "device": "cuda"}}
    cpu_on_gpu_host = {"machine": {"cpu": "Xeon", "gpu": "NVIDIA H100", "device": "cpu"}}
    assert frontier.hardware_lines({"a": {("t", 42): cpu, ("u", 42): dict(cpu)}}) == []  # one kind: nothing to say
    line = frontier.hardware_lines({"a": {("t", 42): cpu, ("u", 42): gpu}, "b": {("t", 42): cpu_on_gpu_host}})[-1]
    assert line == ("Final runs by machine: 1 on AMD EPYC; 1 on NVIDIA H100 (fp32, backbone weights rounded through "
                    "fp16); 1 on Xeon.")
    lines = frontier.hardware_lines({"a": {("t", 42): cpu}}, [cpu, gpu, dict(gpu)])  # merged GPU val runs
    assert lines == ["", "val200 runs (the rate choices) by machine: 1 on AMD EPYC; 2 on NVIDIA H100 (fp32, backbone "
                         "weights rounded through fp16)."]


def test_the_report_lists_the_final_runs_near_chance_or_whose_loss_went_non_finite():
    ok = {"accuracy": 0.85, "num_classes": 10, "final_train_loss": 0.1, "nonfinite_loss_steps": 0}
    near_chance = {"accuracy": 0.092, "num_classes": 10}  # recorded before the baseline kept its loss
    diverged = {"accuracy": 0.6, "num_classes": 10, "final_train_loss": float("nan"), "nonfinite_loss_steps": 3}
    assert frontier.failed_lines({"a": {("t", 42): ok}}) == []
    rows = frontier.failed_lines({"a": {("t", 42): ok, ("u", 42): near_chance}, "b": {("t", 1): diverged},
                                  "c": {("t", 42): {**ok, "accuracy": 0.2}}})  # 2 × chance: learnt something
    near_chance["examined"] = "diverged at the peak"
    rows = frontier.failed_lines({"a": {("t", 42): ok, ("u", 42): near_chance}, "b": {("t", 1): diverged},
                                  "c": {("t", 42): {**ok, "accuracy": 0.2}}})
    assert rows[-2:] == ["| a | u | 42 | 9.20 (chance 10.0) | not recorded | not recorded | diverged at the peak |",
                         "| b | t | 1 | 60.00 (chance 10.0) | nan | 3 |  |"]
    assert rows[-4].startswith("| point |")


def test_stored_bytes_counts_the_adapter_at_its_dtype_and_fp16_and_the_classifier_apart():
    state = {"base_model.model.dinov2.encoder.layer.0.attention.q_proj.lora_A.weight": torch.zeros(8, 384),
             "base_model.model.vblora_vector_bank": torch.zeros(90, 128),
             "base_model.model.topk_indices": torch.zeros(10, 2, dtype=torch.uint8),
             "base_model.model.classifier.modules_to_save.default.weight": torch.zeros(10, 768),
             "base_model.model.classifier.modules_to_save.default.bias": torch.zeros(10)}
    got = hf_peft.stored_bytes(state)
    assert got == {"adapter_bytes": 8 * 384 * 4 + 90 * 128 * 4 + 20, "adapter_bytes_fp16": 8 * 384 * 2 + 90 * 128 * 2
                   + 20, "classifier_bytes": 7690 * 4, "adapter_tensors": 3}


def test_presets_train_the_classifier_at_their_authors_rate_and_split_their_own_parameters():
    named = [(n, torch.nn.Parameter(torch.zeros(1))) for n in
             ("base_model.model.classifier.modules_to_save.default.weight", "base_model.model.vblora_vector_bank",
              "base_model.model.dinov2.encoder.layer.0.attention.query.vera_lambda_d.default")]
    rates = lambda spec, lr: [(g["lr"], len(g["params"])) for g in hf_peft.rate_groups(named, spec, lr)]  # noqa
    assert rates(hf_peft.PEFT_METHODS["vera"], 0.12) == [(4e-3, 1), (0.12, 2)]  # the head stays at 4e-3
    assert rates(hf_peft.PEFT_METHODS["fourierft"], 0.02) == [(1e-3, 1), (0.02, 2)]
    assert rates(hf_peft.PEFT_METHODS["vblora"], 1e-2) == [(1e-3, 1), (1e-2, 2)]  # the bank at lr / 10
    assert hf_peft.PEFT_METHODS["lora-r4"].get("head_lr") is None  # the plain recipe: one rate for all


def test_scales_and_norms_train_without_weight_decay_and_everything_else_with_adamws_default():
    """(IA)³'s scales and LN tuning's norms change nothing at 1 and at the backbone's values, not at zero: decay would
    pull them off the backbone. With a zero gradient the loop leaves them exactly as they are, while the classifier
    (and every tensor of a LoRA preset) shrinks by AdamW's decay."""
    import argparse as _argparse

    def trained(method):
        scale = torch.nn.Parameter(torch.ones(4))
        head = torch.nn.Parameter(torch.ones(4))
        named = [("base_model.model.dinov2.encoder.layer.0.attention.attention.key.ia3_l.default", scale),
                 ("base_model.model.classifier.modules_to_save.default.weight", head)]
        groups = hf_peft.rate_groups(named, hf_peft.PEFT_METHODS[method], 0.1)
        args = _argparse.Namespace(epochs=1, batch_size=4, lr=0.1, seed=1)
        hf_peft.train_loop(lambda idx: (scale.sum() + head.sum()) * 0, groups, 8, args)
        return scale.detach(), head.detach()

    for method in ("ia3", "ia3-kv", "ln-tuning"):
        scale, head = trained(method)
        assert torch.equal(scale, torch.ones(4)), method
        assert (head < 1).all(), method
    scale, head = trained("lora-r4")
    assert (scale < 1).all() and (head < 1).all()


def test_baseline_refuses_unknown_methods_and_stray_settings(capsys):
    with pytest.raises(SystemExit):
        hf_peft.main(["--task", "digits", "--method", "nope", "--out", "/tmp/x"])
    assert "not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--peft-kwargs goes with"):
        hf_peft.peft_spec("vera", '{"r": 4}')
    with pytest.raises(SystemExit, match="JSON object"):
        hf_peft.peft_spec("peft:LoraConfig", "[1]")
    with pytest.raises(SystemExit):
        hf_peft.main(["--task", "digits", "--method", "vera", "--lr", "nan", "--out", "/tmp/x"])


class Interrupted(Exception):
    pass


def tiny_loop(tmp_path, epochs=3, stop_at_step=None, checkpoint=True, settings="s", seed=5, nan_at=(), losses=None,
              result=None):
    """The baseline's loop on a Linear (AdamW + one-cycle, 3 epochs of 4 steps), interrupted at ``stop_at_step``
    when given, the loss of the steps in ``nan_at`` made NaN (the weights untouched: no gradient); returns the Linear
    and the epoch it started at. ``losses`` (a list) gets each step's loss, ``result`` (a list) what the loop returns.
    """
    import argparse as _argparse

    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    net = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.Dropout(0.3))  # dropout: the random state matters
    net[0].bias.requires_grad_(False)  # a frozen tensor is not part of the checkpoint
    calls = [0]

    def step(idx):
        calls[0] += 1
        if calls[0] == stop_at_step:
            raise Interrupted
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        if calls[0] in nan_at:
            loss = loss * 0 + (loss.detach() * float("nan"))  # NaN, and a zero gradient
        if losses is not None:
            losses.append(float(loss.detach()))
        return loss

    torch.manual_seed(seed)  # the random state a fresh process starts with
    args = _argparse.Namespace(epochs=epochs, batch_size=4, lr=0.1, seed=1)
    out = hf_peft.train_loop(step, [p for p in net.parameters() if p.requires_grad], 16, args, module=net,
                             checkpoint=tmp_path / "checkpoint.pt" if checkpoint else None, settings=settings)
    if result is not None:
        result.append(out)
    return net, out.start


def test_the_baseline_records_its_last_epoch_loss_and_counts_non_finite_losses_across_a_resume(tmp_path):
    """The plain recipe has no guard against a loss that goes NaN; the loop counts such steps (a run that diverged
    is told from one that learnt little) and reports the last epoch's mean loss, as heartlora's engine does. The
    count survives a resume: the NaN in epoch 1 is kept in the checkpoint."""
    losses, result = [], []
    tiny_loop(tmp_path / "a", checkpoint=False, losses=losses, result=result)
    assert result[0].nonfinite_steps == 0
    assert result[0].final_train_loss == pytest.approx(sum(losses[8:]) / 4, rel=1e-6)
    assert losses[8] != losses[0]
    (tmp_path / "b").mkdir()
    with pytest.raises(Interrupted):
        tiny_loop(tmp_path / "b", stop_at_step=10, nan_at=(2, 3))
    losses, result = [], []
    tiny_loop(tmp_path / "b", nan_at=(1,), losses=losses, result=result)  # step 1 of this process: epoch 3's first
    assert result[0].start == 2 and len(losses) == 4
    assert result[0].nonfinite_steps == 3
    assert result[0].final_train_loss != result[0].final_train_loss  # NaN: the last epoch's mean holds the NaN


def test_an_interrupted_baseline_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """The baseline keeps a checkpoint after each epoch but the last; a run stopped in epoch 3 and started again
    (another process: another random state) resumes after epoch 2 and ends with the weights of a run never stopped.
    Without the resume (the checkpoint removed) the second run starts at 0."""
    whole, start = tiny_loop(tmp_path / "a", checkpoint=False)
    assert start == 0
    (tmp_path / "b").mkdir()
    with pytest.raises(Interrupted):
        tiny_loop(tmp_path / "b", stop_at_step=10)  # epoch 3's second step
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed, start = tiny_loop(tmp_path / "b", seed=6)
    assert start == 2
    assert torch.equal(resumed[0].weight, whole[0].weight)
    assert not torch.equal(whole[0].weight, tiny_loop(tmp_path / "a", checkpoint=False, epochs=2)[0][0].weight)


def test_a_baseline_checkpoint_of_another_command_or_altered_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        tiny_loop(tmp_path, stop_at_step=6)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(SystemExit, match="another command") as err:
        tiny_loop(tmp_path, settings="other")
    assert "\n" not in str(err.value)
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="do not match the sha256"):
        tiny_loop(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SystemExit, match="do not match the sha256"):
        tiny_loop(tmp_path)


@pytest.mark.slow
def test_the_baseline_script_resumes_a_folder_and_clears_its_checkpoint(tmp_path, monkeypatch):
    """Wiring: ``main`` on a folder holding an interrupted run's checkpoint resumes it (the metrics say after which
    epoch) to the accuracy of the run never stopped, and removes the checkpoint once metrics.json is written."""
    argv = ["--task", "digits", "--protocol", "val", "--img-size", "28", "--epochs", "3", "--method",
            "linear-probe", "--threads", "1", "--seed", "1"]
    whole = hf_peft.main([*argv, "--out", str(tmp_path / "whole")])
    assert "resumed_after_epoch" not in whole
    real = hf_peft.write_checkpoint

    def write_then_stop(path, state):
        if state["epoch"] == 2:
            assert 0 < state["wall_s"] < 1000
            real(path, {**state, "wall_s": 1000.0})  # as if the first process had taken 1,000 s
            raise Interrupted
        real(path, state)

    monkeypatch.setattr(hf_peft, "write_checkpoint", write_then_stop)
    with pytest.raises(Interrupted):
        hf_peft.main([*argv, "--out", str(tmp_path / "cut")])
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = hf_peft.main([*argv, "--out", str(tmp_path / "cut")])
    assert resumed["resumed_after_epoch"] == 2 and resumed["accuracy"] == whole["accuracy"]
    assert 1000 < resumed["wall_s"] < 1000 + whole["wall_s"] * 5  # both processes' time, not the last one's only
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_peft_checkpoint_resumes_only_under_the_preset_it_was_trained_with(tmp_path, monkeypatch):
    """A PEFT run's checkpoint names its config and optimizer groups: after the preset's classifier rate changes in
    the code, resuming it is refused (it would train on at the old rates while the record names the new); under the
    preset it was made with, it resumes. A half-written temporary file a killed run left is removed."""
    argv = ["--task", "digits", "--protocol", "val", "--img-size", "28", "--epochs", "2", "--method", "lora-r1",
            "--threads", "1", "--seed", "1", "--out", str(tmp_path / "run")]
    real = hf_peft.write_checkpoint

    def write_then_stop(path, state):
        real(path, state)
        raise Interrupted

    monkeypatch.setattr(hf_peft, "write_checkpoint", write_then_stop)
    with pytest.raises(Interrupted):
        hf_peft.main(argv)
    monkeypatch.setattr(hf_peft, "write_checkpoint", real)
    (tmp_path / "run" / ".checkpoint.pt.999.tmp").write_bytes(b"half")
    monkeypatch.setitem(hf_peft.PEFT_METHODS, "lora-r1", {**hf_peft.PEFT_METHODS["lora-r1"], "head_lr": 1e-2})
    with pytest.raises(SystemExit, match=r"a checkpoint of another command \(it differs in peaks\)"):
        hf_peft.main(argv)
    monkeypatch.undo()
    m = hf_peft.main(argv)
    assert m["resumed_after_epoch"] == 1 and m["peak_lrs"] == [1e-3]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json"]


@pytest.mark.slow
def test_a_peft_method_with_two_rates_trains_and_reports_its_bytes(tmp_path):
    """VB-LoRA (its bank at lr/10, its logits at lr) on digits at 28 px, one epoch: the run finishes, learns more
    than chance, and counts the bank and the top-k weights it stores, not the full logits it trained."""
    out = tmp_path / "vb"
    m = hf_peft.main(["--task", "digits", "--protocol", "val", "--img-size", "28", "--epochs", "1", "--method",
                      "vblora", "--out", str(out), "--threads", "1", "--seed", "1"])
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["settings"]["lr"] == 1e-2 and m["peft_config"] == "VBLoRAConfig"
    assert m["peak_lrs"] == pytest.approx([1e-3, 1e-2])
    assert m["accuracy"] > 0.2  # 10 classes
    bank = 90 * 128 * 4
    assert bank < m["adapter_bytes"] < bank + 24 * 4 * 3 * 2 * 2 * 8 * 2  # bank + top-2 weights and indices
    assert m["trainable_params"] > m["adapter_bytes"] // 4  # the full logits train; only the top-k are kept
    assert m["classifier_bytes"] == (768 * 10 + 10) * 4


def test_the_shared_pool_runs_jobs_at_a_time_records_failures_and_stops_at_its_limit(tmp_path):
    """heartlora_bench.runner (suite.py's and frontier.py's loop): at most ``jobs`` processes, a failed run is not
    retried by the same call, a start that needs no process is skipped, and may_start stops new starts."""
    import sys as _sys

    from heartlora_bench import runner

    codes = {"a": 0, "b": 3, "c": 0, "skip": None}
    live, peak, done = [], [0], {}

    def start(key, item):
        if codes[key] is None:
            return None
        live.append(key)
        peak[0] = max(peak[0], len(live))
        cmd = [_sys.executable, "-c", f"import time, sys; time.sleep(0.2); sys.exit({codes[key]})"]
        return runner.launch(cmd, tmp_path / f"{key}.log", tmp_path, 1)

    def finish(key, item, returncode, seconds):
        live.remove(key)
        done[key] = returncode
        return returncode == 0

    ready = lambda: [(k, None) for k in codes if k not in done]  # noqa: E731
    started, failed = runner.run_pool(ready, start, finish, jobs=2, poll_s=lambda: 0.02)
    assert started == 3 and failed == {"b"} and done == {"a": 0, "b": 3, "c": 0} and peak[0] == 2
    done.clear()
    started, failed = runner.run_pool(ready, start, finish, jobs=2, poll_s=lambda: 0.02,
                                      may_start=runner.start_limit(1, None))
    assert started == 1 and len(done) == 1
    assert runner.start_limit(None, 0.0)(0) is False and runner.start_limit(None, None)(10**6) is True


def test_the_pool_reads_ready_again_when_a_pass_only_recorded_runs(tmp_path):
    """A start that records without a process (a reused record) can open new runs: the pool must not stop there."""
    import sys as _sys

    from heartlora_bench import runner

    recorded, ran = set(), []

    def ready():
        return [("reuse", None)] if "reuse" not in recorded else [("train", None)] if not ran else []

    def start(key, item):
        if key == "reuse":
            recorded.add(key)
            return None
        ran.append(key)
        return runner.launch([_sys.executable, "-c", "pass"], tmp_path / f"{key}.log", tmp_path, 1)

    started, failed = runner.run_pool(ready, start, lambda *a: True, jobs=2, poll_s=lambda: 0.02)
    assert started == 1 and ran == ["train"] and not failed


def test_the_paper_protocol_runs_every_chosen_point_task_by_task_at_the_cpu_choice(tmp_path):
    data = settled_data({}, {}, {})  # every rate chosen (the reference wins)
    val = frontier.val_index(data)
    items = frontier.paper_plan(data, {"records": []})
    points = list(frontier.POINTS)
    assert len(items) == len(frontier.TASKS) * len(points)
    assert items[:len(points)] == [(frontier.TASKS[0], p, frontier.choose_lr(p, val)[0]) for p in points]
    assert [t for t, _, _ in items[::len(points)]] == list(frontier.TASKS)  # the cpu tasks first, then heldout
    # a recorded run is not planned again; a point whose rate is not chosen yet is not planned at all
    task, point, lr = items[0]
    done = {"records": [{"id": frontier.paper_id(task, point, lr)}]}
    assert items[0] not in frontier.paper_plan(data, done) and len(frontier.paper_plan(data, done)) == len(items) - 1
    open_rate = {"records": [r for r in data["records"] if r["frontier_point"] != "vera"]}
    assert not any(p == "vera" for _, p, _ in frontier.paper_plan(open_rate, {"records": []}))

    peft = frontier.paper_command("digits", "vera", 0.04, tmp_path / "a", "cuda", "bf16", 2)
    assert peft[:2] == [sys.executable, str(frontier.BASELINE)] and peft[peft.index("--method") + 1] == "vera"
    assert {"--img-size=224", "--epochs=100", "--batch-size=64"} <= set(peft)
    assert peft[peft.index("--device") + 1] == "cuda" and peft[peft.index("--precision") + 1] == "bf16"
    assert peft[peft.index("--lr") + 1] == "0.04" and peft[peft.index("--seed") + 1] == "42"
    engine = frontier.paper_command("digits", "heart-lora", 1e-3, tmp_path / "b", "cuda", "bf16", 2)
    assert engine[1:4] == ["-m", "heartlora", "train"] and engine[engine.index("--profile") + 1] == "paper"
    assert "--resume" not in engine and "--overwrite" not in engine
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"x")
    assert frontier.paper_command("digits", "heart-lora", 1e-3, tmp_path / "b", "cuda", "bf16", 2)[-1] == "--resume"


def test_the_paper_table_compares_means_over_the_tasks_every_point_has():
    def rec(point, task, acc, nbytes):
        return {"id": frontier.paper_id(task, point, 1e-3), "frontier_point": point, "task": task, "accuracy": acc,
                "adapter_bytes_fp16": nbytes, "machine": {"gpu": "NVIDIA H100"}, "settings": {"precision": "bf16"}}

    a, b = frontier.CPU_TASKS[:2]
    paper = {"records": [rec("lora-r8", a, 0.80, 294_912), rec("lora-r8", b, 0.60, 294_912),
                         rec("heart-bi-lora", a, 0.70, 15_000)]}
    lines = frontier.paper_lines(paper)
    assert any(f"Mean over the 1 task(s) every point below has run ({a})" in x for x in lines)
    assert "| lora-r8 | 294,912 | 80.0 | 2 | NVIDIA H100, bf16 |" in lines  # task b left out of the mean
    assert "| heart-bi-lora | 15,000 | 70.0 | 1 | NVIDIA H100, bf16 |" in lines
    assert frontier.paper_lines({"records": []}) == []


def test_finish_by_is_the_next_time_the_clock_reads_it_and_refuses_other_text():
    now = frontier.time.mktime((2026, 12, 7, 6, 0, 0, 0, 0, -1))
    assert frontier.finish_by("08:40", now) - now == 2 * 3600 + 40 * 60
    assert frontier.finish_by("04:30", now) - now == 22 * 3600 + 30 * 60  # passed today: tomorrow's
    assert frontier.finish_by(None, now) is None
    with pytest.raises(SystemExit, match="that was 30 min ago"):  # a slip, not tomorrow
        frontier.finish_by("05:30", now)
    for bad in ("8", "25:00", "08:60", "soon"):
        with pytest.raises(SystemExit, match="give a local time as HH:MM"):
            frontier.finish_by(bad, now)


def test_finish_by_starts_only_runs_expected_to_end_in_time_scaled_by_this_machines_speed():
    clock = [1000.0]
    data = {"records": [val_rec("vera", "dsprites_loc", 4e-2, 0.5) | {"wall_s": 600.0},
                        val_rec("vera", "fashion_mnist@4shot", 4e-2, 0.5) | {"wall_s": 150.0}]}
    fit = frontier.Fit(until=2000.0, cost=frontier.wall_model(data), clock=lambda: clock[0])
    full = ("val", "dsprites_loc", "ia3", 3e-3, 42)
    short = ("val", "fashion_mnist@4shot", "ia3", 3e-3, 42)
    final = ("final", "dsprites_loc", "ia3", 3e-3, 42)  # no final yet: the task's val median × 1.25
    assert fit.expected(final) == 750.0 and fit(full) and fit(final)
    clock[0] = 1300.0
    assert fit(full) and not fit(final)
    fit.finished(full, 900.0)  # this machine took 1.5 × the records' time
    assert fit.expected(full) == 900.0 and not fit(full) and fit(short)
    assert frontier.Fit(until=None)(final)


def test_the_wall_model_times_final_runs_by_the_suites_runs_of_the_same_schedule():
    data = {"records": [val_rec("vera", "mnist", 4e-2, 0.5) | {"wall_s": 600.0}]}
    suite = {"cpu/112px-10ep-b32/final/mnist/heart-lora_s42": {"wall_s": 1000.0, "machine": {"cpu": "x"}},
             "heldout/112px-10ep-b32/final/mnist/lora_s43": {"wall_s": 1200.0},
             "cpu/112px-10ep-b32/val/mnist/lora_s42": {"wall_s": 9.0},  # not a final
             "quick/42px-3ep-b32/final/mnist/lora_s42": {"wall_s": 9.0},  # another schedule
             "cpu/112px-10ep-b32/final/mnist/lora_s44": {"wall_s": 9.0, "machine": {"gpu": "H100", "device": "cuda"}}}
    final = ("final", "mnist", "ia3", 3e-3, 42)
    assert frontier.wall_model(data)(final) == 750.0  # the task's val median × 1.25
    assert frontier.wall_model(data, suite)(final) == 1100.0  # the whole test split's evaluation included
    assert frontier.wall_model(data, suite)(("val", "mnist", "ia3", 3e-3, 42)) == 600.0


def test_a_driver_with_finish_by_starts_no_run_that_would_end_too_late(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(frontier, "RECORDS", tmp_path / "frontier.json")
    monkeypatch.setattr(frontier, "report", lambda: None)
    data = {"format": "heartlora-suite-results",
            "records": [val_rec("vera", "dsprites_loc", 4e-2, 0.5) | {"wall_s": 3600.0},
                        val_rec("vera", "fashion_mnist@4shot", 4e-2, 0.5) | {"wall_s": 60.0}]}
    (tmp_path / "frontier.json").write_text(json.dumps(data))
    started = []
    monkeypatch.setattr(frontier, "launch", lambda cmd, *a, **k: started.append(cmd) or pytest.fail("ran"))
    monkeypatch.setattr(frontier, "plan", lambda d: [("val", "dsprites_loc", "ia3", 3e-3, 42)])
    later = frontier.time.strftime("%H:%M", frontier.time.localtime(frontier.time.time() + 1800))
    args = frontier.argparse.Namespace(jobs=2, threads=1, max_runs=None, deadline_s=None, device="cpu",
                                       finish_by=later)
    assert frontier.cmd_run(args) == 0 and not started
    out = capsys.readouterr().out
    assert "starting only runs expected to end by" in out and "(in 0.5 h)" in out
    assert f"1 ready (1 of them would not end by {later})" in out


def test_a_resumed_run_does_not_set_the_machines_speed(tmp_path, monkeypatch):
    """A run resumed from its checkpoint takes a fraction of a whole run's time: it must not make every later run
    look short. Two runs finish in 60 s each against an expected 600 s; only the one trained from scratch counts."""
    monkeypatch.setattr(frontier, "RECORDS", tmp_path / "frontier.json")
    monkeypatch.setattr(frontier, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(frontier, "report", lambda: None)
    (tmp_path / "frontier.json").write_text(json.dumps({"format": "heartlora-suite-results", "records": [
        val_rec("vera", "dsprites_loc", 4e-2, 0.5) | {"wall_s": 600.0}]}))
    items = [("val", "dsprites_loc", "ia3", lr, 42) for lr in (1e-3, 3e-3)]
    (tmp_path / "runs" / frontier.run_id(*items[0])).mkdir(parents=True)
    (tmp_path / "runs" / frontier.run_id(*items[0]) / "checkpoint.pt").write_bytes(b"x")
    monkeypatch.setattr(frontier, "plan", lambda d: [it for it in items if frontier.run_id(*it) not in
                                                     {r["id"] for r in d["records"]}])
    monkeypatch.setattr(frontier, "launch", lambda *a, **k: (None, None))
    monkeypatch.setattr(frontier, "ended_run", lambda runs, run, rc: {"accuracy": 0.5, "accuracy_split": "val200",
                                                                      "adapter_bytes": 10, "adapter_bytes_fp16": 5,
                                                                      "classifier_bytes": 4})
    fits = []
    real_fit = frontier.Fit
    monkeypatch.setattr(frontier, "Fit", lambda *a, **k: fits.append(real_fit(*a, **k)) or fits[-1])

    def pool(ready, start, finish, **kw):
        for key, item in ready():
            start(key, item)
            finish(key, item, 0, 60.0)
        return 2, set()

    monkeypatch.setattr(frontier, "run_pool", pool)
    args = frontier.argparse.Namespace(jobs=2, threads=1, max_runs=None, deadline_s=None, device="cpu")
    assert frontier.cmd_run(args) == 0
    assert fits[0].ratios == [0.1]


def test_the_val200_preview_compares_each_peft_method_with_heartloras_best_point_at_no_more_bytes():
    data = {"records": []}
    accs = {"heart-bi-lora": 0.70, "heart-lora-r2": 0.74, "heart-lora": 0.72, "vera": 0.75, "ia3-kv": 0.69,
            "lora-r4": 0.71}
    nbytes = {"heart-bi-lora": 15_000, "heart-lora-r2": 40_000, "heart-lora": 180_000, "vera": 30_720,
              "ia3-kv": 14_000, "lora-r4": 147_456}
    for point, acc in accs.items():
        fill_val(data, point, lambda lr, acc=acc: acc if lr == frontier.POINTS[point]["lr"] else acc - 0.1)
    for r in data["records"]:
        r["adapter_bytes_fp16"] = nbytes[r["frontier_point"]]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in frontier.val_lines(data, frontier.val_index(data)) if line.startswith("| ")}
    assert rows["vera"][1:] == ["30,720", "75.0", "heart-bi-lora", "70.0", "-5.0 |"]
    # at 147 KB both float points fit: the better val200 one, not the bigger one
    assert rows["lora-r4"][3:] == ["heart-lora-r2", "74.0", "+3.0 |"]
    assert rows["ia3-kv"][3] == "none fits" and rows["heart-lora"][1:3] == ["180,000", "72.0"]
    assert frontier.val_lines({"records": []}, {}) == []


def test_every_peft_preset_starts_as_the_backbone_it_adapts():
    """A preset whose adapter changes the backbone at its start measures how fast it recovers, not the method: at
    DINOv2-S's width (384) FourierFT's default random spectrum at scaling 300 (PEFT's value for ViT-B/L) changed each
    q and v weight by about twice its size. Every preset the frontier runs starts within 1 % (cosine of the
    classifier's input features) of the backbone, on a random 2-layer DINOv2 of that width."""
    import peft
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536,
                          image_size=56, patch_size=14, num_labels=3)
    images = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8)
    base = Dinov2ForImageClassification(config).eval()
    reference = hf_peft.features(base, images, torch.device("cpu"))
    for point in frontier.PEFT_POINTS:
        spec = hf_peft.peft_spec(frontier.POINTS[point]["peft"], None)
        model = Dinov2ForImageClassification(config).eval()
        model.load_state_dict(base.state_dict())
        model = peft.get_peft_model(model, getattr(peft, spec["cls"])(**spec["kwargs"](model),
                                                                      modules_to_save=["classifier"])).eval()
        got = hf_peft.features(model.base_model.model, images, torch.device("cpu"))
        cos = torch.nn.functional.cosine_similarity(got, reference, dim=1).min().item()
        assert cos > 0.99, (point, cos)


def test_supersede_moves_a_points_records_and_run_folders_aside_so_that_run_makes_them_again(tmp_path, monkeypatch):
    from heartlora_bench import load_results, save_results

    records, runs = tmp_path / "frontier.json", tmp_path / "runs"
    monkeypatch.setattr(frontier, "RECORDS", records)
    monkeypatch.setattr(frontier, "SUPERSEDED", tmp_path / "frontier_superseded.json")
    monkeypatch.setattr(frontier, "RUNS", runs)
    paper = tmp_path / "frontier-paper.json"
    monkeypatch.setattr(frontier, "PAPER_RECORDS", paper)
    kept = val_rec("vera", "dsprites_loc", 4e-2, 0.7)
    old = [val_rec("fourierft", t, 2e-1, 0.5) for t in frontier.SELECT_TASKS]
    on_gpu = {"id": frontier.paper_id("digits", "fourierft", 2e-1), "frontier_point": "fourierft", "task": "digits",
              "frontier_lr": 2e-1, "accuracy": 0.9}  # the paper protocol's run of the old recipe goes too
    save_results({"format": load_results(records)["format"], "records": [kept, *old]}, records)
    save_results({"format": load_results(records)["format"], "records": [on_gpu]}, paper)
    for rec in (kept, *old, on_gpu):
        (runs / rec["id"]).mkdir(parents=True)
        (runs / rec["id"] / "metrics.json").write_text("{}")  # what `run` would read back as this run's result
        (runs / f"{rec['id']}.log").write_text("log")
    with pytest.raises(SystemExit, match="unknown point 'nope'"):
        frontier.main(["supersede", "nope", "--why", "x"])
    with frontier.driver_lock("run"):  # a `run` at work: a run of the point in progress would come back
        with pytest.raises(SystemExit, match=r"supersede: a `frontier.py run` is working .*pid \d+.*stop it first"):
            frontier.main(["supersede", "fourierft", "--why", "x"])
        with pytest.raises(SystemExit, match="run: a `frontier.py run` is working"):  # nor a second driver
            frontier.main(["run", "--jobs", "1", "--max-runs", "0"])
    assert len(load_results(records)["records"]) == 1 + len(old)  # nothing moved
    frontier.main(["supersede", "fourierft", "--why", "spectrum starts at zero"])
    assert load_results(records)["records"] == [kept] and load_results(paper)["records"] == []
    moved = load_results(tmp_path / "frontier_superseded.json")["records"]
    assert sorted(r["id"].split("@20")[0] for r in moved) == sorted(r["id"] for r in (*old, on_gpu))
    assert not (runs / on_gpu["id"]).exists()
    assert all(r["superseded"] == "spectrum starts at zero" and r["superseded_at"] for r in moved)
    assert all(not (runs / r["id"]).exists() and not (runs / f"{r['id']}.log").exists() for r in old)
    assert (runs / kept["id"] / "metrics.json").exists()
    aside = list((runs / "superseded").glob("*/" + old[0]["id"] + "/metrics.json"))
    assert len(aside) == 1 and aside[0].parent.with_name(aside[0].parent.name + ".log").exists()
    # the point's rate search starts again: every rate of its first grid is to run
    assert frontier.choose_lr("fourierft", frontier.val_index(load_results(records)))[1] == frontier.grid(2e-1)
    with pytest.raises(SystemExit, match="holds no record of fourierft"):
        frontier.main(["supersede", "fourierft", "--why", "again"])
    # the new recipe's runs, superseded in turn: both batches are kept, under ids of their own
    (runs / frontier.TAG / "val" / "dsprites_loc" / "fourierft_lr0.6_s42").mkdir(parents=True)  # one never recorded
    monkeypatch.setattr(frontier.time, "strftime", lambda fmt, t=None: "2999-01-01T00:00:00Z")
    save_results({"format": load_results(records)["format"], "records": [kept, *old]}, records)
    frontier.main(["supersede", "fourierft", "--why", "second"])
    moved = load_results(tmp_path / "frontier_superseded.json")["records"]
    assert len(moved) == 2 * len(old) + 1 and len({r["id"] for r in moved}) == len(moved)
    assert not list((runs / frontier.TAG).glob("*/*/fourierft_*"))  # the unrecorded folder went aside too
    # a GPU session's copy made before the point was superseded merges nothing of it
    gpu = tmp_path / "gpu.json"
    save_results({"format": load_results(records)["format"],
                  "records": [{**old[0], "recorded_at": "2026-01-01T00:00:00Z"}]}, gpu)
    monkeypatch.setattr(frontier, "PAPER_RECORDS", tmp_path / "paper.json")
    frontier.main(["merge", str(gpu)])
    assert load_results(records)["records"] == [kept]
