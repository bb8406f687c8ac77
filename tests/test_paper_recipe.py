"""The paper's recipe (issue 14 section 2): 80 sentences per update at any number of
workers, the per-sentence loss scale, the Cho et al. baseline, the paper's search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distnmt.config import ConfigError, batch_budget, load_config, update_sentences
from distnmt.data.batch import Batch
from distnmt.data.sampler import BucketBatchSampler
from distnmt.model.build import build_model
from distnmt.model.encdec import RNNEncDec
from distnmt.train.engine import DDPEngine

REPO = Path(__file__).resolve().parents[1]
PAPER = ["rnnsearch-50.yaml", "rnnsearch-30.yaml", "rnnencdec-50.yaml", "rnnencdec-30.yaml"]


# ----------------------------------------------------------------- global batch


@pytest.mark.parametrize("name", PAPER)
@pytest.mark.parametrize("workers", [1, 2, 8])
def test_paper_configs_update_on_80_sentences_whatever_the_workers(name: str, workers: int) -> None:
    cfg = load_config(REPO / "configs" / name, [f"train.workers={workers}"])
    assert cfg.train.batch_sentences == 80
    assert update_sentences(cfg, workers) == 80
    budget = batch_budget(cfg)
    assert budget.max_sentences * cfg.train.accumulate_at(workers) * workers == 80
    # The token budget never binds: every pair the length filter keeps fits 80/W times.
    assert budget.max_tokens == budget.max_sentences * (cfg.data.max_len + 1)
    # A pool is the paper's 20 minibatches of 80 sentences, whatever the micro-batch.
    assert budget.pool_batches * budget.max_sentences == 20 * 80


@pytest.mark.parametrize("world", [1, 2, 8])
def test_an_elastic_paper_run_keeps_80_sentences_at_every_size(world: int) -> None:
    cfg = load_config(REPO / "configs/rnnsearch-50.yaml", ["train.workers=[1, 8]"])
    assert update_sentences(cfg, world) == 80
    # The micro-batch does not depend on the size the group runs at, so the sampler
    # cuts the same batches and an epoch resumes exactly on another number of workers.
    assert batch_budget(cfg).max_sentences == 10


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_the_sampler_real_batches_cover_80_sentences_per_update(workers: int) -> None:
    """Real BucketBatchSampler ranks at each world size: every update but the epoch's
    tail (its last pool, shorter) trains on exactly 80 sentences."""
    cfg = load_config(REPO / "configs/rnnsearch-50.yaml", [f"train.workers={workers}"])
    budget = batch_budget(cfg)
    rng = np.random.default_rng(0)
    n = 20 * 80 * 3 + 500  # three whole pools and a short one
    src = rng.integers(1, cfg.data.max_len + 1, n)
    tgt = rng.integers(1, cfg.data.max_len + 1, n)
    acc = cfg.train.accumulate_at(workers)
    ranks = [list(BucketBatchSampler(src, tgt, budget.max_tokens, num_replicas=workers, rank=r, seed=1,
                                     pool_batches=budget.pool_batches, max_sentences=budget.max_sentences))
             for r in range(workers)]
    steps = len(ranks[0]) // acc
    per_update = [sum(len(ranks[r][s * acc + i]) for r in range(workers) for i in range(acc)) for s in range(steps)]
    full = 3 * 20  # updates cut from the three whole pools
    assert per_update.count(80) >= full
    assert sum(len(b) for rank in ranks for b in rank) == n  # every pair once
    assert all(size <= 80 for size in per_update)


def test_batch_sentences_refuses_what_it_cannot_keep() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_sentences: 80 must be a multiple of .* = 3"):
        load_config(REPO / "configs/rnnsearch-50.yaml", ["train.workers=3"])
    with pytest.raises(ConfigError, match="data.max_batch_sentences: 40 must be null when train.batch_sentences"):
        load_config(REPO / "configs/rnnsearch-50.yaml", ["data.max_batch_sentences=40"])
    cfg = load_config(REPO / "configs/quickstart.yaml")  # token budgets: unchanged
    assert cfg.train.batch_sentences is None and update_sentences(cfg, 2) is None
    assert batch_budget(cfg).max_tokens == cfg.data.max_tokens


# ----------------------------------------------------------------- loss scale


def _batch() -> Batch:
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, 30, (4, 6), generator=g)
    tgt = torch.randint(4, 30, (4, 5), generator=g)
    tgt[2:, 3:] = 0  # two short targets: tokens per sentence differ
    tgt_in = torch.cat([torch.full((4, 1), 2), tgt[:, :-1]], dim=1) * (tgt != 0)
    return Batch(src=src, src_lengths=torch.tensor([6, 5, 4, 3]), tgt_in=tgt_in, tgt_out=tgt, indices=[0, 1, 2, 3])


@pytest.mark.parametrize("norm", ["token", "sentence"])
def test_loss_norm_divides_by_tokens_or_by_sentences(norm: str) -> None:
    cfg = load_config(None, ["model.embed_size=8", "model.hidden_size=8", "model.align_size=8", "model.maxout_size=6",
                             "optim.name=adam", "optim.clip_norm=0", "train.precision=fp32", f"train.loss_norm={norm}"])
    batch = _batch()
    torch.manual_seed(0)
    engine = DDPEngine(cfg, build_model(cfg.model, 30, 30), torch.device("cpu"), wrap=lambda m: m)
    torch.manual_seed(0)
    reference = build_model(cfg.model, 30, 30)
    logits = reference(batch.src, batch.src_lengths, batch.tgt_in)
    total = F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=0, reduction="sum")
    denominator = 4 if norm == "sentence" else int((batch.tgt_out != 0).sum())
    (total / denominator).backward()
    want = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
    stats = engine.train_step([batch])
    assert stats.grad_norm == pytest.approx(float(want), rel=1e-5)
    assert denominator != int((batch.tgt_out != 0).sum()) or norm == "token"  # the two really differ here


def test_paper_configs_use_the_papers_loss_scale_and_search() -> None:
    for name in PAPER:
        cfg = load_config(REPO / "configs" / name)
        assert cfg.train.loss_norm == "sentence", name
        assert (cfg.eval.beam_size, cfg.eval.alpha, cfg.eval.max_len_a, cfg.eval.max_len_b) == (5, 0.0, 3.0, 0), name
    quick = load_config(REPO / "configs/quickstart.yaml")
    assert quick.train.loss_norm == "token"  # the default keeps today's meaning


# ----------------------------------------------------------------- the Cho et al. baseline


@pytest.mark.parametrize("gru", ["cudnn", "paper"])
def test_rnnencdec_is_cho_et_al(gru: str) -> None:
    """Unidirectional encoder, c = tanh(V h_T) initialising the decoder (s_0 = tanh(V' c)),
    read at every step and by the output; padding changes nothing."""
    cfg = load_config(REPO / "configs/rnnencdec-50.yaml", ["model.embed_size=6", "model.hidden_size=8",
                                                           "model.maxout_size=5", f"model.gru={gru}",
                                                           "model.init=torch"])  # paper init: near-uniform output
    torch.manual_seed(0)
    model = build_model(cfg.model, 30, 30).eval()
    assert isinstance(model, RNNEncDec) and not model.attention
    names = {name for name, _ in model.named_parameters()}
    assert not any(k in name for name in names for k in ("query_proj", "key_proj", "energy", "bwd", "reverse"))
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    lengths = torch.tensor([4, 2])
    enc = model.encode(src, lengths)
    # h_T by hand: the encoder run over sentence 1's two real words only, without padding.
    alone = model.encode(src[1:, :2], lengths[1:])
    torch.testing.assert_close(enc.context[1:], alone.context)
    if gru == "cudnn":
        _, h_n = model.encoder(model.src_embed(src[1:, :2]))
        h_t = h_n[0]
    else:
        h = torch.zeros(1, 8)
        for t in range(2):
            h = model.encoder(model.src_embed(src[1:, t]), h)
        h_t = h
    c = torch.tanh(model.summary_proj(h_t))
    torch.testing.assert_close(alone.context, c)
    torch.testing.assert_close(alone.init_state, torch.tanh(model.init_proj(c)))
    # c feeds every step and the output: changing it changes the next-word distribution
    # even with the same state and previous word.
    log_p, _, weights = model.decode_step(enc, torch.tensor([1, 1]), enc.init_state)
    assert torch.all(weights == 0)
    other = type(enc)(enc.annotations, None, enc.mask, enc.init_state, enc.context.flip(0))
    log_q, _, _ = model.decode_step(other, torch.tensor([1, 1]), enc.init_state)
    assert not torch.allclose(log_p, log_q)
