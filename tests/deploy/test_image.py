"""The Dockerfile: multi-stage with the dependencies in their own layers, CPU and CUDA
variants by build argument, the base pinned by digest and every Python package pinned by
constraints.txt (which covers every runtime dependency and satisfies pyproject.toml),
a numeric non-root user, volumes for the model and the data, no redis-server unless the
embedded mode is asked for, a HEALTHCHECK on a route the app serves, and `tessera serve`
as PID 1. (hadolint runs in test_render.py.)"""

from __future__ import annotations

import json
import re
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.manifests import ROOT, dockerfile_stages, exec_form, final_image_env

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LINUX = {"python_version": "3.11", "python_full_version": "3.11.13", "platform_system":
         "Linux", "sys_platform": "linux", "platform_machine": "x86_64", "os_name": "posix",
         "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def arg_defaults() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, flags=re.M))


def constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            assert canonicalize_name(name) not in pins, f"twice: {name}"
            pins[canonicalize_name(name)] = version
    return pins


def test_stages_and_variants() -> None:
    stages = dockerfile_stages()
    assert [s.name for s in stages] == ["builder", "runtime", "final"]
    args = arg_defaults()
    (image,) = {s.base for s in stages} - {"runtime"}  # one base image, no other
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    assert args["VARIANT"] == "cpu" and args["EMBEDDED_REDIS"] == "false"
    builder = stages[0]
    runs = [a for i, a in builder.instructions if i == "RUN"]
    torch_run = next(r for r in runs if "torch==" in r)
    assert "cpu)" in torch_run and "cuda)" in torch_run and '+cpu"' in torch_run
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    # every pip install is constrained; the layers: torch, then the dependencies (from
    # pyproject.toml only), then the project with no dependency resolution of its own
    installs = [r for r in runs if "pip install" in r]
    assert len(installs) == 3 and all("--constraint constraints.txt" in r for r in installs)
    copies = [a for i, a in builder.instructions if i == "COPY"]
    assert copies.index("constraints.txt ./") < copies.index("pyproject.toml ./") < \
        copies.index("adapters ./adapters")
    assert "--no-deps" in installs[2] and "pip check" in installs[2]
    final = stages[-1]
    assert "COPY --from=builder /opt/venv /opt/venv" in [f"COPY {a}" for i, a in
                                                          final.instructions if i == "COPY"]


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = constraints()
    assert Version(pins["torch"]) == Version(arg_defaults()["TORCH_VERSION"])
    for line in PROJECT["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (line, pins[name])
    # and theirs (as installed here): a new transitive dependency needs a pin too
    seen: set[str] = set()
    todo = [Requirement(r) for r in PROJECT["dependencies"]]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"{name} (a dependency of a dependency) is not pinned"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            (str(requirement), pins[name])
        for sub in metadata.requires(requirement.name) or []:
            sub_requirement = Requirement(sub)
            if sub_requirement.marker is None or sub_requirement.marker.evaluate(
                    {**LINUX, "extra": ""}):
                todo.append(sub_requirement)
    # the CUDA variant's packages are pinned as well (they apply only when PyPI's torch
    # pulls them in)
    assert {"triton", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= set(pins)


def test_runtime_user_volumes_and_entrypoint() -> None:
    final = dockerfile_stages()[-1]
    (user,) = [a for i, a in final.instructions if i == "USER"]
    assert re.fullmatch(r"[1-9]\d{4,}:[1-9]\d{4,}", user), user  # numeric, non-root
    (volumes,) = [json.loads(a) for i, a in final.instructions if i == "VOLUME"]
    assert set(volumes) == {"/data", "/models"}
    env = final_image_env()
    for name in ("HOME", "HF_HOME", "TESSERA_STORE_DATA_DIR"):
        assert env[name].startswith("/data/"), name  # writable with a read-only root
    assert exec_form(final, "ENTRYPOINT") == ["tessera"]
    assert exec_form(final, "CMD") == ["serve"]
    assert ("STOPSIGNAL", "SIGTERM") in final.instructions
    assert [a for i, a in final.instructions if i == "EXPOSE"] == [env["TESSERA_PORT"]]
    (health,) = [a for i, a in final.instructions if i == "HEALTHCHECK"]
    assert "/healthz" in health and "TESSERA_PORT" in health
    assert PROJECT["scripts"]["tessera"] == "tessera.server.cli:main"


def test_redis_server_only_in_embedded_images() -> None:
    runs = [a for s in dockerfile_stages() for i, a in s.instructions if i == "RUN"]
    with_redis = [r for r in runs if "redis-server" in r]
    assert len(with_redis) == 1
    (run,) = with_redis
    assert run.startswith('if [ "${EMBEDDED_REDIS}" = "true" ]; then')
    assert '"redis-server=${REDIS_DEB_VERSION}"' in run and "--no-install-recommends" in run
    assert re.fullmatch(r"5:7\.\d+\.\d+-\S+", arg_defaults()["REDIS_DEB_VERSION"])


def test_copies_every_package_it_installs() -> None:
    """The image installs the project from the copied folders: the `tessera` namespace and
    every folder its links point at are copied, and the modules the build imports exist."""
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    assert {p.split(".")[0] for p in found} == {"tessera"}
    linked = {link.resolve().name for link in (ROOT / "tessera").iterdir() if link.is_symlink()}
    assert {"adapters", "store", "engine", "server"} <= linked
    copied = set(re.findall(r"^COPY (\w+) \./\1$", DOCKERFILE, flags=re.M))
    assert {"tessera"} | linked <= copied, copied
    for package, module in re.findall(r"from tessera\.(\w+) import (\w+)", DOCKERFILE):
        assert (ROOT / package / f"{module}.py").is_file(), (package, module)
    assert "builtin.materialise(Path('/opt/tessera/builtin'))" in DOCKERFILE
    assert final_image_env()["TESSERA_BUILTIN_DIR"] == "/opt/tessera/builtin"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "bench", "build", "deploy"} <= ignored
