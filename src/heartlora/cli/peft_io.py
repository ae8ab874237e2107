"""``heartlora export`` (to a PEFT folder) and ``heartlora prune`` (a PEFT LoRA adapter's heads)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from heartlora.cli.common import (
    Commands,
    add_adapter_argument,
    adapter_path,
    field_choices,
    given_adapter,
    heads_flag,
    number,
    print_table,
    refuse_to_replace,
)
from heartlora.errors import HeartLoRAError
from heartlora.integrations import export_peft, prune_peft
from heartlora.method.auto_ne import DEFAULT_TOLERANCE
from heartlora.method.heads_off import parse_heads_off
from heartlora.method.storage import convert_adapter, read_adapter_info, store_dtype


def cmd_export(args: argparse.Namespace) -> int:
    adapter = adapter_path(given_adapter(args))
    if args.format == "heartlora":
        dtype = store_dtype(args.dtype)  # a bad name is one line before any file is read
        if any((Path(args.dir) / name).exists() for name in ("metrics.json", "checkpoint.pt")):
            raise HeartLoRAError(f"{args.dir} holds a training run (metrics.json, checkpoint.pt), whose results "
                                 "describe its own adapter.safetensors: export into another folder")
        refuse_to_replace(Path(args.dir), args.overwrite, ("adapter.safetensors",))
        before = read_adapter_info(adapter)
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        out = Path(args.dir) / "adapter.safetensors"
        report = convert_adapter(adapter, out, dtype)
        print(f"wrote {out}: the adapter stored as {dtype} ({report.adapter_bytes:,} bytes of adapter, "
              f"{before['adapter_bytes']:,} as {before.get('dtype', 'float32')}; classifier unchanged); its accuracy: "
              f"heartlora eval --adapter {args.dir} --split …")
        return 0
    if args.dtype is not None and store_dtype(args.dtype) != "float32":
        raise HeartLoRAError(f"--dtype {args.dtype} goes with --format heartlora: a PEFT folder is written as float32 "
                             "(PeftModel loads it into the model's own dtype)")
    refuse_to_replace(Path(args.dir), args.overwrite, ("adapter_config.json", "adapter_model.safetensors"))
    report = export_peft(adapter, args.dir)
    print(f"wrote {report.path}: PEFT LoRA folder for transformers {report.model_class} "
          f"({report.heads_on} of {report.heads_total} heads on, {report.lora_bytes:,} bytes of LoRA weights); load "
          f"it with PeftModel.from_pretrained({report.model_class}(...), {str(report.path)!r})")
    return 0


def pruned_path(peft_dir: str) -> Path:
    """prune's default --out: PEFT_DIR.pruned.safetensors beside the folder (``.`` is the folder it names)."""
    folder = Path(peft_dir).resolve()
    if not folder.name:
        raise HeartLoRAError(f"{peft_dir} has no folder beside which to write the pruned adapter: pass --out FILE")
    return folder.with_name(folder.name + ".pruned.safetensors")


def cmd_prune(args: argparse.Namespace) -> int:
    ne = parse_heads_off(args.ne, tolerance=args.ne_tolerance).ne  # checked before any file is looked at
    out = args.out or str(pruned_path(args.peft_dir))
    refuse_to_replace(Path(out), args.overwrite)  # before any scoring time is spent
    if args.peft_out:
        refuse_to_replace(Path(args.peft_out), args.overwrite, ("adapter_config.json", "adapter_model.safetensors"))
    r = prune_peft(args.peft_dir, args.task, ne, batches=args.batches, batch_size=args.batch_size, split=args.split,
                   out=out, peft_out=args.peft_out, backbone=args.backbone, img_size=args.img_size, scope=args.scope,
                   seed=args.seed, score_mode=args.score_mode, score_seed=args.score_seed,
                   tolerance=args.ne_tolerance)
    r.pop("model")
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "scores"}, indent=2, default=str))
        return 0
    print_table(f"heartlora prune: {args.peft_dir}", [
        ("task", f"{r['task']}: " + (f"heads ranked at random (--score-mode random, seed {r['score_seed']})"
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


def register(cli: Commands) -> None:
    """export and prune."""
    p = cli.add("export", cmd_export, "write an adapter in another library's format (PEFT LoRA folder), or as "
                                      "heartlora's own at another precision (float16: half a float adapter's bytes)")
    add_adapter_argument(p)
    p.add_argument("dir", metavar="DIR", help="folder to write")
    p.add_argument("--format", default="peft", choices=["peft", "heartlora"],
                   help="peft (the default): adapter_config.json + adapter_model.safetensors for "
                        "PeftModel.from_pretrained; heartlora: DIR/adapter.safetensors, which every heartlora "
                        "command reads, stored as --dtype")
    p.add_argument("--dtype", help="with --format heartlora: float32, float16 or bfloat16 (fp32, fp16, bf16) for the "
                                   "adapter's values (a 1-bit adapter's mean and std); they load back as float32, and "
                                   "the classifier stays float32. Default float32")
    p.add_argument("--overwrite", action="store_true", help="replace the files DIR already holds")

    p = cli.add("prune", cmd_prune, "switch off the least responsive attention heads of a PEFT LoRA adapter")
    p.add_argument("peft_dir", help="PEFT LoRA folder (ViT / DINOv2, q/k/v/o targets, classifier saved)")
    p.add_argument("--task", required=True, help="the task the adapter was trained on (its training split scores)")
    p.add_argument("--ne", default="auto", type=heads_flag("--ne"),
                   help="heads to switch off: a number, or auto (default; decided on sampled training images)")
    p.add_argument("--batches", type=number("batches"), default=8,
                   help="training batches to score heads on (default 8)")
    p.add_argument("--batch-size", type=number("batch_size"), default=32, help="default 32")
    p.add_argument("--split", default="val200", choices=["train800", "val200", "train800val200", "test"],
                   help="split for the accuracy before and after (default val200)")
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="rank heads over the whole model (global, the default) or within each layer")
    p.add_argument("--score-mode", default="abs_sum", choices=field_choices("score_mode"),
                   help="how heads are ranked: the Taylor score (abs_sum, default; sum_abs), or random: a control "
                        "that switches off a random set of heads, drawn from --score-seed (with --ne N: the same "
                        "count as a Taylor prune, to compare the two)")
    p.add_argument("--seed", type=number("seed"), default=0,
                   help="samples the scoring and held-out images, and a NAME@Kshot task's split: give the adapter's "
                        "training seed (default 0)")
    p.add_argument("--score-seed", type=number("seed", "--score-seed"),
                   help="the random control's draw (default: --seed)")
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
    p.add_argument("--json", action="store_true", help="print the report as JSON")

