"""The one exception type for bad input data.

Every problem with a user's files is reported as a single line that names the
file (and the line, where there is one), so a user can open the file and fix it
without reading a traceback from deep inside the pipeline.
"""

from __future__ import annotations

from os import PathLike


class DataError(ValueError):
    """One-line error naming file and line, e.g. ``path/to/file:123: what is wrong``."""

    @classmethod
    def at(cls, path: str | PathLike[str], line: int | None, what: str) -> "DataError":
        """Build the standard message: ``{path}:{line}: {what}`` (``{path}: {what}`` without a line)."""
        where = f"{path}:{line}" if line is not None else f"{path}"
        return cls(f"{where}: {what}")
