"""``model.compile``: the alignment scores, or the whole training recurrence step, through
torch.compile give the eager results.

Each first call compiles C++ kernels (15-30 s per test on 2 cores with a cold inductor
cache). Not marked ``integration`` (one process, no cluster): they run in the unit stream,
beside the integration tests (launch/test.sh).
"""

from __future__ import annotations

import pytest
import torch

from distnmt.model import RNNSearch, beam_search


V, BOS, EOS = 30, 1, 2
TINY = dict(embed_size=8, hidden_size=16, align_size=12, maxout_size=10)


@pytest.fixture(autouse=True)
def one_thread():
    import torch._inductor.config

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; a second thread only spin-waits
    # Inductor compiles in this process instead of a pool of worker processes: each of
    # those imports torch (about 9 CPU-seconds in all here), and on 2 cores beside the
    # rest of the suite the pool gains nothing.
    with torch._inductor.config.patch(compile_threads=1):
        yield
    torch.set_num_threads(before)


def test_compiled_scores_match_eager_in_training_and_decoding() -> None:
    models = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        models[compiled] = RNNSearch(V, V, **TINY, init="torch", compile=compiled)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, V, (3, 6), generator=g)
    src_len = torch.tensor([6, 2, 4])
    tgt = torch.randint(3, V, (3, 5), generator=g)
    # The second batch has new shapes: dynamic=True serves it without recompiling.
    for batch in ((src, src_len, tgt), (src[:2, :4], torch.tensor([4, 2]), tgt[:2, :3])):
        logits = {c: m(*batch) for c, m in models.items()}
        torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
        for m in models.values():
            m.zero_grad()
        for c in models:
            logits[c].logsumexp(-1).sum().backward()
        torch.testing.assert_close(models[True].key_proj.weight.grad, models[False].key_proj.weight.grad,
                                   atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = {c: m(src, src_len, tgt) for c, m in models.items()}
    torch.testing.assert_close(bf16[True], bf16[False], atol=0.05, rtol=0.05)
    hyps = {c: beam_search(m.eval(), src, src_len, BOS, EOS, beam_size=3, max_len_b=4) for c, m in models.items()}
    assert hyps[True] == hyps[False]


def test_compiled_recurrence_step_matches_eager_in_training() -> None:
    """``model.compile: step``: the whole training recurrence step (attention + GRU cell)
    as one graph (fullgraph=True: a graph break is an error, not a silent eager fallback),
    with the eager model's logits and gradients: the cuDNN-style cell over a second batch
    shape (a recompile, after which torch marks the dims dynamic) and in bf16; the paper
    cell (its own graph) on one shape. Each compile costs seconds, so no more of them."""
    import torch._dynamo

    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, V, (3, 6), generator=g)
    tgt = torch.randint(3, V, (3, 5), generator=g)
    first = (src, torch.tensor([6, 2, 4]), tgt)
    second = (src[:2, :4], torch.tensor([4, 2]), tgt[:2, :3])
    for gru, batches in (("cudnn", (first, second)), ("paper", (first,))):
        models = {}
        for mode in (False, "step"):
            torch.manual_seed(0)
            models[mode] = RNNSearch(V, V, **TINY, init="torch", gru=gru, compile=mode)
        torch._dynamo.utils.counters.clear()
        for batch in batches:
            logits = {c: m(*batch) for c, m in models.items()}
            torch.testing.assert_close(logits["step"], logits[False], atol=1e-5, rtol=1e-5)
            for m in models.values():
                m.zero_grad()
            for c in models:
                logits[c].logsumexp(-1).sum().backward()
            compiled = dict(models["step"].named_parameters())
            for name, p in models[False].named_parameters():
                torch.testing.assert_close(compiled[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{gru}: {name}")
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
        if gru == "cudnn":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = {c: m(*first) for c, m in models.items()}
            torch.testing.assert_close(bf16["step"], bf16[False], atol=0.05, rtol=0.05)


def test_compile_mode_names_the_key() -> None:
    from distnmt.model.rnnsearch import compile_mode

    assert [compile_mode(v) for v in (False, True, "scores", "step")] == [None, "scores", "scores", "step"]
    with pytest.raises(ValueError, match="model.compile must be"):
        compile_mode("graph")
    from distnmt.config import ConfigError, load_config

    assert load_config(overrides=["model.compile=step"]).model.compile == "step"
    assert load_config(overrides=["model.compile=true"]).model.compile is True
    with pytest.raises(ConfigError, match="model.compile"):
        load_config(overrides=["model.compile=graph"])
