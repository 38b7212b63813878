"""LoRA (and rsLoRA), DoRA and HRA (and its Gram-Schmidt mode) exports of ``tessera train``
load in ``peft`` itself (``PeftModel.from_pretrained``), and PEFT's logits equal tessera's
reference logits of the same folder within 1e-4."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tessera.adapters.peft_io import load_peft_dir
from tessera.adapters.reference import reference_model
from tessera.train.base import Base
from tessera.train.data import load_jsonl
from tessera.train.finetune import AdapterOptions, RunOptions, train_adapter
from tests.helpers import logits
from tests.train.conftest import TrainedRun, task_files

ATOL = 1e-4
SHORT: dict[str, dict[str, Any]] = {  # variants trained briefly: parity needs no accuracy
    "rslora": {"method": "lora", "rslora": True, "rank": 4, "alpha": 6.0},
    "hra-gram-schmidt": {"method": "hra", "apply_gs": True, "rank": 4},
    "dora-attention": {"method": "dora", "rank": 2, "target_modules": ["q_proj", "v_proj"]},
}


def prompts(base: Base, files: Path) -> torch.Tensor:
    rows = [base.tokenizer(e.prompt + e.completion)["input_ids"]
            for e in load_jsonl(files)[:16]]
    return torch.tensor(rows)  # [16, T]: one length (five-letter words)


def check_parity(base: Base, folder: Path, ids: torch.Tensor, method: str) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == ("HRA" if method == "hra" else "LORA")
    assert config.get("use_dora", False) == (method == "dora")
    fresh = AutoModelForCausalLM.from_pretrained(base.path, local_files_only=True)
    peft_model = PeftModel.from_pretrained(fresh, str(folder)).eval()
    want = logits(reference_model(base.model, load_peft_dir(folder)), ids)
    got = logits(peft_model, ids)
    assert (want - logits(base.model, ids)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["lora", "dora", "hra"])
def test_trained_export_loads_in_peft(method: str, random_base: Base,
                                      trained: Callable[[str], TrainedRun]) -> None:
    run = trained(method)
    check_parity(random_base, run.trained.out, prompts(random_base, run.files.eval), method)


@pytest.mark.parametrize("variant", sorted(SHORT))
def test_variant_export_loads_in_peft(variant: str, random_base: Base, suite_dir: Path,
                                      tmp_path: Path, one_thread: None) -> None:
    files = task_files(suite_dir, "rot13")
    opts = AdapterOptions(**SHORT[variant])
    train_adapter(opts, RunOptions(steps=30, lr=3e-2), random_base, files.train, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if variant == "rslora":
        assert config["use_rslora"] is True
    if variant == "hra-gram-schmidt":
        assert config["apply_GS"] is True
    check_parity(random_base, tmp_path, prompts(random_base, files.eval), opts.method)
