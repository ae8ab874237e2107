"""Training-step time and peak memory on a GPU: heartlora's adapters against PEFT's LoRA, the frozen floor and full
fine-tuning, eager and compiled, in one process (issue 15's table).

Every row is built once and timed in interleaved rounds (round r times every row in turn, ``--steps`` steps each,
synchronised), so a slow phase of the machine hits all rows; a row's figure is its median step time over rounds, and
its ratio is the median of the per-round ratios to PEFT's row. A step is forward + backward + optimizer step, under
``--precision`` autocast (bf16 by default), fused AdamW on CUDA, random weights (speed does not depend on them).

Rows, per model and batch size:
- ``frozen``: the backbone frozen, the classifier trains, and the input requires grad, so backward runs through every
  block (the least any adapter pays);
- ``peft``: PEFT LoRA r 8 (alpha 8): on timm's fused ``qkv`` (all of q, k, v: more work than q and v) or on HF's q and
  v Linears;
- ``heartlora``: LoRA q, v r 8, all heads; ``quarter off`` / ``half off``: that share of heads switched off (a seeded
  random choice, as a score ranking would scatter them); ``1-bit``: Bi-LoRA;
- ``full``: full fine-tuning of every weight.

    python benchmarks/gpu_speed.py                                   # CUDA: ViT-B/16 at batch 64 and 256, DINOv2-S
    python benchmarks/gpu_speed.py --out /tmp/gpu_speed.md           # also the markdown table there (and .json)
    python benchmarks/gpu_speed.py --device cpu --tiny               # a smoke run of the script itself (seconds)

Run it on a GPU machine from the repository root with ``PYTHONPATH=src``; nothing here depends on the engine.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import heartlora.method as hl

NUM_CLASSES = 100
ROWS = ("frozen", "peft", "heartlora", "quarter off", "half off", "1-bit", "full")


@dataclass
class Model:
    """One backbone to measure: a factory for a fresh model (random weights), its input size and the names of the
    Linears PEFT adapts."""

    name: str
    make: Callable[[], nn.Module]
    img_size: int
    peft_targets: list[str]
    classifier: str
    batches: list[int] = field(default_factory=list)


def _timm_vit(tiny: bool) -> Model:
    import timm

    kw = dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=12) if tiny else {}
    return Model("timm ViT-B/16" + (" (tiny)" if tiny else ""),
                 lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=NUM_CLASSES, **kw),
                 32 if tiny else 224, ["qkv"], "head")


class _HFClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=x).last_hidden_state[:, 0])


def _hf_dinov2(tiny: bool) -> Model:
    from transformers import Dinov2Config, Dinov2Model

    size = 32 if tiny else 224
    cfg = Dinov2Config(hidden_size=96 if tiny else 384, num_hidden_layers=2 if tiny else 12, num_attention_heads=6,
                       intermediate_size=192 if tiny else 1536, image_size=size, patch_size=8 if tiny else 14)

    def make() -> nn.Module:
        return _HFClassifier(Dinov2Model(cfg), cfg.hidden_size)

    probe = make()
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in probe.named_modules()
                      if n.endswith(("q_proj", "v_proj", "query", "value"))})
    return Model("HF DINOv2-S/14" + (" (tiny)" if tiny else ""), make, size, targets, "head")


def build(row: str, spec: Model, device: torch.device, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """(model, optimizer, input needs grad) for one row."""
    torch.manual_seed(seed)
    model = spec.make()
    input_grad = False
    if row == "frozen":
        model.requires_grad_(False)
        getattr(model, spec.classifier).requires_grad_(True)
        input_grad = True
    elif row == "peft":
        import peft

        cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=spec.peft_targets, modules_to_save=[spec.classifier])
        model = peft.get_peft_model(model, cfg)
    elif row == "full":
        pass
    else:
        hl.attach(model, hl.HeartLoRAConfig(targets=("q", "v"), rank=8, bits=1 if row == "1-bit" else 32))
        share = {"quarter off": 0.25, "half off": 0.5}.get(row, 0.0)
        heads = [(layer.name, h) for layer in hl.attention_layers(model) for h in range(layer.num_heads)]
        if share:
            hl.deactivate_heads(model, heads=random.Random(seed).sample(heads, int(share * len(heads))))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    return model, opt, input_grad


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(spec: Model, batch: int, device: torch.device, precision: str, compiled: bool, rounds: int, steps: int,
            seed: int, rows: tuple[str, ...] = ROWS) -> dict[str, Any]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    x = torch.rand(batch, 3, spec.img_size, spec.img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    built: dict[str, tuple[Callable[[], None], nn.Module]] = {}
    peaks: dict[str, float] = {}
    for row in rows:
        model, opt, input_grad = build(row, spec, device, seed)
        fwd = torch.compile(model) if compiled else model

        def step(fwd: nn.Module = fwd, opt: torch.optim.Optimizer = opt, input_grad: bool = input_grad) -> None:
            inp = x.requires_grad_(True) if input_grad else x
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(fwd(inp), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            # the rows built before stay resident: a row's peak is what it adds above them (its own weights, optimizer
            # state and activations), not the process's total
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device) - sum(
                t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        for _ in range(3):  # warm-up (and compilation) outside the clock
            step()
        _sync(device)
        peaks[row] = ((torch.cuda.max_memory_allocated(device) - resident) / 2**20 if device.type == "cuda"
                      else float("nan"))
        built[row] = (step, model)
        x.requires_grad_(False)
    times: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(rounds):
        for row in rows:
            step = built[row][0]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            times[row].append((time.perf_counter() - t0) / steps * 1e3)
            x.requires_grad_(False)
    out = {}
    for row in rows:
        def ratio(base: str, row: str = row) -> float:
            if base not in times:
                return float("nan")
            return statistics.median(t / b for t, b in zip(times[row], times[base]))

        out[row] = {"step_ms": statistics.median(times[row]), "ratio_peft": ratio("peft"),
                    "ratio_frozen": ratio("frozen"), "peak_mib": peaks[row], "rounds_ms": times[row]}
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['model']}, batch {res['batch']}, {res['precision']}, "
                  f"{'compiled' if res['compiled'] else 'eager'}", "",
                  "| row | step ms | ÷ PEFT | ÷ frozen | peak MiB |", "|---|---|---|---|---|"]
        for row in res["rows"]:
            r = res["rows"][row]
            lines.append(f"| {row} | {r['step_ms']:.1f} | {r['ratio_peft']:.2f} | {r['ratio_frozen']:.2f} | "
                         f"{r['peak_mib']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--compiled-only", action="store_true", help="compiled rows only (of --compiled-rows)")
    ap.add_argument("--compiled-rows", default=",".join(ROWS),
                    help="the rows measured compiled (each compiles its own graph: minutes on a GPU)")
    ap.add_argument("--compiled-batch", type=int, help="compile only at this batch size")
    ap.add_argument("--tiny", action="store_true", help="tiny models and batches: a smoke run of the script")
    ap.add_argument("--out", type=Path, help="write the markdown table (and a .json beside it) here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and args.precision != "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vit, dino = _timm_vit(args.tiny), _hf_dinov2(args.tiny)
    vit.batches = [4] if args.tiny else [64, 256]
    dino.batches = [4] if args.tiny else [64]
    compiled_rows = tuple(r for r in ROWS if r in args.compiled_rows.split(","))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    command = "python benchmarks/gpu_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    for spec in (vit, dino):
        for batch in spec.batches:
            modes = () if args.no_compile else (True,)
            modes = modes if args.compiled_only else (False, *modes)
            for compiled in modes:
                if compiled and args.compiled_batch and batch != args.compiled_batch:
                    continue
                rows = measure(spec, batch, device, args.precision, compiled, args.rounds, args.steps, args.seed,
                               compiled_rows if compiled else ROWS)
                results.append({"model": spec.name, "batch": batch, "precision": args.precision,
                                "compiled": compiled, "rows": rows})
                print(table(results[-1:]), flush=True)
                if args.out:  # after every table, so a run stopped midway keeps what it measured
                    versions = {m: __import__(m).__version__ for m in ("torch", "timm", "transformers", "peft")}
                    header = (f"Device: {name}; {', '.join(f'{k} {v}' for k, v in versions.items())}; command: "
                              f"`{command.strip()}`\n\n")
                    args.out.write_text(header + table(results))
                    args.out.with_suffix(".json").write_text(json.dumps({"device": name, "versions": versions,
                                                                         "command": command, "results": results},
                                                                        indent=1))


if __name__ == "__main__":
    main()
