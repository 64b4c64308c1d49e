"""deploy/k8s: valid against the Kubernetes schemas (offline, kubernetes-validate), one pipeline per pod
with Guaranteed QoS on whole CPUs, /dev/shm in memory sized to the rings, scrape annotations, liveness
from /healthz, a GPU request exactly where the config puts a stage on a GPU."""

import os
import sys

import kubernetes_validate
import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))
import deploy_support as support

MANIFESTS = sorted((support.DEPLOY / "k8s").glob("*.yaml"))
PIPELINES = [p for p in MANIFESTS if p.name.startswith("pipeline-")]
QUANTITY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def _docs(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _bytes(quantity: str) -> int:
    for suffix, scale in QUANTITY.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * scale
    return int(quantity)


def _pipeline(path):
    docs = {doc["kind"]: doc for doc in _docs(path)}
    return docs["ConfigMap"], docs["Deployment"]


def test_there_is_a_cpu_and_a_gpu_pipeline():
    assert {p.name for p in PIPELINES} == {"pipeline-cpu.yaml", "pipeline-gpu.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema_offline(path):
    version = kubernetes_validate.latest_version()
    for doc in _docs(path):
        # strict: an unknown or misspelt field fails; a kind without a schema raises, never passes quietly
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_a_misspelt_field():
    _, deployment = _pipeline(PIPELINES[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pod_is_guaranteed_qos_with_whole_cpus(path):
    _, deployment = _pipeline(path)
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        resources = container["resources"]
        for key in ("cpu", "memory"):
            assert resources["requests"][key] == resources["limits"][key], (container["name"], key)
        cpu = str(resources["limits"]["cpu"])
        assert cpu.isdigit() and int(cpu) >= 1, f"cpu {cpu}: the static CPU manager needs whole CPUs"


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_dev_shm_is_memory_backed_and_holds_the_rings(path, tmp_path):
    config_map, deployment = _pipeline(path)
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    dshm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert dshm["medium"] == "Memory"
    config, _ = support.validated_config(config_map["data"]["pipeline.toml"], tmp_path)
    rings = support.ring_bytes(config)
    assert rings <= _bytes(dshm["sizeLimit"]), f"rings take {rings} bytes, /dev/shm holds {dshm['sizeLimit']}"
    # a tmpfs counts toward the pod's memory: the limit must hold it
    memory_limit = _bytes(pod["containers"][0]["resources"]["limits"]["memory"])
    assert _bytes(dshm["sizeLimit"]) < memory_limit // 8


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_metrics_are_served_scraped_and_probed_on_one_port(path):
    _, deployment = _pipeline(path)
    template = deployment["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    container = template["spec"]["containers"][0]
    args = support.run_arguments(container["args"])  # `rtpipe run`'s own parser takes them
    assert args.metrics_host == "0.0.0.0" and args.no_live and args.config == "/etc/rtpipe/pipeline.toml"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"] == args.metrics_port
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_volume = {v["name"]: v for v in template["spec"]["volumes"]}[mounts["/etc/rtpipe"]]
    config_map, _ = _pipeline(path)
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_gpu_is_requested_exactly_when_a_stage_runs_on_one(path, tmp_path):
    config_map, deployment = _pipeline(path)
    _, devices = support.validated_config(config_map["data"]["pipeline.toml"], tmp_path)
    gpus_used = {d for d in devices.values() if d.startswith("cuda:")}
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
    assert gpus == len(gpus_used)
    assert int(resources["requests"].get("nvidia.com/gpu", 0)) == gpus
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(":cuda" if gpus else ":cpu")
