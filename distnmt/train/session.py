"""The seam between the Trainer and what runs it: one process, or Ray Train.

The Trainer needs five things from outside: its rank, world size and device; the
checkpoint its runner knows of; a way to publish a checkpoint; whether a node is
being preempted; and whether the evaluator says stop. :class:`Session` gives them
for one process with no Ray at all (tests, debugging); :class:`RaySession` for a
Ray Train worker, including Ray Train's local mode (``train.workers: 0``: the
training function runs in the calling process and ``ray.train.report`` keeps
nothing, so checkpoints are written straight into the run directory as here).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from distnmt.checkpoint import staging_dir


def say(line: str) -> None:
    """A progress line on stdout. Not print(): Ray Train patches print in workers
    and, with Ray's own stdout capture, every printed line would appear twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Session:
    """One process, no Ray: checkpoints are assembled in a hidden directory of the run
    directory and renamed into place, so a reader never sees half of one."""

    def __init__(self, run_dir: Path, device: torch.device | str = "cpu",
                 stop_reason: Optional[Callable[[], Optional[str]]] = None) -> None:
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self._stop_reason = stop_reason

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def world(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """How a DDP engine wraps the model when the world is larger than one."""
        return torch.nn.parallel.DistributedDataParallel(model)

    def reported_checkpoint(self) -> Optional[Path]:
        """The checkpoint the runner would resume from (the Trainer also scans the run directory)."""
        return None

    @contextmanager
    def publish(self, name: str, metrics: dict[str, Any]) -> Iterator[Path]:
        """A directory to write checkpoint ``name`` into; on exit it becomes run_dir/name."""
        staging = staging_dir(self.run_dir, name)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
            target = self.run_dir / name
            shutil.rmtree(target, ignore_errors=True)  # a rerun past a step it had written
            staging.rename(target)
            self._reported(target, name, metrics)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _reported(self, directory: Path, name: str, metrics: dict[str, Any]) -> None:
        """Hook for a runner that wants to know of each checkpoint."""

    def preemption_notice(self) -> Optional[str]:
        """A line saying which ranks are being preempted, or None. No preemption without Ray."""
        return None

    def stop_reason(self) -> Optional[str]:
        """The evaluator's early-stopping verdict, the same on every rank."""
        reason: list[Optional[str]] = [self._stop_reason() if self.rank == 0 and self._stop_reason else None]
        if self.world > 1:
            dist.broadcast_object_list(reason, src=0)
        return reason[0]


class RaySession(Session):
    """A Ray Train worker (or Ray Train's local mode): ray.train's report, checkpoint,
    context and preemption info, and the evaluator actor asked by name."""

    def __init__(self, run_dir: Path, evaluator: Optional[str], namespace: Optional[str], local: bool) -> None:
        import ray.train.torch

        self._local = local  # Ray Train's local mode (ScalingConfig(num_workers=0))
        super().__init__(run_dir, ray.train.torch.get_device())
        self._evaluator, self._namespace = evaluator, namespace

    @property
    def rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_rank()

    @property
    def world(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_size()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def reported_checkpoint(self) -> Optional[Path]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.path) if checkpoint is not None else None

    @contextmanager
    def publish(self, name: str, metrics: dict[str, Any]) -> Iterator[Path]:
        """Every rank writes its part into its own temporary directory and reports it;
        Ray copies the parts into run_dir/name (``report`` is a barrier across ranks)
        and hands it to the evaluator's validation hook. In local mode Ray keeps
        nothing: the checkpoint is written in place as in one process."""
        import ray.train

        if self._local:
            with super().publish(name, metrics) as directory:
                yield directory
            return
        with tempfile.TemporaryDirectory(prefix="distnmt-ckpt-") as tmp:
            directory = Path(tmp) / name
            directory.mkdir()
            yield directory
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=name, validation=True)

    def _reported(self, directory: Path, name: str, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))

    def preemption_notice(self) -> Optional[str]:
        """Whether Ray reports a node of this run as being preempted (drained).

        ``ray.train.get_preemption_info`` is a barrier across the workers. A spot
        node's shutdown hook (launch/preempt-node.sh) drains it with a deadline; the
        Trainer then writes a checkpoint at once, and when the node goes, Ray restarts
        the group on what is left (elastic) from that step.
        """
        import time

        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return None
        left = "" if info.deadline_ms is None else f", {info.deadline_ms / 1000 - time.time():.0f} s before it goes"
        return f"preemption notice for rank(s) {info.preempted_ranks}{left}"

    def stop_reason(self) -> Optional[str]:
        """Rank 0 asks the evaluator actor (threaded: it answers at once even while
        decoding, so this costs a round trip per checkpoint); every rank learns the answer."""
        if self._evaluator:
            import ray

            def ask() -> Optional[str]:
                actor = ray.get_actor(self._evaluator, namespace=self._namespace)
                return ray.get(actor.stop_reason.remote())

            self._stop_reason = ask
        return super().stop_reason()
