"""The ``tessera`` command.

    tessera serve [--host H] [--port P] [--model M] [--redis-url URL] [--dtype D]
                  [--device D] [--num-slots N] [--drain-timeout S] [--log-level L]
    tessera create-tenant NAME                      # admin key
    tessera upload NAME PATH | --config C --weights W   # tenant key
    tessera activate TASK ADAPTER VERSION           # tenant key
    tessera list {adapters,tasks}                   # tenant key

``serve`` takes its settings from ``TESSERA_*`` / ``TESSERA_STORE_*`` environment
variables (see :class:`server.server_settings.ServerSettings`); a flag given on the command
line wins over the environment. It runs uvicorn; SIGTERM or Ctrl-C stops accepting
connections, lets open requests finish (``--drain-timeout`` seconds), drains the engine in
the app's lifespan, stops the embedded Redis (if any) and exits 0.

The admin commands talk to a running server over HTTP: ``--url`` (``TESSERA_URL``, default
``http://127.0.0.1:8000``) and ``--key`` (default ``TESSERA_ADMIN_KEY`` for
``create-tenant``, ``TESSERA_API_KEY`` otherwise). Output is the server's JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.settings import EngineSettings
from server.server_settings import ServerSettings
from store.settings import StoreSettings

log = logging.getLogger("tessera.cli")

DEFAULT_URL = "http://127.0.0.1:8000"
# files of a PEFT adapter folder the server reads (adapters.peft_io names)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CliError(Exception):
    """A user-facing failure: the message is printed, the exit status is 1."""


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
    return parser


def serve_settings(args: argparse.Namespace, base: ServerSettings | None = None
                   ) -> ServerSettings:
    """``base`` (default: ``ServerSettings()`` from the environment) with the flags given on
    the command line applied; the result is validated like the environment is."""
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
    from server.app import create_app
    from server.runner import TesseraServer

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = serve_settings(args)
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


# --- admin client --------------------------------------------------------------------------
def request(args: argparse.Namespace, method: str, path: str, *, body: bytes | None = None,
            content_type: str | None = None) -> Any:
    """One HTTP call to the server; the decoded JSON answer, or CliError."""
    if not args.key:
        raise CliError("no key: pass --key or set the environment variable (see --help)")
    headers = {"Authorization": f"Bearer {args.key}", "Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    url = args.url.rstrip("/") + path
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise CliError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach {args.url}: {exc}") from exc
    return json.loads(raw) if raw else None


def multipart(files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """``field -> (filename, bytes)`` as a multipart/form-data body and its content type."""
    boundary = f"tessera-{uuid.uuid4().hex}"
    out = io.BytesIO()
    for field, (filename, data) in files.items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                  f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream"
                  "\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def folder_archive(folder: Path) -> bytes:
    """The PEFT files of ``folder`` as an in-memory .tar.gz."""
    missing = [name for name in PEFT_FILES if not (folder / name).is_file()]
    if missing:
        raise CliError(f"{folder} is not a PEFT adapter folder: missing {', '.join(missing)}")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name in PEFT_FILES:
            tar.add(folder / name, arcname=name)
    return out.getvalue()


def upload_files(args: argparse.Namespace) -> dict[str, tuple[str, bytes]]:
    if args.path is not None and (args.config or args.weights):
        raise CliError("give either PATH or --config and --weights, not both")
    if args.path is None:
        if not (args.config and args.weights):
            raise CliError("give a PATH, or both --config and --weights")
        return {"config": (args.config.name, _read(args.config)),
                "weights": (args.weights.name, _read(args.weights))}
    if args.path.is_dir():
        return {"archive": (f"{args.name}.tar.gz", folder_archive(args.path))}
    return {"archive": (args.path.name, _read(args.path))}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc


def admin(args: argparse.Namespace) -> Any:
    quote = urllib.parse.quote
    if args.command == "create-tenant":
        body = json.dumps({"name": args.name}).encode()
        return request(args, "POST", "/v1/tenants", body=body,
                       content_type="application/json")
    if args.command == "upload":
        data, content_type = multipart(upload_files(args))
        return request(args, "POST", f"/v1/adapters/{quote(args.name, safe='')}", body=data,
                       content_type=content_type)
    if args.command == "activate":
        body = json.dumps({"adapter": args.adapter, "version": args.version}).encode()
        return request(args, "POST", f"/v1/tasks/{quote(args.task, safe='')}/activate",
                       body=body, content_type="application/json")
    if args.command == "list":
        return request(args, "GET", f"/v1/{args.what}")
    raise CliError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        answer = admin(args)
    except CliError as exc:
        sys.stderr.write(f"tessera: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(answer, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
