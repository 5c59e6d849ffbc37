"""KubeRay manifests, checked as strictly as works offline.

No KubeRay CRD schema ships in a package here, so: every pod template is validated strictly
against the Kubernetes OpenAPI schema (kubernetes-validate, as a PodTemplate: a misspelt container
field fails), and the Ray-specific fields against the field names of KubeRay's ray.io/v1 API.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import ray
import tomllib
import yaml

K8S_VERSION = "1.33.0"
KUBERAY = Path("cluster/kuberay")


def fields(names: str) -> set[str]:
    return set(names.split())


# Field names of KubeRay's ray.io/v1 API (RayCluster, RayJob), KubeRay 1.1 - 1.5.
RAY_CLUSTER_SPEC = fields(
    """headGroupSpec workerGroupSpecs rayVersion enableInTreeAutoscaling autoscalerOptions
    headServiceAnnotations suspend managedBy gcsFaultToleranceOptions upgradeStrategy
    authOptions"""
)
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = fields(
    """groupName replicas minReplicas maxReplicas numOfHosts rayStartParams template
    scaleStrategy idleTimeoutSeconds suspend"""
)
AUTOSCALER = fields(
    """resources image imagePullPolicy env envFrom volumeMounts securityContext
    idleTimeoutSeconds upscalingMode version"""
)
RAY_JOB_SPEC = fields(
    """entrypoint runtimeEnvYAML clusterSelector rayClusterSpec submissionMode
    submitterPodTemplate submitterConfig shutdownAfterJobFinishes ttlSecondsAfterFinished
    activeDeadlineSeconds backoffLimit jobId metadata entrypointNumCpus entrypointNumGpus
    entrypointResources suspend managedBy deletionStrategy"""
)


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def check_keys(where: str, mapping: dict, allowed: set[str]) -> None:
    unknown = set(mapping) - allowed
    assert not unknown, f"{where}: unknown field(s) {sorted(unknown)}"


def check_pod_template(where: str, template: dict) -> None:
    resource = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "t"},
        "template": template,
    }
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{where}: {e.message}") from None


def validate_raycluster(doc: dict) -> None:
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = doc["spec"]
    check_keys("spec", spec, RAY_CLUSTER_SPEC)
    check_keys("spec.autoscalerOptions", spec.get("autoscalerOptions", {}), AUTOSCALER)
    check_keys("spec.headGroupSpec", spec["headGroupSpec"], HEAD_GROUP)
    check_pod_template("spec.headGroupSpec.template", spec["headGroupSpec"]["template"])
    for i, group in enumerate(spec["workerGroupSpecs"]):
        check_keys(f"spec.workerGroupSpecs[{i}]", group, WORKER_GROUP)
        check_pod_template(f"spec.workerGroupSpecs[{i}].template", group["template"])


def validate_rayjob(doc: dict) -> None:
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    check_keys("spec", doc["spec"], RAY_JOB_SPEC)
    check_pod_template("spec.submitterPodTemplate", doc["spec"]["submitterPodTemplate"])
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    templates = [
        spec["headGroupSpec"]["template"],
        *(g["template"] for g in spec["workerGroupSpecs"]),
    ]
    return [c for t in templates for c in t["spec"]["containers"]]


def test_manifests_validate():
    validate_raycluster(load("raycluster.yaml"))
    validate_rayjob(load("rayjob.yaml"))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"].update(enableInTreeAutoscalling=True),
        lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=0),
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            resource={}
        ),
        lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"].update(tolerations="gpu"),
    ],
)
def test_a_typo_fails_validation(mutate):
    doc = copy.deepcopy(load("raycluster.yaml"))
    mutate(doc)
    with pytest.raises(AssertionError):
        validate_raycluster(doc)


def test_gpu_workers_scale_from_zero_and_the_head_trains_nothing():
    spec = load("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # never a LoadBalancer
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_token_auth_from_a_secret_on_every_pod():
    cluster, job = load("raycluster.yaml"), load("rayjob.yaml")
    pods = containers(cluster) + job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for container in pods:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], container[
            "name"
        ]  # never a literal


def dockerfile() -> list[str]:
    return [line for line in (KUBERAY / "Dockerfile").read_text().splitlines() if line.strip()]


def test_same_ray_version_as_the_laptop():
    cluster, job = load("raycluster.yaml"), load("rayjob.yaml")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    base = next(line.split()[1] for line in dockerfile() if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")
    assert base == yaml.safe_load(Path("cluster.yaml").read_text())["docker"]["image"]
    for container in containers(cluster):  # the image built from that Dockerfile
        assert container["image"].startswith("YOUR-REGISTRY/rayft:"), container["name"]
        assert f"-ray{ray.__version__}-" in container["image"], container["name"]
    for container in job["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        assert container["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def test_the_image_is_set_up_like_a_cluster_node_with_no_fallback():
    lines = dockerfile()
    assert lines[-1] == "RUN bash cluster/setup_node.sh /home/ray/rayft"  # fails on a failed extra
    assert not any("||" in line for line in lines)
    copied = {line.split()[-2] for line in lines if line.startswith("COPY ")}
    pyproject = tomllib.loads(Path("pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages | {"requirements"} <= copied  # what `pip install -e` and the set-up read
