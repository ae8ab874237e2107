"""Post-hoc head pruning of a PEFT LoRA adapter against Heart-LoRA trained with those heads off (issue 12).

Per task: one PEFT LoRA adapter trained with the plain recipe of ``benchmarks/baselines/hf_peft.py``
(``Dinov2ForImageClassification`` on the offline DINOv2 ViT-S/14, q and v, r 8, AdamW + OneCycle, on train800);
then, for each ``ne``, ``heartlora.integrations.prune_peft`` switches off the ``ne`` least responsive heads of that
same adapter (scored on ``--batches`` training batches, no retraining), against ``heartlora train --method
heart-lora --ne N`` at the engine's defaults (the heads switched off after the warmup, then trained without them).
Both are reported on val200 (test is never read); the PEFT adapter is scored on its heads after training,
Heart-LoRA during its warmup. ``ne`` 0 is the unpruned adapter and heartlora's LoRA. A control at every nonzero count
(``--random-seeds``, seconds a draw): the same count of the same adapter's heads switched off at random
(``prune_peft(score_mode="random")``), so the table says whether the Taylor ranking finds the heads that matter.

Rows go to ``--out`` as JSON lines, one per (task, method, ne, random draw), written as each finishes; a row already
there is not run again (the PEFT run folder too), so a killed benchmark resumes. ``--report`` turns one or more such
files into a Markdown table and a plot (accuracy against heads off, every method, one panel per task).

CPU-hours at the defaults on the visible tasks (about 19 minutes a training run on one core; on a GPU, half a
minute); run one process per task side by side. ``--smoke`` runs a tiny version (one task, one epoch, 28 px):

    .venv/bin/python benchmarks/prune.py --tasks digits --ne 0,12,24,36,48,60,auto --trained-ne 0,24,48 \
        --out runs/prune/digits.jsonl
    .venv/bin/python benchmarks/prune.py --report runs/prune/*.jsonl --dest docs/research/prune.md
    .venv/bin/python benchmarks/prune.py --smoke --out /tmp/prune-smoke.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEFT_ROW = "peft-lora"
PRUNED = "peft-lora + heartlora prune"
PRUNED_AUTO = "peft-lora + heartlora prune --ne auto"
PRUNED_RANDOM = "peft-lora, random heads pruned (control)"
TRAINED = "heart-lora (heads off after warmup)"
# the arguments a row's accuracy depends on besides its method and count (with the device)
SETTINGS = ("img_size", "epochs", "batch_size", "lr", "rank", "seed", "precision", "batches")


def tag(args: argparse.Namespace) -> str:
    """What a work folder's runs depend on, in its name: a run made with other settings is never reused."""
    return (f"{args.img_size}px-{args.epochs}ep-b{args.batch_size}-lr{args.lr:g}-r{args.rank}-{args.precision}"
            f"-s{args.seed}")


def train_peft(task: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The hf_peft recipe (benchmarks/baselines/hf_peft.py, run as its own process) on train800; the adapter saved
    to ``folder`` for ``dinov2_small``. Returns its metrics (val200 accuracy). The script skips a run folder that has
    its metrics.json; one whose adapter folder did not come with it (another machine's records) is trained again."""
    run = folder.with_name(folder.name + "-run")
    if (run / "metrics.json").is_file() and not (folder / "adapter_config.json").is_file():
        shutil.rmtree(run)
    cmd = [sys.executable, str(HERE / "baselines" / "hf_peft.py"), "--task", task, "--protocol", "val",
           "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--rank", str(args.rank), "--alpha", str(float(args.rank)), "--seed", str(args.seed),
           "--precision", args.precision, "--out", str(run), "--save-peft", str(folder)]
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (
        ["--device", args.device] if args.device != "auto" else [])
    subprocess.run(cmd, check=True)
    return json.loads((run / "metrics.json").read_text())


def heart_lora(task: str, ne: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``heartlora train --method heart-lora --ne N`` (``lora`` for 0) at the engine's defaults, on train800 →
    val200; a run killed midway resumes from its checkpoint."""
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    from heartlora.engine import TrainConfig, train

    resume = (out / "checkpoint.pt").is_file()
    cfg = TrainConfig(task=task, backbone="dinov2_small", method="heart-lora" if ne else "lora", protocol="val",
                      ne=ne if ne else None, rank=args.rank, img_size=args.img_size, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed, out=str(out), resume=resume, overwrite=not resume,
                      progress=False, threads=args.threads, device=args.device, precision=args.precision)
    return train(cfg)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from heartlora.integrations import prune_peft

    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()] \
        if args.out.is_file() else []
    rows = list(done)

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        with args.out.open("a") as f:  # one whole line per row; a kill loses at most the row being written
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"{row['task']:<14} {row['method']:<40} ne {str(row['ne']):>3}  val200 {100 * row['val200']:6.2f} %  "
              f"{row.get('adapter_bytes', 0):>9,} bytes", flush=True)

    for task in args.tasks.split(","):
        base = {"task": task, **{k: getattr(args, k) for k in SETTINGS}, "device": args.device}
        # a row counts only if it was made with these settings (the same --out may hold other runs' rows)
        have = {(r["task"], r["method"], r["ne"], r.get("random_seed")) for r in done
                if all(r.get(k) == base[k] for k in SETTINGS)}
        tokens = [n.strip() for n in args.ne.split(",")]
        auto = "auto" in tokens  # prune's own choice of the count (choose_ne on held-out training images)
        nes = [int(n) for n in tokens if n != "auto"]
        trained = nes if args.trained_ne is None else [int(n) for n in args.trained_ne.split(",") if n.strip()]
        draws = [int(s) for s in args.random_seeds.split(",")] if args.random_seeds else []
        # the random control at every count but 0 (nothing to draw there)
        todo = ([(PRUNED, ne, None) for ne in nes if (task, PRUNED, ne, None) not in have]
                + [(PRUNED_RANDOM, ne, rs) for ne in nes if ne for rs in draws
                   if (task, PRUNED_RANDOM, ne, rs) not in have])
        auto_done = any(r[0] == task and r[1] == PRUNED_AUTO for r in have)
        folder = args.work / f"{task}-{tag(args)}-peft"
        if todo or (task, PEFT_ROW, 0, None) not in have or (auto and not auto_done):
            peft = train_peft(task, folder, args)
            if (task, PEFT_ROW, 0, None) not in have:
                emit({**base, "method": PEFT_ROW, "ne": 0, "val200": float(peft["accuracy"]),
                      "adapter_bytes": peft["adapter_bytes"], "wall_s": peft["wall_s"]})

        def prune(ne: int | str, method: str, rs: int | None) -> None:
            t0 = time.perf_counter()
            name = f"{task}-{tag(args)}-pruned-{ne}" + (f"-random{rs}" if rs is not None else "")
            r = prune_peft(folder, task, ne, batches=args.batches, batch_size=args.batch_size, split="val200",
                           img_size=args.img_size, seed=args.seed, out=args.work / f"{name}.safetensors",
                           score_mode="random" if rs is not None else "abs_sum", score_seed=rs)
            emit({**base, "method": method, "ne": r["ne"], "val200": r["accuracy_after"],
                  "val200_before": r["accuracy_before"], "adapter_bytes": r["adapter_bytes"],
                  **({"random_seed": rs} if rs is not None else {}),
                  **({"ne_choice": r["ne_choice"]} if ne == "auto" else {}), "wall_s": time.perf_counter() - t0})

        # every post-hoc prune first (a scoring pass and a val200 pass each: seconds to a minute), then the trainings
        # (a full run each), so a benchmark stopped midway still has the whole pruned curve
        for method, ne, rs in todo:
            prune(ne, method, rs)
        if auto and not auto_done:
            prune("auto", PRUNED_AUTO, None)
        for ne in trained:
            if (task, TRAINED, ne, None) not in have:
                m = heart_lora(task, ne, args.work / f"{task}-{tag(args)}-heart-lora-{ne}", args)
                emit({**base, "method": TRAINED, "ne": ne, "val200": m["accuracy"],
                      "adapter_bytes": m["adapter_bytes"], "wall_s": m["wall_s"]})
    return rows


def _settings(row: dict[str, Any]) -> tuple:
    """What a row's accuracy depends on besides its method and count."""
    return tuple(row.get(k) for k in (*SETTINGS, "device"))


def auto_tried(row: dict[str, Any]) -> str:
    """The shares ``--ne auto`` tried beyond 0, each with the rise of the sampled loss it caused (% of the loss with
    every head), as a parenthesis for the table; empty for a row without its ``ne_choice``."""
    cands = (row.get("ne_choice") or {}).get("candidates", [])
    if len(cands) < 2 or not cands[0]["loss"]:
        return ""
    tried = [f"{c['ne']}: {100 * c['increase'] / cands[0]['loss']:+.0f} %" for c in cands[1:]]
    return f" (tried {', '.join(tried)})"


def report(files: list[Path], dest: Path) -> str:
    """The rows of ``files`` as a Markdown table (val200 % per task, ne and method) and a plot beside ``dest``."""
    from matplotlib.figure import Figure

    from heartlora._paths import atomic_path

    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"no rows in {', '.join(map(str, files))}: run the benchmark first")
    # one row per (task, method, count, draw): a row written twice (two processes on one file) counts once
    rows = list({(r["task"], r["method"], r["ne"], r.get("random_seed")): r for r in rows}.values())
    mixed = {t: sorted({_settings(r) for r in rows if r["task"] == t}) for t in {r["task"] for r in rows}}
    mixed = {t: v for t, v in mixed.items() if len(v) > 1}
    if mixed:
        raise SystemExit(f"rows of {', '.join(sorted(mixed))} were made with different settings "
                         f"({'; '.join(map(str, next(iter(mixed.values()))))}): report one setting per file set")
    tasks = sorted({r["task"] for r in rows})
    nes = sorted({r["ne"] for r in rows if r["method"] in (PRUNED, TRAINED)})
    by = {(r["task"], r["method"], r["ne"]): r for r in rows}
    by_auto = {r["task"]: r for r in rows if r["method"] == PRUNED_AUTO}
    draws: dict[tuple[str, int], list[float]] = {}  # the random control's accuracies, per (task, count)
    for r in rows:
        if r["method"] == PRUNED_RANDOM:
            draws.setdefault((r["task"], r["ne"]), []).append(100 * r["val200"])

    def control(t: str, ne: int) -> str:
        v = draws.get((t, ne))
        return f"{sum(v) / len(v):.1f} [{min(v):.1f}–{max(v):.1f}]" if v else "—"

    n_draws = sorted({len(v) for v in draws.values()})
    settings = sorted({(r["img_size"], r["epochs"], r["seed"], r.get("device", "cpu"), r.get("precision", "fp32"))
                       for r in rows})
    lines = [
        "# Post-hoc head pruning of a PEFT adapter vs Heart-LoRA trained with the heads off",
        "",
        f"Made by `python benchmarks/prune.py --report {' '.join(str(f) for f in files)} --dest {dest}` from the rows "
        "of `python benchmarks/prune.py --tasks T --ne " + ",".join(map(str, nes)) + ",auto --trained-ne "
        + ",".join(map(str, sorted({r["ne"] for r in rows if r["method"] == TRAINED}))) + " --random-seeds "
        + ",".join(map(str, sorted({r["random_seed"] for r in rows if r["method"] == PRUNED_RANDOM})))
        + " --out FILE` (one process per task, one thread each). Settings "
        "(img size, epochs, seed, device, precision): " + "; ".join(map(str, settings)) + ". Accuracy on val200 "
        "(trained on train800; test never read), one seed: differences under about 1.5 points are within noise. "
        "The PEFT adapter follows the plain HF + PEFT recipe (benchmarks/baselines/hf_peft.py), Heart-LoRA heartlora's "
        "defaults, so each curve starts from its own 0 (heartlora's LoRA there): read each against its start. "
        "The control switches off the same number of heads of the same PEFT adapter at random (`prune --score-mode "
        f"random`; mean [min–max] of {'/'.join(map(str, n_draws)) or 'no'} draws, each draw the same head set on "
        "every task): where the Taylor ranking keeps more accuracy than the random draws, it found the heads that "
        "matter.",
        "",
        ("| task | heads off | PEFT LoRA, heads pruned after training (%) | the same count at random (%) "
         "| Heart-LoRA, trained with them off (%) | pruned adapter bytes | Heart-LoRA bytes |"),
        "|---|---|---|---|---|---|---|",
    ]
    for t in tasks:
        peft = by.get((t, PEFT_ROW, 0))
        if peft:
            lines.append(f"| {t} | unpruned PEFT adapter | {100 * peft['val200']:.1f} | | | | |")
        for ne in nes:
            p, h = by.get((t, PRUNED, ne)), by.get((t, TRAINED, ne))
            acc = [f"{100 * r['val200']:.1f}" if r else "—" for r in (p, h)]
            size = [f"{r['adapter_bytes']:,}" if r else "—" for r in (p, h)]
            lines.append(f"| {t} | {ne} | " + " | ".join([acc[0], control(t, ne), acc[1], *size]) + " |")
        a = by_auto.get(t)
        if a:
            lines.append(f"| {t} | `--ne auto` chose {a['ne']}{auto_tried(a)} | {100 * a['val200']:.1f} | | "
                         f"| {a['adapter_bytes']:,} | |")
    fig = Figure(figsize=(3.2 * len(tasks) + 1, 3.4), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, t in zip(axes, tasks):
        for method, marker, color in ((PRUNED, "o", "C0"), (TRAINED, "s", "C1")):  # one colour a method, every panel
            pts = sorted((ne, 100 * by[(t, method, ne)]["val200"]) for ne in nes if (t, method, ne) in by)
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=method)
        pts = sorted((ne, sum(v) / len(v), min(v), max(v)) for (tt, ne), v in draws.items() if tt == t)
        if pts:
            ne_, mean, lo, hi = map(list, zip(*pts))
            ax.errorbar(ne_, mean, yerr=[[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]],
                        marker="^", linestyle=":", capsize=3, color="C2", label="random heads pruned (min–max)")
        if t in by_auto:
            ax.plot([by_auto[t]["ne"]], [100 * by_auto[t]["val200"]], marker="*", markersize=11, linestyle="none",
                    color="black", label="prune --ne auto")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("heads switched off (of 72)")
    axes[0].set_ylabel("val200 accuracy (%)")
    axes[0].legend(fontsize=7)
    png = dest.with_suffix(".png")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    lines += ["", f"![accuracy against heads off]({png.name})", ""]
    text = "\n".join(lines)
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="digits,mnist,fashion_mnist")
    ap.add_argument("--ne", default="0,12,24,36,48,auto",
                    help="heads switched off, comma-separated (of 72); 'auto' adds prune's own choice (--ne auto)")
    ap.add_argument("--trained-ne", default=None,
                    help="the counts Heart-LoRA is trained at (a full run each; default: every --ne). Post-hoc "
                         "pruning costs seconds a count, so --ne can be dense and --trained-ne sparse, e.g. 0,24,48; "
                         "'' for none")
    ap.add_argument("--random-seeds", default="1,2,3",
                    help="draws of the random control (prune --score-mode random: the same count of heads off, "
                         "chosen at random; seconds each) at every nonzero count; '' for none")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="the PEFT recipe's learning rate")
    ap.add_argument("--rank", type=int, default=8, help="the PEFT adapter's rank (heartlora's is its default, 8)")
    ap.add_argument("--batches", type=int, default=8, help="training batches the PEFT adapter's heads are scored on")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (both trainings; pruning runs on the CPU)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                    help="both trainings: tf32 is fp32 with TF32 matrix products on CUDA (plain fp32 on a CPU); bf16 "
                         "is bf16 autocast (on a CPU too)")
    ap.add_argument("--work", type=Path, default=None, help="run folders (default runs/prune; --smoke: "
                                                              "runs/prune-smoke)")
    ap.add_argument("--out", type=Path, help="JSON lines, one per (task, method, ne, random draw); resumable")
    ap.add_argument("--report", type=Path, nargs="+", help="JSON-lines files to turn into a table and a plot")
    ap.add_argument("--dest", type=Path, default=Path("runs/prune/prune.md"), help="--report's Markdown file")
    ap.add_argument("--smoke", action="store_true", help="digits, ne 0 and 6, 1 epoch, 28 px: checks the script")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report, args.dest))
        return 0
    if args.out is None:
        ap.error("--out is required (or --report FILES)")
    if args.smoke:
        args.tasks, args.ne, args.trained_ne = "digits", "0,6,auto", "0,6"
        args.epochs, args.img_size, args.batches = 1, 28, 1
    args.work = args.work or Path("runs/prune-smoke" if args.smoke else "runs/prune")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
