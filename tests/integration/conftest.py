"""Fixtures of the integration tests: real prepared data (small) and tiny-model overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from distnmt.config import Config, load_config
from distnmt.data.prepare import prepare

# A model small enough that a 2-worker Ray run takes seconds per hundred steps.
TINY = [
    "model.embed_size=32", "model.hidden_size=48", "model.align_size=48", "model.maxout_size=32",
    "data.max_len=30", "data.max_tokens=600", "data.vocab_size=800",
    "optim.name=adam", "optim.lr=0.003",
    "train.workers=2", "train.precision=fp32",
    "eval.beam_size=2", "eval.max_sentences=30", "eval.batch_sentences=30",
    "logging.log_every=10",
]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """3000 real WMT'14 training pairs, 800-subword vocabularies, dev/test in full."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(shared_data, out, vocab_size=800, max_len=30, max_train_pairs=3000, progress=False)
    return out


@pytest.fixture
def tiny_config(prepared: Path) -> Callable[..., Config]:
    """``tiny_config(storage, name, *overrides)``: the tiny config on ``prepared``, run dir storage/name."""

    def make(storage: Path, name: str, *overrides: str) -> Config:
        return load_config(None, [*TINY, f"data.prepared_dir={prepared}", f"train.storage_path={storage}",
                                  f"train.name={name}", *overrides])

    return make
