"""The ``heartlora`` command: the parser (one module per command group: train, evaluate, serving, inspection, peft_io,
data) and the entry point, which turns every error a user can fix into one line.

Errors a user can fix (every ``HeartLoRAError``, a missing or unreadable file) print one line, ``error: …``, and
exit with status 2; ``--debug`` shows the traceback instead.

Imports are at the top of each module, with two kinds of exception. Optional dependencies (peft, FastAPI, tensorboard,
wandb, mlflow) are imported where they are used, so a command that does not need them runs without them. And
matplotlib, which only ``inspect --plot`` needs from the command line, is imported when a plot is drawn: importing
it with the rest cost ``heartlora --help`` 0.42 s more (``python -X importtime -c "import heartlora.cli.main"``:
2.70 s with it, 2.54 s without, most of it torch's 2.0 s; on the 2-core development machine with training jobs
running).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from heartlora import __version__
from heartlora.cli import data, evaluate, inspection, peft_io, serving, train
from heartlora.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, Commands, Parser, Terminated, one_line
from heartlora.cli.configfile import apply_config, find_config
from heartlora.cli.data import cmd_data_export, cmd_data_list
from heartlora.cli.inspection import cmd_inspect
from heartlora.cli.train import DEMO, cmd_demo, cmd_train
from heartlora.engine.settings import QUIET_HELP
from heartlora.errors import HeartLoRAError

__all__ = ["DEMO", "EXIT_ERROR", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also show what transformers, huggingface_hub and heartlora log (load reports, "
                             "progress bars), silenced by default")
    quiet = Parser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    parser = Parser(
        prog="heartlora", parents=[common],
        description="Heart-LoRA fine-tuning of vision transformers: LoRA with the least responsive attention heads "
                    "switched off.",
        epilog="Multi-process: torchrun --nproc_per_node N -m heartlora train …  (docs/CLI.md: 'Many processes and "
               "machines')")
    parser.add_argument("--version", action="version", version=f"heartlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str,
            own_quiet: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common] if own_quiet else [common, quiet], help=help, description=help)
        p.set_defaults(func=func)
        return p

    cli = Commands(add=add, sub=sub, common=common, quiet=quiet)
    for group in (train, evaluate, serving, inspection, peft_io, data):
        group.register(cli)
    return parser


CONFIG_COMMANDS = ("train", "eval", "serve")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, with ``--config FILE``'s values as the defaults of train, eval and serve."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    path = find_config(argv)
    command = next((tok for tok in argv if not tok.startswith("-")), None)
    if path is not None and command in CONFIG_COMMANDS:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        apply_config(subparsers.choices[command], path, argv, command)
    return parser.parse_args(argv)


@contextlib.contextmanager
def third_party_output(verbose: bool, loads_models: bool = True) -> Iterator[None]:
    """For a command that builds models: transformers' load reports and progress bars (huggingface_hub's too) off,
    unless ``verbose``, which also shows heartlora's own log records on stderr. transformers' settings are put
    back afterwards."""
    tlog = sys.modules.get("transformers.utils.logging")
    if tlog is None and loads_models:
        import transformers.utils.logging as tlog  # the command imports transformers anyway
    before = (tlog.get_verbosity(), tlog.is_progress_bar_enabled()) if tlog else None
    if tlog:
        tlog.set_verbosity(logging.INFO if verbose else logging.ERROR)
        (tlog.enable_progress_bar if verbose else tlog.disable_progress_bar)()
    ours = logging.getLogger("heartlora")
    handler = logging.StreamHandler(sys.stderr) if verbose else None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            ours.removeHandler(handler)
            ours.setLevel(logging.NOTSET)
        if tlog and before:
            tlog.set_verbosity(before[0])
            if tlog.is_progress_bar_enabled() != before[1]:
                (tlog.enable_progress_bar if before[1] else tlog.disable_progress_bar)()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``heartlora`` console script; returns the exit status."""
    try:
        args = _parse(argv)
    except HeartLoRAError as exc:  # --config FILE: a missing, malformed or unknown-key file
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:  # --help, or a flag refused in one line (Parser.error): the status, not an exit
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    debug = getattr(args, "debug", False)
    verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False) or getattr(args, "progress", True) is False
    installed = _catch_sigterm(args)
    try:
        with third_party_output(verbose, loads_models=args.func not in (cmd_data_list, cmd_data_export, cmd_inspect)):
            return int(args.func(args) or 0)
    except Terminated:
        _say_stopped(args, "terminated (SIGTERM)")
        return EXIT_TERMINATED
    except HeartLoRAError as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
    except FileNotFoundError as exc:
        if debug:
            raise
        print(f"error: {exc.filename or one_line(exc)}: no such file or folder", file=sys.stderr)
    except PermissionError as exc:
        if debug:
            raise
        print(f"error: {exc.filename or one_line(exc)}: permission denied", file=sys.stderr)
    except BrokenPipeError:  # output piped into `head`: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        _say_stopped(args, "interrupted")
        return EXIT_INTERRUPTED
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return EXIT_ERROR


def _catch_sigterm(args: argparse.Namespace) -> bool:
    """train and demo unwind on SIGTERM like on Ctrl-C (the run folder is released, the exit says so). Only in a
    plain process: not where the host program has its own handler, not off the main thread, and not under torchrun,
    whose ranks may be inside a collective the signalled rank will never finish (torchrun stops them itself)."""
    if args.func not in (cmd_train, cmd_demo) or threading.current_thread() is not threading.main_thread():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _terminate)
    return True


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one-shot: a second SIGTERM must not break the unwinding
    raise Terminated


def _say_stopped(args: argparse.Namespace, how: str) -> None:
    """What a stopped command leaves and how to go on (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.func is cmd_train:
        then = ": the last finished epoch is checkpointed; continue with the same command and --resume"
    elif args.func is cmd_demo:
        then = ": the last finished epoch is checkpointed; `heartlora demo` again continues it"
    else:
        then = ""
    print(f"\n{how}{then}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
