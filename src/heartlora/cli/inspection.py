"""``heartlora inspect``: an adapter file's metadata, bytes and head masks; ``--compare`` several."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from heartlora.cli.common import (
    Commands,
    adapter_path,
    add_adapter_argument,
    given_adapter,
    print_table,
)
from heartlora.engine import read_run_info
from heartlora.engine.compare import jaccard, kendall_tau, spearman
from heartlora.engine.inference import run_img_size
from heartlora.errors import HeartLoRAError


def cmd_inspect(args: argparse.Namespace) -> int:
    args.file = given_adapter(args)
    if args.compare is not None:
        return _inspect_compare(args)
    if args.file is None:
        raise HeartLoRAError("give an adapter file or run folder to inspect, or --compare A B … to compare several")
    path = adapter_path(args.file)
    info = read_run_info(path)
    run, adapter = info["run"], info["adapter"]
    spec = run.get("backbone_spec") or (adapter or {}).get("backbone", {})
    rows = [("file", f"{path} ({path.stat().st_size:,} bytes)"),
            ("backbone", (f"{spec.get('name')} ({spec.get('num_classes')} classes, "
                          f"{run_img_size(info)} px, pretrained={run.get('pretrained')})")),
            ("task / method", f"{run.get('task')} / {run.get('method')}")]
    masks: dict[str, list[bool]] = {}
    if adapter is not None:
        cfg = adapter.get("config", {})
        masks = {layer["name"]: list(layer["head_mask"]) for layer in adapter.get("layers", [])}
        total = sum(len(m) for m in masks.values())
        on = sum(sum(m) for m in masks.values())
        rows += [("targets / rank", f"{','.join(cfg.get('targets', []))} / {cfg.get('rank')}"),
                 ("scale / bits", f"{cfg.get('scale')} / {cfg.get('bits')}"),
                 ("adapter bytes", f"{adapter.get('adapter_bytes', 0):,} (weights and quantization constants, "
                                   f"stored as {adapter.get('dtype', 'float32')})"),
                 ("heads on", f"{on} of {total}")]
    else:
        rows.append(("adapter", "none: this method stores plain weights"))
    if args.json:
        print(json.dumps({"run": run, "adapter": adapter}, indent=2))
    else:
        print_table("heartlora inspect", rows)
        width = max((len(n) for n in masks), default=0)
        for name, mask in masks.items():
            cells = "".join("■" if m else "·" for m in mask)
            print(f"  {name.ljust(width)}  {cells}  {sum(mask)}/{len(mask)} on")
        if masks:
            print("  (■ on, · switched off)")
    if args.plot is not None:

        target = Path(args.plot) if args.plot else path.with_suffix(".responsiveness.png")
        if not masks:
            raise HeartLoRAError(f"{path} has no adapter heads to plot (method {run.get('method')})")
        from heartlora.engine.plots import responsiveness_heatmap  # matplotlib: see heartlora.cli.main

        responsiveness_heatmap(target, run.get("responsiveness") or None, masks,
                               title=f"{run.get('task')} · {run.get('method')} · {spec.get('name')}")
        print(f"heatmap written to {target}")
    return 0


def _inspect_compare(args: argparse.Namespace) -> int:
    """``inspect --compare A B …``: the files' head rankings side by side (Kendall τ and Spearman ρ of their
    responsiveness scores, Jaccard of the heads they switched off), and with --plot a heatmap grid."""
    given = ([args.file] if args.file else []) + list(args.compare)
    if len(given) < 2:
        raise HeartLoRAError("--compare needs at least two adapter files or run folders")
    panels: dict[str, tuple[dict[str, list[float]], dict[str, list[bool]]]] = {}
    paths = [adapter_path(g) for g in given]
    for path in paths:
        info = read_run_info(path)
        scores = info["run"].get("responsiveness") or {}
        if not scores or info["adapter"] is None:
            raise HeartLoRAError(f"{path} holds no responsiveness scores (method {info['run'].get('method')}): "
                                 "compare files of adapter methods trained by heartlora")
        name = path.parent.name if path.name == "adapter.safetensors" else path.stem
        while name in panels:
            name += "'"
        panels[name] = (scores, {layer["name"]: list(layer["head_mask"]) for layer in info["adapter"]["layers"]})
    rows = []
    names = list(panels)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (sa, ma), (sb, mb) = panels[a], panels[b]
            off_a = {(n, h) for n, m in ma.items() for h, on in enumerate(m) if not on}
            off_b = {(n, h) for n, m in mb.items() for h, on in enumerate(m) if not on}
            rows.append({"a": a, "b": b, "kendall": kendall_tau(sa, sb), "spearman": spearman(sa, sb),
                         "jaccard_off": jaccard(off_a, off_b), "off_a": len(off_a), "off_b": len(off_b)})
    if args.json:
        print(json.dumps({"files": [str(p) for p in paths], "pairs": rows}, indent=2))
    else:
        width = max(len(n) for n in names)
        print(f"{'A'.ljust(width)}  {'B'.ljust(width)}  Kendall τ  Spearman ρ  Jaccard(off)")
        for r in rows:
            print(f"{r['a'].ljust(width)}  {r['b'].ljust(width)}  {r['kendall']:9.3f}  {r['spearman']:10.3f}  "
                  f"{r['jaccard_off']:.3f} ({r['off_a']} vs {r['off_b']} heads off)")
    if args.plot is not None:
        target = Path(args.plot) if args.plot else paths[0].parent / "compare.responsiveness.png"
        from heartlora.engine.plots import heatmap_grid  # matplotlib: see heartlora.cli.main

        heatmap_grid(target, panels, title=" vs ".join(names))
        print(f"heatmap grid written to {target}")
    return 0


def register(cli: Commands) -> None:
    """inspect."""
    p = cli.add("inspect", cmd_inspect, "metadata, bytes and attention-head masks of an adapter file")
    add_adapter_argument(p, required=False)
    p.add_argument("--compare", nargs="+", metavar="FILE", default=None,
                   help="compare the head rankings of these adapter files or run folders (and FILE, if given): "
                        "Kendall τ, Spearman ρ and Jaccard of the switched-off heads for every pair")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="also write the heads heatmap (default: beside the file; with --compare, a grid beside the "
                        "first file, compare.responsiveness.png)")
    p.add_argument("--json", action="store_true",
                   help="print the file's run facts and adapter metadata as JSON (with --compare: the pairs)")

