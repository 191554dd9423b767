"""The cluster-launcher config and KubeRay manifests parse, carry what their consumers require,
and name entry points that exist in this repository."""

import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types",
                "head_node_type", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in config
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("pip install" in c and "vitad_ray" in c for c in config["setup_commands"])
    validate_config(prepare_config(config))  # Ray's JSON schema, offline


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name, kind):
    doc = yaml.safe_load((REPO / "cluster/kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert doc["metadata"]["name"]
    spec = doc["spec"]["rayClusterSpec"] if kind == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"]
                  .get("nvidia.com/gpu")]
    assert gpu_groups and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
                              for g in spec["workerGroupSpecs"])
    if kind == "RayJob":
        args = shlex.split(doc["spec"]["entrypoint"])
        assert args[0] == "python" and (REPO / args[1]).is_file()
        step = Path(args[1]).stem
        from vitad_ray.cli import build_parser

        build_parser().parse_args([step, *args[2:]])  # the job's arguments are valid


def test_job_entry_points_exist_for_every_step():
    for step in ("embed", "fit", "score", "evaluate"):
        text = (REPO / "jobs" / f"{step}.py").read_text()
        assert f'run("{step}")' in text
