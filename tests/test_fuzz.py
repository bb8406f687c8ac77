"""Property-based fuzzing (issue 9): the config loader and the corpus readers, fed
arbitrary and near-valid input, either succeed or raise their documented one-line
error (ConfigError, DataError); never another exception, never a multi-line message."""

from __future__ import annotations

import dataclasses
import gzip
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distnmt.config import Config, ConfigError, load_config
from distnmt.data.corpus import read_lines, read_parallel
from distnmt.data.errors import DataError
from distnmt.data.sgml import read_sgml_parallel
from distnmt.data.stream import decode_block, iter_parallel_blocks

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _one_line(err: Exception) -> None:
    message = str(err)
    assert message and "\n" not in message, repr(message)


# ------------------------------------------------------------------ config

SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
KEYS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["fp16", "bf16", "deepspeed", "rnnsearch", "1e-3", "NFC", "dev", "-1", "0"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
# Mostly real keys (so values reach the type and range checks), some typos and junk.
keys = st.one_of(
    st.sampled_from(KEYS),
    st.tuples(st.sampled_from(list(SECTIONS)), st.text(max_size=10)),
    st.tuples(st.text(max_size=8), st.text(max_size=8)),
)


def _load_text(text: str, overrides: list[str] = ()) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            cfg = load_config(path, overrides)
        except ConfigError as err:
            _one_line(err)
        else:
            assert isinstance(cfg, Config)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_config_from_near_valid_yaml_loads_or_is_a_config_error(entries: dict[tuple[str, str], Any]) -> None:
    data: dict[Any, Any] = {}
    for (section, key), value in entries.items():
        node = data.setdefault(section, {})
        if isinstance(node, dict):
            node[key] = value
    _load_text(yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(st.text(max_size=200))
def test_config_from_arbitrary_text_loads_or_is_a_config_error(text: str) -> None:
    _load_text(text)


@FUZZ
@given(st.lists(st.one_of(
    st.builds(lambda k, v: f"{k[0]}.{k[1]}={v}", st.sampled_from(KEYS), st.text(max_size=12)),
    st.text(max_size=30),
), max_size=4))
def test_config_overrides_load_or_are_a_config_error(overrides: list[str]) -> None:
    try:
        load_config(None, overrides)
    except ConfigError as err:
        _one_line(err)


# ------------------------------------------------------------------ corpus readers

lines = st.lists(st.one_of(st.text(max_size=20), st.binary(max_size=20).map(lambda b: b.decode("latin-1"))), max_size=8)
corpus_bytes = st.one_of(
    st.binary(max_size=300),
    lines.map(lambda ls: "\n".join(ls).encode("utf-8")),
    st.builds(lambda good, bad, at: good[:at] + bad + good[at:],
              lines.map(lambda ls: "\n".join(ls).encode("utf-8")), st.binary(min_size=1, max_size=4), st.integers(0, 50)),
)


def _write(directory: Path, name: str, data: bytes, how: str) -> Path:
    path = directory / name
    if how == "gzip":
        path = path.with_name(name + ".gz")
        data = gzip.compress(data)
    elif how == "truncated gzip":
        path = path.with_name(name + ".gz")
        data = gzip.compress(data)[: max(1, len(data) // 2)]
    path.write_bytes(data)
    return path


@FUZZ
@given(corpus_bytes, corpus_bytes, st.sampled_from(["plain", "gzip", "truncated gzip"]), st.integers(1, 5))
def test_parallel_readers_read_or_raise_a_data_error(src: bytes, tgt: bytes, how: str, block: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _write(Path(tmp), "x.en", src, how), _write(Path(tmp), "x.fr", tgt, how)
        try:
            pairs = list(read_parallel(a, b))
            assert all(isinstance(s, str) and isinstance(t, str) for s, t in pairs)
            assert read_lines(a) == [s for s, _ in pairs]
        except DataError as err:
            _one_line(err)
        try:
            for chunk in iter_parallel_blocks(a, b, block):
                decode_block(chunk.src, a, chunk.first_line)
                decode_block(chunk.tgt, b, chunk.first_line)
        except DataError as err:
            _one_line(err)


# SGML made of the pieces of real newstest files, in any order, with damage.
sgml_lines = st.lists(st.one_of(
    st.sampled_from(['<srcset setid="x" srclang="any">', '<refset setid="x" trglang="fr">', "</srcset>", "</refset>",
                     '<doc docid="d1" sysid="ref">', '<doc docid="d2">', "<doc>", "</doc>", "<p>", "</p>",
                     '<seg id="1">Hello &amp; bye</seg>', '<seg id="2">Two</seg>', '<seg id=3>Three</seg>',
                     '<seg id="1">dup</seg>', "<seg>no id</seg>", '<seg id="4">unclosed', "<seg id='5'>a&#10;b</seg>"]),
    st.text(max_size=15),
), max_size=12)


@FUZZ
@given(sgml_lines, sgml_lines)
def test_sgml_reader_reads_or_raises_a_data_error(src: list[str], ref: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "t-src.en.sgm", Path(tmp) / "t-ref.fr.sgm"
        a.write_text("\n".join(src) + "\n", encoding="utf-8")
        b.write_text("\n".join(ref) + "\n", encoding="utf-8")
        try:
            sources, references = read_sgml_parallel(a, b)
            assert len(sources) == len(references)
        except DataError as err:
            _one_line(err)
