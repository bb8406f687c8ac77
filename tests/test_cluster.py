"""distnmt/cluster/ without Ray: the console's line filter, process-tree memory
(PSS against summed RSS), listening sockets from /proc, and the run's address
(the runs themselves are in tests/integration/test_job_submit.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from distnmt.cluster import (
    is_loopback,
    is_ray_info,
    listening_sockets,
    process_tree,
    tree_memory,
)
from distnmt.cluster.procs import _decode_address


@pytest.mark.parametrize("line", [
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/r/checkpoint_00000010)",
    "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(...), metrics={'loss': 4.1}, validation_spec=...)",
    "Launched async validation task for checkpoint Checkpoint(filesystem=local, path=/tmp/r/checkpoint_00000010)",
    "Running validations for checkpoint(s): [].",
    "Staged validations for checkpoint(s): [].",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "Requesting resources: {'CPU': 0.9} * 2",
    "- (ip=127.0.0.1, pid=16410) world_rank=0, local_rank=0, node_rank=0",
    "[2026-12-02 06:04:12,438 I 15997 16045] core_worker.cc:100: informational",
])
def test_ray_train_informational_lines_are_held_back(line: str) -> None:
    assert is_ray_info(line, is_err=True)


@pytest.mark.parametrize("line", [
    "Warning: The following resource request cannot be scheduled right now: {'CPU': 1.0}.",
    "[Gang scheduling] Training worker group failed to start: worker group startup timed out",
    "Traceback (most recent call last):",
    '  File "/x/loop.py", line 3, in train',
    "ValueError: bad value",
    "UserWarning: TypedStorage is deprecated",
    "A worker died or was killed while executing a task by an unexpected system error.",
    "[2026-12-02 06:04:12,438 E 15997 16045] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: '697f' has constructor arguments in the object store and max_restarts > 0.",
])
def test_warnings_errors_and_tracebacks_reach_the_console(line: str) -> None:
    assert not is_ray_info(line, is_err=True)


def test_stdout_is_never_held_back() -> None:
    """distnmt's own lines ([train], [evaluator]) are written to stdout."""
    assert not is_ray_info("[train] step 10/20 epoch 1 | loss 5.1", is_err=False)
    assert not is_ray_info("Running validations for checkpoint(s): []", is_err=False)


def test_pss_counts_shared_pages_once_where_summed_rss_counts_them_twice() -> None:
    """A parent that touched 200 MiB, then forked: both map the same pages
    (copy-on-write), so the summed RSS is about 400 MiB, the PSS about 200 and
    the USS (private pages) small."""
    code = ("import os, time; x = bytearray(200 * 2**20); x[::4096] = b'\\x01' * len(x[::4096]); "
            "pid = os.fork(); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        deadline = time.time() + 20
        while len(process_tree(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        memory = tree_memory(process_tree(proc.pid))
        assert memory["processes"] == 2
        assert memory["rss"] > 390, memory
        assert 195 < memory["pss"] < memory["rss"] - 150, memory
        assert memory["uss"] < 100, memory
    finally:
        for pid in reversed(process_tree(proc.pid)):
            os.kill(pid, 9)
        proc.wait()


def test_listening_sockets_are_found_with_their_address() -> None:
    loop, anywhere = socket.socket(), socket.socket()
    try:
        loop.bind(("127.0.0.1", 0))
        anywhere.bind(("0.0.0.0", 0))
        loop.listen()
        anywhere.listen()
        found = {(address, port) for pid, address, port in listening_sockets([os.getpid()])}
        assert ("127.0.0.1", loop.getsockname()[1]) in found
        assert ("0.0.0.0", anywhere.getsockname()[1]) in found
        assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
        assert not is_loopback("::") and not is_loopback("10.1.2.3")
    finally:
        loop.close()
        anywhere.close()


def test_proc_net_addresses_decode() -> None:
    assert _decode_address("0100007F") == "127.0.0.1"
    assert _decode_address("00000000000000000000000001000000") == "::1"
    assert _decode_address("00000000000000000000000000000000") == "::"


@pytest.mark.parametrize("level", ["warning", "info"])
def test_forwarded_lines_go_to_the_file_and_only_some_to_the_console(level: str, tmp_path) -> None:
    """Ray's dispatcher of the lines forwarded from workers, with a printer in place of
    the one ray.init installs: every line reaches the run's log file; the console's
    printer gets all but Ray's informational ones (all of them with logging.ray: info);
    the undo puts Ray's printer back."""
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    from distnmt.cluster.logs import _route_worker_logs

    printed: list[str] = []

    def printer(data: dict) -> None:
        printed.extend(data["lines"])

    dispatcher.add_handler("ray_print_logs", printer)
    log = tmp_path / "logs" / "ray-1.log"
    try:
        undo = _route_worker_logs(log, level)
        dispatcher.emit({"pid": 7, "actor_name": "RayTrainWorker", "is_err": True,
                         "lines": ["Checkpoint successfully created at: Checkpoint(path=/r/checkpoint_1)",
                                   "Reporting training result 1: TrainingReport(...)"]})
        dispatcher.emit({"pid": 7, "actor_name": "RayTrainWorker", "is_err": False,
                         "lines": ["[train] step 10/20 epoch 0 | loss 5.0"]})
        dispatcher.emit({"pid": 8, "actor_name": "TrainController", "is_err": True,
                         "lines": ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: x"]})
        undo()
        assert [name for name, _ in dispatcher.handlers if name == "ray_print_logs"] == ["ray_print_logs"]
        assert dict(dispatcher.handlers)["ray_print_logs"] is printer
    finally:
        dispatcher.remove_handler("ray_print_logs")
    shown = ["[train] step 10/20 epoch 0 | loss 5.0", "Traceback (most recent call last):", '  File "x.py", line 1',
             "ValueError: x"]
    if level == "info":
        shown = ["Checkpoint successfully created at: Checkpoint(path=/r/checkpoint_1)",
                 "Reporting training result 1: TrainingReport(...)", *shown]
    assert printed == shown
    logged = log.read_text()
    assert "(RayTrainWorker pid=7 stderr) Checkpoint successfully created" in logged
    assert "(RayTrainWorker pid=7) [train] step 10/20" in logged and "ValueError: x" in logged


def test_lines_forwarded_until_the_disconnect_are_routed_and_the_printer_stays_out(tmp_path, monkeypatch) -> None:
    """RayHandle.stop shuts Ray down while the routing is still in, so a line Ray Train's
    controller forwards at the very end (after the run's closing BLEU line) is filtered
    like any other, not printed by Ray's printer. ray.shutdown() takes the printer out by
    name, and the undo leaves it out: the next ray.init adds its own, and one put back
    here would print every line twice."""
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    from distnmt.cluster import RayHandle
    from distnmt.cluster.logs import _route_worker_logs

    printed: list[str] = []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.extend(data["lines"]))
    log = tmp_path / "logs" / "ray-1.log"
    late = "Staged validations for checkpoint(s): []."

    def shutdown() -> None:  # what ray.shutdown() does to the dispatcher, a late line first
        dispatcher.emit({"pid": 8, "actor_name": "TrainController", "is_err": True, "lines": [late]})
        dispatcher.remove_handler("ray_print_logs")

    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    handle = RayHandle("127.0.0.1:1", owned=True, log_path=log, _restore=[_route_worker_logs(log, "warning")])
    try:
        handle.stop()
    finally:
        dispatcher.remove_handler("ray_print_logs")
    assert printed == []
    assert "ray_print_logs" not in dict(dispatcher.handlers)
    assert f"(TrainController pid=8 stderr) {late}" in log.read_text()


def test_this_process_ray_logger_info_to_the_file_warnings_to_the_console(tmp_path) -> None:
    """The driver's own "ray" logger: its console handlers pass WARNING and up only;
    INFO ("Started a local Ray instance") goes to the run's log file; undone after."""
    import logging

    import ray  # noqa: F401  (configures the "ray" logger's console handler)

    from distnmt.cluster.logs import _log_files, _route_driver_logs

    log = tmp_path / "ray.log"
    logger = logging.getLogger("ray")
    console = list(logger.handlers)
    levels = [h.level for h in console]
    assert console, "ray configures a console handler of its own"
    undo = _route_driver_logs(log, "warning")
    try:
        assert all(h.level == logging.WARNING for h in console)
        logger.info("Started a local Ray instance.")
        logger.warning("Token authentication is enabled for this Ray cluster.")
    finally:
        undo()
        _log_files.pop(log).close()
    logged = log.read_text()
    assert "INFO ray: Started a local Ray instance." in logged and "Token authentication" in logged
    assert list(logger.handlers) == console and [h.level for h in console] == levels
    undo = _route_driver_logs(log, "info")  # logging.ray: info leaves the console as Ray set it
    try:
        assert [h.level for h in console] == levels
    finally:
        undo()
        _log_files.pop(log).close()
