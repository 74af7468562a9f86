"""Cluster configs (cluster/): launcher YAMLs pass Ray's own schema, KubeRay manifests fit the
package (entrypoint, Serve args) and the CRDs, and no file holds a credential.

Offline and fast: nothing is launched, applied or deployed. A launcher is any cluster/*.yaml
with a `provider:`; the cloud ones (not local / fake) must also be deployable: a head that
schedules nothing, autoscaling GPU workers, an idle timeout, llada-ray installed on every node.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.providers import _DEFAULT_CONFIGS
from ray.autoscaler._private.util import prepare_config, validate_config

from llada_ray.config import ServeConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
LOCAL_PROVIDERS = {"local", "fake_multinode", "fake_multinode_docker", "readonly"}
SERVE_APP = "llada_ray.serve.app:build"
GPU = "nvidia.com/gpu"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _is_launcher(path: Path) -> bool:
    raw = _yaml(path)
    return isinstance(raw, dict) and "provider" in raw


LAUNCHERS = sorted(p for p in CLUSTER.glob("*.yaml") if _is_launcher(p))
CLOUD_LAUNCHERS = [p for p in LAUNCHERS if _yaml(p)["provider"]["type"] not in LOCAL_PROVIDERS]
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _name(path: Path) -> str:
    return str(path.relative_to(CLUSTER))


def built_image() -> str:
    """The tag cluster/Dockerfile's build command gives its image (what the manifests run)."""
    found = re.search(r"docker build .*-t (\S+)", (CLUSTER / "Dockerfile").read_text())
    assert found is not None
    return found[1]


# --- Ray cluster launcher ---------------------------------------------------------------------


def _launchable(provider: str) -> bool:
    """`ray up` can fill in this provider's defaults (the fake provider ships none)."""
    loader = _DEFAULT_CONFIGS.get(provider)
    return loader is not None and Path(loader()).is_file()


def ray_validate(raw: dict) -> None:
    """Ray's checks: its JSON schema on the file as written (as the autoscaler reads it), then,
    for a provider `ray up` launches, what `ray up` runs before it contacts the cloud."""
    jsonschema.validate(raw, RAY_SCHEMA)
    if _launchable(raw["provider"]["type"]):
        validate_config(prepare_config(copy.deepcopy(raw)))


def test_launchers_found() -> None:
    assert {"aws.yaml", "gcp.yaml"} <= {p.name for p in CLOUD_LAUNCHERS}


@pytest.mark.parametrize("path", LAUNCHERS, ids=_name)
def test_launcher_passes_ray_schema(path: Path) -> None:
    raw = _yaml(path)
    ray_validate(raw)
    assert raw["head_node_type"] in raw["available_node_types"]


@pytest.mark.parametrize("path", CLOUD_LAUNCHERS, ids=_name)
def test_cloud_launcher_is_deployable(path: Path) -> None:
    raw = _yaml(path)
    assert _launchable(raw["provider"]["type"]), "Ray's full validation must run on it"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not schedule tasks"
    assert not head["resources"].get("GPU")
    assert raw["idle_timeout_minutes"] > 0

    workers = {k: t for k, t in types.items() if k != raw["head_node_type"]}
    gpu_types = {k: t for k, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, node_type in gpu_types.items():
        assert node_type["max_workers"] > node_type.get("min_workers", 0), f"{name} cannot scale"

    docker = raw["docker"]
    assert docker["container_name"]
    # Ray's GPU image at our ray version plus setup commands, or cluster/Dockerfile's image.
    stock = rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu"
    if not re.fullmatch(stock, docker["image"]):
        assert docker["image"] == built_image()
        return
    # The requirement itself (llada-ray, llada-ray[gpu] @ git+…), not just the repository's URL.
    installs = re.compile(r"pip install\b.*?[\s\"']llada-ray(\[[\w,]+\])?(\s*@|[=<>~!]=|[\s\"']|$)")
    common = raw.get("setup_commands", [])
    per_node = {raw["head_node_type"]: [*common, *raw.get("head_setup_commands", [])]}
    for name, node_type in workers.items():
        # A node type's own worker_setup_commands replace the common lists (Ray's schema).
        default = [*common, *raw.get("worker_setup_commands", [])]
        per_node[name] = node_type.get("worker_setup_commands", default)
    for name, commands in per_node.items():
        assert any(installs.search(c) for c in commands), f"{name}: llada-ray is not installed"


def _set(raw: dict, path: tuple[str, ...], value: object) -> None:
    for key in path[:-1]:
        raw = raw[key]
    raw[path[-1]] = value


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("idle_timeout_minute",), 10),  # misspelled top-level key
        (("max_workers",), "eight"),
        (("docker", "imagee"), "rayproject/ray"),
        (("available_node_types", "gpu_train", "min_worker"), 0),
        (("available_node_types", "gpu_train", "resources", "GPU"), 0.5),
        (("available_node_types", "head", "node_config"), "m6i.2xlarge"),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else None,
)
def test_ray_schema_rejects_broken_launcher(path: tuple[str, ...], value: object) -> None:
    raw = _yaml(CLUSTER / "aws.yaml")
    ray_validate(copy.deepcopy(raw))  # the file itself passes: the edit is what fails
    _set(raw, path, value)
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(raw)


# --- KubeRay manifests ------------------------------------------------------------------------

# Spec fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1, operator 1.1 – 1.5): a key
# outside them is a typo the API server would drop (e.g. RayService's rayClusterConfig).
SPEC_KEYS = {
    "RayCluster": {
        "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
        "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
        "gcsFaultToleranceOptions", "upgradeStrategy", "authOptions", "networkPolicy",
        "tlsOptions", "historyServerOptions",
    },
    "RayJob": {
        "entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "submissionMode",
        "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
        "backoffLimit", "submitterPodTemplate", "submitterConfig", "metadata", "managedBy",
        "deletionStrategy", "jobId", "entrypointResources", "entrypointNumCpus",
        "entrypointNumGpus", "suspend", "schedule",
    },
    "RayService": {
        "serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
        "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds",
        "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
    },
}  # fmt: skip
AUTOSCALER_KEYS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
    "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args",
}  # fmt: skip
HEAD_GROUP_KEYS = {
    "template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
    "rayStartParams", "serviceType",
}  # fmt: skip
WORKER_GROUP_KEYS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
    "template", "scaleStrategy", "idleTimeoutSeconds", "priority", "resources", "labels",
    "suspend",
}  # fmt: skip


def _documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in MANIFESTS:
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


DOCUMENTS = _documents()


def _doc_id(item: tuple[Path, dict]) -> str:
    return f"{_name(item[0])}:{item[1].get('kind')}"


def _of_kind(kind: str) -> list[dict]:
    return [d for _, d in DOCUMENTS if d.get("kind") == kind]


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside any of the three kinds."""
    field = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    spec = doc["spec"]
    return spec if field[doc["kind"]] is None else spec[field[doc["kind"]]]


def _groups(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def _containers(group: dict) -> list[dict]:
    pod = group["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def _gpus(group: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in _containers(group)
    )


def gpu_capacity(spec: dict) -> int:
    """GPUs the cluster can reach at its largest."""
    return sum(_gpus(g) * g["maxReplicas"] for g in spec.get("workerGroupSpecs", []))


def test_manifests_found() -> None:
    assert {d["kind"] for _, d in DOCUMENTS} >= {"RayCluster", "RayJob", "RayService"}


@pytest.mark.parametrize("item", DOCUMENTS, ids=_doc_id)
def test_manifest_is_kuberay_v1(item: tuple[Path, dict]) -> None:
    _, doc = item
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in SPEC_KEYS
    # Pods and services are named after it plus suffixes: a short DNS label.
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?", doc["metadata"]["name"])
    assert set(doc["spec"]) <= SPEC_KEYS[doc["kind"]]


@pytest.mark.parametrize("item", DOCUMENTS, ids=_doc_id)
def test_manifest_cluster_autoscales_gpus(item: tuple[Path, dict]) -> None:
    _, doc = item
    spec = cluster_spec(doc)
    assert set(spec) <= SPEC_KEYS["RayCluster"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert set(options) <= AUTOSCALER_KEYS
    assert options["idleTimeoutSeconds"] > 0
    assert options.get("upscalingMode", "Default") in {"Default", "Aggressive", "Conservative"}

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_KEYS
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must not schedule tasks"
    assert _gpus(head) == 0

    workers = spec["workerGroupSpecs"]
    assert all(set(g) <= WORKER_GROUP_KEYS for g in workers)
    gpu_groups = [g for g in workers if _gpus(g) >= 1]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        low, high = group["minReplicas"], group["maxReplicas"]
        assert low < high, f"{group['groupName']} cannot scale"
        assert low <= group.get("replicas", low) <= high
        mounts = [m["mountPath"] for c in _containers(group) for m in c.get("volumeMounts", [])]
        assert "/dev/shm" in mounts, "NCCL needs more than the 64 MB default /dev/shm"

    images = {c["image"] for _, g in _groups(spec) for c in _containers(g)}
    assert images == {built_image()}
    assert not built_image().endswith(":latest") and ":" in built_image()


def test_dockerfile_matches_ray() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base is not None
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", base[1])
    assert re.search(r"pip install .*-c constraints\.txt", text)


def test_rayjob_runs_the_pipeline() -> None:
    (job,) = _of_kind("RayJob")
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"]
    assert (ROOT / argv[1]).is_file()
    config = ROOT / argv[argv.index("--config") + 1]
    assert config.parent == ROOT / "configs" and config.is_file()
    cfg = load_config(config)
    # A job runs in a temporary copy of its working directory: nothing may stay on the pods.
    assert cfg.storage.root.startswith("s3://")
    assert cfg.tracking.uri.startswith(("http://", "https://"))
    if cfg.scaling.use_gpu:
        assert gpu_capacity(cluster_spec(job)) >= cfg.scaling.num_workers


def test_rayservice_deploys_the_serve_app() -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    (service,) = _of_kind("RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what `serve deploy` accepts
    (app,) = serve_config["applications"]
    assert app["import_path"] == SERVE_APP
    module, _, attr = app["import_path"].partition(":")
    build: Callable[[dict], Application] = getattr(importlib.import_module(module), attr)

    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.model.startswith("s3://"), "the replicas read the model from storage"
    assert isinstance(build(app["args"]), Application)  # builds; nothing deploys
    spec = cluster_spec(service)
    assert cfg.autoscaling.max_replicas * cfg.num_gpus <= gpu_capacity(spec)

    # Every worker pod a replica can land on (the head has no CPUs) sets the key, from a Secret
    # that must exist: with the variable unset the app serves without authentication.
    for group in spec["workerGroupSpecs"]:
        if _gpus(group) < cfg.num_gpus:
            continue
        env = {e["name"]: e for c in _containers(group) for e in c.get("env", [])}
        assert cfg.api_key_env in env, f"{group['groupName']}: replicas would serve without a key"
        ref = env[cfg.api_key_env]["valueFrom"]["secretKeyRef"]
        assert not ref.get("optional", False)


# --- no credentials in any file ---------------------------------------------------------------

LITERAL_SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}"),
    re.compile(r"(?i)\bpassword\s*[=:]\s*['\"]?[^\s'\"{}$]+"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(ghp|gho|github_pat|hf)_[A-Za-z0-9_]{20,}"),
    # A secret handed to a container or shell as a literal (docker run_options, commands).
    re.compile(r"(?i)(--env\s+|-e\s+|export\s+)\w*(key|secret|token|password)\w*=[^\s$]"),
]
SECRET_KEY = re.compile(
    r"(?i)(aws_)?(secret_access_key|access_key_id|session_token)|password|passwd|api_?key"
    r"|token|secret|credentials?"
)
SECRET_ENV = re.compile(r"(?i)key|secret|token|password|credential")


def literal_secrets(text: str) -> list[str]:
    return [m[0] for pattern in LITERAL_SECRETS for m in pattern.finditer(text)]


def secret_values(node: object, where: str = "") -> Iterator[str]:
    """Mapping keys named like a secret that hold a literal; embedded YAML strings included."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}"
            if SECRET_KEY.fullmatch(str(key)) and isinstance(value, str | int) and value != "":
                yield path
            if key in ("serveConfigV2", "runtimeEnvYAML") and isinstance(value, str):
                value = yaml.safe_load(value)
            yield from secret_values(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from secret_values(value, f"{where}.{i}")


def literal_secret_env(node: object) -> Iterator[str]:
    """Env vars named like a secret (any `env:` list) not taken from a Secret."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                for var in value:
                    source = var.get("valueFrom", {}).get("secretKeyRef", {})
                    secret = SECRET_ENV.search(var["name"])
                    if secret and ("value" in var or not {"name", "key"} <= set(source)):
                        yield var["name"]
            yield from literal_secret_env(value)
    elif isinstance(node, list):
        for value in node:
            yield from literal_secret_env(value)


CLUSTER_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=_name)
def test_no_literal_credentials(path: Path) -> None:
    text = path.read_text()
    assert not literal_secrets(text)
    if path.suffix == ".yaml":
        for doc in yaml.safe_load_all(text):
            assert not list(secret_values(doc))
            assert not list(literal_secret_env(doc))


def test_credential_checks_catch_literals() -> None:
    key_id = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example, split to stay unflagged
    assert literal_secrets(f"run_options: [--env AWS_ACCESS_KEY_ID={key_id}]")
    assert literal_secrets("aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" * 2)
    assert literal_secrets("password: hunter2")
    assert literal_secrets("run_options: [--env LLADA_RAY_API_KEY=sk-123]")
    assert not literal_secrets("run_options: [--env AWS_DEFAULT_REGION=us-west-2]")
    assert not literal_secrets("secretKeyRef: {name: llada-ray, key: MLFLOW_TRACKING_PASSWORD}")
    assert list(secret_values({"spec": {"serveConfigV2": "args: {api_key: sk-123}"}}))
    assert not list(secret_values({"args": {"api_key_env": "LLADA_RAY_API_KEY"}}))
    env = [
        {"name": "LLADA_RAY_API_KEY", "value": "sk-123"},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s"}}},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "AWS_DEFAULT_REGION", "value": "us-west-2"},
    ]
    found = list(literal_secret_env({"containers": [{"env": env}]}))
    assert found == ["LLADA_RAY_API_KEY", "AWS_SECRET_ACCESS_KEY"]
