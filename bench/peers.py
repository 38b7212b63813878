"""The systems tessera is compared with, on the same model and workload, in the same run:
transformers ``generate`` (one padded batch), transformers continuous batching
(``generate_batch``, its paged/SDPA path) and PEFT's mixed-adapter batch
(``adapter_names``). Each returns output tokens/s over its own wall time."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaForCausalLM

from tessera.adapters import Adapter


def _timed(run: Callable[[], int], tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    with torch.no_grad():
        produced = run()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the last kernels are in the wall time
    wall = time.perf_counter() - start
    assert produced == tokens, (produced, tokens)
    return {"tok_s": produced / wall, "wall_s": wall}


def generate(model: LlamaForCausalLM, prompts: list[list[int]], new: int,
             adapter_names: list[str] | None = None) -> dict[str, float]:
    """``model.generate`` on one batch of equal-length prompts (no padding), exactly
    ``new`` tokens each; with ``adapter_names`` (a PEFT model) one adapter per row."""
    ids = torch.tensor(prompts, device=model.device)  # [R, P]
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}

    def run() -> int:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, **extra)
        return int((out.shape[1] - ids.shape[1]) * ids.shape[0])

    return _timed(run, new * len(prompts))


def generate_batch(model: LlamaForCausalLM, prompts: list[list[int]], new: int
                   ) -> dict[str, float]:
    """transformers' continuous batching (``generate_batch``), greedy, ``new`` tokens."""
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)

    def run() -> int:
        out = model.generate_batch(inputs=prompts, generation_config=config,
                                   progress_bar=False, warmup=False)
        return sum(len(o.generated_tokens) for o in out.values())

    return _timed(run, new * len(prompts))


def peft_model(path: Path, adapters: list[Adapter], targets: list[str], rank: int,
               alpha: float, like: torch.nn.Module | None = None) -> PeftModel:
    """A fresh copy of the base (from ``path``; on ``like``'s device and in its dtype) with
    every LoRA adapter loaded into PEFT under the names ``a0``, ``a1``, ... (tessera's
    factors copied into PEFT's layers)."""
    base = LlamaForCausalLM.from_pretrained(path).eval()
    if like is not None:
        weight = next(like.parameters())
        base.to(device=weight.device, dtype=weight.dtype)
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, len(adapters)):
        model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            for path_, tensors in adapter.components[0].modules.items():
                layer = model.base_model.model.get_submodule(path_)
                layer.lora_A[f"a{i}"].weight.copy_(tensors["lora_A"])
                layer.lora_B[f"a{i}"].weight.copy_(tensors["lora_B"])
    return model.eval()


def save_peft_dirs(root: Path, adapters: list[Adapter], targets: list[str], rank: int,
                   alpha: float) -> list[Path]:
    """Each LoRA adapter as PEFT saves it (config JSON + safetensors), for vLLM."""
    dirs = []
    for i, adapter in enumerate(adapters):
        out = root / f"a{i}"
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
            "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": ""}))
        save_file({f"base_model.model.{path}.{name}.weight": t.contiguous()
                   for path, tensors in adapter.components[0].modules.items()
                   for name, t in tensors.items()}, str(out / "adapter_model.safetensors"))
        dirs.append(out)
    return dirs


def check_vllm(python: str) -> None:
    """Fail before the long run, not after it: ``python`` must import vLLM and its LoRA
    and model code (a CUDA-built torchvision or torchaudio beside the CPU torch does not
    load: uninstall them from that venv)."""
    probe = ("import vllm, vllm.lora.request; from vllm import LLM, SamplingParams; "
             "import vllm.model_executor.models.llama")
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if found.returncode:
        tail = found.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"--vllm {python}: vLLM does not import: {tail[0]}")


def vllm(python: str, model_dir: Path, prompts: list[list[int]], new: int,
         lora_dirs: list[Path], reps: int, threads: int | None = None) -> dict[str, list[float]]:
    """vLLM's CPU build in its own venv (``python``), base and round-robin LoRA, ``reps``
    runs each after a warm-up (bench/vllm_peer.py). ``threads``: its OMP_NUM_THREADS (None:
    vLLM's own choice, which on 2 cores keeps one for its engine-core process)."""
    env = dict(os.environ) if threads is None else {**os.environ,
                                                    "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"prompts": prompts, "new": new, "reps": reps,
                                    "loras": [str(d) for d in lora_dirs]}))
        script = Path(__file__).with_name("vllm_peer.py")
        subprocess.run([python, str(script), str(model_dir), str(spec), str(out)],
                       check=True, env=env)
        result: dict[str, list[float]] = json.loads(out.read_text())
    return result
