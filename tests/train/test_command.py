"""The ``tessera train`` command end to end (in-process, tiny step counts on the random
built-in model): every kind of run writes its artifact, ``training.json`` and a summary on
stdout; option errors exit 1 with a message; ``tessera train --help`` loads no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.server import cli
from tessera.train.base import Base
from tests.train.conftest import task_files


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(("method", "artifact_files"), [
    ("lora", {"adapter_config.json", "adapter_model.safetensors"}),
    ("soka", {"manifest.json", "weights.safetensors"}),
])
def test_train_writes_artifact_and_summary(method: str, artifact_files: set[str],
                                           random_base: Base, suite_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    files = task_files(suite_dir, "upper")
    out = tmp_path / "out"
    status, stdout, err = run_cli(
        ["train", method, "--data", str(files.train), "--eval-file", str(files.eval),
         "--out", str(out), "--base", str(random_base.path), "--steps", "3",
         "--eval-every", "2", "--threads", "1", "--no-progress", "--rank", "2"], capsys)
    assert status == 0, err
    summary = json.loads(stdout)
    assert summary["method"] == method and summary["steps"] == 3
    assert summary["history"][0]["step"] == 2 and "exact_match" in summary["eval"]
    assert json.loads((out / "training.json").read_text()) == summary
    assert artifact_files <= {p.name for p in out.iterdir()}
    assert (out / "checkpoint" / "state.safetensors").is_file()


def test_hyperloader_then_new_task(random_base: Base, suite_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    up, rot = task_files(suite_dir, "upper"), task_files(suite_dir, "rot13")
    common = ["--base", str(random_base.path), "--steps", "2", "--threads", "1"]
    status, stdout, err = run_cli(
        ["train", "hyperloader", "--data", f"upper={up.train}", "--data", f"rot13={rot.train}",
         "--eval-file", f"upper={up.eval}", "--out", str(tmp_path / "hyper"), *common], capsys)
    assert status == 0, err
    assert set(json.loads(stdout)["eval"]) == {"upper"}
    caesar = task_files(suite_dir, "caesar")
    status, stdout, err = run_cli(
        ["train", "task-embedding", "--hypernet", str(tmp_path / "hyper"),
         "--data", f"caesar={caesar.train}", "--out", str(tmp_path / "new"), *common], capsys)
    assert status == 0, err
    assert json.loads(stdout)["trainable_parameters"] == 16  # the embedding alone
    manifest = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert manifest["tasks"] == ["rot13", "upper", "caesar"]


@pytest.mark.parametrize(("args", "message"), [
    (["hyperloader", "--data", "plain.jsonl"], "give NAME=FILE"),
    (["hyperloader", "--data", "t=a.jsonl", "--data", "t=b.jsonl"], "given twice"),
    (["lora", "--data", "a.jsonl", "--data", "b.jsonl"], "trains on one --data file"),
    (["lora", "--data", "x.jsonl", "--upload", "http://127.0.0.1:9"], "--upload needs a key"),
    (["task-embedding", "--data", "t=x.jsonl"], "needs --hypernet"),
    (["task-embedding", "--hypernet", "h", "--data", "t=x.jsonl", "--upload", "http://s",
      "--key", "k"], "task-embedding --upload needs --hypernetwork NAME[@VERSION]"),
    (["task-embedding", "--hypernet", "h", "--data", "t=x.jsonl", "--upload", "http://s",
      "--key", "k", "--hypernetwork", "multi@0"], "VERSION must be a positive integer"),
    (["task-embedding", "--hypernet", "h", "--data", "t=x.jsonl", "--upload", "http://s",
      "--key", "k", "--hypernetwork", "multi", "--name", "n"], "--name does not apply"),
    (["lora", "--data", "x.jsonl", "--upload", "http://s", "--key", "k",
      "--hypernetwork", "multi"], "--hypernetwork applies to task-embedding only"),
    (["lora", "--data", "x.jsonl", "--task", "t"], "--task goes with --upload URL"),
    (["hyperloader", "--data", "t=x.jsonl", "--upload", "http://s", "--key", "k",
      "--task", "p" * 63], "served task (PREFIX-TASK) is 65 characters long"),
    (["lora", "--data", "x.jsonl", "--upload", "http://s", "--key", "k", "--task", "a..b"],
     "task 'a..b' is not allowed"),
])
def test_option_errors(args: list[str], message: str, tmp_path: Path, suite_dir: Path,
                       monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TESSERA_API_KEY", raising=False)
    files = task_files(suite_dir, "upper")
    for name in ("plain.jsonl", "a.jsonl", "b.jsonl", "x.jsonl"):
        (tmp_path / name).write_bytes(files.train.read_bytes())
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(["train", *args, "--out", str(tmp_path / "out"),
                              "--base", str(tmp_path / "none")], capsys)
    assert status == 1 and message in err, err


def test_train_help_loads_no_torch() -> None:
    code = ("import sys, tessera.server.cli as c\n"
            "try:\n    c.main(['train', '--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
            "assert not heavy, heavy[:5]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--embedding-init" in done.stdout and "--resume" in done.stdout
    assert "--hypernetwork NAME[@VERSION]" in done.stdout  # the upload rules, documented
    assert "each task T is served as the task PREFIX-T" in done.stdout
