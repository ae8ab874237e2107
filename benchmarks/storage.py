"""Adapter bytes from real ``save_adapter`` calls (not formulas): the paper's ViT-B/16 check and the suite's configs.

- timm ``vit_base_patch16_224`` (random weights: bytes do not depend on them), q and v, rank 32, 1 bit: all heads on
  must give 147,840 bytes (METHOD.md §4, the paper's 0.14 MB); each head switched off saves its 64 B-rows × 32 bits in q
  and in v = 512 bytes, so 64 heads off give 147,840 − 32,768 = 115,072 bytes, the paper's 0.11 MB.
- ``dinov2_small`` (the suite's backbone), q and v, rank 8: float LoRA, 1-bit, each with 0, 12 and 36 heads off, and
  PEFT's LoRA for the same targets (bytes of its saved LoRA tensors).

Heads are switched off spread over layers (head i goes to layer i mod L), so no layer loses all of them unless the
count forces it; a layer with every head off would also drop its shared A (``AdapterReport`` shows it).

    .venv/bin/python benchmarks/storage.py            # table, writes benchmarks/records/storage.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "benchmarks" / "records" / "storage.json"


def spread_heads(layers: list[Any], count: int) -> list[tuple[str, int]]:
    """``count`` heads, round-robin over layers (layer i mod L, then the next head index)."""
    out: list[tuple[str, int]] = []
    i = 0
    while len(out) < count:
        layer = layers[i % len(layers)]
        h = i // len(layers)
        if h < layer.num_heads:
            out.append((layer.name, h))
        i += 1
    return out


def measure(backbone: str, img_size: int | None, rank: int, bits: int, heads_off: int) -> dict[str, Any]:
    """Build, attach, switch heads off, ``save_adapter`` to a temporary file; the report as a row."""
    from heartlora.backbones import create_backbone
    from heartlora.method import HeartLoRAConfig, attach, attention_layers, deactivate_heads, save_adapter

    pretrained = backbone == "dinov2_small"
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=10, img_size=img_size, pretrained=pretrained)
    attach(model, HeartLoRAConfig(targets=("q", "v"), rank=rank, bits=bits))
    layers = attention_layers(model)
    if heads_off:
        deactivate_heads(model, heads=spread_heads(layers, heads_off))
    with tempfile.TemporaryDirectory() as tmp:
        rep = save_adapter(model, Path(tmp) / "adapter.safetensors")
    return {"backbone": backbone, "config": f"q,v r{rank} " + ("float32" if bits == 32 else f"{bits}-bit"),
            "heads_off": heads_off, "heads_total": sum(layer.num_heads for layer in layers),
            "adapter_bytes": int(rep.adapter_bytes), "head_bytes": int(rep.head_bytes),
            "file_bytes": int(rep.file_bytes), "via": "heartlora.save_adapter"}


def measure_peft(img_size: int, rank: int) -> dict[str, Any]:
    """PEFT's LoRA on dinov2_small q, v: bytes of the LoRA tensors PEFT saves, and its saved file size."""
    from heartlora.backbones import create_backbone
    from heartlora_bench.peft_lora import peft_adapter_bytes, peft_model

    model = peft_model(create_backbone("dinov2_small", num_classes=10, img_size=img_size), ("q", "v"), rank, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = list(Path(tmp).glob("adapter_model.*"))
        file_bytes = files[0].stat().st_size if files else 0
    return {"backbone": "dinov2_small", "config": f"PEFT LoRA q,v r{rank} float32", "heads_off": 0, "heads_total": 72,
            "adapter_bytes": peft_adapter_bytes(model), "head_bytes": 0, "file_bytes": file_bytes,
            "via": "peft save_pretrained (file includes the classifier, modules_to_save)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for off in (0, 12, 36, 64):
        rows.append(measure("vit_base_patch16_224", 224, 32, 1, off))
    for bits in (32, 1):
        for off in (0, 12, 36):
            rows.append(measure("dinov2_small", 112, 8, bits, off))
    rows.append(measure_peft(112, 8))
    vit_all = rows[0]["adapter_bytes"]
    vit_64 = rows[3]["adapter_bytes"]
    match = "matches" if vit_all == 147840 else "DOES NOT match"
    saved = (rows[0]["adapter_bytes"] - rows[1]["adapter_bytes"]) // 12
    notes = [
        (f"ViT-B/16, q,v, r32, 1 bit, all 144 heads on: {vit_all:,} bytes ({match} the reference 147,840 = "
         "0.141 MiB, the paper's 0.14 MB)."),
        (f"With 64 of 144 heads off: {vit_64:,} bytes ({vit_64 / 2**20:.3f} MiB, {vit_64 / 1e6:.3f} MB), the "
         f"paper's Heart-LoRA 0.11 MB; each head off saves {saved:,} bytes (64 rows × 32 codes × 1 bit, in q and "
         "in v)."),
        ("adapter_bytes counts adapter weights and quantization constants (μ, σ as float32 per matrix), as the "
         "Bi-LoRA code counts; file bytes add the classifier, metadata and safetensors headers."),
    ]
    doc = {"rows": rows, "notes": notes, "command": "python benchmarks/storage.py",
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'backbone':<22} {'config':<26} {'off':>8} {'adapter B':>10} {'MiB':>7} {'file B':>10}")
    for r in rows:
        print(f"{r['backbone']:<22} {r['config']:<26} {r['heads_off']:>3}/{r['heads_total']:<4} "
              f"{r['adapter_bytes']:>10,} {r['adapter_bytes'] / 2**20:>7.3f} {r['file_bytes']:>10,}")
    for n in notes:
        print("- " + n)
    if args.json:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
