"""What every command shares: exit statuses, the one-line parser, numeric flag types, tables."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from heartlora.engine import METHODS, TrainConfig
from heartlora.engine.settings import RANGES, Range
from heartlora.errors import HeartLoRAError, SettingError
from heartlora.method.heads_off import parse_ne
from heartlora.method.storage import adapter_file

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell or a job scheduler expects of a process it stopped


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `kill`, torchrun ending its workers) inside train or demo."""


BACKBONE_HELP = ("build this backbone instead of the one the file names (a file never makes heartlora download: "
                 "name a hub model here to fetch it, or give a local copy); its weights must match the file's")


def config_help(example: str, run_folder: bool = False) -> str:
    """``--config``'s help for a command: its keys are that command's own flag names (``example`` is one)."""
    return (f"read this command's flags from a YAML or TOML file whose keys are its flag names (e.g. `{example}`); "
            "flags given on the command line win" + (". A run folder's config.yaml repeats that run" if run_folder
                                                     else ""))


@dataclass
class Commands:
    """What a command group's ``register`` adds its sub-commands with: ``add(name, func, help)`` (a sub-parser with
    the shared flags), the sub-parsers themselves, and the shared parents (--debug/--verbose, --quiet)."""

    add: Callable[..., argparse.ArgumentParser]
    sub: Any
    common: argparse.ArgumentParser
    quiet: argparse.ArgumentParser


# ---------------------------------------------------------------------------------------------------------------------
# Output


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """Two-column key/value table (rich)."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # paths must stay whole: wrap, never cut with "…"
    for k, v in rows:
        table.add_row(k, v)
    Console(highlight=False).print(table)


def summary_rows(metrics: dict[str, Any], out: str | None) -> list[tuple[str, str]]:
    """The one-screen summary of a run, from its metrics."""
    acc = metrics.get("accuracy")
    split = metrics.get("accuracy_split", "?")
    heads = (f"{metrics.get('heads_off_count', len(metrics.get('heads_off', [])))} of {metrics.get('heads_total')}"
             if metrics.get("heads_total") else "n/a (no adapter)")
    rows = [
        ("task", str(metrics.get("task"))),
        ("method", f"{metrics.get('method')} on {metrics.get('backbone')}"),
        ("protocol", f"{metrics.get('protocol')}: trained on {metrics.get('train_split')}, reported on {split}"),
        (f"accuracy ({split})", "n/a" if acc is None else f"{100 * acc:.2f} %"),
        ("adapter bytes", f"{metrics.get('adapter_bytes', 0):,}"),
        ("trainable params", f"{metrics.get('trainable_params', 0):,}"),
        ("heads switched off", heads),
        ("epochs", f"{metrics.get('epochs')} (warmup {metrics.get('warmup_epochs')})"),
        ("time", f"{metrics.get('wall_s', 0):.0f} s, {metrics.get('train_images_per_s', 0):.1f} train img/s"),
    ]
    rows.append(("selection", "none on test: the last epoch is reported"))
    return rows


def file_lines(metrics: dict[str, Any], out: str) -> list[str]:
    """Where the run's files are, one per line (outside the table, so a long path is never wrapped or cut)."""
    files = metrics.get("files") or {}
    lines = []
    if files.get("responsiveness_plot"):
        lines.append(f"heatmap: {Path(out) / files['responsiveness_plot']}")
    lines.append(f"curves:  {Path(out) / files.get('curves_plot', 'curves.png')}")
    lines.append(f"metrics: {Path(out) / 'metrics.json'}")
    lines.append(f"adapter: {Path(out) / 'adapter.safetensors'}")
    return lines


def refuse_to_replace(path: Path, overwrite: bool, names: tuple[str, ...] = ()) -> None:
    """Refuse to write over an existing file (``names`` empty) or a folder holding one of ``names``, unless
    ``--overwrite``: nothing a user made is replaced without being asked."""
    if names and path.exists() and not path.is_dir():  # --overwrite replaces files in a folder, not the folder
        raise HeartLoRAError(f"{path} is a file, not a folder: name a folder to write")
    if overwrite:
        return
    if names:
        taken = [n for n in names if (path / n).exists()]
        if taken:
            raise HeartLoRAError(f"{path} already holds {', '.join(taken)}: name another folder, or pass --overwrite "
                                 "to replace them")
    elif path.exists():
        raise HeartLoRAError(f"{path} already exists: name another file with --out, or pass --overwrite to replace "
                             "it")


def adapter_path(value: str) -> Path:
    """A run folder stands for the adapter.safetensors inside it (the library's rule: storage.adapter_file)."""
    return adapter_file(value)


def add_adapter_argument(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The adapter a command reads, as its first argument or as ``--adapter`` (what eval, predict and serve take),
    so that either spelling works on every command."""
    what = "adapter.safetensors (or the run folder)"
    p.add_argument("adapter", nargs="?", metavar="ADAPTER", help=f"{what}; or give it as --adapter")
    p.add_argument("--adapter", dest="adapter_flag", metavar="ADAPTER", help=f"{what}, as the other commands take it")
    p.set_defaults(adapter_required=required)


def given_adapter(args: argparse.Namespace) -> str | None:
    """The adapter ``add_adapter_argument`` read (None when neither spelling is given and it is optional)."""
    both = [a for a in (args.adapter, args.adapter_flag) if a is not None]
    if len(both) == 2 and both[0] != both[1]:
        raise HeartLoRAError(f"two adapters given ({both[0]} and --adapter {both[1]}): give one")
    if not both and args.adapter_required:
        raise HeartLoRAError("give the adapter file or run folder: ADAPTER or --adapter ADAPTER")
    return both[0] if both else None


# ---------------------------------------------------------------------------------------------------------------------
# Flags


GROUP_TITLES = {"what to train": "what to train", "adapter": "adapter and attention heads",
                "schedule": "schedule (defaults: docs/METHOD.md §5, or the --profile)", "run": "run"}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with the field's help and default: the dataclass is the only copy."""
    groups = {key: p.add_argument_group(title) for key, title in GROUP_TITLES.items()}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if f.name == "notes":
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = meta.get("fill") if meta.get("fill") is not None else f.default
        shown = meta.get("default_text") or (",".join(default) if isinstance(default, tuple) else default)
        text = meta["help"] + ("" if shown is None or isinstance(shown, bool) else f" (default {shown})")
        if meta.get("hidden"):
            text = argparse.SUPPRESS
        kind = hints[f.name]
        g = groups[meta["group"]]
        if f.name == "method":
            text += ": " + "; ".join(f"{k}: {m.description}" for k, m in METHODS.items())
            g.add_argument(flag, dest=f.name, help=text)  # not choices=: registered baselines join at run time
        elif kind in (bool, bool | None):
            # --no-pretrained stores False, --quiet turns progress off, the others switch a feature on.
            const = False if flag.startswith("--no-") else not (f.default if isinstance(f.default, bool)
                                                                 else meta.get("fill", True))
            g.add_argument(flag, dest=f.name, action="store_const", const=const, default=f.default, help=text)
        else:
            typ = next((t for t in (int, float) if kind in (t, t | None)), str)
            if f.name in RANGES:
                typ = number(f.name)
            elif f.name == "ne":
                typ = heads_flag(flag)
            g.add_argument(flag, dest=f.name, type=typ, choices=meta.get("choices"), default=f.default, help=text)
    groups["run"].add_argument("--json", action="store_true", help="print metrics.json instead of the summary")


OTHER_RANGES = {"port": ("int", 0, 65535, "(0: any free port)"), "max_batch": ("int", 1, 100_000, ""),
                "max_wait_ms": ("float", 0, 60_000, "milliseconds"), "top_k": ("int", 1, 1000, ""),
                "batches": ("int", 1, 100_000, ""), "cache_mb": ("float", 0.01, 10_000_000, "MiB")}


def number(name: str, flag: str | None = None) -> Callable[[str], Any]:
    """The argparse type of a numeric flag (``flag``, default ``--name``): its text as a number in the setting's
    range (``RANGES``), else one line naming the flag and the range, before anything is loaded."""
    if name in RANGES:
        rule = RANGES[name]
    else:
        kind, lo, hi, hint = OTHER_RANGES[name]
        rule = Range(int if kind == "int" else float, lo, hi, hint=hint)
    flag = flag or "--" + name.replace("_", "-")

    def parse(text: str) -> Any:
        try:
            return rule.check(flag, text)
        except HeartLoRAError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in its messages
    parse.rule = rule  # type: ignore[attr-defined]  (tests/test_fuzz.py enumerates the numeric flags by it)
    return parse


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    """--threads for a command that runs a model (train has its own, a TrainConfig field)."""
    p.add_argument("--threads", type=number("threads"),
                   help="CPU threads of this process (default: PyTorch's; 1 is often faster on a machine busy with "
                        "other jobs)")


def use_threads(args: argparse.Namespace) -> None:
    """Apply --threads (before the model is built: the command runs in its own process, nothing to restore)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def heads_flag(flag: str) -> Callable[[str], str]:
    """The argparse type of --ne: auto, or a whole number of heads ≥ 0 (kept as text, as resolve reads it), checked
    by the one parser of the heads-off rule (``heartlora.method.heads_off.parse_ne``)."""
    rule = Range(int, 0, hint="heads, or auto")  # what tests/test_fuzz.py tries (nan, inf, 0, -1)
    names = {"ne": flag}

    def parse(text: str) -> str:
        try:
            parse_ne(text, names)
        except HeartLoRAError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = "ne"
    parse.rule = rule  # type: ignore[attr-defined]
    return parse


class Parser(argparse.ArgumentParser):
    """Parse errors in one line, like every other error (``--help`` shows the usage)."""

    def error(self, message: str) -> Any:
        message = " ".join(message.split())
        if message.startswith("argument ") and ": --" in message:  # "argument --lr: --lr nan is …": once is enough
            message = message.split(": ", 1)[1]
        self.exit(EXIT_ERROR, f"error: {message} (heartlora {self.prog.split(' ', 1)[-1]} --help shows the flags)\n"
                  if " " in self.prog else f"error: {message} (heartlora --help shows the commands)\n")


def field_choices(name: str) -> tuple[str, ...]:
    """A TrainConfig field's choices, for a flag of another command that takes the same values."""
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name).metadata["choices"]


def one_line(exc: BaseException) -> str:
    text = " ".join((exc.for_cli() if isinstance(exc, SettingError) else str(exc)).split())
    return text or type(exc).__name__
