"""The shipped demo adapters: what ``train/demo_assets/`` holds and how it was made.

``demo.json`` (written by :mod:`tessera.train.demo_build`) names, for every adapter, its
method, the demo task it learned (:mod:`tessera.train.tasks`), its folder (a PEFT folder
for LoRA, DoRA and HRA, tessera's artifact for the rest), its trainable parameters and the
held-out exact match measured in-process by the training code on the shipped (float16)
weights; for the HyperLoader, its tasks, the new task whose embedding was trained against
the frozen hypernetwork, and their accuracies. It also records the base the adapters were
trained against (the built-in model's sha256): adapters only do their job on that base.

Torch-free (pydantic and the standard library), so ``tessera demo`` can check the assets
before it loads a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ASSETS = Path(__file__).resolve().parent / "demo_assets"
MANIFEST = "demo.json"
FORMAT = "tessera.demo"
BUILD_COMMAND = "python -m tessera.train.demo_build --out train/demo_assets"

HYPER_PREFIX = "hyper"  # HyperLoader task T is served as "hyper-T" (tessera.train.upload)

Method = Literal["lora", "dora", "hra", "hut", "soka", "bottleneck"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseInfo(_Strict):
    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DemoAdapter(_Strict):
    """One single-method adapter, trained on one demo task."""

    name: str  # the adapter's name on the server
    method: Method
    task: str  # the demo task (tessera.train.tasks)
    folder: str  # relative to the assets directory
    options: dict[str, object]  # tessera.train.finetune.AdapterOptions
    steps: int
    lr: float
    parameters: int  # trainable parameters
    dtype: Literal["float16", "float32"]  # of the shipped weights
    accuracy: float  # held-out exact match, in-process, shipped weights
    train_seconds: float

    @property
    def served_task(self) -> str:
        return f"{self.method}-{self.task}"


class NewTask(_Strict):
    """A task embedding trained against the frozen hypernetwork after it was trained (the
    hypernetwork's weights untouched): a new dataset of a skill it learnt."""

    task: str  # the demo task (tessera.train.tasks)
    description: str  # what the task is, in words
    embedding: str  # safetensors file holding one tensor "embedding" [task_dim]
    init: Literal["nearest", "random"]  # where the embedding started
    start_accuracy: float  # held-out exact match of the starting embedding
    steps: int
    lr: float
    dtype: Literal["float16", "float32"]  # of the shipped embedding
    accuracy: float  # held-out exact match, in-process, shipped embedding
    train_seconds: float


class DemoHyper(_Strict):
    name: str
    folder: str  # the hypernetwork artifact, its training tasks registered
    tasks: tuple[str, ...]
    options: dict[str, object]  # tessera.train.hyperloader.HyperOptions
    steps: int
    lr: float
    parameters: int
    dtype: Literal["float16", "float32"]  # of the shipped hypernetwork
    accuracy: dict[str, float]  # per task, in-process, shipped weights
    train_seconds: float
    new_task: NewTask | None = None

    def served_task(self, task: str) -> str:
        return f"{HYPER_PREFIX}-{task}"  # tessera.train.upload.served_task's rule


class DemoManifest(_Strict):
    format: Literal["tessera.demo"] = "tessera.demo"
    version: Literal[1] = 1
    base: BaseInfo
    seed: int  # the task suite's seed (tessera.train.tasks.splits)
    train_seed: int  # every run's RunOptions.seed (init and data order)
    n_train: int
    n_eval: int
    command: str
    threads: int
    adapters: tuple[DemoAdapter, ...]
    hyperloader: DemoHyper

    @property
    def tasks(self) -> list[str]:
        """Every demo task some adapter or HyperLoader task serves, in first-seen order."""
        names = [a.task for a in self.adapters] + list(self.hyperloader.tasks)
        if self.hyperloader.new_task is not None:
            names.append(self.hyperloader.new_task.task)
        return list(dict.fromkeys(names))


def load_manifest(directory: Path = ASSETS) -> DemoManifest:
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"no demo adapters in {directory} ({exc.strerror}); build "
                                f"them with `{BUILD_COMMAND}`") from None
    return DemoManifest.model_validate_json(text)


def save_manifest(manifest: DemoManifest, directory: Path) -> Path:
    path = directory / MANIFEST
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path
