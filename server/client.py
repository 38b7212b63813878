"""A small typed client of a running tessera server: tenants, adapter uploads, HyperLoader
hypernetworks and task embeddings, activation, listings and native generation
(``POST /v1/tasks/{task}/generate``).

It imports only the standard library and httpx — no torch, no transformers, nothing of the
server — so scripts and the ``tessera`` admin commands start in a fraction of a second::

    with TesseraClient("http://127.0.0.1:8000", key=admin_key) as admin:
        tenant = admin.create_tenant("acme")
    with TesseraClient("http://127.0.0.1:8000", key=tenant["api_key"]) as client:
        client.upload("my-lora", Path("./peft-output"))
        client.activate("summarise", "my-lora", 1)
        client.generate("summarise", "Hello", max_tokens=32)["text"]
        hyper = client.upload_hypernetwork("multi", Path("./hyperloader-output"))
        client.register_hyper_task("multi", hyper["version"], "ner",
                                   Path("./new-task/embedding.safetensors"))
        client.activate_hyper("ner", "multi", hyper["version"], "ner")

Answers are the server's JSON, typed as the dictionaries below. An error answer raises
:class:`TesseraError` carrying the server's error object; a server that cannot be reached
raises :class:`TesseraConnectionError`.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NotRequired, TypedDict, cast
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# the files of a PEFT adapter folder the server reads (tessera.adapters.peft_io's names)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# a tessera hypernetwork artifact (tessera.adapters.artifact.save_hypernetwork): the
# manifest (config and registered task embeddings) and the generator's weights
HYPERNETWORK_FILES = ("manifest.json", "weights.safetensors")


# --- answers (the server's JSON; server/schemas.py, server/openai_schemas.py) -------------
class Tenant(TypedDict):
    name: str
    api_key: str  # shown once


class AdapterVersion(TypedDict):
    name: str
    version: int
    method: str
    format: str
    sha256: str
    size: int
    created: float
    uploader: str
    metadata: dict[str, str]


class Adapter(TypedDict):
    name: str
    versions: list[AdapterVersion]


class Task(TypedDict):
    task: str
    adapter: str | None
    version: int | None
    revision: int
    updated: NotRequired[float | None]
    actor: NotRequired[str | None]
    hypernetwork: NotRequired[str | None]
    hyper_task: NotRequired[str | None]


class HypernetworkVersion(TypedDict):
    name: str
    version: int
    sha256: str  # of the weights file as uploaded
    size: int
    created: float
    uploader: str
    config: dict[str, Any]  # the generator's HyperLoaderConfig
    tasks: list[str]  # the HyperLoader tasks registered on this version


class Hypernetwork(TypedDict):
    name: str
    versions: list[HypernetworkVersion]


class Message(TypedDict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class Generation(TypedDict):
    id: str
    task: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


# --- errors --------------------------------------------------------------------------------
class TesseraError(Exception):
    """The server answered with an error status. ``error`` is the server's error object
    (``{"type": ..., "message": ..., "field": ...}``; for an answer that is not tessera's
    JSON, e.g. from a proxy, ``type`` is ``"http_error"`` and ``message`` its text)."""

    def __init__(self, status: int, error: dict[str, Any], *, method: str, path: str) -> None:
        self.status = status
        self.error = error
        self.method = method
        self.path = path
        super().__init__(f"{method} {path}: HTTP {status} {self.type}: {self.message}")

    @property
    def type(self) -> str:
        return str(self.error.get("type", "http_error"))

    @property
    def message(self) -> str:
        return str(self.error.get("message", ""))

    @property
    def field(self) -> str | None:
        field = self.error.get("field")
        return None if field is None else str(field)


class TesseraConnectionError(OSError):
    """The server could not be reached (refused, timed out, a broken connection)."""


def _error_of(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return cast(dict[str, Any], body["error"])
    return {"type": "http_error", "message": response.text[:1000]}


# --- uploads -------------------------------------------------------------------------------
def folder_archive(folder: Path) -> bytes:
    """The PEFT files of ``folder`` as an in-memory .tar.gz (other files are not sent).
    ValueError if one is missing."""
    missing = [name for name in PEFT_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a PEFT adapter folder: missing {', '.join(missing)}")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name in PEFT_FILES:
            tar.add(folder / name, arcname=name)
    return out.getvalue()


def hypernetwork_files(folder: Path) -> tuple[Path, Path]:
    """The manifest and weights of a hypernetwork artifact folder (what ``tessera train
    hyperloader`` writes). ValueError if one is missing."""
    missing = [name for name in HYPERNETWORK_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a hypernetwork artifact folder: missing "
                         f"{', '.join(missing)}")
    manifest, weights = (folder / name for name in HYPERNETWORK_FILES)
    return manifest, weights


def _content(data: Path | bytes, default_name: str) -> tuple[str, bytes]:
    if isinstance(data, bytes):
        return default_name, data
    return data.name, data.read_bytes()


# --- the client ----------------------------------------------------------------------------
class TesseraClient:
    """One server, one bearer key (the admin key for :meth:`create_tenant`, a tenant's API
    key for the rest). Thread-safe as httpx.Client is; close it, or use it as a context
    manager."""

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, *,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.url = url.rstrip("/")
        try:
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                      transport=transport)
        except httpx.InvalidURL as exc:
            raise ValueError(f"invalid server URL {url!r}: {exc}") from exc
        if self._http.base_url.scheme not in ("http", "https"):
            self._http.close()
            raise ValueError(f"invalid server URL {url!r}: give http:// or https://")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TesseraClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise TesseraConnectionError(f"cannot reach {self.url}: {exc}") from exc
        if response.is_error:
            raise TesseraError(response.status_code, _error_of(response), method=method,
                               path=path)
        return response.json() if response.content else None

    # tenants (admin key)
    def create_tenant(self, name: str) -> Tenant:
        """A new tenant and its API key (shown once: keep it)."""
        return cast(Tenant, self._call("POST", "/v1/tenants", json={"name": name}))

    # adapters (tenant key)
    def upload(self, name: str, path: Path) -> AdapterVersion:
        """A new version of adapter ``name`` from a PEFT adapter folder (its
        adapter_config.json and adapter_model.safetensors, sent as a .tar.gz) or an archive
        of one (.zip, .tar, .tar.gz, .tgz)."""
        if path.is_dir():
            files = {"archive": (f"{name}.tar.gz", folder_archive(path))}
        else:
            files = {"archive": (path.name, path.read_bytes())}
        return self._upload(name, files)

    def upload_files(self, name: str, config: Path | bytes, weights: Path | bytes
                     ) -> AdapterVersion:
        """A new version from a config (PEFT adapter_config.json or a tessera manifest)
        and safetensors weights, each a file or its bytes."""
        return self._upload(name, {"config": _content(config, "config.json"),
                                   "weights": _content(weights, "weights.safetensors")})

    def _upload(self, name: str, files: dict[str, tuple[str, bytes]]) -> AdapterVersion:
        return cast(AdapterVersion, self._post_files(f"/v1/adapters/{_q(name)}", files))

    def _post_files(self, path: str, files: dict[str, tuple[str, bytes]]) -> Any:
        parts = {field: (filename, data, "application/octet-stream")
                 for field, (filename, data) in files.items()}
        return self._call("POST", path, files=parts)

    def adapter_names(self) -> list[str]:
        return cast(list[str], self._call("GET", "/v1/adapters")["adapters"])

    def adapter(self, name: str) -> Adapter:
        """One adapter with all its versions."""
        return cast(Adapter, self._call("GET", f"/v1/adapters/{_q(name)}"))

    def adapters(self) -> list[Adapter]:
        """Every adapter of the tenant with its versions (one request per adapter)."""
        return [self.adapter(name) for name in self.adapter_names()]

    # HyperLoader hypernetworks (tenant key)
    def upload_hypernetwork(self, name: str, folder: Path) -> HypernetworkVersion:
        """A new version of hypernetwork ``name`` from a hypernetwork artifact folder (its
        manifest.json and weights.safetensors; the task embeddings registered in the
        manifest are registered on the new version too)."""
        manifest, weights = hypernetwork_files(folder)
        return self.upload_hypernetwork_files(name, manifest, weights)

    def upload_hypernetwork_files(self, name: str, manifest: Path | bytes,
                                  weights: Path | bytes) -> HypernetworkVersion:
        """A new version from a hypernetwork manifest and its safetensors weights, each a
        file or its bytes."""
        return cast(HypernetworkVersion, self._post_files(
            f"/v1/hypernetworks/{_q(name)}",
            {"manifest": _content(manifest, "manifest.json"),
             "weights": _content(weights, "weights.safetensors")}))

    def hypernetwork_names(self) -> list[str]:
        return cast(list[str], self._call("GET", "/v1/hypernetworks")["hypernetworks"])

    def hypernetwork(self, name: str) -> Hypernetwork:
        """One hypernetwork with all its versions (oldest first)."""
        return cast(Hypernetwork, self._call("GET", f"/v1/hypernetworks/{_q(name)}"))

    def hypernetwork_version(self, name: str, version: int) -> HypernetworkVersion:
        return cast(HypernetworkVersion, self._call(
            "GET", f"/v1/hypernetworks/{_q(name)}/versions/{int(version)}"))

    def hypernetworks(self) -> list[Hypernetwork]:
        """Every hypernetwork of the tenant with its versions (one request per name)."""
        return [self.hypernetwork(name) for name in self.hypernetwork_names()]

    def register_hyper_task(self, hypernetwork: str, version: int, task: str,
                            embedding: Path | bytes) -> HypernetworkVersion:
        """Register HyperLoader task ``task`` on ``hypernetwork`` ``version`` from its
        embedding (a safetensors file holding one tensor ``[task_dim]``: the
        ``embedding.safetensors`` of ``tessera train task-embedding``); returns the
        version with its tasks."""
        return cast(HypernetworkVersion, self._post_files(
            f"/v1/hypernetworks/{_q(hypernetwork)}/versions/{int(version)}/tasks/{_q(task)}",
            {"embedding": _content(embedding, "embedding.safetensors")}))

    # tasks (tenant key)
    def activate(self, task: str, adapter: str, version: int, *,
                 expected_revision: int | None = None) -> Task:
        """Bind ``task`` to ``adapter`` version ``version`` (409 if ``expected_revision``
        is given and the task has moved on)."""
        body: dict[str, Any] = {"adapter": adapter, "version": version}
        return self._activate(task, body, expected_revision)

    def activate_hyper(self, task: str, hypernetwork: str, version: int, hyper_task: str, *,
                       expected_revision: int | None = None) -> Task:
        """Bind ``task`` to HyperLoader task ``hyper_task`` of ``hypernetwork`` version
        ``version`` (its adapter is generated on the task's first request)."""
        body: dict[str, Any] = {"hypernetwork": hypernetwork, "version": version,
                                "hyper_task": hyper_task}
        return self._activate(task, body, expected_revision)

    def _activate(self, task: str, body: dict[str, Any], expected_revision: int | None
                  ) -> Task:
        if expected_revision is not None:
            body["expected_revision"] = expected_revision
        return cast(Task, self._call("POST", f"/v1/tasks/{_q(task)}/activate", json=body))

    def tasks(self) -> list[Task]:
        return cast(list[Task], self._call("GET", "/v1/tasks")["tasks"])

    def task(self, task: str) -> Task:
        return cast(Task, self._call("GET", f"/v1/tasks/{_q(task)}"))

    # generation (tenant key)
    def generate(self, task: str, prompt: str | list[int] | None = None, *,
                 messages: list[Message] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, ignore_eos: bool | None = None
                 ) -> Generation:
        """Generate with the adapter bound to ``task`` (``"base"``: no adapter) from a
        prompt (text or token ids) or chat ``messages``; unset sampling values are the
        server's defaults. Not streamed."""
        body: dict[str, Any] = {key: value for key, value in (
            ("prompt", prompt), ("messages", messages), ("max_tokens", max_tokens),
            ("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
            ("seed", seed), ("stop", stop), ("ignore_eos", ignore_eos)) if value is not None}
        return cast(Generation, self._call("POST", f"/v1/tasks/{_q(task)}/generate",
                                           json=body))


def _q(segment: str) -> str:
    """One path segment, percent-encoded (a name never reaches another route)."""
    return quote(segment, safe="")
