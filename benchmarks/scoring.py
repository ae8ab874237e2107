"""How many optimizer steps does scoring need? (issue 11, the paper's open question Q2), and does the Taylor score
predict what switching a head off really costs?

Per task and seed: LoRA on every head trains through the full warmup (``--warmup-epochs`` of ``--epochs``' LR
schedule, as ``heartlora train`` would), and the head ranking (``ResponsivenessTracker.scores()``) is recorded after
1, 2, 4, … steps up to the whole warmup. Each snapshot is compared with the full-warmup ranking (Kendall τ, and the
Jaccard overlap of the ``--ne`` heads it would switch off, ``heartlora_bench.stability``); the full-warmup
rankings of different seeds of one task are compared with each other too: the noise floor a budget has to reach.
Then, for ``--sample-heads`` heads, the val200 loss change when that head alone is switched off after warmup,
against its Taylor score (Spearman ρ per task).

One JSON record per (task, seed) in ``--out`` (resumable: done records are skipped), a summary and two plots
(``<out>.stability.png``, ``<out>.effect.png``). CPU-hours at real settings; ``--smoke`` checks the script in a
minute:

    .venv/bin/python benchmarks/scoring.py --tasks digits,mnist --seeds 1,2,3 --out runs/scoring/records.json
    .venv/bin/python benchmarks/scoring.py --smoke --out /tmp/scoring-smoke.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heartlora._paths import atomic_path
from heartlora.backbones import create_backbone
from heartlora.data import get_task
from heartlora.engine.trainer import make_schedule
from heartlora_bench import group_of
from heartlora_bench.stability import (
    doubling_steps,
    group_correlations,
    heatmap_grid,
    normalised,
    pairwise,
    spearman,
    stability_curve,
)
from heartlora.method import HeartLoRAConfig, ResponsivenessTracker, attach, deactivate_heads

SMOKE = {"tasks": "digits", "seeds": "1,2", "backbone": "test_vit", "pretrained": False, "img_size": 32,
         "epochs": 10, "warmup_epochs": 1, "batch_size": 32, "ne": 3, "sample_heads": 4, "train_images": 128}


def _scores(tracker: ResponsivenessTracker) -> dict[str, list[float]]:
    return {k: [float(x) for x in v] for k, v in tracker.scores().items()}


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    total = sum(float(nn.functional.cross_entropy(model(x[i:i + batch].float() / 255), y[i:i + batch],
                                                  reduction="sum")) for i in range(0, len(x), batch))
    return total / len(x)


def run_one(task_name: str, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    """Warmup with snapshots, then the switch-off effect of a sample of heads."""
    task = get_task(task_name)
    x, y = task.load("train800", img_size=a.img_size, seed=seed)
    if a.train_images:
        x, y = x[:a.train_images], y[:a.train_images]
    vx, vy = task.load("val200", img_size=a.img_size, seed=seed)
    torch.manual_seed(seed)
    model = create_backbone(a.backbone, num_classes=task.num_classes, img_size=a.img_size, pretrained=a.pretrained)
    attach(model, HeartLoRAConfig(targets=("q", "v"), rank=8, scale=a.scale))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-4)
    per_epoch = math.ceil(len(x) / a.batch_size)
    warmup = a.warmup_epochs * per_epoch
    sched = make_schedule(opt, warmup, a.epochs * per_epoch, 0.01)
    tracker = ResponsivenessTracker(model)
    wanted, snaps, step, t0 = set(doubling_steps(warmup)), [], 0, time.perf_counter()
    model.train()
    for epoch in range(a.warmup_epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for i in range(per_epoch):
            idx = perm[i * a.batch_size:(i + 1) * a.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx].float() / 255), y[idx])
            loss.backward()
            tracker.update()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step in wanted:
                snaps.append((step, _scores(tracker)))
    full = snaps[-1][1]
    base = _loss(model, vx, vy, a.batch_size)
    heads = [(n, h) for n, v in full.items() for h in range(len(v))]
    pick = torch.randperm(len(heads), generator=torch.Generator().manual_seed(seed))[:a.sample_heads].tolist()
    effect = []
    for j in sorted(pick):
        name, h = heads[j]
        probe = copy.deepcopy(model)
        deactivate_heads(probe, heads=[(name, h)])
        effect.append({"layer": name, "head": h, "taylor": full[name][h],
                       "loss_change": _loss(probe, vx, vy, a.batch_size) - base})
    rho = (spearman({"s": [e["taylor"] for e in effect]}, {"s": [e["loss_change"] for e in effect]})
           if len(effect) > 2 else None)
    return {"task": task_name, "seed": seed, "warmup_steps": warmup, "ne": a.ne, "snapshots": snaps,
            "curve": stability_curve(snaps, full, a.ne), "val_loss": base, "effect": effect,
            "effect_spearman": rho, "seconds": time.perf_counter() - t0}


def summarize(records: list[dict[str, Any]], ne: int) -> dict[str, Any]:
    """Per task: the mean curve over seeds, the seed-to-seed floor of the full rankings, and the smallest budget
    whose mean Jaccard reaches that floor."""
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in records}):
        rs = [r for r in records if r["task"] == task]
        steps = [row["steps"] for row in rs[0]["curve"]]
        mean = {k: [sum(r["curve"][i][k] for r in rs) / len(rs) for i in range(len(steps))]
                for k in ("kendall", "jaccard")}
        pairs = pairwise({str(r["seed"]): r["snapshots"][-1][1] for r in rs}, ne) if len(rs) > 1 else []
        floor = {k: sum(p[k] for p in pairs) / len(pairs) for k in ("kendall", "jaccard")} if pairs else None
        # a snapshot whose ranking is undefined (every score equal: after one step B is still zero, so every head
        # of a q/v projection scores 0) does not count, whatever its tie order happens to overlap
        enough = next((s for s, j, k in zip(steps, mean["jaccard"], mean["kendall"])
                       if floor and not math.isnan(k) and j >= floor["jaccard"]), None)
        rhos = [r["effect_spearman"] for r in rs if r["effect_spearman"] is not None]
        out[task] = {"steps": steps, "mean": mean, "seed_floor": floor, "smallest_budget_at_floor": enough,
                     "warmup_steps": steps[-1], "effect_spearman_mean": sum(rhos) / len(rhos) if rhos else None}
    return out


def by_group(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Q1: the full-warmup rankings compared between tasks of one group, of different groups, and (the noise floor)
    between seeds of one task (``heartlora_bench.stability.group_correlations``); and each task's share of
    responsiveness by depth (the layers in three equal parts), mean over its seeds."""
    runs = {(r["task"], r["seed"]): r["snapshots"][-1][1] for r in records}
    depth: dict[str, Any] = {}
    for task in sorted({t for t, _ in runs}):
        layers = [normalised(s)["layers"] for (t, _), s in runs.items() if t == task]
        mean = sum(layers) / len(layers)
        third = len(mean) / 3
        depth[task] = {"group": group_of(task), "seeds": len(layers),
                       "thirds": [float(mean[round(i * third):round((i + 1) * third)].sum()) for i in range(3)]}
    return {"correlations": group_correlations(runs, group_of), "depth_share": depth}


def plot_groups(records: list[dict[str, Any]], out: Path) -> Path:
    """One layers × heads panel per task: its mean normalised responsiveness over seeds."""
    panels = {}
    for task in sorted({r["task"] for r in records}):
        rs = [r["snapshots"][-1][1] for r in records if r["task"] == task]
        heads = sum(normalised(s)["heads"] for s in rs) / len(rs)
        rows, i = {}, 0
        for name, v in rs[0].items():
            rows[name] = [float(x) for x in heads[i:i + len(v)]]
            i += len(v)
        panels[f"{task}\n{group_of(task)}, {len(rs)} seeds"] = (rows, {})
    return heatmap_grid(out.with_suffix(".groups.png"), panels, title="full-warmup responsiveness by task")


def plot(summary: dict[str, Any], records: list[dict[str, Any]], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for task, s in summary.items():
        for ax, key in zip(axes, ("kendall", "jaccard")):
            line = ax.plot(s["steps"], s["mean"][key], marker="o", label=task)[0]
            if s["seed_floor"]:
                ax.axhline(s["seed_floor"][key], color=line.get_color(), linestyle="--", linewidth=0.8)
    for ax, key in zip(axes, ("Kendall τ vs full warmup", "Jaccard of switched-off set vs full warmup")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("scoring steps")
        ax.set_title(key + " (dashed: seed-to-seed)", fontsize=9)
    axes[0].legend(fontsize=7)
    paths = [out.with_suffix(".stability.png"), out.with_suffix(".effect.png")]
    with atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    for task in summary:
        e = [x for r in records if r["task"] == task for x in r["effect"]]
        ax.scatter([x["taylor"] for x in e], [x["loss_change"] for x in e], label=task, s=12)
    ax.set_xlabel("Taylor responsiveness (full warmup)")
    ax.set_ylabel("val200 loss change, head switched off")
    ax.legend(fontsize=7)
    with atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return paths


# What --suite-check can compare: the setting the two sides differ in, its default (the `against` side), and how
# the table names the two sides.
CHECKS: dict[str, dict[str, Any]] = {
    # score_steps: any budget against none; the count may differ (--ne auto is refused after a short probe)
    "score_steps": {"default": None, "value": None, "free": ("ne", "ne_fraction", "ne_tolerance"),
                    "a": "full warmup", "b": "probe",
                    "title": "Heart-LoRA with a {values}-step scoring probe against the full warmup",
                    "what": "the full warmup's at ne auto, the probe's at its fixed count"},
    # score_mode: the random control against the Taylor ranking at the same count of heads
    "score_mode": {"default": "abs_sum", "value": "random", "free": (), "a": "Taylor", "b": "random",
                   "title": "Heart-LoRA: heads switched off at random ({values}) against the Taylor ranking",
                   "what": "the same count of heads off, chosen by the Taylor score or at random"},
}


def suite_check(check: Path, against: Path, dest: Path | None, key: str = "score_steps") -> str:
    """The accuracy check of a change to how heads are chosen: the ``cpu`` suite's heart-lora final runs of
    ``against`` (``key`` at its default) paired by task and seed with the same runs of ``check`` made with another
    ``key``: a scoring budget (``score_steps``, issue 11: a results file of ``suite.py run --profile cpu --methods
    heart-lora --engine-flags '{"*": ["--score-steps", "N", "--ne", "K"]}'``, a fixed count since --ne auto is
    refused after a probe shorter than the warmup) or the random-ranking control (``score_mode`` random against
    abs_sum at the same --ne). Test accuracy, as the suite reports it; nothing is chosen from it."""
    import statistics

    spec = CHECKS[key]

    def final(path: Path, changed: bool) -> dict[tuple[str, int], dict[str, Any]]:
        recs = json.loads(path.read_text())["records"]
        return {(r["task"], r["seed"]): r for r in recs
                if r.get("profile") == "cpu" and r.get("suite_method") == "heart-lora" and r.get("role") == "final"
                and (is_changed(r["settings"].get(key, spec["default"])) == changed)}

    def is_changed(v: Any) -> bool:  # the one value the check asks for, else any but the default
        return v == spec["value"] if spec["value"] is not None else v != spec["default"]

    base, probe = final(against, False), final(check, True)
    # every setting but the compared one must match (precision may differ: a GPU's TF32 against a CPU's fp32, shown)
    free = {"task", "seed", key, "precision", *spec["free"]}  # the count, where free, is shown

    def same(k: tuple[str, int]) -> bool:
        x, y = base[k]["settings"], probe[k]["settings"]
        return all(x.get(f) == y.get(f) for f in (set(x) | set(y)) - free)

    pairs = sorted(k for k in set(base) & set(probe) if same(k))
    if not pairs:
        raise SystemExit(f"no task and seed has both a heart-lora run with the default {key} in {against} and one "
                         f"with another {key} in {check} with the same settings (all but {', '.join(sorted(free))})")
    values = [str(v) for v in sorted({probe[k]["settings"][key] for k in pairs})]
    la, lb = spec["a"], spec["b"]
    lines = [f"# {spec['title'].format(values='/'.join(values))}", "",
             (f"Made by `python benchmarks/scoring.py --suite-check {check} --against {against}"
              + (f" --differ-in {key}" if key != "score_steps" else "") + "`: the `cpu` suite's "
              f"heart-lora final runs (test accuracy %; {spec['what']}) "
              f"paired by task and seed; every setting equal but {key}, the count (heads off, listed) and the "
              "precision (listed). ± is the sample std over seeds."),
             "", f"| task | seeds | {la} | {lb} | {lb} − {la} | heads off ({la} → {lb}) | precision |",
             "|---|---|---|---|---|---|---|"]

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")

    for task in sorted({t for t, _ in pairs}):
        ks = [k for k in pairs if k[0] == task]
        a = [100 * base[k]["accuracy"] for k in ks]
        b = [100 * probe[k]["accuracy"] for k in ks]
        off = ", ".join(f"{base[k]['heads_off_count']}→{probe[k]['heads_off_count']}" for k in ks)
        prec = ", ".join(sorted({f"{base[k]['settings'].get('precision')}→{probe[k]['settings'].get('precision')}"
                                 for k in ks}))
        lines.append(f"| {task} | {len(ks)} | {ms(a)} | {ms(b)} | {statistics.mean(y - x for x, y in zip(a, b)):+.1f} "
                     f"| {off} | {prec} |")
    # the summary only over tasks that every compared seed has, so that each seed's mean is over the same tasks
    seeds = sorted({sd for _, sd in pairs})
    tasks = sorted(t for t in {t for t, _ in pairs} if all((t, sd) in pairs for sd in seeds))
    if not tasks:  # no task has every seed: the seed with the most tasks
        seeds = [max(seeds, key=lambda sd: (sum(1 for _, x in pairs if x == sd), -sd))]
        tasks = sorted(t for t, sd in pairs if sd == seeds[0])
    per_seed = {sd: statistics.mean(100 * (probe[(t, sd)]["accuracy"] - base[(t, sd)]["accuracy"]) for t in tasks)
                for sd in seeds}
    full_means = [statistics.mean(100 * base[(t, sd)]["accuracy"] for t in tasks) for sd in seeds]
    mean = statistics.mean(per_seed.values())
    lines += ["", f"Over the {len(tasks)} task(s) every compared seed has ({', '.join(tasks)}), mean of {lb} − {la}: "
              f"{mean:+.2f} points"
              + (f" (per seed {', '.join(f'{sd}: {d:+.2f}' for sd, d in sorted(per_seed.items()))}; their std "
                 f"{statistics.stdev(per_seed.values()):.2f}). The {la} runs' own seed spread of their mean over "
                 f"those tasks: ± {statistics.stdev(full_means):.2f}" if len(seeds) > 1 else
                 f" (seed {seeds[0]} only: no spread to compare with)") + ".", ""]
    text = "\n".join(lines)
    if dest is not None:
        with atomic_path(dest) as tmp:
            Path(tmp).write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits,mnist")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--backbone", default="dinov2_small")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=10, help="the LR schedule's length (the cpu profile's)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="the full warmup: scoring over all its steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scale", type=float, default=4.0, help="LoRA scale (the engine's default)")
    p.add_argument("--ne", type=int, default=12, help="heads switched off, for the Jaccard of the switched-off sets")
    p.add_argument("--sample-heads", type=int, default=16, help="heads whose switch-off effect is measured")
    p.add_argument("--train-images", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny settings (random test_vit, 32 px) to check the script")
    p.add_argument("--out", type=Path, default=Path("runs/scoring/records.json"))
    p.add_argument("--suite-check", type=Path, default=None, metavar="RESULTS",
                   help="instead: compare the heart-lora runs in RESULTS made with another --differ-in setting "
                        "(--score-steps N by default) with the runs of --against")
    p.add_argument("--differ-in", choices=list(CHECKS), default="score_steps",
                   help="--suite-check: the setting the two sides differ in (score_mode: the random-ranking control)")
    p.add_argument("--against", type=Path, default=Path("benchmarks/records/results.json"),
                   help="--suite-check's default runs")
    p.add_argument("--dest", type=Path, default=None, help="--suite-check: also write the table here")
    a = p.parse_args(argv)
    if a.suite_check:
        print(suite_check(a.suite_check, a.against, a.dest, a.differ_in))
        return 0
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    torch.set_num_threads(a.threads)
    records: list[dict[str, Any]] = json.loads(a.out.read_text())["records"] if a.out.is_file() else []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in ("backbone", "pretrained", "img_size", "epochs", "warmup_epochs",
                                           "batch_size", "lr", "ne", "sample_heads", "train_images")}
    done = {(r["task"], r["seed"]) for r in records if r.get("settings") == settings}
    records = [r for r in records if r.get("settings") == settings]
    for task in a.tasks.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            if (task, seed) in done:
                continue
            rec = {**run_one(task, seed, a), "settings": settings}
            records.append(rec)
            print(f"{task} seed {seed}: {rec['warmup_steps']} warmup steps, Jaccard at "
                  + ", ".join(f"{c['steps']}: {c['jaccard']:.2f}" for c in rec["curve"])
                  + f"; Taylor vs switch-off ρ {rec['effect_spearman']}", flush=True)
            with atomic_path(a.out) as tmp:  # after every run: a kill loses one run at most
                Path(tmp).write_text(json.dumps({"records": records}))
    summary = summarize(records, a.ne)
    # Q1 pairs runs of different seeds only (a shared init would make two runs alike): it needs two tasks and two seeds
    groups = (by_group(records) if len({r["task"] for r in records}) > 1 and len({r["seed"] for r in records}) > 1
              else None)
    with atomic_path(a.out) as tmp:
        Path(tmp).write_text(json.dumps({"records": records, "summary": summary, "groups": groups}, indent=1))
    for path in [*plot(summary, records, a.out), *([plot_groups(records, a.out)] if groups else [])]:
        print(f"wrote {path}")
    if groups:
        for unit in ("heads", "layers"):
            c = groups["correlations"][unit]
            print(f"Q1, Pearson r over {unit} (pairs of different seeds): "
                  + "; ".join(f"{k} {c[k]['mean']:.2f} [{c[k]['min']:.2f}, {c[k]['max']:.2f}] ({c[k]['pairs']} pairs)"
                              for k in ("same_task", "same_group", "other_group") if c[k])
                  + (f"; same − other group {c['permutation']['gap']:+.3f}, permutation p {c['permutation']['p']:.2f}"
                     f" of {c['permutation']['regroupings']} regroupings" if c.get("permutation") else ""))
    print(json.dumps({t: {k: s[k] for k in ("smallest_budget_at_floor", "warmup_steps", "seed_floor",
                                             "effect_spearman_mean")} for t, s in summary.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
