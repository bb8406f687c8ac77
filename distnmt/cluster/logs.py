"""Where Ray's lines go during a run: its informational lines to a log file in the run
directory, named at the start; distnmt's own lines, Ray's warnings and errors, and
anything a user must act on, to the console (``logging.ray: info`` brings back the rest)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Optional, TextIO


# A line a user must see: a warning, an error, a traceback, a failure; or a line of
# Ray's C++ core logged at severity W, E or F ("[2026-12-02 06:04:12,438 E 15997 16045] ...").
_ACTIONABLE = re.compile(
    r"warn|error|exception|traceback|fail|fatal|abort|killed|timed? ?out|unable|cannot|could not|"
    r"not found|invalid|denied|out of memory|oom|deprecat|^\s+File \"|"
    r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [WEF] \d+ \d+\]",
    re.IGNORECASE,
)


def is_ray_info(line: str, is_err: bool) -> bool:
    """True for a line forwarded from a Ray process that only informs: written to stderr
    (where Ray's loggers, Ray Train's included, write without a level) and naming no
    warning, error or failure. stdout is the program's own output (distnmt's progress,
    the evaluator's scores) and is never held back."""
    return is_err and not _ACTIONABLE.search(line)


class _LogFile:
    """Appends lines to the run's Ray log, opened on first use (line-buffered)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Optional[TextIO] = None

    def write(self, text: str) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8", buffering=1)
        self._handle.write(text if text.endswith("\n") else text + "\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


_log_files: dict[Path, _LogFile] = {}


def _log_file(path: Path) -> _LogFile:
    return _log_files.setdefault(path, _LogFile(path))


def _route_driver_logs(log_path: Path, level: str) -> Callable[[], None]:
    """This process's ``ray`` logger: INFO to the run's log file, the console from
    WARNING up (unless ``logging.ray: info``). Returns the undo."""
    logger = logging.getLogger("ray")
    handler = logging.StreamHandler(_log_file(log_path))  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    levels = [(h, h.level) for h in logger.handlers if h is not handler]
    if level != "info":
        for h, _ in levels:
            h.setLevel(logging.WARNING)

    def undo() -> None:
        logger.removeHandler(handler)
        for h, old in levels:
            h.setLevel(old)

    return undo


def _route_worker_logs(log_path: Path, level: str) -> Callable[[], None]:
    """The lines Ray forwards from the run's workers, actors and raylets: all of them to
    the run's log file; to the console all but Ray's informational ones (or all, with
    ``logging.ray: info``). Replaces Ray's own printer; returns the undo."""
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    original = dict(dispatcher.handlers).get("ray_print_logs")  # a list of (name, handler)
    if original is None:  # log_to_driver off, or not a driver: nothing is forwarded here
        return lambda: None
    log = _log_file(log_path)

    def route(data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        who = data.get("actor_name") or data.get("task_name") or ""
        tag = f"({who} pid={data.get('pid')}{' stderr' if data.get('is_err') else ''}) "
        for line in lines:
            log.write(tag + line)
        if level == "info":
            original(data)
            return
        # A traceback is one batch: keep it whole when any line of it is actionable.
        if any(_ACTIONABLE.search(line) for line in lines):
            original(data)
            return
        keep = [line for line in lines if not is_ray_info(line, bool(data.get("is_err")))]
        if keep:
            original({**data, "lines": keep})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", route)

    def undo() -> None:
        # Ray's printer back only where the route is still in: ray.shutdown() takes it
        # out by name, and one put back after that would print every line twice under
        # the next ray.init, which adds its own.
        if any(handler is route for _, handler in dispatcher.handlers):
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", original)
        log.close()
        _log_files.pop(log_path, None)

    return undo
