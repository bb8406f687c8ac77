"""A user's own parallel text (data.corpora, data.dev, data.test): gzipped and plain pairs and a
TSV, any language codes, dev/test as plain text or SGML (detected by content), through the
same stages as WMT; every bad input is a one-line error naming the file (and line or key);
the BLEU tokenizer key."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from parallel_text import pairs, sgml, write, write_gz  # tests/parallel_text.py

from distnmt.cli import main
from distnmt.config import ConfigError, CorpusFiles, DataConfig, load_config
from distnmt.data import DataError, prepare
from distnmt.data.custom import read_eval_pair, split_tsv
from distnmt.evaluate.scoring import score_corpus

REPO = Path(__file__).resolve().parents[1]
FAST = dict(vocab_size=150, max_len=40, workers=1, spm_sample_pairs=5000)


def make_corpus(root: Path) -> Path:
    """English -> a made-up language 'xx': a gzipped pair, a TSV (xx first), a plain pair;
    plain-text dev, SGML test in files without an .sgm suffix."""
    a, web, c = pairs(300, "en", "xx", 1), pairs(200, "xx", "en", 2), pairs(100, "en", "xx", 3)
    a[5] = ("   ", "ka maru.")  # an empty side: dropped by the cleaning rule, counted in the report
    write_gz(root / "corpus/a.en.gz", [e for e, _ in a])
    write_gz(root / "corpus/a.xx.gz", [x for _, x in a])
    write(root / "corpus/web.tsv", [f"{x}\t{e}" for x, e in web])
    write(root / "corpus/c.en", [e for e, _ in c])
    write(root / "corpus/c.xx", [x for _, x in c])
    dev, test = pairs(40, "en", "xx", 4), pairs(30, "en", "xx", 5)
    write(root / "eval/dev.en", [e for e, _ in dev])
    write(root / "eval/dev.xx", [x for _, x in dev])
    write(root / "eval/test-src.txt", sgml("srcset", "en", [e for e, _ in test]))
    write(root / "eval/test-ref.txt", sgml("refset", "xx", [x for _, x in test]))
    return root


CONFIG = """\
data:
  source_dir: {root}
  prepared_dir: {out}
  src_lang: en
  tgt_lang: xx
  corpora:
    - src: corpus/a.en.gz
      tgt: corpus/a.xx.gz
    - name: web
      tsv: corpus/web.tsv
      columns: [xx, en]
    - src: corpus/c.en
      tgt: corpus/c.xx
  dev:
    src: eval/dev.en
    tgt: eval/dev.xx
  test:
    name: mytest
    src: eval/test-src.txt
    tgt: eval/test-ref.txt
  preset: null
  dev_sets: null
  test_set: null
  joint_vocab: true
  vocab_size: 150
  spm_sample_pairs: 5000
  max_len: 40
  workers: 1
"""


def test_own_files_prepare_through_the_same_stages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_corpus(tmp_path / "mine")
    config = tmp_path / "my.yaml"
    config.write_text(CONFIG.format(root=root, out=tmp_path / "out"))
    assert main(["prepare", "--config", str(config), "--quiet"]) == 0, capsys.readouterr().err
    import json

    m = json.loads((tmp_path / "out/manifest.json").read_text(encoding="utf-8"))
    assert (m["src_lang"], m["tgt_lang"]) == ("en", "xx")
    # One row per corpus, named by the config or by the file name, then the total.
    assert list(m["report"]) == ["a", "web", "c", "total"]
    assert [m["report"][p]["read"] for p in ("a", "web", "c")] == [300, 200, 100]
    assert m["report"]["a"]["empty"] == 1 and m["report"]["total"]["kept"] <= 599
    assert m["counts"]["dev"] == 40 and m["counts"]["test"] == 30
    # The TSV's columns were xx, en: the English side is the source all the same.
    web = pairs(200, "xx", "en", 2)
    assert (tmp_path / "out/work/own/corpora1.en").read_text(encoding="utf-8").splitlines()[0] == web[0][1]
    assert m["sources"]["tsv_sha256"] and m["config"]["corpora"][1]["swap_columns"] is True
    # SGML recognised without an .sgm suffix; dev/test raw text unchanged.
    assert (tmp_path / "out/test.xx").read_text(encoding="utf-8").splitlines() == [x for _, x in pairs(30, "en", "xx", 5)]
    assert (tmp_path / "out/dev.en").read_text(encoding="utf-8").splitlines() == [e for e, _ in pairs(40, "en", "xx", 4)]
    # joint_vocab: one model under both names.
    assert (tmp_path / "out/spm.en.model").read_bytes() == (tmp_path / "out/spm.xx.model").read_bytes()
    # A re-run reuses the split TSV (and the rest).
    split = tmp_path / "out/work/own/corpora1.en"
    before = split.stat().st_mtime_ns
    assert main(["prepare", "--config", str(config), "--quiet"]) == 0
    assert split.stat().st_mtime_ns == before


def _own(root: Path, **changes: CorpusFiles) -> dict[str, object]:
    """DataConfig keyword arguments for make_corpus's files, some entries replaced."""
    spec = {
        "a": CorpusFiles(src="corpus/a.en.gz", tgt="corpus/a.xx.gz"),
        "web": CorpusFiles(name="web", tsv="corpus/web.tsv", columns=["xx", "en"]),
        "dev": CorpusFiles(src="eval/dev.en", tgt="eval/dev.xx"),
        "test": CorpusFiles(src="eval/test-src.txt", tgt="eval/test-ref.txt"),
    }
    spec.update(changes)
    return dict(corpora=[spec["a"], spec["web"]], dev=spec["dev"], test=spec["test"], src_lang="en", tgt_lang="xx", **FAST)


def _error(root: Path, out: Path, **changes: CorpusFiles) -> str:
    with pytest.raises(DataError) as err:
        prepare(DataConfig(source_dir=str(root), prepared_dir=str(out), **_own(root, **changes)), progress=False)
    message = str(err.value)
    assert "\n" not in message and not (out / "manifest.json").exists()
    return message


def test_bad_own_files_are_one_line_errors(tmp_path: Path) -> None:
    root = make_corpus(tmp_path / "mine")
    out = tmp_path / "out"
    corpus = root / "corpus"

    # a missing file: named, with the config key
    assert _error(root, out, a=CorpusFiles(src="corpus/nope.en", tgt="corpus/a.xx.gz")) == \
        f"{corpus}/nope.en: file not found (data.corpora[0].src)"
    assert not out.exists()  # found out before any output is touched
    # an empty file, plain or gzipped, or an empty TSV
    write(corpus / "empty.xx", b"")
    assert _error(root, out, a=CorpusFiles(src="corpus/a.en.gz", tgt="corpus/empty.xx")) == \
        f"{corpus}/empty.xx: empty: no lines to read (data.corpora[0].tgt)"
    write(corpus / "empty.xx.gz", gzip.compress(b""))
    assert _error(root, out, a=CorpusFiles(src="corpus/a.en.gz", tgt="corpus/empty.xx.gz")) == \
        f"{corpus}/empty.xx.gz: empty: no lines to read (data.corpora[0].tgt)"
    write(corpus / "empty.tsv", b"")
    assert _error(root, out, web=CorpusFiles(tsv="corpus/empty.tsv")) == \
        f"{corpus}/empty.tsv: empty: no lines to read (data.corpora[1].tsv)"
    # line counts that differ
    write(corpus / "short.xx", [x for _, x in pairs(299, "en", "xx", 1)])
    assert _error(root, out, a=CorpusFiles(src="corpus/a.en.gz", tgt="corpus/short.xx")) == \
        f"{corpus}/short.xx: has 299 lines but {corpus}/a.en.gz has 300"
    # bad UTF-8, in a pair and in a TSV: file and line
    lines = (corpus / "c.en").read_bytes().split(b"\n")
    lines[6] = b"caf\xe9 au lait"
    write(corpus / "latin1.en", b"\n".join(lines))
    assert _error(root, out, a=CorpusFiles(src="corpus/latin1.en", tgt="corpus/c.xx")) == \
        f"{corpus}/latin1.en:7: not valid UTF-8 (invalid continuation byte at byte 4 of the line)"
    rows = (corpus / "web.tsv").read_bytes().split(b"\n")
    rows[3] = b"ka\tcaf\xe9"
    write(corpus / "latin1.tsv", b"\n".join(rows))
    assert _error(root, out, web=CorpusFiles(tsv="corpus/latin1.tsv")).startswith(f"{corpus}/latin1.tsv:4: not valid UTF-8")
    # a TSV line without a tab, or with two
    rows = (corpus / "web.tsv").read_text(encoding="utf-8").split("\n")
    write(corpus / "notab.tsv", "\n".join([*rows[:9], rows[9].replace("\t", " "), *rows[10:]]).encode())
    assert _error(root, out, web=CorpusFiles(tsv="corpus/notab.tsv")) == \
        f"{corpus}/notab.tsv:10: no tab: expected two columns, source<TAB>target"
    write(corpus / "three.tsv", "\n".join([rows[0] + "\textra", *rows[1:]]).encode())
    assert _error(root, out, web=CorpusFiles(tsv="corpus/three.tsv")) == \
        f"{corpus}/three.tsv:1: 3 columns: expected two columns, source<TAB>target"
    # dev/test: line counts, and one side SGML, the other plain text
    ev = root / "eval"
    write(ev / "dev-short.xx", (ev / "dev.xx").read_text(encoding="utf-8").splitlines()[:-2])
    assert _error(root, out, dev=CorpusFiles(src="eval/dev.en", tgt="eval/dev-short.xx")) == \
        f"{ev}/dev-short.xx: has 38 lines but {ev}/dev.en has 40"
    assert _error(root, out, test=CorpusFiles(src="eval/test-src.txt", tgt="eval/dev.xx")) == \
        f"{ev}/dev.xx: plain text, but {ev}/test-src.txt is SGML: give both in one form"


def test_tsv_split_and_sgml_detection_units(tmp_path: Path) -> None:
    tsv = write(tmp_path / "x.tsv.gz", gzip.compress("a\tb\r\nc d\te f\n\t\n".encode()))  # CR LF too
    lines, sha = split_tsv(tsv, tmp_path / "o.src", tmp_path / "o.tgt", swap=True)
    assert lines == 3 and len(sha) == 64
    assert (tmp_path / "o.src").read_text() == "b\ne f\n\n" and (tmp_path / "o.tgt").read_text() == "a\nc d\n\n"
    src = write(tmp_path / "s.sgm", sgml("srcset", "en", ["one", "two"], docs=1))
    ref = write(tmp_path / "r", sgml("refset", "xx", ["ka", "maru"], docs=1))
    assert read_eval_pair(src, ref) == (["one", "two"], ["ka", "maru"])
    plain = write(tmp_path / "p.sgm", ["<not sgml>", "two"])  # a suffix does not make it SGML
    plain2 = write(tmp_path / "q", ["ka", "maru"])
    assert read_eval_pair(plain, plain2) == (["<not sgml>", "two"], ["ka", "maru"])


def test_own_files_config_shape_and_mistakes(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/custom.yaml")
    assert [c.name for c in cfg.data.corpora] == ["europarl", "web"] and cfg.data.corpora[1].columns == ["de", "en"]
    assert cfg.data.test.src.endswith(".sgm") and cfg.eval.bleu_tokenize == "13a"

    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_config(REPO / "configs/custom.yaml", list(overrides))
        return str(err.value)

    assert error("data.preset=wmt14").endswith("data.preset: set it to null when your own files are given "
                                               "(data.corpora, data.dev, data.test)")
    assert error("data.dev=null") == "--set data.dev: missing: with your own files, give data.corpora, data.dev and data.test"
    assert error("data.corpora=[{src: a.en}]") == "--set data.corpora[0]: has src but no tgt"
    assert error("data.corpora=[{src: a.en, tgt: a.de, tsv: b.tsv}]") == \
        "--set data.corpora[0]: give either src and tgt (two files) or tsv (one file)"
    assert error("data.corpora=[{tsv: b.tsv, columns: [en, fr]}]") == \
        "--set data.corpora[0].columns: ['en', 'fr'] must name a tsv's two columns, 'en' and 'de' in the file's order"
    assert error("data.corpora=[{tsv: b.tsv, name: a.b}]") == \
        "--set data.corpora[0].name: 'a.b' may hold only letters, digits, - and _"
    # A mistake inside the file names the file and line of the list item's key.
    text = (REPO / "configs/custom.yaml").read_text().replace("      columns: [de, en]", "      columns: [de, fr]")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/c.yaml:\d+: data.corpora\[1\].columns: \['de', 'fr'\]"):
        load_config(tmp_path / "c.yaml")


def test_bleu_tokenizer_is_checked_and_reaches_the_signature() -> None:
    assert load_config(None, ["eval.bleu_tokenize=intl"]).eval.bleu_tokenize == "intl"
    with pytest.raises(ConfigError, match=r"^--set eval.bleu_tokenize: 'moses' is not a sacreBLEU tokenizer "
                                          r"\(known: none, zh, 13a, intl, char, ja-mecab"):
        load_config(None, ["eval.bleu_tokenize=moses"])
    hyps, refs = ["他们在家。", "你好世界"], ["他们在家里。", "你好，世界"]
    zh, default = score_corpus(hyps, refs, "zh"), score_corpus(hyps, refs)
    assert "|tok:zh|" in zh.bleu_signature and "|tok:13a|" in default.bleu_signature
    assert zh.bleu != default.bleu  # 13a sees each Chinese sentence as about one word
    assert zh.chrf == default.chrf  # chrF stays as is


def test_a_score_under_another_bleu_tokenizer_is_not_reused() -> None:
    from distnmt.config import EvalConfig
    from distnmt.evaluate.records import ScoreRecord
    from distnmt.evaluate.score import decode_settings

    record = ScoreRecord(checkpoint="checkpoint_00000010", step=10, split="dev", test_set="mydev", bleu=1.0, chrf=2.0,
                         bleu_line="", bleu_signature="", chrf_signature="", sentences=30,
                         beam_size=5, alpha=1.0, max_len_a=1.5, max_len_b=10, bleu_tokenize="13a")
    assert record.matches(decode_settings(EvalConfig(), 30))
    assert not record.matches(decode_settings(EvalConfig(bleu_tokenize="zh"), 30))
    # A line written before the field matches any tokenizer, as for the other settings.
    older = ScoreRecord.from_dict({k: v for k, v in record.to_dict().items() if k != "bleu_tokenize"})
    assert older.matches(decode_settings(EvalConfig(bleu_tokenize="zh"), 30))
