"""The training process group's rendezvous, listening on the node's own address only.

Ray Train's ``TorchConfig`` hands torch an ``env://`` or ``tcp://`` address, and torch's
TCPStore (rank 0's rendezvous server) then listens on every interface ("::"), whatever
the address says (torch 2.13). Here rank 0 binds the listening socket itself, on the
address Ray knows its node by (127.0.0.1 in a local cluster, the node's IP on a real
one), and hands it to TCPStore (``master_listen_fd``); the other ranks connect to it.
The rest is Ray Train's torch backend as it is: the backend choice (gloo, or NCCL with
GPUs), the ranks' environment, the shutdown.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import ray
import torch.distributed as dist
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

# Rank 0's listening socket: TCPStore serves on its descriptor, so it lives as long as
# this worker process (one process group per worker process in Ray Train).
_listener: Optional[socket.socket] = None


def _listen_on_node_address() -> tuple[str, int]:
    """Rank 0: listen on this node's Ray address, on a port the kernel picks; return both."""
    global _listener
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((address, 0))
    listener.listen(socket.SOMAXCONN)
    if _listener is not None:
        _listener.close()
    _listener = listener
    return address, listener.getsockname()[1]


def _join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                        timeout_s: int) -> None:
    """Every rank: the store (served by rank 0 on its socket), then the process group.
    (``world_rank``: Ray's ``execute_single_async`` takes ``rank`` itself.)"""
    rank = world_rank
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # As Ray Train does: a timed-out NCCL collective fails instead of hanging.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # The env:// names too, for code that reads them (DeepSpeed's launcher conventions).
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    timeout = datetime.timedelta(seconds=timeout_s)
    fd = _listener.fileno() if rank == 0 and _listener is not None else None
    if rank == 0 and fd is None:
        raise RuntimeError("rank 0 has no rendezvous socket: _listen_on_node_address did not run in this process")
    # libuv is TCPStore's default server and the one that serves on a given descriptor.
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                          master_listen_fd=fd, use_libuv=True)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class _NodeAddressTorchBackend(_TorchBackend):
    """Ray Train's torch backend with the rendezvous above; shutdown is Ray's."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        address, port = worker_group.execute_single(0, _listen_on_node_address)
        worker_group.execute(_set_torch_distributed_env_vars)  # RANK, LOCAL_RANK, WORLD_SIZE, ...
        ray.get([
            worker_group.execute_single_async(i, _join_process_group, backend=backend, world_rank=i,
                                              world_size=len(worker_group), address=address, port=port,
                                              timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))
        ])


@dataclass
class NodeAddressTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous listens on the node's address only (see above)."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _NodeAddressTorchBackend
