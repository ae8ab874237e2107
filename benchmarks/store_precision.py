"""What storing a trained adapter at float16 or bfloat16 costs in accuracy: real run folders, each evaluated as stored
(float32), then converted (``heartlora.convert_adapter``, what ``heartlora export … --format heartlora --dtype``
writes) and evaluated again on the same images.

For every finished run folder given (default: every one under runs/frontier/, the frontier's val200 runs), on the
split the run reported (val200 for a val run), with the run's image size and seed: accuracy at each precision, how
many predictions changed, the largest logit change, and the adapter bytes. The frontier counts heartlora's float
adapters at fp16 bytes; this is the measurement that says what that rounding does to their accuracy.

    .venv/bin/python benchmarks/store_precision.py         # writes benchmarks/records/store_precision.json
    .venv/bin/python benchmarks/store_precision.py runs/x runs/y --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from heartlora_bench import write_text_atomic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "records" / "store_precision.json"
DTYPES = ("float16", "bfloat16")


def measure(run: Path, scratch: Path) -> dict[str, Any]:
    """One run folder at float32 (as stored) and at each of ``DTYPES``."""
    import heartlora as hl
    from heartlora.data import get_task
    from heartlora.engine.metrics import predict_logits

    metrics = json.loads((run / "metrics.json").read_text())
    model, info = hl.load_trained(run)
    facts = info["run"]
    task = get_task(facts["task"])
    split = metrics["accuracy_split"]
    images, labels = task.load(split, img_size=facts["img_size"], seed=int(facts.get("init_seed", 0)))
    device = torch.device("cpu")
    with torch.no_grad():
        base = predict_logits(model, images, device)
    stored = hl.read_adapter_info(run / "adapter.safetensors")
    row: dict[str, Any] = {"run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
                           "task": facts["task"], "method": facts.get("method"), "split": split, "images": len(labels),
                           "bits": stored["config"]["bits"], "float32": {
                               "accuracy": float((base.argmax(1) == labels).float().mean()),
                               "adapter_bytes": stored["adapter_bytes"]}}
    for dtype in DTYPES:
        path = scratch / f"{dtype}.safetensors"
        report = hl.convert_adapter(run / "adapter.safetensors", path, dtype)
        other, _ = hl.load_trained(path)
        with torch.no_grad():
            logits = predict_logits(other, images, device)
        row[dtype] = {"accuracy": float((logits.argmax(1) == labels).float().mean()),
                      "adapter_bytes": report.adapter_bytes,
                      "predictions_changed": int((logits.argmax(1) != base.argmax(1)).sum()),
                      "max_logit_change": float((logits - base).abs().max())}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path, help="finished run folders (default: every one under runs/frontier)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = args.runs or sorted(m.parent for m in (ROOT / "runs" / "frontier").glob("**/metrics.json")
                               if (m.parent / "adapter.safetensors").is_file())
    if not runs:
        raise SystemExit("no finished run folders given or under runs/frontier: train one, or name run folders")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            rows.append(measure(run.resolve(), Path(tmp)))
            r = rows[-1]
            print(f"{r['run']}: {r['split']} acc {100 * r['float32']['accuracy']:.1f} % float32 "
                  f"({r['float32']['adapter_bytes']:,} B), "
                  + ", ".join(f"{100 * r[d]['accuracy']:.1f} % {d} ({r[d]['adapter_bytes']:,} B, "
                              f"{r[d]['predictions_changed']} of {r['images']} predictions changed, logits by at most "
                              f"{r[d]['max_logit_change']:.2g})" for d in DTYPES), flush=True)
    import platform

    summary = {d: {"runs": len(rows),
                   "mean_accuracy_change_points": 100 * sum(r[d]["accuracy"] - r["float32"]["accuracy"]
                                                            for r in rows) / len(rows),
                   "predictions_changed": sum(r[d]["predictions_changed"] for r in rows),
                   "images": sum(r["images"] for r in rows)} for d in DTYPES}
    for d, s in summary.items():
        print(f"{d}: {s['predictions_changed']} of {s['images']} predictions changed over {s['runs']} runs; mean "
              f"accuracy change {s['mean_accuracy_change_points']:+.2f} points")
    record = {"command": ".venv/bin/python benchmarks/store_precision.py" + "".join(f" {r}" for r in args.runs),
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": args.threads},
              "summary": summary, "runs": rows}
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
