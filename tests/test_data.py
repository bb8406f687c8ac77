"""Unit tests for distnmt.data on the real WMT'14 sample: SGML, corpus reading, block
streaming, cleaning rules, sentencepiece, token arrays (single and sharded) and batching.
The sampler is in test_data_sampler.py, sources in test_data_sources.py, prepare in
test_data_prepare.py."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from distnmt.data import (
    BOS_ID, EOS_ID, PAD_ID, UNK_ID,
    CleanRules, DataError, TokenArray, Tokenizer,
    collate, collate_sentences, open_text, read_lines, read_parallel,
    read_sgml, read_sgml_parallel, read_sgml_segments, train_sentencepiece, write_token_array,
)
from distnmt.data.clean import DROPPING_RULES, clean_block
from distnmt.data.shards import write_shard_index
from distnmt.data.stream import LineBlockReader, decode_block, iter_parallel_blocks, SourceDigest

# ---------------------------------------------------------------------------- SGML


def test_newstest2014_sgml_matches_plain_text(shared_data: Path) -> None:
    src = read_sgml_segments(shared_data / "test/newstest2014-fren-src.en.sgm")
    ref = read_sgml_segments(shared_data / "test/newstest2014-fren-ref.fr.sgm")
    assert len(src) == len(ref) == 3003
    assert src[1] == ("Sportsman Jhonathan Florez jumped from a helicopter above Bogota, "
                      "the capital of Colombia, on Thursday.")
    assert src == read_lines(shared_data / "test/newstest2014.en")
    assert ref == read_lines(shared_data / "test/newstest2014.fr")
    # read_lines dispatches .sgm to the SGML reader
    assert read_lines(shared_data / "test/newstest2014-fren-src.en.sgm") == src


def test_sgml_unescapes_and_rejects_malformed(tmp_path: Path) -> None:
    good = tmp_path / "good.sgm"
    good.write_text('<refset>\n<doc docid="d">\n<seg id="1"> A &amp; B &lt;3 </seg>\n'
                    '<seg id="2">caf&#233;</seg>\n</doc>\n</refset>\n', encoding="utf-8")
    assert read_sgml_segments(good) == ["A & B <3", "café"]

    bad = tmp_path / "bad.sgm"
    bad.write_text('<refset>\n<doc docid="d">\n<seg id="1">fine</seg>\n<seg id="2">no end\n</doc>\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{bad}:4: malformed <seg>"):
        read_sgml_segments(bad)

    empty = tmp_path / "empty.sgm"
    empty.write_text("<refset>\n</refset>\n", encoding="utf-8")
    with pytest.raises(DataError, match="no <seg> elements"):
        read_sgml_segments(empty)


def test_newstest2014_pairs_by_doc_and_seg_id(shared_data: Path) -> None:
    src_path, ref_path = shared_data / "test/newstest2014-fren-src.en.sgm", shared_data / "test/newstest2014-fren-ref.fr.sgm"
    src, ref = read_sgml_parallel(src_path, ref_path)
    assert len(src) == len(ref) == 3003
    assert ref == read_lines(shared_data / "test/newstest2014.fr")
    segments = read_sgml(src_path)
    assert len({seg.docid for seg in segments}) == 176
    assert len({seg.key for seg in segments}) == 3003
    assert segments[1].docid == segments[0].docid and segments[1].segid == "2"


def _sgml(docs: list[tuple[str, list[tuple[str, str]]]], kind: str = "refset") -> str:
    body = "".join(
        f'<doc docid="{d}" genre="news">\n' + "".join(f'<seg id="{i}">{t}</seg>\n' for i, t in segs) + "</doc>\n"
        for d, segs in docs
    )
    return f'<{kind} setid="t" srclang="any">\n{body}</{kind}>\n'


def test_sgml_matches_by_id_not_by_position(tmp_path: Path) -> None:
    src, ref = tmp_path / "src.sgm", tmp_path / "ref.sgm"
    src.write_text(_sgml([("a", [("1", "one"), ("2", "two")]), ("b", [("1", "three")])], "srcset"), encoding="utf-8")
    # the reference lists its documents and segments in another order
    ref.write_text(_sgml([("b", [("1", "trois")]), ("a", [("2", "deux"), ("1", "un")])]), encoding="utf-8")
    assert read_sgml_parallel(src, ref) == (["one", "two", "three"], ["un", "deux", "trois"])

    ref.write_text(_sgml([("a", [("1", "un"), ("2", "deux")]), ("b", [("7", "sept")])]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{ref}: no seg id '1' in doc 'b' \(the source has it at {src}:7\)$"):
        read_sgml_parallel(src, ref)
    ref.write_text(_sgml([("a", [("1", "un"), ("2", "deux"), ("3", "trois")]), ("b", [("1", "x")])]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{src}: no seg id '3' in doc 'a' \(the reference has it at {ref}:5\)$"):
        read_sgml_parallel(src, ref)


@pytest.mark.parametrize("text, line, what", [
    ('<refset>\n<doc docid="a">\n<seg id="1">x</seg>\n<seg id="1">y</seg>\n</doc>\n', 4, "duplicate seg id '1' in doc 'a'"),
    ('<refset>\n<seg id="1">x</seg>\n', 2, "<seg> outside any <doc>"),
    ('<refset>\n<doc docid="a">\n<seg>x</seg>\n</doc>\n', 3, "<seg> without an id"),
    ('<refset>\n<doc genre="n">\n<seg id="1">x</seg>\n</doc>\n', 2, "<doc> without a docid"),
    ('<refset>\n<doc docid="a">\n<seg id="1">x</seg>\n', 2, "<doc docid='a'> is never closed"),
    ('<refset>\n<doc docid="a">\n<doc docid="b">\n', 3, "<doc> opened inside doc 'a'"),
])
def test_malformed_sgml_names_file_and_line(tmp_path: Path, text: str, line: int, what: str) -> None:
    path = tmp_path / "bad.sgm"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:{line}: {re.escape(what)}"):
        read_sgml(path)


# -------------------------------------------------------------------------- corpus


def test_read_parallel_real_train_sample(shared_data: Path) -> None:
    pairs = read_parallel(shared_data / "train/train.en.gz", shared_data / "train/train.fr.gz")
    n = 0
    for n, (en, fr) in enumerate(pairs, start=1):
        assert en and fr and "\n" not in en + fr
    assert n == 47954


def test_read_parallel_count_mismatch_names_shorter_file(tmp_path: Path) -> None:
    three, two = tmp_path / "three.en", tmp_path / "two.fr"
    three.write_text("a\nb\nc\n", encoding="utf-8")
    two.write_text("x\ny\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{two}: has 2 lines but {three} has 3$"):
        list(read_parallel(three, two))
    with pytest.raises(DataError, match=rf"^{two}: has 2 lines but {three} has 3$"):
        list(read_parallel(two, three))
    assert list(read_parallel(three, three)) == [("a", "a"), ("b", "b"), ("c", "c")]


def test_lines_split_on_newline_only(tmp_path: Path) -> None:
    # U+2028, NEL and CR are ordinary characters inside a WMT segment, not line breaks.
    text = "one\u2028still one\rand \x85one\ntwo\n"
    plain, gz = tmp_path / "a.txt", tmp_path / "a.txt.gz"
    plain.write_bytes(text.encode("utf-8"))
    gz.write_bytes(gzip.compress(text.encode("utf-8")))
    assert read_lines(plain) == read_lines(gz) == ["one\u2028still one\rand \x85one", "two"]


@pytest.mark.parametrize("compress", [False, True])
def test_non_utf8_names_file_and_line(tmp_path: Path, compress: bool) -> None:
    data = "fine\nstill fine\n".encode("utf-8") + b"caf\xe9 latin-1\nlast\n"
    path = tmp_path / ("bad.txt.gz" if compress else "bad.txt")
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        read_lines(path)
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        list(read_parallel(path, path))
    with pytest.raises(DataError, match=rf"^{path}:3: "), open_text(path) as f:
        f.read()


def test_missing_or_truncated_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nope.en'}: file not found"):
        read_lines(tmp_path / "nope.en")
    truncated = tmp_path / "cut.en.gz"
    truncated.write_bytes(gzip.compress(b"some line\n" * 1000)[:-20])
    with pytest.raises(DataError, match=rf"^{truncated}: cannot read: EOFError"):
        read_lines(truncated)


# ------------------------------------------------------------------------- stream


def test_parallel_blocks_equal_line_reading(shared_data: Path) -> None:
    src, tgt = shared_data / "train/train.en.gz", shared_data / "train/train.fr.gz"
    digest = SourceDigest()
    blocks = list(iter_parallel_blocks(src, tgt, 5000, digest=digest))
    assert [b.count for b in blocks] == [5000] * 9 + [2954]
    assert [b.first_line for b in blocks[:3]] == [1, 5001, 10001]
    en = [line for b in blocks for line in decode_block(b.src, src, b.first_line)]
    fr = [line for b in blocks for line in decode_block(b.tgt, tgt, b.first_line)]
    assert list(zip(en, fr)) == list(read_parallel(src, tgt))
    # the checksums of the files as stored, as in the sample's SHA256SUMS
    sums = dict(line.split()[::-1] for line in (shared_data / "SHA256SUMS").read_text().splitlines())
    assert (digest.src_sha256, digest.tgt_sha256) == (sums["train/train.en.gz"], sums["train/train.fr.gz"])
    assert digest.lines == 47954 and digest.src_size == src.stat().st_size
    # a limit stops early, yet the checksum still covers the whole file
    limited = SourceDigest()
    assert sum(b.count for b in iter_parallel_blocks(src, tgt, 300, limit=1000, digest=limited)) == 1000
    assert limited.src_sha256 == digest.src_sha256


def test_blocks_count_mismatch_empty_and_last_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a.en", tmp_path / "b.fr"
    a.write_text("1\n2\n3\n4\n5", encoding="utf-8")  # no final newline: still 5 lines
    b.write_text("1\n2\n3\n4\n5\n6\n7\n", encoding="utf-8")
    for size in (2, 5, 100):
        with pytest.raises(DataError, match=rf"^{a}: has 5 lines but {b} has 7$"):
            list(iter_parallel_blocks(a, b, size))
        with pytest.raises(DataError, match=rf"^{a}: has 5 lines but {b} has 7$"):
            list(iter_parallel_blocks(b, a, size))
    b.write_text("1\n2\n3\n4\n\n", encoding="utf-8")
    assert [decode_block(x.tgt, b, 1) for x in iter_parallel_blocks(a, b, 3)] == [["1", "2", "3"], ["4", ""]]
    empty = tmp_path / "empty.en"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{empty}: empty"):
        list(iter_parallel_blocks(empty, empty, 10))


def test_block_decoding_names_file_and_line(tmp_path: Path) -> None:
    data = "fine\nstill fine\n".encode() + b"caf\xe9 latin-1\nlast\n"
    with pytest.raises(DataError, match=r"^x.en:103: not valid UTF-8 \(invalid continuation byte at byte 4 of the line\)"):
        decode_block(data, "x.en", 101)
    truncated = tmp_path / "cut.en.gz"
    truncated.write_bytes(gzip.compress(b"some line\n" * 100000)[:-200])
    with pytest.raises(DataError, match=rf"^{truncated}: cannot read past line \d+ \(truncated or corrupt\?\): EOFError"), LineBlockReader(truncated) as r:
        r.take(10**6)


# -------------------------------------------------------------------------- clean


def test_every_cleaning_rule_is_counted_and_switchable() -> None:
    src = ["Ok.", "  ", "café", "line\u2028break", "w " * 60, "one two three four", "same", "a\rb"]
    tgt = ["Oui.", "vide", "cafe\u0301", "saut", "short", "un", "same", "c"]
    kept_src, kept_tgt, counts = clean_block(src, tgt, CleanRules(max_words=50, max_ratio=3.0))
    assert counts["read"] == 8 and counts["kept"] == len(kept_src) == 5
    assert (counts["empty"], counts["max_words"], counts["ratio"]) == (1, 1, 1)
    assert counts["line_breaks"] == 2 and counts["normalize"] == 1
    assert kept_src == ["Ok.", "café", "line break", "same", "a b"]
    assert kept_tgt[1] == "café"  # NFC composed e + combining acute
    assert counts["read"] == counts["kept"] + sum(counts[r] for r in DROPPING_RULES)

    off = CleanRules(normalize=None, fold_line_breaks=False, drop_empty=False)
    kept_src, kept_tgt, counts = clean_block(src, tgt, off)
    assert counts["kept"] == 8 and kept_src[3] == "line\u2028break" and kept_tgt[2] == "cafe\u0301" and kept_src[1] == ""
    with pytest.raises(ValueError, match="normalize"):
        CleanRules(normalize="NFD")


# ----------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def en_tokenizer(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    lines = read_lines(shared_data / "train/train.en.gz")[:3000]
    model = train_sentencepiece(lines, tmp_path_factory.mktemp("spm") / "spm.en", vocab_size=1000)
    return Tokenizer(model)


def _is_plain(text: str) -> bool:
    """Text sentencepiece's NFKC normalizer leaves as it is (so decode(encode(s)) == s can hold)."""
    return text == " ".join(text.split()) and unicodedata.normalize("NFKC", text) == text


def test_sentencepiece_round_trip_on_dev(shared_data: Path, en_tokenizer: Tokenizer) -> None:
    tok = en_tokenizer
    assert tok.vocab_size == 1000
    assert (tok._sp.pad_id(), tok._sp.unk_id(), tok._sp.bos_id(), tok._sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    dev = [s for s in read_lines(shared_data / "dev/newstest2013.en") if _is_plain(s)]
    encoded = tok.encode_batch(dev)
    assert encoded[:50] == [tok.encode(s) for s in dev[:50]]
    # Characters never seen in 3000 training lines map to UNK and cannot round-trip.
    checked = [(s, ids) for s, ids in zip(dev, encoded) if UNK_ID not in ids]
    assert len(checked) > 2000
    for text, ids in checked:
        assert tok.decode(ids) == text
    # special ids are dropped when decoding
    text, ids = checked[0]
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == text


def test_sentencepiece_is_deterministic(shared_data: Path, en_tokenizer: Tokenizer, tmp_path: Path) -> None:
    lines = read_lines(shared_data / "train/train.en.gz")[:3000]
    # A different prefix and a generator input must still give the very same model bytes.
    again = Tokenizer(train_sentencepiece(iter(lines), tmp_path / "other" / "m", vocab_size=1000))
    assert again.sha256 == en_tokenizer.sha256
    assert again.sha256 == hashlib.sha256(en_tokenizer.model_path.read_bytes()).hexdigest()
    assert (tmp_path / "other" / "m.vocab").read_text(encoding="utf-8").count("\n") == 1000


def test_tokenizer_pickles_by_value(en_tokenizer: Tokenizer, tmp_path: Path) -> None:
    copy = pickle.loads(pickle.dumps(en_tokenizer))
    assert copy.sha256 == en_tokenizer.sha256 and copy.vocab_size == en_tokenizer.vocab_size
    assert copy.encode("The European Parliament.") == en_tokenizer.encode("The European Parliament.")


def test_train_sentencepiece_reraises_iterator_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\n" * 50 + b"\xff\n")

    def stream():
        with open_text(bad) as f:
            yield from f

    # sentencepiece turns an iterator's exception into a RuntimeError; the DataError must survive
    with pytest.raises(DataError, match=rf"^{bad}:51: not valid UTF-8"):
        train_sentencepiece(stream(), tmp_path / "spm", vocab_size=30)


def test_tokenizer_rejects_non_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match=rf"^{junk}: not a sentencepiece model"):
        Tokenizer(junk)


# -------------------------------------------------------------------------- shards


def test_token_array_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 8000, size=rng.integers(0, 60)).tolist() for _ in range(1000)]
    assert write_token_array(tmp_path / "a", iter(seqs)) == 1000
    arr = TokenArray(tmp_path / "a")
    assert len(arr) == 1000
    assert np.load(tmp_path / "a.ids.npy", mmap_mode="r").dtype == np.uint16
    assert arr.lengths.tolist() == [len(s) for s in seqs]
    for i in (0, 1, 500, 999, -1):
        assert arr[i].dtype == np.int64 and arr[i].tolist() == seqs[i]
    with pytest.raises(IndexError):
        arr[1000]
    assert pickle.loads(pickle.dumps(arr))[7].tolist() == seqs[7]

    big = [[1, 2], [], [70000]]
    write_token_array(tmp_path / "big", big)
    assert np.load(tmp_path / "big.ids.npy").dtype == np.int32
    assert [TokenArray(tmp_path / "big")[i].tolist() for i in range(3)] == big

    write_token_array(tmp_path / "empty", [])
    assert len(TokenArray(tmp_path / "empty")) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("a.")) == ["a.ids.npy", "a.offsets.npy"]


def test_sharded_token_array_reads_as_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    seqs = [rng.integers(4, 900, size=rng.integers(1, 30)).tolist() for _ in range(250)]
    cuts = [0, 100, 100, 180, 250]  # one shard is empty
    shards = []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        write_token_array(tmp_path / "shards" / f"s{k}.en", seqs[a:b])
        shards.append((tmp_path / "shards" / f"s{k}.en", b - a, sum(len(x) for x in seqs[a:b])))
    write_shard_index(tmp_path / "train.en", shards)
    arr = TokenArray(tmp_path / "train.en")
    assert len(arr) == 250 and arr.num_shards == 4 and arr.num_tokens == sum(map(len, seqs))
    assert arr.lengths.tolist() == [len(x) for x in seqs]
    for i in (0, 99, 100, 179, 180, 249, -1):
        assert arr[i].tolist() == seqs[i]
    order = [249, 0, 100, 180, 5]
    assert [x.tolist() for x in arr.gather(order)] == [seqs[i] for i in order]
    assert pickle.loads(pickle.dumps(arr))[181].tolist() == seqs[181]
    src = collate(arr, arr, [3, 150])
    assert src.src[1, : len(seqs[150])].tolist() == seqs[150]

    # a shard that does not match the index is caught when opening
    write_token_array(tmp_path / "shards" / "s2.en", seqs[100:170])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'train.en.shards.json'}: shard shards/s2.en has 70 sequences"):
        TokenArray(tmp_path / "train.en")
    write_token_array(tmp_path / "shards" / "s2.en", seqs[100:180])
    assert len(TokenArray(tmp_path / "train.en")) == 250
    (tmp_path / "shards" / "s3.en.ids.npy").unlink()
    with pytest.raises(DataError, match="s3.en.ids.npy: missing"):
        TokenArray(tmp_path / "train.en")


def test_token_array_corruption_is_data_error(tmp_path: Path) -> None:
    write_token_array(tmp_path / "a", [[5, 6, 7], [8], [9, 10]])
    offsets = tmp_path / "a.offsets.npy"
    np.save(offsets, np.array([0, 3, 2, 6], dtype=np.int64))
    with pytest.raises(DataError, match=rf"^{offsets}: corrupt: offsets decrease at sequence 1"):
        TokenArray(tmp_path / "a")
    np.save(offsets, np.array([0, 3, 4, 7], dtype=np.int64))
    with pytest.raises(DataError, match=rf"^{offsets}: corrupt: last offset is 7"):
        TokenArray(tmp_path / "a")
    offsets.write_bytes(b"garbage")
    with pytest.raises(DataError, match=rf"^{offsets}: not a readable .npy"):
        TokenArray(tmp_path / "a")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'b.ids.npy'}: missing"):
        TokenArray(tmp_path / "b")


# --------------------------------------------------------------------------- batch


def test_collate_layout(tmp_path: Path) -> None:
    write_token_array(tmp_path / "s", [[10, 11, 12], [13], [14, 15]])
    write_token_array(tmp_path / "t", [[20], [21, 22, 23, 24], []])
    batch = collate(TokenArray(tmp_path / "s"), TokenArray(tmp_path / "t"), [2, 0, 1])
    P, E, B = PAD_ID, EOS_ID, BOS_ID
    assert batch.src.tolist() == [[14, 15, E, P], [10, 11, 12, E], [13, E, P, P]]
    assert batch.src_lengths.tolist() == [3, 4, 2]
    assert batch.tgt_in.tolist() == [[B, P, P, P, P], [B, 20, P, P, P], [B, 21, 22, 23, 24]]
    assert batch.tgt_out.tolist() == [[E, P, P, P, P], [20, E, P, P, P], [21, 22, 23, 24, E]]
    assert batch.src.dtype == batch.tgt_in.dtype == batch.src_lengths.dtype == torch.long
    assert batch.indices == [2, 0, 1] and len(batch) == 3
    assert batch.num_target_tokens() == 1 + 2 + 5
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out)

    src, lengths = collate_sentences([[5, 6], [], [7]])
    assert src.tolist() == [[5, 6, E], [E, P, P], [7, E, P]] and lengths.tolist() == [3, 1, 2]


