"""Shared pytest setup: one CPU thread (CI has 2 cores), transformers quiet and offline."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
