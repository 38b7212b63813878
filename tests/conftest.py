from __future__ import annotations

import os

import torch

torch.set_num_threads(2)
# Without a GPU, Triton's kernels (tessera.adapters.ops.triton_ops) run in its interpreter
# on the CPU (read when Triton is imported, so set before any test imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
