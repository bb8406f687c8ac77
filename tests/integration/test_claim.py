"""The paper's claim in miniature, the suite's version (issue 14): ``distnmt bench claim
--tiny --models rnnsearch`` generates the synthetic task, prepares it through ``distnmt
prepare``, trains RNNsearch with a Ray Train worker while the evaluator actor scores
each checkpoint (beam search, sacreBLEU on detokenised text), and RNNsearch must
translate the held-out dev set almost perfectly.

A task whose translation is known exactly turns "it trains" into a sharp check: a
broken attention mask, alignment, beam search or detokenisation keeps dev BLEU far
below 90 (how each was checked is in docs/MODEL.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distnmt.bench.claim import main as claim_main
from distnmt.data.prepared import PreparedData

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.beside]


def test_rnnsearch_learns_the_synthetic_task_through_the_real_path(tmp_path: Path) -> None:
    assert claim_main(["--tiny", "--models", "rnnsearch", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "claim.json").read_text())
    search = result["models"]["rnnsearch"]
    assert search["dev_bleu"] >= 90, search["dev_bleu_by_step"]
    assert search["test_bleu"] >= 85
    # Scored by the evaluator actor on the prepared plain-text dev set, at each checkpoint.
    assert sorted(int(step) for step in search["dev_bleu_by_step"]) == [500, 1000]
    assert (tmp_path / "claim_bleu_by_length.png").stat().st_size > 0
    assert (tmp_path / "claim_attention.png").stat().st_size > 0
    # The corpus went through prepare: sentencepiece models and shards beside the plain text.
    prepared = PreparedData.load(tmp_path / "prepared")
    assert prepared.spm_model("src").exists()
    assert prepared.text("dev", "tgt").read_text() == (tmp_path / "corpus" / "dev" / "dev.tgt").read_text()
