"""Shared pytest fixtures."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

# CI clones the repository beside ../shared, so the sample lives outside the repo.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/wmt14-en-fr"

# The sample's training parts, by registry name -> file name under train/by-corpus.
SAMPLE_PARTS = {"europarl-v7": "europarl-v7", "news-commentary-v9": "news-commentary", "giga-fren": "giga-fren"}
SMALL_PAIRS = 800  # pairs per part in the small mirror
SMALL_DOCS = 12    # newstest documents kept in the small mirror


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real WMT'14 En-Fr sample (train/dev/test), at ../shared relative to the repo root."""
    if not (SHARED_DATA / "README.md").exists():
        raise FileNotFoundError(f"{SHARED_DATA}: WMT'14 sample not found; clone the shared data beside the repo")
    return SHARED_DATA


def _head_docs(text: str, docs: int) -> str:
    """An SGML file cut after its first ``docs`` documents, still well formed."""
    lines = text.splitlines(keepends=True)
    out, seen = [], 0
    for line in lines:
        out.append(line)
        if line.strip().lower() == "</doc>":
            seen += 1
            if seen == docs:
                break
    out.append(lines[-1])  # </srcset> or </refset>
    return "".join(out)


def write_small_mirror(shared: Path, root: Path, pairs: int = SMALL_PAIRS, docs: int = SMALL_DOCS) -> Path:
    """A mirror laid out like the sample, with the first ``pairs`` real pairs of each part
    and the first ``docs`` documents of newstest2013/2014: prepares in about a second."""
    for name in SAMPLE_PARTS.values():
        for lang in ("en", "fr"):
            with gzip.open(shared / "train/by-corpus" / f"{name}.{lang}.gz", "rb") as f:
                lines = f.read().split(b"\n")[:pairs]
            out = root / "train/by-corpus" / f"{name}.{lang}.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", mtime=0))
    for rel in ("dev/newstest2013-src.en.sgm", "dev/newstest2013-ref.fr.sgm",
                "test/newstest2014-fren-src.en.sgm", "test/newstest2014-fren-ref.fr.sgm"):
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_head_docs((shared / rel).read_text(encoding="utf-8"), docs), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def small_mirror_master(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_mirror(shared_data, tmp_path_factory.mktemp("small-mirror"))


@pytest.fixture
def small_mirror(small_mirror_master: Path, tmp_path: Path) -> Path:
    """A private copy of the small mirror, which a test may damage."""
    return Path(shutil.copytree(small_mirror_master, tmp_path / "mirror"))
