"""Under autocast the decoder state is carried *and updated* in fp32 (docs/MODEL.md,
"Precision"): only the cell's matmuls run in the low precision.

Device-independent: a TorchDispatchMode records the dtype of every op one decoder
cell step runs under CPU autocast. On CUDA, ``nn.GRUCell`` (``gru_cell``) is on
autocast's fp16 list and would run whole in fp16; on CPU its gates come out of the
bf16 matmuls in bf16. Both cells must keep every non-matmul op in fp32 instead.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distnmt.model import RNNSearch
from distnmt.model.rnnsearch import gru_cell_fp32_gates

MATMULS = {"mm", "addmm", "bmm", "linear", "matmul", "t", "_to_copy", "view", "split", "unsafe_split",
           "slice", "detach", "chunk", "split_with_sizes", "unsafe_split_with_sizes", "cat", "transpose",
           "expand", "_unsafe_view", "clone"}


class _OpDtypes(TorchDispatchMode):
    """Records (op name, output dtype) of every floating-point op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.ops.append((func.overloadpacket.__name__, out.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gru", ["cudnn", "paper"])
def test_decoder_cell_updates_the_state_in_fp32_under_autocast(gru: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = RNNSearch(20, 20, embed_size=6, hidden_size=8, align_size=5, maxout_size=4, gru=gru, init="torch")
    emb, context, state = torch.randn(3, 6), torch.randn(3, 16), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=dtype):
        with _OpDtypes() as mode:
            new_state = model._cell_step(emb, context, state)
    assert new_state.dtype == torch.float32
    low = [(op, d) for op, d in mode.ops if d != torch.float32]
    assert low, "the matmuls should have run in the low precision"
    assert {op for op, _ in low} <= MATMULS, f"pointwise state math in low precision: {low}"
    # The gates must not be rounded: sigmoid, tanh and the update all ran in fp32.
    assert {op for op, d in mode.ops if d == torch.float32} >= {"sigmoid", "tanh"}


def test_fp32_gate_cell_equals_nn_gru_cell() -> None:
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(7, 5)
    x, h = torch.randn(4, 7), torch.randn(4, 5)
    torch.testing.assert_close(gru_cell_fp32_gates(cell, x, h), cell(x, h), rtol=0, atol=1e-6)
    x.requires_grad_(True)
    ours = torch.autograd.grad(gru_cell_fp32_gates(cell, x, h).sum(), x)[0]
    theirs = torch.autograd.grad(cell(x, h).sum(), x)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
