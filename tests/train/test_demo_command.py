"""``tessera demo`` end to end, as a user runs it: its own process, a fresh data directory
(embedded redis-server), the built-in trained model written to a fresh directory; it
prints the per-task table and the batch summary and exits 0. Few examples per task (the
accuracies are the HTTP test's business, tests/http/test_demo_served.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tessera.train.demo_suite import ASSETS, load_manifest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 4


def test_demo_prints_the_table(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    done = subprocess.run(
        [sys.executable, "-m", "tessera.server.cli", "demo", "--examples", str(EXAMPLES),
         "--data-dir", str(data), "--builtin-dir", str(tmp_path / "model"),
         "--json", str(tmp_path / "demo.json"), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    manifest = load_manifest(ASSETS)
    header = next(line for line in out.splitlines() if line.startswith("demo task")).split()
    assert header == ["demo", "task", "served", "as", "method", "params", "base",
                      "in-process", "served"]
    for entry in manifest.adapters:
        assert any(line.split()[:3] == [entry.task, entry.served_task, entry.method]
                   for line in out.splitlines()), entry.served_task
    assert "distinct adapters per forward" in out and "distinct methods per forward" in out
    assert any(data.iterdir())  # the embedded redis-server kept its data there

    results = json.loads((tmp_path / "demo.json").read_text())
    hyper = manifest.hyperloader
    n_hyper = len(hyper.tasks) + (hyper.new_task is not None)
    assert len(results["rows"]) == len(manifest.adapters) + n_hyper
    assert {r["method"] for r in results["rows"]} == {a.method for a in manifest.adapters} \
        | {"hyperloader"}
    assert all(r["total"] == EXAMPLES for r in results["rows"])
    assert hyper.new_task is not None  # served beside the hypernetwork's own tasks
    (new,) = [r for r in results["rows"] if r["demo_task"] == hyper.new_task.task]
    assert (new["task"], new["method"], new["in_process"]) == (
        hyper.served_task(hyper.new_task.task), "hyperloader", hyper.new_task.accuracy)
    assert "new task embedding" in new["note"]
    assert any(line.split()[:3] == [new["demo_task"], new["task"], "hyperloader"]
               and "new task embedding" in line for line in out.splitlines())
    assert results["requests"] == EXAMPLES * (len(results["rows"]) + len(manifest.tasks))
    assert results["batches"]["steps"] > 0 and results["metrics"]["steps"] > 0
