"""A user's own files end to end: a TSV and a gzipped plain-text pair in a made-up language,
plain-text dev and test, prepared by the CLI, trained, and scored by the evaluator with
the configured sacreBLEU tokenizer, dev during training and test at the end (issue 17).

The run is Ray Train's local mode (``train.workers: 0``): what this test is about, the
data path from the user's files to the scores, is the same code on a cluster, and a
cluster's start-up would triple the test's time (the 2-worker path with the evaluator
actor is the local run of tests/integration/test_job_submit.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distnmt.cli import main
from distnmt.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/parallel_text.py
from parallel_text import pairs, write, write_gz  # noqa: E402

pytestmark = pytest.mark.integration

# The integration tests' tiny model (tests/integration/conftest.py), on this corpus's small vocabulary.
TINY = [
    "model.embed_size=32", "model.hidden_size=48", "model.align_size=48", "model.maxout_size=32",
    "data.max_len=30", "data.max_tokens=600", "optim.name=adam", "optim.lr=0.003", "train.precision=fp32",
    "eval.beam_size=2", "eval.batch_sentences=30", "logging.log_every=10",
]


def test_own_tsv_and_plain_files_train_and_are_scored_with_the_configured_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "mine"
    web, more = pairs(600, "en", "xx", 1), pairs(300, "en", "xx", 2)
    write(root / "web.tsv", [f"{e}\t{x}" for e, x in web])
    write_gz(root / "more.en.gz", [e for e, _ in more])
    write_gz(root / "more.xx.gz", [x for _, x in more])
    for split, seed in (("dev", 3), ("test", 4)):
        items = pairs(30, "en", "xx", seed)
        write(root / f"{split}.en", [e for e, _ in items])
        write(root / f"{split}.xx", [x for _, x in items])
    data = [
        f"data.source_dir={root}", f"data.prepared_dir={tmp_path / 'prepared'}", "data.src_lang=en", "data.tgt_lang=xx",
        "data.corpora=[{tsv: web.tsv}, {src: more.en.gz, tgt: more.xx.gz}]",
        "data.dev={name: mydev, src: dev.en, tgt: dev.xx}", "data.test={src: test.en, tgt: test.xx}",
        "data.vocab_size=120", "data.workers=1",
    ]
    assert main(["prepare", "--quiet", *(x for item in data for x in ("--set", item))]) == 0
    manifest = json.loads((tmp_path / "prepared/manifest.json").read_text(encoding="utf-8"))
    assert list(manifest["report"]) == ["web", "more", "total"] and manifest["counts"]["dev"] == 30

    from distnmt.orchestrate import run_training

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    cfg = load_config(None, [*TINY, *data, "eval.bleu_tokenize=char", "train.workers=0", "train.max_steps=20",
                             "train.checkpoint_every=20", "eval.figures=false", f"train.storage_path={tmp_path}",
                             "train.name=own"])
    records = run_training(cfg)
    assert [r.step for r in records] == [20]
    dev = records[0]
    assert dev.test_set == "mydev" and dev.sentences == 30 and dev.bleu_tokenize == "char"
    assert "|tok:char|" in dev.bleu_signature and 0.0 <= dev.bleu <= 100.0
    final = json.loads((tmp_path / "own/eval/final.json").read_text(encoding="utf-8"))
    assert final["test"]["test_set"] == "test" and "|tok:char|" in final["test"]["bleu_signature"]
