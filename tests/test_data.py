"""Tests for distnmt.data on the real WMT'14 sample: SGML, corpus reading, sentencepiece,
token arrays, the bucketed sampler, batching and prepare end to end."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import pickle
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from distnmt.data import (
    BOS_ID, EOS_ID, PAD_ID, UNK_ID,
    BucketBatchSampler, DataError, TokenArray, Tokenizer,
    collate, collate_sentences, load_manifest, open_text, prepare, read_lines, read_parallel,
    read_sgml_segments, train_sentencepiece, write_token_array,
)

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


# ------------------------------------------------------------------------- sampler


@pytest.fixture(scope="module")
def word_lengths(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real (src, tgt) word counts of the training sample, up to 50 words as in the paper."""
    pairs = read_parallel(shared_data / "train/train.en.gz", shared_data / "train/train.fr.gz")
    lengths = np.array([(len(en.split()), len(fr.split())) for en, fr in pairs])
    lengths = lengths[(lengths.max(axis=1) <= 50) & (lengths.min(axis=1) > 0)]
    return lengths[:, 0], lengths[:, 1]


def _epoch(sampler: BucketBatchSampler) -> list[list[int]]:
    return list(sampler)


def _samplers(src, tgt, world: int, **kw) -> list[BucketBatchSampler]:
    return [BucketBatchSampler(src, tgt, num_replicas=world, rank=r, **kw) for r in range(world)]


def _cost(src, tgt, batch) -> int:
    return len(batch) * int(max(src[batch].max(), tgt[batch].max()) + 1)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_sampler_covers_every_pair_once(word_lengths, world: int) -> None:
    src, tgt = word_lengths
    samplers = _samplers(src, tgt, world, max_tokens=2048, seed=3)
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [_epoch(s) for s in samplers]
        counts = {len(b) for b in per_rank}
        assert counts == {len(samplers[0])}  # the same number of batches on every rank
        dropped = samplers[0].dropped_batches()
        assert len(dropped) < world
        seen = [i for batches in per_rank for b in batches for i in b]
        all_seen = seen + [i for b in dropped for i in b]
        assert len(all_seen) == len(set(all_seen)) == len(src)
        for batches in per_rank:
            assert all(_cost(src, tgt, b) <= 2048 for b in batches)


def test_sampler_small_cases_exhaustive() -> None:
    rng = np.random.default_rng(0)
    skipped = 0
    for trial in range(200):
        n = int(rng.integers(1, 60))
        src, tgt = rng.integers(0, 12, size=n), rng.integers(0, 12, size=n)
        max_tokens = int(rng.integers(13, 80))
        world = int(rng.integers(1, 4))
        kw = dict(max_tokens=max_tokens, seed=trial, pool_batches=int(rng.integers(1, 5)),
                  max_sentences=[None, 3][trial % 2], shuffle=bool(trial % 3))
        try:
            samplers = _samplers(src, tgt, world, **kw)
            per_rank = [_epoch(s) for s in samplers]
        except DataError as exc:  # fewer batches than replicas: must say so
            assert "replicas" in str(exc)
            skipped += 1
            continue
        flat = [i for batches in per_rank for b in batches for i in b]
        flat += [i for b in samplers[0].dropped_batches() for i in b]
        assert sorted(flat) == list(range(n))
        assert len({len(b) for b in per_rank}) == 1
        for b in itertools.chain.from_iterable(per_rank):
            assert b and _cost(src, tgt, b) <= max_tokens
            assert kw["max_sentences"] is None or len(b) <= kw["max_sentences"]
    assert skipped < 20


def test_sampler_is_deterministic(word_lengths) -> None:
    src, tgt = word_lengths
    a = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=7)
    b = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=7)
    assert _epoch(a) == _epoch(b)
    a.set_epoch(1)
    b.set_epoch(1)
    first = _epoch(a)
    assert first == _epoch(b)
    a.set_epoch(0)
    assert _epoch(a) != first  # batches differ from epoch to epoch
    c = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=8)
    c.set_epoch(1)
    assert _epoch(c) != first


def test_sampler_resumes_exactly(word_lengths) -> None:
    src, tgt = word_lengths
    full = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
    full.set_epoch(2)
    expected = _epoch(full)
    assert full.state_dict()["position"] == len(full) == len(expected)

    run = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it) for _ in range(10)]
    state = run.state_dict()
    assert state == {"epoch": 2, "position": 10, "seed": 5, "num_replicas": 2, "max_tokens": 4096}

    # a fresh process: same config, state from rank 0's checkpoint (states are rank-independent)
    resumed = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.set_epoch(2)  # what a training loop does at the top of the epoch: must keep the position
    assert head + list(resumed) == expected
    resumed.set_epoch(3)
    assert resumed.state_dict()["position"] == 0 and len(list(resumed)) == len(resumed)

    for key, value in (("seed", 6), ("num_replicas", 4), ("max_tokens", 2048)):
        other = BucketBatchSampler(src, tgt, max_tokens=4096, num_replicas=2, rank=1, seed=5)
        with pytest.raises(ValueError, match=key):
            other.load_state_dict({**state, key: value})


def test_sampler_rejects_pair_over_budget() -> None:
    src, tgt = np.array([3, 4, 30, 2]), np.array([3, 40, 5, 2])
    with pytest.raises(DataError, match=r"^pair 1: needs 41 tokens .* max_tokens is 32"):
        BucketBatchSampler(src, tgt, max_tokens=32)


def test_sampler_padding_efficiency(word_lengths) -> None:
    src, tgt = word_lengths
    default = BucketBatchSampler(src, tgt, max_tokens=4096)
    wide = BucketBatchSampler(src, tgt, max_tokens=4096, pool_batches=100)
    # Random batching: the same greedy token budget over the shuffled order, unsorted.
    order = np.random.default_rng(0).permutation(len(src))
    real = padded = 0
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and _cost(src, tgt, order[start:end + 1]) <= 4096:
            end += 1
        b = order[start:end]
        real += int((src[b] + 1).sum() + (tgt[b] + 1).sum())
        padded += len(b) * int(src[b].max() + tgt[b].max() + 2)
        start = end
    random_eff = real / padded
    assert random_eff < 0.6
    assert default.padding_efficiency() > 0.85
    assert wide.padding_efficiency() >= 0.9


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


# ------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def prepared(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prepared")
    return prepare(shared_data, out, vocab_size=500, max_train_pairs=2000, progress=False)


def test_prepare_end_to_end(prepared, shared_data: Path) -> None:
    out, manifest = prepared.out_dir, prepared.manifest
    assert load_manifest(out) == manifest
    assert manifest["version"] == 1 and manifest["vocab_size"] == 500 and manifest["max_len"] == 50
    counts, dropped = manifest["counts"], manifest["dropped"]
    assert counts["train_read"] == 2000
    assert counts["train"] + dropped["empty"] + dropped["too_long"] == 2000
    assert dropped["too_long"] > 0  # Europarl has sentences over 50 subwords
    assert counts["dev"] == 3000 and counts["test"] == 3003

    tok = {lang: Tokenizer(out / f"spm.{lang}.model") for lang in ("en", "fr")}
    assert {lang: t.sha256 for lang, t in tok.items()} == manifest["spm_sha256"]
    src, tgt = TokenArray(out / "train.en"), TokenArray(out / "train.fr")
    assert len(src) == len(tgt) == counts["train"]
    assert src.num_tokens == counts["train_tokens_en"] and tgt.num_tokens == counts["train_tokens_fr"]
    assert 1 <= src.lengths.min() and max(src.lengths.max(), tgt.lengths.max()) <= 50
    assert int(np.load(out / "train.fr.ids.npy").max()) < 500

    # the first training pair is short and clean: it decodes back to the raw text
    en, fr = next(read_parallel(shared_data / "train/train.en.gz", shared_data / "train/train.fr.gz"))
    assert tok["en"].decode(src[0]) == en and tok["fr"].decode(tgt[0]) == fr

    # raw references are copied unchanged; sources are encoded in full
    assert (out / "dev.en").read_bytes() == (shared_data / "dev/newstest2013.en").read_bytes()
    assert (out / "dev.fr").read_bytes() == (shared_data / "dev/newstest2013.fr").read_bytes()
    assert (out / "test.fr").read_bytes() == (shared_data / "test/newstest2014.fr").read_bytes()
    assert read_lines(out / "test.en") == read_lines(shared_data / "test/newstest2014.en")
    dev = TokenArray(out / "dev.en")
    assert len(dev) == 3000 and dev[5].tolist() == tok["en"].encode(read_lines(out / "dev.en")[5])
    assert len(TokenArray(out / "test.en")) == 3003
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.scratch"))


def test_prepare_is_deterministic(prepared, shared_data: Path, tmp_path: Path) -> None:
    again = prepare(shared_data, tmp_path, vocab_size=500, max_train_pairs=2000, progress=False)
    assert again.manifest["spm_sha256"] == prepared.manifest["spm_sha256"]
    assert again.manifest["counts"] == prepared.manifest["counts"]
    for name in ("train.en.ids.npy", "train.fr.offsets.npy", "test.en.ids.npy"):
        assert (tmp_path / name).read_bytes() == (prepared.out_dir / name).read_bytes()


def test_load_manifest_errors(prepared, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path}/manifest.json: missing; run `distnmt prepare` first"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{\n  oops", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{tmp_path}/manifest.json:2: invalid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**prepared.manifest, "version": 99}), encoding="utf-8")
    with pytest.raises(DataError, match="version 99 is not supported"):
        load_manifest(tmp_path)
    # manifest from one prepare, sentencepiece models from another
    (tmp_path / "manifest.json").write_text(json.dumps(prepared.manifest), encoding="utf-8")
    (tmp_path / "spm.en.model").write_bytes(b"other")
    with pytest.raises(DataError, match=rf"^{tmp_path}/spm.en.model: sha256 .* does not match"):
        load_manifest(tmp_path)


def test_prepare_missing_source_names_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path}/train/train.en.gz: missing"):
        prepare(tmp_path, tmp_path / "out", progress=False)
