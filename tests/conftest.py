"""Test session setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the switch
must be set before triton.jit decorates them, i.e. before hires_kernels is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
