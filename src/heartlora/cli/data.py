"""``heartlora data list`` and ``heartlora data export``: the registered tasks, one as a VTAB-1K folder."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from heartlora.cli.common import (
    Commands,
    number,
)
from heartlora.data import export_task, get_task, list_tasks
from heartlora.errors import HeartLoRAError


def cmd_data_list(args: argparse.Namespace) -> int:
    tasks = list_tasks()
    rows = []
    for t in tasks:
        sizes = ""
        if args.sizes:
            try:
                s = get_task(t.name).split_sizes()
                sizes = f"{s['train800']}/{s['val200']}/{s['test']}"
            except HeartLoRAError as exc:
                sizes = f"unavailable: {exc}"
        rows.append((t.name, t.group, t.description, sizes))
    table = Table(title="heartlora tasks" + (" (sizes: train800/val200/test)" if args.sizes else ""))
    for col in ("task", "group", "description") + (("sizes",) if args.sizes else ()):
        table.add_column(col)
    for r in rows:
        table.add_row(*(r if args.sizes else r[:3]))
    Console(highlight=False).print(table)
    print("also: vtab:/path/to/folder (VTAB-1K layout) and NAME@Kshot (few-shot: K training images a class, any K "
          "every class of train800 has; the benchmarks use 1, 2, 4, 8, 16)")
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    out = export_task(get_task(args.task), args.dir, img_size=args.img_size, overwrite=args.overwrite)
    print(f"wrote {args.task} to {out} (VTAB-1K layout: read it back with --task vtab:{out})")
    return 0


def register(cli: Commands) -> None:
    """data list and data export."""
    data = cli.sub.add_parser("data", parents=[cli.common], help="list or export tasks")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    p = data_sub.add_parser("list", parents=[cli.common, cli.quiet], help="every registered task")
    p.add_argument("--sizes", action="store_true", help="also count split sizes (builds generated tasks)")
    p.set_defaults(func=cmd_data_list)
    p = data_sub.add_parser("export", parents=[cli.common, cli.quiet], help="write a task as a VTAB-1K folder")
    p.add_argument("task", help="a registered task (heartlora data list), NAME@Kshot or a folder")
    p.add_argument("dir", help="folder to write the VTAB-1K layout into")
    p.add_argument("--img-size", type=number("img_size"), help="resize (default: native size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR when it is not empty (the new folder is renamed into its place)")
    p.set_defaults(func=cmd_data_export)

