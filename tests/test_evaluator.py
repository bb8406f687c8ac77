"""The evaluator without Ray: score records (typed, old lines readable), policies,
early stopping, persistence and restart, the stored lag in every path, the dev
cross-entropy, sacreBLEU agreement with its command line, `distnmt evaluate`
without the actor, end-of-run test score, figures, W&B (offline) and checkpoint averaging. Real sentencepiece models from the WMT'14
sample, real (untrained, tiny) RNNsearch checkpoints, real sacreBLEU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray.train
import torch

from distnmt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from distnmt.cli import main as cli_main
from distnmt.config import ConfigError, DataConfig, load_config
from distnmt.data.prepare import load_manifest, prepare
from distnmt.data.tokenizer import PAD_ID, Tokenizer
from distnmt.evaluate.average import average_checkpoints, last_checkpoints
from distnmt.evaluate.evaluator import Evaluator
from distnmt.evaluate.figures import bleu_by_length, example_indices
from distnmt.evaluate.policy import EarlyStopping, best_record, should_skip
from distnmt.evaluate.records import FinalReport, Record, ScoreRecord, SkipRecord, read_scores
from distnmt.evaluate.score import cross_entropy, eval_set_name
from distnmt.evaluate.translator import SRC_SPM, TGT_SPM, translator_from_checkpoint
from distnmt.model.build import build_model

TINY = [
    "model.embed_size=16", "model.hidden_size=24", "model.align_size=24", "model.maxout_size=16",
    "data.max_len=30", "data.vocab_size=800",
    "eval.beam_size=2", "eval.max_sentences=12", "eval.batch_sentences=12", "eval.attention_examples=2",
]


# ---------------------------------------------------------------- pure rules


def test_policy_every_never_skips_and_newest_skips_for_a_newer_checkpoint() -> None:
    known = {"checkpoint_10": 10, "checkpoint_20": 20, "checkpoint_30": 30}
    assert should_skip("every", 10, known) is None
    assert should_skip("newest", 10, known) == "checkpoint_30"  # names the newest it knows
    assert should_skip("newest", 30, known) is None  # the newest is always scored
    with pytest.raises(ValueError):
        should_skip("oldest", 10, known)


def _rec(step: int, bleu: float, **fields: Any) -> ScoreRecord:
    return ScoreRecord(checkpoint=f"checkpoint_{step}", step=step, split="dev", test_set="newstest2013", bleu=bleu,
                       chrf=bleu * 2, bleu_line=f"BLEU = {bleu:.2f}", bleu_signature="nrefs:1|tok:13a",
                       chrf_signature="nrefs:1|nc:6", sentences=12, **fields)


def test_early_stopping_counts_scored_checkpoints_since_the_best() -> None:
    records = [_rec(10, 5.0), _rec(20, 7.0), _rec(30, 6.9), _rec(40, 7.0)]
    assert EarlyStopping(None).reason(records) is None
    assert EarlyStopping(3).reason(records) is None  # two without improvement, patience 3
    reason = EarlyStopping(2).reason(records)
    assert reason is not None and reason.startswith("early stopping: newstest2013 BLEU has not improved")
    assert "best 7.00 at step 20" in reason and "patience 2" in reason
    # Scored out of order (a restart): the decision follows training steps.
    assert EarlyStopping(2).reason(list(reversed(records))) == reason
    # min_delta: +2.0 is not "better" when a gain must exceed 2.5.
    assert EarlyStopping(1, min_delta=2.5).since_best(records)[1] == 3


def test_best_record_prefers_the_earliest_on_a_tie() -> None:
    assert best_record([_rec(30, 7.0), _rec(20, 7.0), _rec(10, 1.0)]).step == 20
    assert best_record([]) is None


def test_bleu_by_length_bins_by_source_words() -> None:
    sources = ["a b c", "a " * 15, "a " * 70, "one two"]
    refs = ["le petit chat noir dort", "il fait beau ce matin", "x y z w v", "deux mots et plus encore"]
    bins = bleu_by_length(sources, refs, refs)
    assert [(b.label, b.sentences) for b in bins] == [("1-10", 2), ("11-20", 1), ("60+", 1)]
    assert all(b.bleu == pytest.approx(100.0) for b in bins)


def test_test_set_names() -> None:
    assert eval_set_name("dev/newstest2013") == "newstest2013"
    assert eval_set_name("test/newstest2014-fren-src.en.sgm") == "newstest2014"


def test_eval_config_keys_are_checked() -> None:
    cfg = load_config(None, ["eval.policy=newest", "eval.patience=3", "eval.test_at_end=false"])
    assert (cfg.eval.policy, cfg.eval.patience, cfg.eval.test_at_end) == ("newest", 3, False)
    with pytest.raises(ConfigError, match="eval.policy"):
        load_config(None, ["eval.policy=latest"])
    with pytest.raises(ConfigError, match="eval.patience: 0 must be at least 1"):
        load_config(None, ["eval.patience=0"])


def test_score_record_round_trips_and_old_lines_still_load(tmp_path: Path) -> None:
    record = _rec(40, 7.5, beam_size=2, alpha=1.0, max_len_a=1.5, max_len_b=10, xent=5.25, xent_tokens=300,
                  reported_at=100.0, scored_at=112.5, lag_seconds=12.5, averaged_from=["checkpoint_30"])
    assert ScoreRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    # A line written before the typed record (no origin, no settings, no xent) and one
    # from a newer writer (an unknown key) both load; a line missing a required field does not.
    old = {"checkpoint": "checkpoint_10", "step": 10, "split": "dev", "test_set": "newstest2013", "bleu": 1.0,
           "chrf": 9.0, "bleu_line": "BLEU = 1.00", "bleu_signature": "s", "chrf_signature": "c", "sentences": 12,
           "reported_at": 5.0, "scored_at": 9.0, "lag_seconds": 4.0}
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [
        old, {**old, "checkpoint": "checkpoint_20", "from_the_future": 1}, {"checkpoint": "checkpoint_30"}]))
    loaded = read_scores(path)
    assert [(r.checkpoint, r.origin, r.xent, r.lag_seconds) for r in loaded] == [
        ("checkpoint_10", "training", None, 4.0), ("checkpoint_20", "training", None, 4.0)]
    # A setting missing from an old line does not disqualify it; a different one does.
    assert loaded[0].matches({"beam_size": 5, "sentences": 12}) and not loaded[0].matches({"sentences": 13})
    # Re-issued to training: the lag runs from this report to now, not from the earlier decode.
    again = _rec(10, 1.0, origin="evaluate", scored_at=50.0).for_report(reported_at=60.0, handed_at=61.0, now=62.5)
    assert (again.origin, again.reused_from, again.lag_seconds, again.scored_at) == ("training", "evaluate", 2.5, 50.0)
    report = FinalReport(best=record, stop_reason="why", figures=["figures/x.png"])
    assert FinalReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


# ---------------------------------------------------------------- with real checkpoints


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(DataConfig(source_dir=str(shared_data), prepared_dir=str(out), vocab_size=800, max_len=30, max_train_pairs=2000), progress=False)
    return out


def _config(prepared: Path, *extra: str) -> dict[str, Any]:
    return load_config(None, TINY + [f"data.prepared_dir={prepared}", *extra]).to_dict()


def make_checkpoint(run_dir: Path, prepared: Path, step: int, seed: int, extra: tuple[str, ...] = ()) -> Path:
    """An untrained tiny RNNsearch checkpoint in the trainer's format (weights from ``seed``)."""
    config = _config(prepared, *extra)
    cfg = load_config(None, TINY + list(extra))
    src_tok, tgt_tok = Tokenizer(prepared / "spm.en.model"), Tokenizer(prepared / "spm.fr.model")
    torch.manual_seed(seed)
    model = build_model(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, pad_id=PAD_ID)
    return save_checkpoint(
        run_dir / f"checkpoint_{step:08d}", {"model": model.state_dict(), "step": step},
        step=step, config=config, vocab_sha256=load_manifest(prepared)["spm_sha256"],
        extra_meta={"vocab_size": {"src": src_tok.vocab_size, "tgt": tgt_tok.vocab_size}},
        extra_files={SRC_SPM: prepared / "spm.en.model", TGT_SPM: prepared / "spm.fr.model"},
    )


def _report(evaluator: Evaluator, checkpoint: Path) -> Record:
    """What the training hook does, without Ray: hand over a Ray Train checkpoint."""
    return evaluator.score_checkpoint(ray.train.Checkpoint.from_directory(str(checkpoint)))


def test_scores_persist_and_a_restarted_evaluator_reuses_them(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = make_checkpoint(run, prepared, 10, seed=1)
    evaluator = Evaluator(_config(prepared), str(prepared), str(run))
    record = _report(evaluator, first)
    assert isinstance(record, ScoreRecord) and record.origin == "training" and record.sentences == 12
    # The lag is stored, and is from the report (meta.json's mtime) to the score.
    assert record.reported_at == pytest.approx((first / "meta.json").stat().st_mtime)
    assert record.lag_seconds == round(record.scored_at - record.reported_at, 2) and record.lag_seconds >= 0
    assert record.bleu_signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert len((run / "eval" / record.hyp_file).read_text().splitlines()) == 12

    # A crash mid-write leaves a cut line; the restarted evaluator ignores it.
    with open(run / "eval" / "dev.jsonl", "a") as handle:
        handle.write('{"checkpoint": "checkpoint_000')
    restarted = Evaluator(_config(prepared), str(prepared), str(run))
    assert [r.checkpoint for r in restarted.results()] == [first.name]
    again = _report(restarted, first)  # re-sent after a restart: not decoded again
    assert again == record  # the same record, lag included
    # Other decoding settings are another score, not a reused one.
    other = Evaluator(_config(prepared, "eval.beam_size=1"), str(prepared), str(run))
    assert other.results() == []


def test_newest_policy_skips_a_checkpoint_when_a_newer_one_was_reported(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    paths = [make_checkpoint(run, prepared, step, seed=step) for step in (10, 20, 30)]
    newest = Evaluator(_config(prepared, "eval.policy=newest"), str(prepared), str(run))
    skipped = _report(newest, paths[0])
    assert isinstance(skipped, SkipRecord) and skipped.newer == "checkpoint_00000030"
    assert isinstance(_report(newest, paths[2]), ScoreRecord)
    # Skips are recorded apart from scores, and survive a restart.
    assert [r.checkpoint for r in newest.results()] == ["checkpoint_00000030"]
    lines = (run / "eval" / "dev.skipped.jsonl").read_text().splitlines()
    assert [json.loads(line)["checkpoint"] for line in lines] == ["checkpoint_00000010"]
    restarted = Evaluator(_config(prepared, "eval.policy=newest"), str(prepared), str(run))
    assert [r.checkpoint for r in restarted.skipped()] == ["checkpoint_00000010"]
    assert _report(restarted, paths[0]) == skipped  # re-sent: not recorded twice
    assert len((run / "eval" / "dev.skipped.jsonl").read_text().splitlines()) == 1
    # Policy "every" scores it all the same.
    every = Evaluator(_config(prepared), str(prepared), str(tmp_path / "other"))
    assert isinstance(_report(every, paths[0]), ScoreRecord)


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    evaluator = Evaluator(_config(prepared, "eval.max_sentences=40", "eval.batch_sentences=40"), str(prepared), str(run))
    record = _report(evaluator, make_checkpoint(run, prepared, 10, seed=3))
    ref = tmp_path / "ref.fr"
    ref.write_text("".join((prepared / "dev.fr").read_text(encoding="utf-8").splitlines(keepends=True)[:40]))
    hyp = run / "eval" / record.hyp_file
    out = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-w", "6", "-f", "text"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    # e.g. "BLEU|nrefs:1|...|version:2.6.0 = 0.061234 0.9/0.0/..." then "chrF2|...|version:2.6.0 = 12.345678"
    (bleu_sig, bleu_rest), (chrf_sig, chrf_rest) = (line.strip().split(" = ", 1) for line in out.stdout.splitlines())
    assert float(bleu_rest.split()[0]) == pytest.approx(record.bleu, abs=1e-6)
    assert float(chrf_rest) == pytest.approx(record.chrf, abs=1e-6)
    # The same metric settings, not just the same numbers.
    assert bleu_sig == f"BLEU|{record.bleu_signature}"
    assert chrf_sig == f"chrF2|{record.chrf_signature}"


def test_stop_reason_comes_from_persisted_scores(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    evaluator = Evaluator(_config(prepared, "eval.patience=1", "eval.min_delta=100"), str(prepared), str(run))
    assert evaluator.stop_reason() is None
    _report(evaluator, make_checkpoint(run, prepared, 10, seed=1))
    assert evaluator.stop_reason() is None  # the first score is the best so far
    _report(evaluator, make_checkpoint(run, prepared, 20, seed=2))
    reason = evaluator.stop_reason()
    assert reason is not None and "has not improved by more than 100 for 1 scored checkpoint(s)" in reason
    # A restarted evaluator gives the same answer at once, and reports it as why the run ended.
    restarted = Evaluator(_config(prepared, "eval.patience=1", "eval.min_delta=100", "eval.test_at_end=false",
                                  "eval.figures=false"), str(prepared), str(run))
    assert restarted.stop_reason() == reason
    restarted.finalize()
    assert restarted.final().stop_reason == reason


def test_a_reason_nobody_asked_for_is_not_why_the_run_ended(prepared: Path, tmp_path: Path) -> None:
    # Training hit max_steps; the last score would have met the patience, but no one was told to stop.
    run = tmp_path / "run"
    evaluator = Evaluator(_config(prepared, "eval.patience=1", "eval.min_delta=100", "eval.test_at_end=false",
                                  "eval.figures=false"), str(prepared), str(run))
    for step in (10, 20):
        _report(evaluator, make_checkpoint(run, prepared, step, seed=step))
    evaluator.finalize()
    assert evaluator.final().stop_reason is None


def test_finalize_scores_the_best_on_test_draws_figures_and_logs_to_wandb(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    evaluator = Evaluator(_config(prepared, "logging.wandb=offline"), str(prepared), str(run))
    scores = [_report(evaluator, make_checkpoint(run, prepared, step, seed=step)) for step in (10, 20)]
    best = max(scores, key=lambda r: (r.bleu, -r.step))

    records = evaluator.finalize()
    assert [r.step for r in records] == [10, 20]  # the evaluation split's scores, for the driver
    final = json.loads((run / "eval" / "final.json").read_text())
    assert FinalReport.from_dict(final) == evaluator.final()
    assert final["best"]["checkpoint"] == best.checkpoint
    test = final["test"]
    assert (test["split"], test["test_set"], test["checkpoint"], test["sentences"], test["origin"]) == (
        "test", "newstest2014", best.checkpoint, 12, "final"
    )
    assert test["lag_seconds"] is None  # no report: the end-of-run score has no lag
    assert test["xent"] > 0 and test["xent_tokens"] > 12
    assert [json.loads(line)["checkpoint"] for line in (run / "eval" / "test.jsonl").read_text().splitlines()] == [
        best.checkpoint
    ]
    # The paper's figures, as PNG files in the run directory.
    assert len(final["figures"]) == 3  # Figure 2 + two attention examples
    for name in final["figures"]:
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bins = json.loads((run / "figures" / "bleu_by_length.json").read_text())
    assert sum(b["sentences"] for b in bins) == 12
    # W&B: a separate offline run in the training run's group, id kept for restarts.
    run_id = (run / "eval" / "wandb_run_id").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    media = offline[0] / "files" / "media"
    assert list(media.glob("table/samples_*.table.json"))  # the sample translations
    assert sorted(p.name.split("_")[0] for p in media.glob("images/figures/*.png")) == ["attention", "attention", "bleu"]
    # Finalizing again reuses every score.
    assert evaluator.finalize() == records
    assert len((run / "eval" / "test.jsonl").read_text().splitlines()) == 1


def test_attention_rows_are_distributions_over_the_source(prepared: Path, tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, prepared, 10, seed=1)
    cfg = load_config(None, TINY + ["eval.beam_size=3"]).eval
    sentences = (prepared / "dev.en").read_text().splitlines()
    picks = example_indices(sentences, 2)
    assert picks == example_indices(sentences, 2)  # fixed sentences, run after run
    for alignment in translator_from_checkpoint(path, cfg).attention([sentences[i] for i in picks]):
        assert alignment.weights.shape == (len(alignment.tgt_pieces), len(alignment.src_pieces))
        assert alignment.src_pieces[-1] == "</s>"
        assert alignment.weights.sum(axis=1) == pytest.approx(1.0, abs=1e-4)


def test_averaging_the_last_checkpoints(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    paths = [make_checkpoint(run, prepared, step, seed=step) for step in (10, 20, 30)]
    assert last_checkpoints(paths[2], 2) == paths[1:]
    assert last_checkpoints(paths[1], 2) == paths[:2]
    with pytest.raises(CheckpointError, match="averaging 4 checkpoints needs 4 up to step 30"):
        last_checkpoints(paths[2], 4)

    averaged = average_checkpoints(paths[1:], tmp_path / "avg")
    loaded = load_checkpoint(averaged)
    a, b = (load_checkpoint(p).state["model"] for p in paths[1:])
    for name, tensor in loaded.state["model"].items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2)
    assert loaded.meta["averaged_from"] == [p.name for p in paths[1:]] and loaded.step == 30

    # From the command line: averaged, scored, and the averaged checkpoint kept.
    out = tmp_path / "out"
    code = cli_main([
        "evaluate", str(paths[2]), "--average", "2", "--beam", "1", "--max-sentences", "5",
        "--prepared", str(prepared), "--out", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "averaged checkpoint_00000020 checkpoint_00000030" in printed and "BLEU" in printed
    record = json.loads((out / "eval" / "dev.jsonl").read_text().splitlines()[0])
    assert record["averaged_from"] == ["checkpoint_00000020", "checkpoint_00000030"]
    assert (out / "averaged" / record["checkpoint"] / "meta.json").is_file()


def test_averaging_refuses_different_models(prepared: Path, tmp_path: Path) -> None:
    one = make_checkpoint(tmp_path / "a", prepared, 10, seed=1)
    two = make_checkpoint(tmp_path / "b", prepared, 20, seed=1, extra=("model.hidden_size=32",))
    with pytest.raises(CheckpointError, match="model config differs"):
        average_checkpoints([one, two], tmp_path / "avg")


def test_sacrebleu_cli_is_the_one_installed() -> None:
    # The comparison above runs `python -m sacrebleu`; make sure it is the library we score with.
    import sacrebleu

    out = subprocess.run([sys.executable, "-m", "sacrebleu", "--version"], capture_output=True, text=True, timeout=60)
    assert sacrebleu.__version__ in out.stdout + out.stderr


def test_cross_entropy_is_per_target_subword_with_eos(prepared: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    translator = translator_from_checkpoint(make_checkpoint(tmp_path, prepared, 10, seed=5),
                                            load_config(None, TINY).eval)
    sources = (prepared / "dev.en").read_text(encoding="utf-8").splitlines()[:9]
    references = (prepared / "dev.fr").read_text(encoding="utf-8").splitlines()[:9]
    nats, tokens = cross_entropy(translator, sources, references)
    # Counted by hand: every reference subword and one EOS per sentence.
    assert tokens == sum(len(translator.tgt_tok.encode(r)) + 1 for r in references)
    # Computed by hand, one sentence at a time: BOS + y in, y + EOS scored, plain log-softmax.
    expected = 0.0
    with torch.no_grad():
        for source, reference in zip(sources, references):
            src = torch.tensor([translator.src_tok.encode(source) + [3]])
            y = translator.tgt_tok.encode(reference)
            logits = translator.model(src, torch.tensor([src.size(1)]), torch.tensor([[2] + y]))
            log_probs = torch.log_softmax(logits[0].double(), dim=-1)
            expected -= float(log_probs[torch.arange(len(y) + 1), torch.tensor(y + [3])].sum())
    assert nats == pytest.approx(expected, rel=1e-5)
    # However the sentences are batched (here one at a time), the same figure.
    monkeypatch.setattr("distnmt.evaluate.score.XENT_LOGITS_BUDGET", 1)
    assert cross_entropy(translator, sources, references) == (pytest.approx(nats, rel=1e-5), tokens)


def test_lag_is_stored_in_every_path_and_bench_eval_lag_reads_it(prepared: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import time

    from distnmt.bench.eval_lag import lag_rows

    run = tmp_path / "run"
    first = make_checkpoint(run, prepared, 10, seed=1)
    # `distnmt evaluate` scores it into the run's records first, with the run's settings: no lag.
    assert cli_main(["evaluate", str(first), "--prepared", str(prepared), "--out", str(run)]) == 0
    assert "persisted score reused" not in capsys.readouterr().out
    evaluated = read_scores(run / "eval" / "dev.jsonl")[0]
    assert (evaluated.origin, evaluated.lag_seconds, evaluated.reported_at) == ("evaluate", None, None)
    # Then training reports it (its meta.json lands after that score): the score is re-issued,
    # and the lag is from this report to the re-issue, never missing, never negative.
    reported = time.time()
    os.utime(first / "meta.json", (reported, reported))
    evaluator = Evaluator(_config(prepared, "eval.test_at_end=false", "eval.figures=false"), str(prepared), str(run))
    reissued = _report(evaluator, first)
    assert isinstance(reissued, ScoreRecord)
    assert (reissued.origin, reissued.reused_from, reissued.scored_at) == ("training", "evaluate", evaluated.scored_at)
    assert reissued.reported_at == pytest.approx(reported)
    assert 0 <= reissued.lag_seconds < 60
    # Persisted as such: a restarted evaluator hands out the same record and writes nothing more.
    restarted = Evaluator(_config(prepared, "eval.test_at_end=false", "eval.figures=false"), str(prepared), str(run))
    assert _report(restarted, first) == reissued
    assert len((run / "eval" / "dev.jsonl").read_text().splitlines()) == 2
    # Checkpoints no validation task handed over are scored at the end, their lag from their
    # meta.json; one that `distnmt evaluate` scored meanwhile is re-issued, not decoded again.
    second = make_checkpoint(run, prepared, 20, seed=2)
    third = make_checkpoint(run, prepared, 30, seed=3)
    assert cli_main(["evaluate", str(third), "--prepared", str(prepared), "--out", str(run)]) == 0
    restarted = Evaluator(_config(prepared, "eval.test_at_end=false", "eval.figures=false"), str(prepared), str(run))
    restarted.finalize()
    caught, late = restarted.results()[1:]
    assert caught.checkpoint == second.name and caught.reused_from is None
    assert caught.lag_seconds == round(caught.scored_at - (second / "meta.json").stat().st_mtime, 2)
    assert (late.checkpoint, late.origin, late.reused_from) == (third.name, "training", "evaluate")
    assert late.lag_seconds >= 0 and late.reported_at == (third / "meta.json").stat().st_mtime
    # `bench eval-lag` reports the stored lags; a re-issued score has no queue or decode time of its own.
    _, rows, _ = lag_rows(run)
    assert [(r["checkpoint"], r["lag_s"]) for r in rows] == [
        (first.name, reissued.lag_seconds), (second.name, caught.lag_seconds), (third.name, late.lag_seconds)]
    assert (rows[0]["wait_s"], rows[0]["decode_s"]) == (None, None) and rows[1]["wait_s"] is not None
    assert restarted.final().lag_seconds["checkpoints"] == 3


def test_evaluate_command_needs_neither_ray_nor_the_actor(prepared: Path, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "run", prepared, 10, seed=4)
    script = (
        "import sys\n"
        "from distnmt.cli import main\n"
        f"code = main(['evaluate', {str(checkpoint)!r}, '--prepared', {str(prepared)!r}, '--beam', '1'])\n"
        "print('loaded:', 'ray' in sys.modules, 'distnmt.evaluate.evaluator' in sys.modules, code)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "loaded: False False 0" in out.stdout
    record = read_scores(tmp_path / "run" / "eval" / "dev.jsonl")[0]
    assert (record.origin, record.beam_size, record.hyp_file) == ("evaluate", 1, "dev.checkpoint_00000010.beam1.n12.hyp")
    assert f"cross-entropy per target subword (teacher-forced, {record.xent_tokens} subwords incl. EOS)" in out.stdout
