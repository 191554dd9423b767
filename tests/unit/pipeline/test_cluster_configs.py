"""The cluster-launcher config and KubeRay manifests parse, carry what their consumers require,
and name entry points that exist in this repository."""

import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


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
        from vitad_ray.cli.main import build_parser

        build_parser().parse_args([step, *args[2:]])  # the job's arguments are valid


def test_job_entry_points_exist_for_every_step():
    from vitad_ray.pipeline.submit import STEPS, entry_point

    assert set(STEPS) == {"embed", "fit", "score", "evaluate", "serve-deploy"}
    for step in STEPS:
        text = (REPO / entry_point(step)).read_text()
        assert f'run("{step.split("-")[0]}")' in text


def test_rayservice_names_the_serve_app_and_valid_settings():
    import importlib

    from vitad_ray.serve.config import ServeConfig

    doc = yaml.safe_load((REPO / "cluster/kuberay/rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
               for g in cluster["workerGroupSpecs"])
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    cfg = ServeConfig.from_args(app["args"])  # every setting is one the app knows
    assert cfg.model_dir.startswith("/runs/") and cfg.use_gpu is True
    # Ray's own schema for a Serve config accepts it.
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config) if hasattr(
        ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(serve_config)
