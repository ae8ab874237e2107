"""``heartlora train`` and ``heartlora demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

from heartlora.cli.common import (
    config_help,
    Commands,
    add_config_flags,
    file_lines,
    number,
    print_table,
    summary_rows,
)
from heartlora.engine import TrainConfig, default_out, resolve, train
from heartlora.engine.settings import DEVICE_HELP, QUIET_HELP

DEMO = {"task": "mnist", "backbone": "dinov2_small", "method": "heart-lora", "profile": "cpu", "protocol": "final",
        "img_size": 84, "epochs": 8, "batch_size": 32, "ne": 18, "out": "runs/demo", "threads": 1}


def _train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig the flags describe (every flag is a TrainConfig field, see ``add_config_flags``)."""

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                          if hasattr(args, f.name)})


def cmd_train(args: argparse.Namespace) -> int:
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
    settings = dict(DEMO)
    for key in ("task", "epochs", "img_size", "out", "threads"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if not args.quiet:
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


def register(cli: Commands) -> None:
    """train and demo."""
    p = cli.add("train", cmd_train, "fine-tune a backbone on a task (warmup → score → switch off → train)",
            own_quiet=True)
    add_config_flags(p)
    p.add_argument("--config", metavar="FILE", help=config_help("img-size: 112", run_folder=True))

    p = cli.add("demo", cmd_demo, "the main job on the embedded default: offline DINOv2-S, Heart-LoRA, MNIST (~10 min "
            "on 2 CPU cores)", own_quiet=True)
    p.add_argument("--task", help=f"default {DEMO['task']}")
    p.add_argument("--epochs", type=number("epochs"), help=f"default {DEMO['epochs']}")
    p.add_argument("--img-size", type=number("img_size"), help=f"default {DEMO['img_size']}")
    p.add_argument("--out", help=f"run folder (default {DEMO['out']})")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=number("threads"),
                   help="CPU threads (default 1: robust on a shared 2-core machine)")
    p.add_argument("--overwrite", action="store_true", help="run again even if --out holds a finished demo")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

