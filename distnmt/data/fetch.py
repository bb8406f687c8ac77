"""Getting the files of registry parts and eval sets: from a mirror, or by download.

One path after the archive is on disk, whichever way it got there::

    mirror holds the extracted files ──────────────────────────────▶ read
    mirror holds the archive ───────────┐
    no mirror: download into cache_dir ─┴▶ verify ▶ extract ▶ read

``verify`` checks the size and checksum the registry knows; ``extract`` pulls
just the needed members into ``cache_dir/extracted/<archive>/`` under temporary
names, renames them, and writes a stamp last, so a crash never leaves a member
that a later run takes as complete; the stamp also lets a re-run skip both steps
when the archive has not changed (same size and mtime).

Under a mirror directory, each file is looked for (first match wins):

1. at its member path, e.g. ``training/europarl-v7.fr-en.en`` (also with or without ``.gz``);
2. anywhere below the mirror by base name, e.g. ``europarl-v7.fr-en.en[.gz]``;
3. anywhere below by ``{name}.{lang}[.gz]`` for the part's name and aliases,
   e.g. ``europarl-v7.en.gz`` (how ``../shared/data/wmt14-en-fr/train/by-corpus`` is laid out);

and when the files are not there, the archive is looked for by its file name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from distnmt.data.download import download
from distnmt.data.errors import DataError
from distnmt.data.sources import Archive, EvalSet, Part, Registry, members

_HASH_CHUNK = 1 << 22
_STAMP = ".extracted.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_archive(path: Path, archive: Archive, check: bool = True) -> str:
    """Check ``path`` against the registry's size and checksum; returns its sha256.

    With ``check=False`` nothing is compared (a user's re-packed archive), but the
    sha256 is still computed for the manifest.
    """
    size = path.stat().st_size
    if check and archive.size is not None and size != archive.size:
        raise DataError.at(
            path, None, f"{size} bytes but {archive.url} has {archive.size}: a truncated download or another release "
            "(delete it to download again, or set data.verify_checksums: false)"
        )
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
    if check and archive.checksum is not None:
        algo, _, expected = archive.checksum.partition(":")
        actual = {"sha256": sha256, "md5": md5}[algo].hexdigest()
        if actual != expected.lower():
            raise DataError.at(
                path, None, f"{algo} {actual[:16]}… does not match the published {expected[:16]}… of {archive.url} "
                "(corrupt download or another release: delete it, or set data.verify_checksums: false)"
            )
    return sha256.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def extract_members(archive_path: Path, wanted: Sequence[str], dest: Path) -> dict[str, Path]:
    """Extract ``wanted`` members of a tar archive into ``dest``; returns member -> file.

    Streams through the archive once (a .tgz cannot be read out of order) and
    stops as soon as every wanted member is out.
    """
    dest.mkdir(parents=True, exist_ok=True)
    out = {m: dest / m for m in wanted}
    todo = set(wanted)
    try:
        with tarfile.open(archive_path, mode="r|*") as tar:
            for info in tar:
                name = info.name[2:] if info.name.startswith("./") else info.name
                if name not in todo or not info.isfile():
                    continue
                target = out[name]
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                source = tar.extractfile(info)
                assert source is not None  # a regular file always has content
                with source, open(tmp, "wb") as f:
                    shutil.copyfileobj(source, f, _HASH_CHUNK)
                os.replace(tmp, target)
                todo.discard(name)
                if not todo:
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise DataError.at(archive_path, None, f"cannot read archive ({reason}); truncated or corrupt?") from None
    if todo:
        raise DataError.at(archive_path, None, f"has no member {sorted(todo)[0]!r}; is it the right archive?")
    return out


class Fetcher:
    """Finds or fetches the files of parts and eval sets for one language direction."""

    def __init__(
        self, mirror: Optional[Path], cache_dir: Path, registry: Registry, src_lang: str, tgt_lang: str, *,
        verify: bool = True, progress: bool = True,
    ) -> None:
        self.mirror = Path(mirror).resolve() if mirror is not None else None
        self.cache_dir = Path(cache_dir)
        self.registry = registry
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.verify = verify
        self.progress = progress
        self._index: Optional[dict[str, list[Path]]] = None
        self.archive_sha256: dict[str, str] = {}  # archives verified this run

    # ---- the mirror ---------------------------------------------------------

    def _by_name(self) -> dict[str, list[Path]]:
        """Every file below the mirror by base name (built once; mirrors hold few files)."""
        if self._index is None:
            self._index = {}
            assert self.mirror is not None
            for root, dirs, files in os.walk(self.mirror, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in files:
                    self._index.setdefault(name, []).append(Path(root) / name)
        return self._index

    def _find_one(self, names: Iterable[str], what: str) -> Optional[Path]:
        index = self._by_name()
        for name in names:
            hits = index.get(name, [])
            if len(hits) > 1:
                listed = ", ".join(str(h) for h in hits[:4])
                raise DataError.at(
                    self.mirror or Path("."), None, f"{what}: {len(hits)} files named {name!r} ({listed}); keep one"
                )
            if hits:
                return hits[0]
        return None

    def _find_file(self, item: Part | EvalSet, member: str, lang: str) -> Optional[Path]:
        assert self.mirror is not None
        variants = [member[:-3], member] if member.endswith(".gz") else [member, member + ".gz"]
        for rel in variants:
            if (self.mirror / rel).is_file():
                return self.mirror / rel
        base = [Path(v).name for v in variants]
        aliases = (item.name, *item.aliases) if isinstance(item, Part) else ()
        short = [f"{a}.{lang}{gz}" for a in aliases for gz in ("", ".gz")]
        return self._find_one([*base, *short], f"{item.name} ({lang})")

    # ---- archives -----------------------------------------------------------

    def _archive_path(self, archive: Archive) -> Path:
        """The archive from the mirror, or downloaded into the cache when there is no mirror."""
        if self.mirror is not None:
            found = self._find_one([archive.name], archive.name)
            if found is None:
                raise DataError.at(self.mirror, None, f"has neither the files nor the archive {archive.name}")
            return found
        dest = self.cache_dir / "downloads" / archive.name
        return download(archive.url, dest, size=archive.size, progress=self.progress)

    def _from_archive(self, archive: Archive, wanted: Sequence[str]) -> dict[str, Path]:
        """verify -> extract, skipped when the stamp says this very archive was done."""
        path = self._archive_path(archive)
        dest = self.cache_dir / "extracted" / archive.name
        stamp_file = dest / _STAMP
        try:
            stamp = json.loads(stamp_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stamp = {}
        if (stamp.get("archive") == str(path) and stamp.get("stat") == _stat_key(path)
                and set(wanted) <= set(stamp.get("members", ())) and all((dest / m).is_file() for m in wanted)):
            self.archive_sha256[archive.name] = stamp["sha256"]
            return {m: dest / m for m in wanted}
        sha = verify_archive(path, archive, check=self.verify)
        stamp_file.unlink(missing_ok=True)
        files = extract_members(path, wanted, dest)
        tmp = stamp_file.with_name(_STAMP + ".tmp")
        tmp.write_text(json.dumps({"archive": str(path), "stat": _stat_key(path), "sha256": sha,
                                   "members": sorted(wanted)}), encoding="utf-8")
        os.replace(tmp, stamp_file)
        self.archive_sha256[archive.name] = sha
        return files

    # ---- public -------------------------------------------------------------

    def fetch(self, items: Sequence[Part | EvalSet]) -> dict[str, tuple[Path, Path]]:
        """``{item name: (source file, target file)}``, extracting each needed archive once."""
        result: dict[str, tuple[Path, Path]] = {}
        pending: dict[str, list[Part | EvalSet]] = {}
        for item in items:
            src_m, tgt_m = members(item, self.src_lang, self.tgt_lang)
            if self.mirror is not None:
                src = self._find_file(item, src_m, self.src_lang)
                tgt = self._find_file(item, tgt_m, self.tgt_lang)
                if src is not None and tgt is not None:
                    result[item.name] = (src, tgt)
                    continue
                if (src is None) != (tgt is None) and self._find_one([item.archive], item.archive) is None:
                    missing, lang = (src_m, self.src_lang) if src is None else (tgt_m, self.tgt_lang)
                    raise DataError.at(self.mirror, None, f"{item.name}: has the other side but not {missing} ({lang})")
                if self._find_one([item.archive], item.archive) is None:
                    base = Path(src_m).name.removesuffix(".gz")
                    raise DataError.at(
                        self.mirror, None, f"{item.name} not found: no {base}[.gz] (nor a short name like "
                        f"{item.name}.{self.src_lang}.gz) and no archive {item.archive}"
                    )
            pending.setdefault(item.archive, []).append(item)
        for archive_name, group in pending.items():
            wanted = sorted({m for item in group for m in members(item, self.src_lang, self.tgt_lang)})
            files = self._from_archive(self.registry.archives[archive_name], wanted)
            for item in group:
                src_m, tgt_m = members(item, self.src_lang, self.tgt_lang)
                result[item.name] = (files[src_m], files[tgt_m])
        return {item.name: result[item.name] for item in items}

    def describe(self) -> dict[str, Any]:
        return {"mirror": str(self.mirror) if self.mirror else None, "cache_dir": str(self.cache_dir),
                "archives_sha256": dict(self.archive_sha256)}
