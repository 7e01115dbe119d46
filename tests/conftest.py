"""Test-session setup: without a GPU, Triton kernels run through Triton's interpreter."""

import os

import torch

if not torch.cuda.is_available():
    # Read when a kernel is defined, so it must be set before xent imports its Triton module.
    os.environ.setdefault("TRITON_INTERPRET", "1")
