"""``heartlora eval`` and ``heartlora predict``: a trained adapter on a task split, or on image files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from heartlora.bank import bank_from_files
from heartlora.cli.common import (
    BACKBONE_HELP,
    config_help,
    Commands,
    adapter_path,
    add_threads_flag,
    number,
    use_threads,
)
from heartlora.data import get_task
from heartlora.engine import accuracy, classify, collect_images, load_trained
from heartlora.engine.distributed import DistInfo, resolve_device
from heartlora.engine.inference import read_image, run_img_size
from heartlora.engine.precision import exact_fp32
from heartlora.engine.settings import DEVICE_HELP, PROTOCOLS
from heartlora.errors import HeartLoRAError


def cmd_eval(args: argparse.Namespace) -> int:
    use_threads(args)
    device = resolve_device(args.device)
    model, info = load_trained(adapter_path(args.adapter), device, backbone=args.backbone)
    run = info["run"]
    if not (args.task or run.get("task")):
        raise HeartLoRAError(f"{args.adapter} records no task (saved with save_adapter): pass --task")
    task = get_task(args.task or run["task"])
    trained_at = run_img_size(info) or model.spec["img_size"]
    img_size = args.img_size or trained_at
    if task.num_classes != model.spec["num_classes"]:
        raise HeartLoRAError(f"task {task.name} has {task.num_classes} classes but the adapter's classifier has "
                             f"{model.spec['num_classes']}: evaluate on the task it was trained for "
                             f"({run.get('task', 'not recorded')})")
    names = [str(c) for c in run.get("class_names") or []]
    if names and _named(names) and _named(task.class_names) and names != task.class_names:
        raise HeartLoRAError(f"task {task.name}'s classes ({_few(task.class_names)}) are not the ones the adapter was "
                             f"trained on ({_few(names)}, in that order): its accuracy there would mean nothing; "
                             f"evaluate on {run.get('task', 'the task it was trained for')}")
    if img_size != trained_at:
        _check_size(model, img_size, trained_at, device)
    seed = args.seed if args.seed is not None else int(run.get("init_seed", 0))
    images, labels = task.load(args.split, img_size=img_size, seed=seed)
    with exact_fp32(device):  # the numerics of the accuracy `heartlora train` records, whatever it trained with
        acc = accuracy(model, images, labels, DistInfo(0, 1, 0, device), batch_size=args.batch_size)
    notes = []
    trained_on = PROTOCOLS.get(str(run.get("protocol")), ("",))[0]
    if _parts(args.split) & _parts(trained_on) and task.name == run.get("task"):
        notes.append(f"{args.split} holds training images of this adapter (its {run['protocol']} protocol trained on "
                     f"{trained_on}): not a held-out accuracy")
    if img_size != trained_at:
        notes.append(f"trained at {trained_at} px, evaluated at {img_size} px")
    result = {"adapter": str(args.adapter), "task": task.name, "split": args.split, "images": len(labels),
              "img_size": img_size, "accuracy": acc, **({"notes": notes} if notes else {})}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"accuracy {100 * acc:.2f} % on {task.name} {args.split} ({len(labels)} images, {img_size} px)"
              + "".join(f"\nnote: {n}" for n in notes))
    return 0


def _parts(split: str) -> set[str]:
    """The 800/200 halves a split is made of (train800val200 is both)."""
    return {part for part in ("train800", "val200") if part in split}


def _named(names: list[str]) -> bool:
    """Whether class names are names (a folder's classes.txt, a dataset's labels), not the numbers a task without
    them is given (0, 1, …), which say nothing of what a class is."""
    return names != [str(i) for i in range(len(names))]


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", …" if len(names) > 4 else "")


def _check_size(model: torch.nn.Module, img_size: int, trained_at: int, device: torch.device) -> None:
    """Refuse, in one line, an image size the backbone cannot take (a ViT of fixed size, a side its patches do not
    divide), by one forward pass of a blank image before any data is read."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    except Exception as err:  # whatever the backbone raises: its first line names the reason
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise HeartLoRAError(f"--img-size {img_size}: the backbone does not take {img_size} px images ({reason}); "
                             f"the adapter was trained at {trained_at} px: leave --img-size out") from err


def cmd_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise HeartLoRAError(f"--top-k {args.top_k}: give at least 1 label per image")
    files = collect_images(args.inputs)  # fail on a missing path before the model is built
    use_threads(args)
    device = resolve_device(args.device)
    if len(args.adapter) > 1:
        return _predict_bank(args, files, device)
    model, info = load_trained(adapter_path(args.adapter[0]), device, backbone=args.backbone)
    run = info["run"]
    img_size = run_img_size(info) or model.spec["img_size"]
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


def register(cli: Commands) -> None:
    """eval and predict."""
    p = cli.add("eval", cmd_eval, "accuracy of a trained adapter on a task split")
    p.add_argument("--config", metavar="FILE", help=config_help("split: test"))
    p.add_argument("--adapter", required=True, help="adapter.safetensors (or the run folder)")
    p.add_argument("--task", help="default: the task the adapter was trained on")
    p.add_argument("--backbone", help=BACKBONE_HELP)
    p.add_argument("--split", default="test", choices=["train800", "val200", "train800val200", "test"],
                   help="split to score (default test: report it once; choose settings on val200)")
    p.add_argument("--img-size", type=number("img_size"), help="default: the training size")
    p.add_argument("--batch-size", type=number("batch_size"), default=128, help="default 128")
    p.add_argument("--seed", type=number("seed"),
                   help="a NAME@Kshot task's sample (default: the run's --seed, so train800 is what it trained on)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_threads_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (adapter, task, split, images, img_size, accuracy)")

    p = cli.add("predict", cmd_predict, "top-k labels for image files or folders")
    p.add_argument("--adapter", required=True, action="append",
                   help="adapter.safetensors (or the run folder); repeat it for several tasks on one backbone "
                        "(an AdapterBank): each image is then labelled by every task")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them (not searched "
                   "below their first level)")
    p.add_argument("--backbone", help=BACKBONE_HELP)
    p.add_argument("--top-k", type=number("top_k"), default=5, help="labels per image and task (default 5)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_threads_flag(p)
    p.add_argument("--json", action="store_true",
                   help='print the labels as JSON: a list of {"image", "top"} (and "task" with several adapters)')

