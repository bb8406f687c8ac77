"""RNG states saved and restored at their exact position (issue 15): torch's CPU
generator, the accelerator's (through the device-generic API; none on a CPU-only
machine), numpy's including its position in the key array, and Python's."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from distnmt.train.rng import _accelerator, rng_state, set_rng_state


def _draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(2).tolist(), random.random())


def _through_a_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as a checkpoint's rng/rank<r>.pt is read


def test_every_generator_resumes_where_it_was_saved() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    _draws()
    np.random.randn(1)  # numpy mid-key-array (pos != 624) and a cached Gaussian: a fixed position would differ
    state = _through_a_file(rng_state())
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(state)
    assert _draws() == expected


def test_a_checkpoint_of_the_older_format_still_loads() -> None:
    np.random.seed(3)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
           "python": list(random.getstate()[1])}
    set_rng_state(old)
    assert np.random.get_state()[2] == 624


def test_the_accelerator_generator_round_trips() -> None:
    device = _accelerator()
    state = rng_state()
    if device is None:
        assert state["accelerator"] is None  # the same code path, nothing to save on a CPU-only machine
        pytest.skip("no accelerator on this machine: the accelerator generator's round trip needs one")
    module = torch.get_device_module(device)
    module.manual_seed_all(5)
    torch.rand(2, device=device)
    state = _through_a_file(rng_state())
    expected = torch.rand(4, device=device).cpu()
    torch.rand(4, device=device)
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device=device).cpu(), expected)
