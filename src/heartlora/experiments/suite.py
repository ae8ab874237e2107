"""The accuracy suite's definition: methods, task groups and profiles (``benchmarks/suite.py run --profile P``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from heartlora.experiments.selection import Profile

# Method name in the suite → engine method and fixed settings. heart-lora-layer is the paper's Heart-LoRA†.
METHODS: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear"},
    "lora": {"method": "lora"},
    "peft-lora": {"method": "peft-lora"},
    "heart-lora": {"method": "heart-lora", "scope": "global"},
    "heart-lora-layer": {"method": "heart-lora", "scope": "layer"},
    "bi-lora": {"method": "bi-lora"},
    "heart-bi-lora": {"method": "heart-bi-lora", "scope": "global"},
}
GROUPS = ("natural", "structured", "few-shot")
NATURAL = ("mnist", "fashion_mnist", "digits")
STRUCTURED = ("dsprites_loc", "dsprites_ori", "clevr_count", "clevr_dist", "smallnorb_azi", "smallnorb_ele")
FEWSHOT = tuple(f"fashion_mnist@{k}shot" for k in (1, 2, 4, 8, 16))


PROFILES: dict[str, Profile] = {
    # Sized for ≤ 45 minutes on a shared 2-core CPU: small images, 3 epochs (1 warmup), one seed, 2 + 2 + 1 tasks,
    # and one searched setting (ne of global Heart-LoRA); the other heart methods reuse its choice.
    "quick": Profile(
        name="quick", img_size=42, epochs=3, batch_size=32, seeds=(42,),
        tasks=("digits", "fashion_mnist", "dsprites_loc", "smallnorb_ele", "fashion_mnist@4shot"),
        methods=tuple(METHODS),
        grids={"heart-lora": {"ne": [12, 36]},
               "heart-lora-layer": {"ne": "from:heart-lora/12"},
               "heart-bi-lora": {"ne": "from:heart-lora"}},
        threads=1,
        note="42 px, 3 epochs (1 warmup), batch 32, seed 42; tasks digits, fashion_mnist (natural), dsprites_loc, "
             "smallnorb_ele (structured), fashion_mnist@4shot (few-shot); ne of heart-lora chosen on val200 from "
             "{12, 36}, reused by heart-bi-lora and, divided by the 12 layers, by heart-lora-layer; every scale 1.0",
    ),
    # A trial of the machinery only (tests, a first look): tiny images, 2 epochs, one task.
    "smoke": Profile(
        name="smoke", img_size=28, epochs=2, batch_size=32, seeds=(42,), tasks=("digits",), methods=tuple(METHODS),
        grids={"heart-lora": {"ne": [12, 36]}, "heart-lora-layer": {"ne": "from:heart-lora/12"},
               "heart-bi-lora": {"ne": "from:heart-lora"}},
        threads=1, note="machinery trial: 28 px, 2 epochs, digits only; not a result",
    ),
    # The GPU user's run: the METHOD.md §5 schedule, every task, three seeds, the Bi-LoRA scale grid and an ne grid.
    "full": Profile(
        name="full", img_size=224, epochs=100, batch_size=64, seeds=(42, 43, 44),
        tasks=NATURAL + STRUCTURED + FEWSHOT, methods=tuple(METHODS),
        grids={"heart-lora": {"ne": [6, 12, 24, 36]},
               "heart-lora-layer": {"ne": [1, 2, 3]},
               "bi-lora": {"scale": [0.1, 1.0, 10.0, 100.0]},
               "heart-bi-lora": {"scale": "from:bi-lora", "ne": [6, 12, 24, 36]}},
        note="224 px, 100 epochs (10 warmup), batch 64, seeds 42, 43, 44; every task; ne and scale chosen on val200 "
             "with seed 42",
    ),
}


def group_of(task: str) -> str:
    if "@" in task:
        return "few-shot"
    return "structured" if task in STRUCTURED else "natural"


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and threads: recorded with every timing."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version()}
