"""Resumable HTTP(S) download with a progress bar.

Bytes go to ``{dest}.part``; an interrupted download continues from where it
stopped with a ``Range`` request (a server that ignores it gets the file again
from the start), and ``dest`` appears only once the file is complete, so a file
under its real name is never partial. Checking the checksum is the caller's
business (:func:`distnmt.data.fetch.verify_archive`): the same check runs whether
an archive was downloaded or found in a mirror directory.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from distnmt.data.errors import DataError

_CHUNK = 1 << 20
BACKOFF_S = 2.0  # seconds before retry n is n * BACKOFF_S (a module constant, so tests can shorten it)
_USER_AGENT = "distnmt-prepare/0.1 (+https://github.com/)"


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def download(
    url: str, dest: Path, *, size: Optional[int] = None, progress: bool = True,
    retries: int = 5, timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); returns ``dest``.

    Retries up to ``retries`` times after a network error, each time resuming.
    Raises DataError naming the URL when it cannot be fetched.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(dest)
    last_error = ""
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, tmp, size, progress, timeout)
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403, 404, 410):
                raise DataError(f"{url}: HTTP {exc.code} {exc.reason}; download it by hand into a mirror directory") from None
            last_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt < retries:
                time.sleep(BACKOFF_S * (attempt + 1))
    raise DataError(f"{url}: download failed after {retries + 1} attempts ({last_error}); "
                    f"{tmp} keeps what arrived and the next run resumes it")


def _fetch_once(url: str, tmp: Path, size: Optional[int], progress: bool, timeout: float) -> None:
    """One request: append to ``tmp`` from its current size to the end of the file."""
    have = tmp.stat().st_size if tmp.exists() else 0
    if size is not None and have == size:
        return  # complete already; only the rename was missing
    headers = {"User-Agent": _USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: we hold the whole file
            return
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        mode = "ab" if have else "wb"
        with open(tmp, mode) as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=tmp.name[:-5],
            file=sys.stderr, disable=not progress, mininterval=1.0,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    got = tmp.stat().st_size
    if total is not None and got < total:
        raise ConnectionError(f"connection closed after {got} of {total} bytes")
