"""The accuracy suite's definition: methods, task groups and profiles (``benchmarks/suite.py run --profile P``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from heartlora_bench.selection import Profile

# Method name in the suite → engine method and fixed settings. heart-lora-layer is the paper's Heart-LoRA†.
# "baseline": run by benchmarks/baselines/hf_peft.py (outside the engine) with that --method.
METHODS: dict[str, dict[str, Any]] = {
    "linear-probe": {"baseline": "linear-probe"},
    "hf-peft": {"baseline": "hf-peft"},
    "linear": {"method": "linear"},
    "lora": {"method": "lora"},
    "peft-lora": {"method": "peft-lora"},
    "heart-lora": {"method": "heart-lora", "scope": "global"},
    "heart-lora-layer": {"method": "heart-lora", "scope": "layer"},
    "bi-lora": {"method": "bi-lora"},
    "heart-bi-lora": {"method": "heart-bi-lora", "scope": "global"},
}
ENGINE_METHODS = tuple(m for m, spec in METHODS.items() if "method" in spec)
GROUPS = ("natural", "structured", "few-shot")
NATURAL = ("mnist", "fashion_mnist", "digits")
STRUCTURED = ("dsprites_loc", "dsprites_ori", "clevr_count", "clevr_dist", "smallnorb_azi", "smallnorb_ele")
FEWSHOT = tuple(f"fashion_mnist@{k}shot" for k in (1, 2, 4, 8, 16))
# The cpu profile: 3 natural, 3 structured and 1 K-shot task (the engine's few-shot floor gives it 100 steps).
CPU_TASKS = ("fashion_mnist", "mnist", "digits", "dsprites_loc", "smallnorb_ele", "clevr_count", "fashion_mnist@4shot")
# Tasks no default was chosen on (profile heldout): the other half of each structured source.
HELDOUT_TASKS = ("dsprites_ori", "clevr_dist", "smallnorb_azi")
# Defaults only (ne auto, the engine's scales): the suite measures what a user gets. The plain baselines first.
CPU_METHODS = ("linear-probe", "hf-peft", "lora", "heart-lora", "heart-bi-lora", "bi-lora", "heart-lora-layer")


PROFILES: dict[str, Profile] = {
    # A smoke profile, not a result: at 42 px structured and few-shot tasks stay near chance. Sized for ≤ 45 minutes
    # on a shared 2-core CPU: small images, 3 epochs (1 warmup), one seed, 2 + 2 + 1 tasks,
    # and one searched setting (ne of global Heart-LoRA); the other heart methods reuse its choice.
    "quick": Profile(
        name="quick", img_size=42, epochs=3, batch_size=32, seeds=(42,),
        tasks=("digits", "fashion_mnist", "dsprites_loc", "smallnorb_ele", "fashion_mnist@4shot"),
        methods=ENGINE_METHODS,
        grids={"heart-lora": {"ne": [12, 36]},
               "heart-lora-layer": {"ne": "from:heart-lora/12"},
               "heart-bi-lora": {"ne": "from:heart-lora"}},
        threads=1,
        note="42 px, 3 epochs (1 warmup), batch 32, seed 42; tasks digits, fashion_mnist (natural), dsprites_loc, "
             "smallnorb_ele (structured), fashion_mnist@4shot (few-shot); ne of heart-lora chosen on val200 from "
             "{12, 36}, reused by heart-bi-lora and, divided by the 12 layers, by heart-lora-layer; every scale 1.0. "
             "A smoke profile: at 42 px the structured and few-shot tasks stay near chance, so it shows nothing about "
             "which method is more accurate (the cpu profile does)",
    ),
    # The profile that learns on a 2-core CPU (the engine's `--profile cpu`: 112 px, 10 epochs, batch 32), three
    # seeds, every method at its defaults; bi-lora and heart-lora-layer on the first seed only. About 120 runs:
    # resumable, `--jobs 2` (benchmarks/suite.py).
    "cpu": Profile(
        name="cpu", img_size=112, epochs=10, batch_size=32, seeds=(42, 43, 44), tasks=CPU_TASKS, methods=CPU_METHODS,
        threads=1, engine_profile="cpu", method_seeds={"bi-lora": (42,), "heart-lora-layer": (42,)},
        note="112 px, 10 epochs (1 warmup; K-shot runs get the engine's 100-step floor), batch 32, seeds 42, 43, 44 "
             "(bi-lora and heart-lora-layer: 42 only); tasks fashion_mnist, mnist, digits (natural), dsprites_loc, "
             "smallnorb_ele, clevr_count (structured), fashion_mnist@4shot (few-shot); every method at its defaults "
             "(heart methods: ne auto), nothing searched; linear-probe and hf-peft are benchmarks/baselines/hf_peft.py",
    ),
    # The cpu profile's settings on the built-in tasks that no default was chosen on (the defaults sweep and the
    # --ne refinement read only CPU_TASKS' val200): how the defaults carry to tasks they have never seen.
    "heldout": Profile(
        name="heldout", img_size=112, epochs=10, batch_size=32, seeds=(42,), tasks=HELDOUT_TASKS,
        methods=("hf-peft", "lora", "heart-lora", "heart-bi-lora"), threads=1, engine_profile="cpu",
        note="the cpu profile's settings (112 px, 10 epochs, 1 warmup, batch 32), seed 42; tasks dsprites_ori, "
             "clevr_dist, smallnorb_azi (structured), none of which any default was chosen on; every method at its "
             "defaults (heart methods: ne auto); hf-peft is benchmarks/baselines/hf_peft.py",
    ),
    # The paper's schedule on a GPU (issue 17 item 5): the cpu profile's tasks, the three methods that carry the claims
    # and the plain recipe they are measured against (issue 16's goals hold at this schedule too).
    "paper": Profile(
        name="paper", img_size=224, epochs=100, batch_size=64, seeds=(42, 43, 44), tasks=CPU_TASKS,
        methods=("hf-peft", "lora", "heart-lora", "heart-bi-lora"), engine_profile="paper",
        note="224 px, 100 epochs (10 warmup), batch 64, seeds 42, 43, 44; the cpu profile's tasks; defaults only; "
             "hf-peft is benchmarks/baselines/hf_peft.py at the same size, epochs and batch",
    ),
    # A trial of the machinery only (tests, a first look): tiny images, 2 epochs, one task.
    "smoke": Profile(
        name="smoke", img_size=28, epochs=2, batch_size=32, seeds=(42,), tasks=("digits",), methods=ENGINE_METHODS,
        grids={"heart-lora": {"ne": [12, 36]}, "heart-lora-layer": {"ne": "from:heart-lora/12"},
               "heart-bi-lora": {"ne": "from:heart-lora"}},
        threads=1, note="machinery trial: 28 px, 2 epochs, digits only; not a result",
    ),
    # The GPU user's run: the METHOD.md §5 schedule, every task, three seeds, the Bi-LoRA scale grid and an ne grid.
    "full": Profile(
        name="full", img_size=224, epochs=100, batch_size=64, seeds=(42, 43, 44),
        tasks=NATURAL + STRUCTURED + FEWSHOT, methods=ENGINE_METHODS,
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
