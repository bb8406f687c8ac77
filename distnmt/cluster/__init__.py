"""Ray for a distnmt run, and the local clusters of ``distnmt cluster`` (the orchestration
layer, above train/ and evaluate/):

- run.py: ``start_or_join(cfg, run_dir)``, what ``distnmt train`` does before training
  (join the given cluster, or start a local one on 127.0.0.1 sized for one machine);
- logs.py: Ray's informational lines to the run's log file, the rest to the console;
- procs.py: process trees from /proc (memory, listening sockets), a local cluster's
  processes found by marker and stopped by process id;
- jobs.py: what a ``ray job submit`` of distnmt carries (runtime_env, absolute paths);
- commands.py: ``distnmt cluster start|add-node|stop|submit|logs|stop-job|env|pids``.

Ray is imported inside the functions that need it: the cluster commands start fast,
and importing this package costs nothing.
"""

from distnmt.cluster.commands import add_parser, main
from distnmt.cluster.jobs import DEFAULT_PASSTHROUGH, WORKING_DIR_EXCLUDES, ClusterError, job_paths, runtime_env
from distnmt.cluster.logs import is_ray_info
from distnmt.cluster.procs import (
    MARKER_VAR,
    cluster_pids,
    is_loopback,
    listening_sockets,
    process_tree,
    stop_cluster,
    stop_marked,
    tree_memory,
)
from distnmt.cluster.run import (
    LOOPBACK,
    NAMESPACE,
    RayHandle,
    free_ports,
    ray_log_path,
    route_local_mode_logs,
    run_env_vars,
    start_local,
    start_or_join,
)

__all__ = [
    "DEFAULT_PASSTHROUGH", "LOOPBACK", "MARKER_VAR", "NAMESPACE", "WORKING_DIR_EXCLUDES", "ClusterError", "RayHandle",
    "add_parser", "cluster_pids", "free_ports", "is_loopback", "is_ray_info", "job_paths", "listening_sockets", "main",
    "process_tree", "ray_log_path", "route_local_mode_logs", "run_env_vars", "runtime_env", "start_local",
    "start_or_join", "stop_cluster", "stop_marked",
    "tree_memory",
]
