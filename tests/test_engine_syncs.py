"""The training step reads nothing back from the device that it does not need, and
computes what it computed before it stopped reading.

The reference is the step as it was (host reads of the token count, of each
micro-batch's loss and of the gradient norm), kept here verbatim: the step that
keeps them on the device must give bit-identical weights. The read counts are taken
with tests/hostsync.py (see there why counting calls stands in for syncs on CPU).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from distnmt.config import load_config
from distnmt.model.build import build_model
from distnmt.train.engine import DDPEngine, global_tokens, token_loss_sum
from hostsync import count_host_reads
from test_engine import BATCHES, TINY, VOCAB


def _engine(overrides: list[str]) -> DDPEngine:
    cfg = load_config(None, TINY + ["train.accumulate=2", *overrides])
    torch.manual_seed(0)
    return DDPEngine(cfg, build_model(cfg.model, VOCAB, VOCAB), torch.device("cpu"), wrap=lambda m: m)


def _reference_step(self: DDPEngine, batches) -> tuple[float, float]:
    """DDPEngine.train_step before the host reads were taken out (single process)."""
    scale = 1 / max(global_tokens(batches, self.device), 1.0)
    self.optimizer.zero_grad(set_to_none=True)
    loss_total = 0.0
    for batch in batches:
        with self._autocast() if self.cfg.train.precision != "fp32" else nullcontext():
            logits = self.model(batch.src, batch.src_lengths, batch.tgt_in)
        loss_sum = token_loss_sum(logits, batch, self.cfg.optim.label_smoothing)
        if self.poison_loss:
            loss_sum = loss_sum * math.nan
        self.scaler.scale(loss_sum * scale).backward()
        loss_total += float(loss_sum.detach())
    self.scaler.unscale_(self.optimizer)
    clip = self.cfg.optim.clip_norm if self.cfg.optim.clip_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
    if math.isfinite(grad_norm) or self.scaler.is_enabled():
        self.scaler.step(self.optimizer)
    self.scaler.update()
    self.scheduler.step()
    return loss_total, grad_norm


@pytest.mark.parametrize("overrides", [
    ["optim.name=adam", "train.precision=fp32"],
    ["optim.name=adadelta", "optim.lr=1.0", "train.precision=bf16", "optim.clip_norm=0.5"],
])
def test_device_side_step_gives_the_same_weights_as_the_host_reading_step(overrides: list[str]) -> None:
    new, old = _engine(overrides), _engine(overrides)
    for step in range(3):
        poison = step == 1  # a skipped (non-finite) step in the middle: both must skip it
        new.poison_loss = old.poison_loss = poison
        stats = new.train_step(BATCHES)
        loss, norm = _reference_step(old, BATCHES)
        assert stats.finite is (not poison)
        if not poison:
            assert stats.loss_sum == pytest.approx(loss, rel=1e-6) and stats.grad_norm == norm
        for name, value in old.module.state_dict().items():
            assert torch.equal(new.module.state_dict()[name], value), (step, name)
    assert stats.tokens == sum(b.num_target_tokens() for b in BATCHES)


# Reads that are no sync on a GPU: host tensors by design. torch's non-fused
# optimizers keep their step counters on the CPU; a PackedSequence's batch_sizes
# live on the CPU; the encoder checks the source lengths (_host_lengths), which Batch.to leaves
# on the host (two reads per micro-batch).
HOST_TENSOR_READS = {
    "item torch/optim/optimizer.py:_get_value",
    "__int__ torch/nn/modules/rnn.py:get_expected_hidden_size",
    "__int__ rnnsearch.py:_host_lengths",
}


def _device_reads(engine: DDPEngine) -> dict[str, int]:
    for b in BATCHES:
        b.num_target_tokens()  # collate counts on the host
    engine.train_step(BATCHES)  # optimizer state is created at the first step
    with count_host_reads() as counts:
        stats = engine.train_step(BATCHES)
    assert counts["__int__ rnnsearch.py:_host_lengths"] == 2 * len(BATCHES)
    assert isinstance(stats.loss_sum_t, torch.Tensor) and isinstance(stats.grad_norm_t, torch.Tensor)
    return {k: v for k, v in counts.items() if k not in HOST_TENSOR_READS}


def test_a_step_reads_the_device_once_for_the_skip_decision_of_a_non_fused_optimizer() -> None:
    # Before: 2 + 5 per micro-batch (token count, loss per micro-batch, norm, the
    # target counts and the packed lengths back from the device) = 12 here.
    assert _device_reads(_engine(["optim.name=adadelta", "optim.lr=1.0"])) == {"__bool__ engine.py:_step_unless": 1}


def test_a_step_with_a_fused_optimizer_reads_nothing_back() -> None:
    engine = _engine(["optim.name=adam"])
    # As built on CUDA (train/optim.py): fused Adam takes the skip flag as a tensor.
    engine.optimizer = torch.optim.Adam(engine.module.parameters(), lr=0.01, fused=True)
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda _: 1.0)
    assert _device_reads(engine) == {}


def test_fused_skip_leaves_weights_and_adam_state_untouched() -> None:
    engine = _engine(["optim.name=adam"])
    engine.optimizer = torch.optim.Adam(engine.module.parameters(), lr=0.01, fused=True)
    engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda _: 1.0)
    engine.train_step(BATCHES)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    state = {k: v.clone() for k, v in engine.optimizer.state[next(engine.module.parameters())].items()}
    engine.poison_loss = True
    assert not engine.train_step(BATCHES).finite
    assert all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    after = engine.optimizer.state[next(engine.module.parameters())]
    assert all(torch.equal(state[k], after[k]) for k in state)  # the step count too
