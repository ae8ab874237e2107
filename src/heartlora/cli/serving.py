"""``heartlora serve``: an HTTP server over an AdapterBank."""

from __future__ import annotations

import argparse
import sys

from heartlora.bank import bank_from_files
from heartlora.bank_folder import bank_from_folder
from heartlora.cli.configfile import from_file
from heartlora.cli.common import (
    BACKBONE_HELP,
    config_help,
    Commands,
    add_threads_flag,
    number,
    use_threads,
)
from heartlora.engine.distributed import resolve_device
from heartlora.engine.settings import DEVICE_HELP
from heartlora.errors import ConfigError
from heartlora.serve import require_serving, serve
from heartlora.serve_api import check_token, create_api, require_api


def cmd_serve(args: argparse.Namespace) -> int:
    require_serving()
    require_api()
    token = check_token(args.admin_token)  # before the adapters are loaded
    use_threads(args)
    if args.adapter and args.adapter_dir and from_file(args, "adapter") != from_file(args, "adapter_dir"):
        # one of them from the --config file, the other from the command line: the command line wins
        if from_file(args, "adapter"):
            args.adapter = None
        else:
            args.adapter_dir = None
    if bool(args.adapter) == bool(args.adapter_dir):
        raise ConfigError("give the adapters to serve: --adapter FILE (repeat it for several) or --adapter-dir DIR, "
                          "not both")
    if args.adapter_dir:
        bank, img_size = bank_from_folder(args.adapter_dir, resolve_device(args.device), backbone=args.backbone,
                                          cache_mb=args.cache_mb)
        if args.preload:
            bank.preload()
        budget = "no memory limit" if args.cache_mb is None else f"at most {args.cache_mb:g} MiB of adapters in memory"
        what = f"the adapters of {args.adapter_dir} ({len(bank.available())} now, {len(bank.tasks)} loaded; {budget})"
    else:
        if args.cache_mb is not None or args.preload:
            raise ConfigError("--cache-mb and --preload apply to --adapter-dir DIR: drop them, or serve a folder")
        bank, img_size = bank_from_files(args.adapter, resolve_device(args.device), backbone=args.backbone)
        what = f"{len(bank.tasks)} tasks ({', '.join(bank.tasks)})"
    app = create_api(bank, img_size, args.max_batch, args.max_wait_ms, admin_token=token)
    admin = "; POST, DELETE /adapters with the admin token" if token else ""

    def listening(host: str, port: int) -> None:  # once the port is bound, never before
        if not args.quiet:
            print(f"serving {what} on http://{host}:{port} "
                  "(POST /predict?task=NAME with the image as the body or a form field; GET /tasks, /health; the "
                  f"API and its schema: /docs, /openapi.json{admin})", file=sys.stderr, flush=True)

    serve(bank, img_size, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          log_level="warning" if args.quiet else "debug" if getattr(args, "verbose", False) else "info", app=app,
          on_listening=listening)
    return 0


def register(cli: Commands) -> None:
    """serve."""
    p = cli.add("serve", cmd_serve, "an HTTP server for one or more adapters on one backbone (needs heartlora[serve])")
    p.add_argument("--config", metavar="FILE", help=config_help("port: 8000"))
    p.add_argument("--adapter", action="append", help="adapter.safetensors (or the run folder); "
                   "repeat it for every task to serve")
    p.add_argument("--adapter-dir", metavar="DIR", help="serve every adapter file in DIR (task NAME: NAME.safetensors "
                   "or NAME/adapter.safetensors), each loaded on its first request; files added later are found, "
                   "removed ones answer 404")
    p.add_argument("--cache-mb", type=number("cache_mb"), help="with --adapter-dir: the most recently used tasks "
                   "kept in memory within this many MiB of adapters (factors and classifiers; default: no limit)")
    p.add_argument("--preload", action="store_true", help="with --adapter-dir: load the folder's adapters at start, "
                   "as many as --cache-mb holds")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number("port"), default=8000, help="default 8000 (0: any free port)")
    p.add_argument("--backbone", help=BACKBONE_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_threads_flag(p)
    p.add_argument("--max-batch", type=number("max_batch"), default=32,
                   help="most requests answered by one bank call (default 32)")
    p.add_argument("--max-wait-ms", type=number("max_wait_ms"), default=5.0,
                   help="how long the first request of a batch waits for others to join it (default 5)")
    p.add_argument("--admin-token", metavar="TOKEN",
                   help="enable POST /adapters and DELETE /adapters/NAME (add and remove tasks while serving) for "
                        "requests with Authorization: Bearer TOKEN; at least 16 characters (default: "
                        "$HEARTLORA_ADMIN_TOKEN, else off)")

