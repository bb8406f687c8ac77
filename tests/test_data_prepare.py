"""``prepare`` end to end on real WMT'14 text: legacy file layout and registry parts from
a mirror, the cleaning report, shards, determinism for any number of workers, reuse of
finished work, and every kind of bad input as a one-line error with nothing half done."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest

from distnmt.cli import main
from distnmt.config import ConfigError, DataConfig, config_from_dict, load_config
from distnmt.data import DataError, PreparedData, load_manifest, prepare, read_lines, read_parallel
from distnmt.data.clean import DROPPING_RULES
from distnmt.data.shards import ids_path, index_path

QUICKSTART = Path(__file__).resolve().parents[1] / "configs/quickstart.yaml"
SMALL = dict(preset="sample", dev_sets=["newstest2013"], test_set="newstest2014", vocab_size=300)


def _config(mirror: Optional[Path], out: Path, **kw: Any) -> DataConfig:
    """The data config of a test: ``kw`` over the defaults, downloads (if any) under ``out``."""
    return DataConfig(source_dir=str(mirror) if mirror is not None else None, prepared_dir=str(out),
                      cache_dir=str(out / "cache"), **kw)


def _prepare_small(mirror: Path, out: Path, **kw: Any):
    return prepare(_config(mirror, out, **{**SMALL, "workers": 1, **kw}), progress=False)


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


# ------------------------------------------------------------------ legacy layout


@pytest.fixture(scope="module")
def prepared(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prepared")
    return prepare(_config(shared_data, out, vocab_size=500, max_train_pairs=2000, workers=1), progress=False)


def test_prepare_end_to_end(prepared, shared_data: Path) -> None:
    out, manifest = prepared.out_dir, prepared.manifest
    assert load_manifest(out) == manifest
    assert manifest["version"] == 2 and manifest["vocab_size"] == 500 and manifest["max_len"] == 50
    counts, dropped = manifest["counts"], manifest["dropped"]
    assert counts["train_read"] == 2000
    assert counts["train"] + sum(dropped.values()) == 2000
    assert dropped["too_long"] > 0  # Europarl has sentences over 50 subwords
    assert counts["dev"] == 3000 and counts["test"] == 3003

    data = PreparedData.load(out)
    tok = {lang: data.tokenizer(lang) for lang in ("en", "fr")}
    assert {lang: t.sha256 for lang, t in tok.items()} == manifest["spm_sha256"] == data.spm_sha256
    assert data.vocab_sizes == {"src": 500, "tgt": 500}
    src, tgt = data.train_arrays()
    assert len(src) == len(tgt) == counts["train"]
    assert src.num_tokens == counts["train_tokens_en"] and tgt.num_tokens == counts["train_tokens_fr"]
    assert 1 <= src.lengths.min() and max(src.lengths.max(), tgt.lengths.max()) <= 50
    ids = np.load(ids_path(data.shard_prefix("train-00000", "fr")))
    assert ids.dtype == np.uint16 and int(ids.max()) < 500

    # the first training pair is short and clean: it decodes back to the raw text
    en, fr = next(read_parallel(shared_data / "train/train.en.gz", shared_data / "train/train.fr.gz"))
    assert tok["en"].decode(src[0]) == en and tok["fr"].decode(tgt[0]) == fr

    # raw references are copied unchanged; sources are encoded in full
    assert data.text("dev", "en").read_bytes() == (shared_data / "dev/newstest2013.en").read_bytes()
    assert data.text("dev", "fr").read_bytes() == (shared_data / "dev/newstest2013.fr").read_bytes()
    assert data.text("test", "fr").read_bytes() == (shared_data / "test/newstest2014.fr").read_bytes()
    assert data.eval_text("test")[0] == read_lines(shared_data / "test/newstest2014.en")
    dev = data.source_ids("dev")
    assert len(dev) == 3000 and dev[5].tolist() == tok["en"].encode(data.eval_text("dev")[0][5])
    assert len(data.source_ids("test")) == 3003
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".scratch"))]
    assert not leftovers
    # the source checksums are those of the files as published with the sample
    sums = dict(line.split()[::-1] for line in (shared_data / "SHA256SUMS").read_text().splitlines())
    assert manifest["sources"]["train"]["train"]["sha256"] == [sums["train/train.en.gz"], sums["train/train.fr.gz"]]


def test_prepared_data_layout(prepared) -> None:
    """The documented layout (docs/DATA.md), named here and in PreparedData only."""
    out = prepared.out_dir
    data = PreparedData(out)
    names = {
        data.manifest_path: "manifest.json", data.report_md: "report.md", data.report_json: "report.json",
        data.spm_model("en"): "spm.en.model", data.spm_vocab("fr"): "spm.fr.vocab",
        index_path(data.train_prefix("en")): "train.en.shards.json", data.text("dev", "fr"): "dev.fr",
        ids_path(data.source_ids_prefix("test")): "test.en.ids.npy", data.work_dir: "work",
        ids_path(data.shard_prefix("train-00000", "en")): "shards/train-00000.en.ids.npy",
    }
    for path, name in names.items():
        assert path == out / name and path.exists(), name


def test_prepared_data_checks_languages(prepared) -> None:
    from distnmt.config import DataConfig

    out = prepared.out_dir
    loaded = PreparedData.load(out)
    assert loaded.langs == ("en", "fr") and loaded.manifest == prepared.manifest
    assert PreparedData.from_config(DataConfig(prepared_dir=str(out))).check().langs == ("en", "fr")
    wrong = PreparedData.from_config(DataConfig(prepared_dir=str(out), src_lang="fr", tgt_lang="en"))
    with pytest.raises(DataError, match=rf"^{out}/manifest.json: prepared for en->fr, not fr->en"):
        wrong.check()


def test_load_manifest_errors(prepared, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path}/manifest.json: missing; run `distnmt prepare` first"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{\n  oops", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{tmp_path}/manifest.json:2: invalid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**prepared.manifest, "version": 1}), encoding="utf-8")
    with pytest.raises(DataError, match="version 1 is not supported"):
        load_manifest(tmp_path)
    # manifest from one prepare, sentencepiece models from another
    (tmp_path / "manifest.json").write_text(json.dumps(prepared.manifest), encoding="utf-8")
    PreparedData(tmp_path).spm_model("en").write_bytes(b"other")
    with pytest.raises(DataError, match=rf"^{tmp_path}/spm.en.model: sha256 .* does not match"):
        load_manifest(tmp_path)


def test_prepare_missing_source_names_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path}/train/train.en.gz: missing"):
        prepare(_config(tmp_path, tmp_path / "out"), progress=False)


# ------------------------------------------------------------ registry parts, mirror


def test_preset_from_the_shared_sample(shared_data: Path, tmp_path: Path) -> None:
    """`--mirror ../shared/data/wmt14-en-fr`: parts found by their short names, newstest by SGML ids."""
    result = prepare(_config(shared_data, tmp_path, **{**SMALL, "max_train_pairs": 3500, "workers": 2, "shard_size": 1000}),
                     progress=False)
    m = result.manifest
    assert list(m["report"]) == ["europarl-v7", "news-commentary-v9", "total"]  # the limit stops in part 2
    assert m["report"]["europarl-v7"]["read"] == 2994 and m["report"]["news-commentary-v9"]["read"] == 506
    assert m["sources"]["train"]["europarl-v7"]["files"] == [
        str(shared_data / "train/by-corpus/europarl-v7.en.gz"), str(shared_data / "train/by-corpus/europarl-v7.fr.gz")]
    assert [s["name"] for s in m["shards"]] == [f"europarl-v7-0000{k}" for k in range(3)] + ["news-commentary-v9-00000"]
    data = PreparedData.load(tmp_path)
    assert data.text("dev", "fr").read_bytes() == (shared_data / "dev/newstest2013.fr").read_bytes()
    assert data.text("test", "en").read_bytes() == (shared_data / "test/newstest2014.en").read_bytes()
    assert data.text("test", "fr").read_bytes() == (shared_data / "test/newstest2014.fr").read_bytes()
    assert len(data.train_arrays()[0]) == m["counts"]["train"]


def test_report_per_rule_per_part(small_mirror: Path, tmp_path: Path) -> None:
    rules = dict(max_words=30, max_ratio=2.0, dedupe=True)
    m = _prepare_small(small_mirror, tmp_path, **rules, max_len=40, shard_size=300).manifest
    report = m["report"]
    assert list(report) == ["europarl-v7", "news-commentary-v9", "giga-fren", "total"]
    for part, row in report.items():
        assert row["read"] == row["kept"] + sum(row[r] for r in DROPPING_RULES), part
    assert all(report["total"][r] > 0 for r in ("max_words", "ratio", "too_long", "duplicate"))
    assert report["europarl-v7"]["duplicate"] > 0  # Europarl boilerplate repeats
    assert m["dropped"] == {r: report["total"][r] for r in DROPPING_RULES}
    data = PreparedData.load(tmp_path)
    assert json.loads(data.report_json.read_text()) == report
    table = data.report_md.read_text()
    assert "| giga-fren | 800 |" in table and "**total**" in table
    # each rule's share: of the pairs read, and of the pairs still there when it ran
    total = report["total"]
    reached = total["read"] - sum(total[r] for r in DROPPING_RULES[:-1])
    assert total["dropped_share"]["too_long"] == round(total["too_long"] / total["read"], 6)
    assert total["dropped_share_of_reaching"]["too_long"] == round(total["too_long"] / reached, 6)
    assert total["dropped_share_of_reaching"]["empty"] == total["dropped_share"]["empty"]  # the first rule
    share = f"{100 * total['too_long'] / total['read']:.2f}% ({100 * total['too_long'] / reached:.2f}%)"
    assert "Share dropped by each rule" in table and share in table.splitlines()[-1]
    # dedupe means no pair of the prepared data repeats
    src, tgt = data.train_arrays()
    pairs = {(tuple(src[i]), tuple(tgt[i])) for i in range(len(src))}
    assert len(pairs) == len(src)


def test_same_bytes_for_any_number_of_workers(small_mirror: Path, tmp_path: Path) -> None:
    one = _prepare_small(small_mirror, tmp_path / "one", shard_size=250, workers=1).manifest
    two = _prepare_small(small_mirror, tmp_path / "two", shard_size=250, workers=2).manifest
    assert one["spm_sha256"] == two["spm_sha256"] and one["shards"] == two["shards"] and len(one["shards"]) == 12
    for path in sorted((tmp_path / "one/shards").iterdir()):
        assert path.read_bytes() == (tmp_path / "two/shards" / path.name).read_bytes(), path.name


def test_joint_vocabulary(small_mirror: Path, tmp_path: Path) -> None:
    m = _prepare_small(small_mirror, tmp_path, joint_vocab=True, vocab_size=400).manifest
    data = PreparedData.load(tmp_path)
    assert data.spm_model("en").read_bytes() == data.spm_model("fr").read_bytes()
    assert m["spm_sha256"]["en"] == m["spm_sha256"]["fr"] and m["joint_vocab"]
    tok = data.tokenizer("fr")
    assert tok.vocab_size == 400
    for text in ("Resumption of the session", "Reprise de la session"):  # one model for both languages
        assert tok.decode(tok.encode(text)) == text
    assert load_manifest(tmp_path)["spm_sample_pairs"] == m["counts"]["train_read"] - m["dropped"]["empty"]


def test_spm_trains_on_a_bounded_sample(small_mirror: Path, tmp_path: Path) -> None:
    m = _prepare_small(small_mirror, tmp_path, spm_sample_pairs=500, workers=2).manifest
    assert m["spm_sample_pairs"] == 500
    sampled = sum(len(read_lines(p)) for p in (tmp_path / "work/sample").glob("*.en"))
    assert sampled == 500
    # drawn from every part, not just the first 500 pairs
    assert all(read_lines(p) for p in (tmp_path / "work/sample").glob("*.fr"))


# ------------------------------------------------------------------------- reuse


def test_rerun_reuses_finished_work(small_mirror: Path, tmp_path: Path) -> None:
    first = _prepare_small(small_mirror, tmp_path, shard_size=400).manifest
    clean, shards = _mtimes(tmp_path / "work/clean", "*.en"), _mtimes(tmp_path / "shards", "*")
    data = PreparedData(tmp_path)
    model = data.spm_model("en").stat().st_mtime_ns

    again = _prepare_small(small_mirror, tmp_path, shard_size=400, workers=2).manifest
    assert again["shards"] == first["shards"] and again["spm_sha256"] == first["spm_sha256"]
    assert _mtimes(tmp_path / "shards", "*") == shards and _mtimes(tmp_path / "work/clean", "*.en") == clean
    assert data.spm_model("en").stat().st_mtime_ns == model

    # a subword limit only changes the encode stage: cleaning and sentencepiece are reused
    shorter = _prepare_small(small_mirror, tmp_path, shard_size=400, max_len=20).manifest
    assert _mtimes(tmp_path / "work/clean", "*.en") == clean and data.spm_model("en").stat().st_mtime_ns == model
    assert shorter["counts"]["train"] < first["counts"]["train"] and load_manifest(tmp_path)["max_len"] == 20
    assert max(data.train_arrays()[1].lengths) <= 20
    # another vocabulary size retrains sentencepiece but keeps the cleaned text
    _prepare_small(small_mirror, tmp_path, shard_size=400, vocab_size=350)
    assert _mtimes(tmp_path / "work/clean", "*.en") == clean and data.tokenizer("en").vocab_size == 350


def test_failed_run_leaves_nothing_taken_as_done(small_mirror: Path, tmp_path: Path) -> None:
    _prepare_small(small_mirror, tmp_path / "out", shard_size=300)
    giga = small_mirror / "train/by-corpus/giga-fren.fr.gz"
    good = giga.read_bytes()
    lines = gzip.decompress(good).split(b"\n")
    lines[650] = b"caf\xe9"  # line 651 of the last part is Latin-1
    giga.write_bytes(gzip.compress(b"\n".join(lines)))
    with pytest.raises(DataError, match=rf"^{giga}:651: not valid UTF-8"):
        _prepare_small(small_mirror, tmp_path / "out", shard_size=300, workers=2)
    with pytest.raises(DataError, match="manifest.json: missing"):
        load_manifest(tmp_path / "out")  # the earlier complete output is no longer vouched for
    # a stamp vouches only for a shard whose files are complete (temporary names are never read)
    for stamp in (tmp_path / "out/work/clean").glob("*-[0-9][0-9][0-9][0-9][0-9].json"):
        name = stamp.name[: -len(".json")]
        assert all((tmp_path / "out/work/clean" / f"{name}.{lang}").is_file() for lang in ("en", "fr"))

    europarl = _mtimes(tmp_path / "out/work/clean", "europarl-v7-*.en")
    giga.write_bytes(good)
    fixed = _prepare_small(small_mirror, tmp_path / "out", shard_size=300, workers=2).manifest
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith((".tmp", ".scratch"))]
    assert _mtimes(tmp_path / "out/work/clean", "europarl-v7-*.en") == europarl  # not redone
    fresh = _prepare_small(small_mirror, tmp_path / "fresh", shard_size=300).manifest
    assert fixed["shards"] == fresh["shards"] and fixed["spm_sha256"] == fresh["spm_sha256"]
    for path in (tmp_path / "fresh/shards").iterdir():
        assert path.read_bytes() == (tmp_path / "out/shards" / path.name).read_bytes()


# --------------------------------------------------------------------- bad input


def _gz_lines(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).split(b"\n")


def _damage(mirror: Path, kind: str) -> tuple[Path, str]:
    """Break the mirror one way; returns the file the error must name and a regex for the rest."""
    by_corpus = mirror / "train/by-corpus"
    if kind == "line counts":
        path = by_corpus / "news-commentary.fr.gz"
        path.write_bytes(gzip.compress(b"\n".join(_gz_lines(path)[:-4]) + b"\n"))
        return path, rf": has 797 lines but {by_corpus / 'news-commentary.en.gz'} has 800$"
    if kind == "utf-8":
        path = by_corpus / "europarl-v7.en.gz"
        lines = _gz_lines(path)
        lines[9] = b"\xff\xfe broken"
        path.write_bytes(gzip.compress(b"\n".join(lines)))
        return path, r":10: not valid UTF-8"
    if kind == "truncated gzip":
        path = by_corpus / "giga-fren.en.gz"
        path.write_bytes(path.read_bytes()[:-100])
        return path, r": cannot read past line \d+ \(truncated or corrupt\?\): EOFError"
    if kind == "empty corpus":
        path = by_corpus / "europarl-v7.en.gz"
        for lang in ("en", "fr"):
            (by_corpus / f"europarl-v7.{lang}.gz").write_bytes(gzip.compress(b""))
        return path, r": empty: no lines to read"
    if kind == "missing part":
        for lang in ("en", "fr"):
            (by_corpus / f"giga-fren.{lang}.gz").unlink()
        return mirror, r": giga-fren not found: no giga-fren.release2.fixed.en\[.gz\] .* no archive training-giga-fren.tar$"
    if kind == "malformed SGML":
        path = mirror / "test/newstest2014-fren-ref.fr.sgm"
        text = path.read_text(encoding="utf-8").replace('<seg id="3">', '<seg id="2">', 1)
        path.write_text(text, encoding="utf-8")
        return path, r":\d+: duplicate seg id '2' in doc"
    if kind == "SGML ids differ":
        path = mirror / "dev/newstest2013-ref.fr.sgm"
        text = path.read_text(encoding="utf-8").replace('<seg id="5">', '<seg id="500">', 1)
        path.write_text(text, encoding="utf-8")
        return path, r": no seg id '5' in doc '.*' \(the source has it at .*newstest2013-src.en.sgm:\d+\)$"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["line counts", "utf-8", "truncated gzip", "empty corpus", "missing part",
                                  "malformed SGML", "SGML ids differ"])
def test_bad_input_is_one_line_naming_the_file(small_mirror: Path, tmp_path: Path, kind: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path, rest = _damage(small_mirror, kind)
    with pytest.raises(DataError) as info:
        _prepare_small(small_mirror, tmp_path / "out", workers=2)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)) and re.search(rest, message[len(str(path)):]), message
    assert not (tmp_path / "out/manifest.json").exists()
    # and through the command line: one line on stderr, exit status 2
    code = main(["prepare", "--quiet", "--config", str(QUICKSTART), "--mirror", str(small_mirror),
                 "--set", f"data.prepared_dir={tmp_path / 'cli'}", "--set", "data.vocab_size=300", "--set", "data.workers=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"distnmt prepare: error: {path}")


def test_cli_prepare_with_a_mirror(small_mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["prepare", "--quiet", "--config", str(QUICKSTART), "--mirror", str(small_mirror),
                 "--set", f"data.prepared_dir={out}", "--set", "data.vocab_size=300", "--set", "data.workers=1",
                 "--set", "data.max_ratio=2.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"[prepare] report: {PreparedData(out).report_md}" in printed
    manifest = load_manifest(out)
    assert manifest["config"]["preset"] == "sample" and manifest["config"]["rules"]["max_ratio"] == 2.5
    assert manifest["config"]["rules"]["dedupe"] and min(manifest["counts"]["dev"], manifest["counts"]["test"]) > 100
    assert manifest["source_dir"] == str(small_mirror.resolve())
    assert main(["prepare", "--quiet", "--set", "data.shard_size=0"]) == 2
    assert "data.shard_size: 0 must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [
    ("shard_size", 0), ("spm_sample_pairs", 0), ("workers", 0), ("max_words", 0), ("max_ratio", 0.5),
    ("vocab_size", 50), ("max_len", 0), ("max_train_pairs", 0), ("tgt_lang", "en"),
])
def test_each_data_value_is_checked_once_for_config_and_prepare(tmp_path: Path, key: str, value: Any) -> None:
    """The same check (DataConfig.checks) guards a YAML/--set config and a DataConfig built in code."""
    with pytest.raises(ConfigError, match=rf"^--set data\.{key}: {value!r} must "):
        load_config(None, [f"data.{key}={value}"])
    with pytest.raises(ConfigError, match=rf"^data\.{key}: {value!r} must "):
        prepare(_config(tmp_path, tmp_path / "out", **{key: value}), progress=False)
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.parametrize("config", ["rnnsearch-50", "rnnencdec-30"])
def test_paper_configs_filter_by_words_as_the_paper(small_mirror: Path, tmp_path: Path, config: str) -> None:
    """Issue 14: the paper keeps every sentence of up to 50 (30) words; a subword cap at
    the same number dropped a sixth of those. The paper configs' cap is only a guard."""
    paper = load_config(QUICKSTART.parent / f"{config}.yaml").data
    rules = dict(max_words=paper.max_words, max_ratio=paper.max_ratio, dedupe=paper.dedupe, max_len=paper.max_len)
    total = _prepare_small(small_mirror, tmp_path, shard_size=1000, **rules).manifest["report"]["total"]
    assert total["max_words"] > 0 and total["too_long"] == 0
    # the old cap (max_len = max_words) on the same pairs: only encoding is redone
    capped = _prepare_small(small_mirror, tmp_path, shard_size=1000, **{**rules, "max_len": paper.max_words})
    share = capped.manifest["report"]["total"]["dropped_share_of_reaching"]["too_long"]
    assert share > 0.05, share


def test_data_max_sentences_is_renamed(tmp_path: Path) -> None:
    """Issue 16.9: one name meant two things; the old data key is a one-line error naming the new one."""
    config = tmp_path / "old.yaml"
    config.write_text("data:\n  max_tokens: 2048\n  max_sentences: 80\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value).startswith(f"{config}:3: data.max_sentences is now data.max_batch_sentences (")
    assert "\n" not in str(err.value) and "eval.max_sentences" in str(err.value)
    with pytest.raises(ConfigError, match=r"^--set: data.max_sentences is now data.max_batch_sentences \("):
        load_config(None, ["data.max_sentences=80"])
    cfg = load_config(None, ["data.max_batch_sentences=80", "eval.max_sentences=7"])
    assert cfg.data.max_batch_sentences == 80 and cfg.eval.max_sentences == 7
    # A checkpoint's stored config (written before the rename) still loads.
    stored = cfg.to_dict()
    stored["data"]["max_sentences"] = stored["data"].pop("max_batch_sentences")
    assert config_from_dict(stored) == cfg


def test_download_needs_registry_parts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.source_dir is null"):
        prepare(_config(None, tmp_path), progress=False)
    with pytest.raises(DataError, match=r"^data.parts: unknown part 'europarl' \(known: europarl-v7, "):
        prepare(_config(None, tmp_path, parts=["europarl"]), progress=False)
    with pytest.raises(DataError, match=r"^data.preset: unknown preset 'full'"):
        prepare(_config(None, tmp_path, preset="full"), progress=False)


def _sigterm_disposition(_: int) -> bool:
    import signal

    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_pool_workers_die_on_sigterm_whatever_the_parents_handler() -> None:
    """ray.init leaves a Python SIGTERM handler in its process; forked prepare workers
    inheriting it once outlived Pool.terminate() and hung the suite. They must not."""
    import signal
    import sys

    from distnmt.data.stages import Workers, in_child

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs
    try:
        seen: list[bool] = []
        with Workers(2) as pool:
            for i in range(4):
                pool.submit(_sigterm_disposition, i, seen.append)
        assert seen == [True] * 4
        assert in_child(_sigterm_disposition, 0)  # prepare's sentencepiece child, the same way
    finally:
        signal.signal(signal.SIGTERM, previous)


# Run in its own interpreter: os.register_at_fork cannot be undone, and without the
# fix a worker would go on as a copy of this script (of pytest, if run in it).
_SIGNAL_AT_FORK = r"""
import os, signal, sys
from pathlib import Path
from distnmt.data.stages import Workers, in_child

marks, once, parent = Path(sys.argv[1]), Path(sys.argv[2]), os.getpid()

def parents_handler(signum, frame):  # what ray.init leaves (it calls sys.exit); this one leaves a mark
    (marks / f"ran-{signum}-in-{'parent' if os.getpid() == parent else 'child'}").touch()
    os._exit(3)

signal.signal(signal.SIGTERM, parents_handler)
signal.signal(signal.SIGINT, parents_handler)
hit = [signal.SIGTERM, "0"]

def at_once():
    # The signal reaches the first child forked in each round before it runs a line
    # of its own, as Pool.terminate() or a Ctrl-C to the process group can.
    try:
        os.close(os.open(once / hit[1], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getpid(), hit[0])

os.register_at_fork(after_in_child=at_once)
for sig in (signal.SIGTERM, signal.SIGINT):
    hit[:] = [sig, f"{sig}-pool"]
    got = []
    with Workers(2) as pool:
        for i in range(6):
            pool.submit(abs, -i, got.append)
    assert got == list(range(6)), got
    hit[:] = [sig, f"{sig}-in-child"]
    assert in_child(abs, -7) == 7
assert len(list(once.iterdir())) == 4
print("ok", flush=True)
"""


def test_a_signal_at_a_workers_birth_never_runs_the_parents_handler(tmp_path: Path) -> None:
    """SIGTERM or SIGINT reaching a pool worker (or prepare's sentencepiece child) at once
    after the fork: the worker ends, the pool replaces it, the work completes, and the
    parent's handler ran nowhere (without the signals held over the fork, the child ran
    it and, with ray.init's sys.exit, carried on as a second pytest: seen in the suite)."""
    import subprocess
    import sys

    marks, once = tmp_path / "marks", tmp_path / "once"
    marks.mkdir()
    once.mkdir()
    done = subprocess.run([sys.executable, "-c", _SIGNAL_AT_FORK, str(marks), str(once)], capture_output=True,
                          text=True, timeout=120)
    assert sorted(p.name for p in marks.iterdir()) == [], done.stderr[-2000:]
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _mark_after(task: tuple[str, float, bytes]) -> int:
    """A pool task: wait, then leave a file; the payload stands for a block of the corpus."""
    import time

    path, seconds, payload = task
    time.sleep(seconds)
    Path(path).write_text(str(len(payload)))
    return len(payload)


def test_an_error_lets_the_tasks_in_flight_finish_then_ends_the_pool(tmp_path: Path) -> None:
    """Bad input stops `prepare` without Pool.terminate(), which once hung the suite (its
    task handler writing a large task that no worker read any more): the tasks in flight
    (4 MiB each, as a block of the corpus would be) end normally, then so do the workers."""
    import multiprocessing

    from distnmt.data.stages import Workers

    with pytest.raises(ValueError, match="bad input"):
        with Workers(2) as pool:
            for i in range(4):  # 2 * processes: all in flight, none collected yet
                pool.submit(_mark_after, (str(tmp_path / str(i)), 0.2, b"x" * 2**22), lambda n: None)
            children = multiprocessing.active_children()
            raise ValueError("bad input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2", "3"]
    assert children and not any(child.is_alive() for child in children)


def test_ctrl_c_stops_the_pool_at_once(tmp_path: Path) -> None:
    import multiprocessing
    import time

    from distnmt.data.stages import Workers

    started = time.time()
    with pytest.raises(KeyboardInterrupt):
        with Workers(2) as pool:
            for i in range(4):
                pool.submit(_mark_after, (str(tmp_path / str(i)), 30.0, b""), lambda n: None)
            children = multiprocessing.active_children()
            raise KeyboardInterrupt
    assert time.time() - started < 20 and list(tmp_path.iterdir()) == []
    assert children and not any(child.is_alive() for child in children)
