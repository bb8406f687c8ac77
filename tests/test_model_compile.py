"""``model.compile``: the alignment scores through torch.compile give the eager results.

Marked ``integration``: the first call compiles C++ kernels (15-60 s on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

from distnmt.model import RNNSearch, beam_search

pytestmark = pytest.mark.integration

V, BOS, EOS = 30, 1, 2
TINY = dict(embed_size=8, hidden_size=16, align_size=12, maxout_size=10)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; a second thread only spin-waits
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
