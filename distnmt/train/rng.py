"""Every random number generator a training step can draw from, saved and restored.

Exact resume needs all of them at the position the checkpointed step left them:
torch's CPU generator, the accelerator's (one per visible device: dropout on a GPU
draws from it), numpy's global state (its position inside the key array too, not
only the keys) and Python's. Each rank saves its own (rng/rank<r>.pt); the values
are tensors, ints, floats and lists, so the file loads with ``weights_only=True``.

The accelerator is found through ``torch.accelerator`` (CUDA, ROCm, XPU, MPS, ...),
so this one code path runs on a CPU-only machine too, where it saves none.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch


def _accelerator() -> Optional[str]:
    """The device type of the current accelerator ("cuda", "xpu", ...), or None on CPU."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    return "cuda" if torch.cuda.is_available() else None


def rng_state() -> dict[str, Any]:
    """This process's generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": list(random.getstate()[1]),
        "accelerator": None,
    }
    device = _accelerator()
    if device is not None:
        state["accelerator"] = {"type": device, "states": torch.get_device_module(device).get_rng_state_all()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also reads the older format: numpy keys as a list)."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        keys = np.asarray(numpy["keys"], dtype=np.int64).astype(np.uint32)
        np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    else:  # checkpoints written before the position was saved: the keys alone
        np.random.set_state(("MT19937", np.array(numpy, dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    saved = state.get("accelerator")
    device = _accelerator()
    if saved is not None and device == saved["type"]:
        module = torch.get_device_module(device)
        # A rank resumed on fewer visible devices restores those it has.
        for index, generator in enumerate(saved["states"][: module.device_count()]):
            module.set_rng_state(generator, index)
