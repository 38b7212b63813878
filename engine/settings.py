"""Engine settings: passed in by whoever builds the engine (``TESSERA_*`` environment
variables when built with ``EngineSettings()``); nothing here is read at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tessera.adapters import PoolConfig
from tessera.adapters.ops import Choice
from tessera.engine.graphs import Mode
from tessera.engine.kvcache import KVBudget

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda", "auto"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TESSERA_", extra="forbid",
                                      protected_namespaces=())

    # --- base model ---------------------------------------------------------------------
    model: str | None = Field(
        None, description="local directory or hub id of the base model; None = the small "
                          "built-in model (tessera.engine.builtin), materialised into builtin_dir")
    allow_download: bool = Field(
        False, description="let a hub id download; otherwise only local files / the local "
                           "HF cache are read (local_files_only=True)")
    revision: str | None = Field(None, description="hub revision (commit) of a hub model")
    builtin_dir: Path | None = Field(None, description="where the built-in model is written; "
                                                       "None = the user cache directory")
    dtype: Dtype = "float32"
    device: Device = "auto"
    packed_linear: bool = Field(
        True, description="on the CPU, run the base's linear layers through oneDNN on "
                          "weights packed once at load (tessera.adapters.kernels: ~1.5x "
                          "faster decode GEMMs, ~4x the LM head, on a 2-core AVX2 CPU); "
                          "costs a second copy of those weights. Ignored on CUDA and where "
                          "the build or CPU lacks it (bf16 needs AVX-512)")

    # --- slot pool ----------------------------------------------------------------------
    num_slots: int = Field(8, ge=1, le=65536, description="adapters resident on the device")
    max_rank: int = Field(16, ge=1)
    max_bottleneck_dim: int = Field(64, ge=1)
    gather_budget: int = Field(1 << 22, ge=0)
    dense_slots: int = Field(
        8, ge=0, description="slots per module that may keep a dense weight for HUT "
                             "adapters (one GEMM instead of r per token); memory: up to this "
                             "many copies of the HUT-targeted weights; 0 = never")
    kernels: Choice = Field(
        "auto", description="backend of the adapter banks' batched ops and of the decode "
                            "attention: 'auto' = Triton kernels on CUDA where triton is "
                            "installed and a start-up probe of them passes, else torch; "
                            "'torch'; 'triton' (CUDA; the attention keeps torch where its "
                            "own probe fails)")
    decode_graphs: Mode = Field(
        "auto", description="decode steps as CUDA graphs (tessera.engine.graphs): 'auto' = "
                            "captured on CUDA where the adapter banks and the decode "
                            "attention run the Triton kernels (steps using LoRA, rsLoRA, "
                            "DoRA, HRA or no adapter; others run eagerly); 'eager' = the same "
                            "static steps, not captured (tests, debugging); 'off'")
    methods: list[str] | None = Field(
        None, description="adapter methods the slot pool allocates banks for (e.g. "
                          '["lora", "dora"]); None = every registered method')
    target_modules: list[str] | str | None = Field(
        None, description="modules the pool wraps (PEFT's rule: names or a regex); None = "
                          "every adaptable projection")
    load_workers: int = Field(2, ge=1, le=64, description="threads validating + lowering")

    # --- scheduler ----------------------------------------------------------------------
    max_batch_rows: int = Field(32, ge=1, description="rows (requests) in one forward")
    max_queue: int = Field(256, ge=1, description="requests waiting to join the batch; "
                                                  "more -> QueueFullError")
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(4096, ge=1)
    context_limit: int | None = Field(
        None, ge=2, description="prompt + max_tokens limit; None = the model's "
                                "max_position_embeddings")
    prefill_chunk: int = Field(512, ge=1, description="prompt tokens of one row per step")
    kv_cache_tokens: int = Field(
        65536, ge=16, le=1 << 30,
        description="token positions (per layer) the running batch's KV cache may hold; "
                    "past it the newest row is preempted and recomputed later "
                    "(tessera.engine.kvcache). Also caps the context limit")
    kv_block_size: int = Field(16, ge=1, le=4096, description="KV positions per block: "
                               "the unit of the KV budget and of its usage metric")
    prefill_tokens_per_step: int = Field(
        2048, ge=1, description="prompt tokens in one step's forward beside the decode "
                                "tokens (bounds the decode stall a long prompt causes)")
    max_stop_sequences: int = Field(8, ge=0)
    max_stop_length: int = Field(128, ge=1)
    drain_timeout_s: float = Field(30.0, ge=0)
    ready_stall_s: float = Field(
        120.0, gt=0, description="readiness fails when the scheduler loop has not beaten for "
                                 "this long (a step that hangs); the idle loop beats every "
                                 "second")
    retry_after_min_s: int = Field(1, ge=1)
    retry_after_max_s: int = Field(60, ge=1)

    # --- hot tenants (tessera.engine.hot) ---------------------------------------------------------
    hot_merge: bool = Field(
        False, description="run steps on W0 + the delta of the adapter that dominates the "
                           "traffic (a low-rank one: LoRA, HRA), the others corrected in the "
                           "same forward; false = admin pins only (the default: on the CPU "
                           "a merged step measured no faster than slots, docs/serving.md)")
    hot_window_s: float = Field(30.0, gt=0, description="window of recent generated tokens "
                                                        "the shares are taken over")
    hot_enter_share: float = Field(0.5, gt=0, le=1, description="share of the window's "
                                                                "tokens that makes an adapter hot")
    hot_leave_share: float = Field(0.25, ge=0, le=1, description="a merged adapter below this "
                                                                 "share is dropped (hysteresis)")
    hot_min_tokens: int = Field(256, ge=1, description="tokens the window must hold before "
                                                       "any adapter is judged hot")
    hot_interval_s: float = Field(1.0, gt=0, description="seconds between policy checks")

    @model_validator(mode="after")
    def _check(self) -> EngineSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} exceeds "
                             f"max_tokens_limit {self.max_tokens_limit}")
        if self.retry_after_min_s > self.retry_after_max_s:
            raise ValueError("retry_after_min_s exceeds retry_after_max_s")
        if self.hot_leave_share > self.hot_enter_share:
            raise ValueError("hot_leave_share exceeds hot_enter_share")
        if self.kv_block_size > self.kv_cache_tokens:
            raise ValueError("kv_block_size exceeds kv_cache_tokens")
        return self

    def kv_budget(self) -> KVBudget:
        return KVBudget(self.kv_cache_tokens, self.kv_block_size)

    def pool_config(self) -> PoolConfig:
        """The slot pool these settings describe."""
        return PoolConfig(num_slots=self.num_slots, max_rank=self.max_rank,
                          max_bottleneck_dim=self.max_bottleneck_dim,
                          methods=self.methods, target_modules=self.target_modules,
                          gather_budget=self.gather_budget, dense_slots=self.dense_slots,
                          kernels=self.kernels)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
