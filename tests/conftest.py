"""Test session setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the switch
must be set before triton.jit decorates them, i.e. before hires_kernels is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _ieee_cudnn_convolutions():
    """cuDNN may run float32 convolutions in TF32 (torch's default allows it), which would
    put the eager references on CUDA at TF32's error depending on which tests ran before in
    the same worker: every test runs with it off and the flags restored after."""
    if not torch.cuda.is_available():
        yield
        return
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield
