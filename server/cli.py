"""The ``tessera`` command.

    tessera serve [--host H] [--port P] [--model M] [--redis-url URL] [--dtype D]
                  [--device D] [--num-slots N] [--drain-timeout S] [--log-level L]
                  [--log-format {auto,json,text}]
    tessera create-tenant NAME                      # admin key
    tessera upload NAME PATH | --config C --weights W   # tenant key
    tessera activate TASK ADAPTER VERSION           # tenant key
    tessera list {adapters,tasks}                   # tenant key
    tessera train METHOD --data FILE --out DIR [...]  # fine-tune an adapter (torch)
    tessera demo [--examples N] [--json FILE]      # demo adapters of every method, served

``serve`` takes its settings from ``TESSERA_*`` / ``TESSERA_STORE_*`` environment
variables (see :class:`tessera.server.server_settings.ServerSettings`); a flag given on the command
line wins over the environment. It runs uvicorn; SIGTERM or Ctrl-C stops accepting
connections, lets open requests finish (``--drain-timeout`` seconds), drains the engine in
the app's lifespan, stops the embedded Redis (if any) and exits 0.

With no ``TESSERA_ADMIN_KEY``, ``serve`` generates an admin key on its first start, keeps
it in a 0600 file and reuses it later (:mod:`tessera.server.admin_key`).

The admin commands talk to a running server over HTTP through
:class:`tessera.server.client.TesseraClient`: ``--url`` (``TESSERA_URL``, default
``http://127.0.0.1:8000``) and ``--key`` (default ``TESSERA_ADMIN_KEY`` for
``create-tenant``, ``TESSERA_API_KEY`` otherwise). Output is the server's JSON (``list``:
each adapter with its versions). This module imports no torch, transformers, pydantic or
settings at module level — only ``serve`` and ``train`` load them — so the admin commands
start fast. ``train`` is :mod:`tessera.train.command` (its options: ``tessera train --help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.server.cli_error import CliError
from tessera.server.client import (
    DEFAULT_URL,
    TesseraClient,
    TesseraConnectionError,
    TesseraError,
)
from tessera.train import command as train_command
from tessera.train import demo as demo_command

if TYPE_CHECKING:  # the settings import torch (tessera.engine.settings): loaded by `serve` only
    from tessera.server.server_settings import ServerSettings

log = logging.getLogger("tessera.cli")


# --- parsing -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Multi-tenant adapter "
                                     "serving: run the server or manage a running one.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server",
                                description="Settings come from TESSERA_* environment "
                                "variables; flags override them.")
    serve.add_argument("--host", default=os.environ.get("TESSERA_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("TESSERA_PORT", "8000")))
    serve.add_argument("--model", help="local directory or hub id (default: built-in model)")
    serve.add_argument("--redis-url", help="Redis URL (default: embedded redis-server)")
    serve.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    serve.add_argument("--device", choices=("cpu", "cuda", "auto"))
    serve.add_argument("--num-slots", type=int, help="adapters resident on the device")
    serve.add_argument("--drain-timeout", type=float,
                       help="seconds open requests may take to finish on shutdown")
    serve.add_argument("--log-level", default=os.environ.get("TESSERA_LOG_LEVEL", "info"),
                       choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--log-format", default=os.environ.get("TESSERA_LOG_FORMAT", "auto"),
                       choices=("auto", "json", "text"),
                       help="JSON lines or text (auto: text on a terminal, else JSON)")

    def client(name: str, help_: str, key_env: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--url", default=os.environ.get("TESSERA_URL", DEFAULT_URL))
        sub.add_argument("--key", default=os.environ.get(key_env),
                         help=f"bearer key (default: ${key_env})")
        sub.add_argument("--timeout", type=float, default=60.0)
        return sub

    tenant = client("create-tenant", "create a tenant; prints its API key once",
                    "TESSERA_ADMIN_KEY")
    tenant.add_argument("name")
    upload = client("upload", "upload an adapter version", "TESSERA_API_KEY")
    upload.add_argument("name", help="adapter name")
    upload.add_argument("path", nargs="?", type=Path,
                        help="PEFT adapter folder, or a .zip / .tar(.gz) archive of one")
    upload.add_argument("--config", type=Path, help="config JSON (with --weights)")
    upload.add_argument("--weights", type=Path, help="safetensors file (with --config)")
    activate = client("activate", "bind a task to an adapter version", "TESSERA_API_KEY")
    activate.add_argument("task")
    activate.add_argument("adapter")
    activate.add_argument("version", type=int)
    listing = client("list", "list your adapters or tasks", "TESSERA_API_KEY")
    listing.add_argument("what", choices=("adapters", "tasks"), nargs="?", default="adapters")
    train_command.add_parser(commands)
    demo_command.add_parser(commands)
    return parser


def serve_settings(args: argparse.Namespace, base: ServerSettings | None = None
                   ) -> ServerSettings:
    """``base`` (default: ``ServerSettings()`` from the environment) with the flags given on
    the command line applied; the result is validated like the environment is."""
    from pydantic import ValidationError

    from tessera.engine.settings import EngineSettings
    from tessera.server.server_settings import ServerSettings
    from tessera.store.settings import StoreSettings

    try:
        base = base if base is not None else ServerSettings()
    except ValidationError as exc:
        raise CliError(f"invalid settings in the environment:\n{exc}") from exc
    engine = {field: value for field, value in (
        ("model", args.model), ("dtype", args.dtype), ("device", args.device),
        ("num_slots", args.num_slots), ("drain_timeout_s", args.drain_timeout))
        if value is not None}
    store = {"redis_url": args.redis_url} if args.redis_url is not None else {}
    try:
        # model_validate, unlike the constructor, reads no environment variables
        return base.model_copy(update={
            "engine": EngineSettings.model_validate({**base.engine.model_dump(), **engine}),
            "store": StoreSettings.model_validate({**base.store.model_dump(), **store})})
    except ValidationError as exc:
        raise CliError(f"invalid option:\n{exc}") from exc


# --- serve ---------------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    from tessera.server.admin_key import AdminKeyError, ensure_admin_key
    from tessera.server.app import create_app
    from tessera.server.logs import configure_logging, json_format_of
    from tessera.server.runner import TesseraServer

    configure_logging(args.log_level, json_format=json_format_of(args.log_format))
    settings = serve_settings(args)
    try:
        settings = ensure_admin_key(settings, os.environ,
                                    url=f"http://{client_host(args.host)}:{args.port}")
    except AdminKeyError as exc:
        raise CliError(str(exc)) from exc
    log.info("starting tessera on %s:%d (model: %s, redis: %s)", args.host, args.port,
             settings.engine.model or "built-in",
             "configured URL" if settings.store.redis_url else "embedded")
    server = TesseraServer(create_app(settings), host=args.host, port=args.port,
                           log_level=args.log_level,
                           drain_timeout_s=settings.engine.drain_timeout_s)
    stopped_by: list[int] = []
    # uvicorn handles SIGTERM/SIGINT while it serves (TesseraServer drains the engine
    # first: open streams end with finish reason "shutdown"; then connections close and
    # the lifespan shutdown stops the engine and closes the store) and re-raises the
    # signal afterwards; these handlers receive that re-raise, so a requested, completed
    # shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    server.run()
    if stopped_by:
        log.info("tessera stopped by %s", signal.Signals(stopped_by[0]).name)
    return 0 if server.started else 1


# --- train ---------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> Any:
    """``tessera train``: logs like ``serve`` (text on a terminal), the summary on stdout."""
    from tessera.server.logs import configure_logging, json_format_of

    configure_logging("info", json_format=json_format_of("auto"))
    return train_command.run(args)


# --- demo ----------------------------------------------------------------------------------
def demo(args: argparse.Namespace) -> int:
    """``tessera demo`` (:mod:`tessera.train.demo`): prints its own table."""
    try:
        demo_command.run(args)
    except CliError as exc:
        sys.stderr.write(f"tessera demo: {exc}\n")
        return 1
    return 0


# --- admin client --------------------------------------------------------------------------
def client_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def check_upload_args(args: argparse.Namespace) -> None:
    if args.path is not None and (args.config or args.weights):
        raise CliError("give either PATH or --config and --weights, not both")
    if args.path is None and not (args.config and args.weights):
        raise CliError("give a PATH, or both --config and --weights")


def admin(args: argparse.Namespace) -> Any:
    """The command's call(s) through :class:`TesseraClient`; the JSON to print."""
    if not args.key:
        raise CliError("no key: pass --key or set the environment variable (see --help)")
    if args.command == "upload":
        check_upload_args(args)
    try:
        with TesseraClient(args.url, args.key, timeout=args.timeout) as client:
            return call(client, args)
    except (TesseraError, TesseraConnectionError):
        raise
    except ValueError as exc:  # an invalid --url, not a PEFT adapter folder
        raise CliError(str(exc)) from exc
    except OSError as exc:  # a file to upload
        raise CliError(f"cannot read {exc.filename}: {exc.strerror}") from exc


def call(client: TesseraClient, args: argparse.Namespace) -> Any:
    if args.command == "create-tenant":
        return client.create_tenant(args.name)
    if args.command == "upload":
        if args.path is not None:
            return client.upload(args.name, args.path)
        return client.upload_files(args.name, args.config, args.weights)
    if args.command == "activate":
        return client.activate(args.task, args.adapter, args.version)
    if args.command == "list" and args.what == "tasks":
        return {"tasks": client.tasks()}
    if args.command == "list":
        return {"adapters": client.adapters()}
    raise CliError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "demo":
            return demo(args)
        answer = train(args) if args.command == "train" else admin(args)
    except (CliError, TesseraError, TesseraConnectionError) as exc:
        sys.stderr.write(f"tessera: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
