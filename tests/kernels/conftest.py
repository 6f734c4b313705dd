"""Kernel tests run the Triton kernels on CPU under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, i.e. before
`ringattn.kernels.attention.triton_impl` is imported: conftest runs before the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
