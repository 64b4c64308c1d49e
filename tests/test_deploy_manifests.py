"""deploy/k8s: valid against the Kubernetes schemas (offline, kubernetes-validate); each pod runs `rtpipe
serve` (flags its own parser takes, a config serve_raw builds and validates) with Guaranteed QoS on whole
CPUs, /dev/shm in memory sized to the rings, scrape annotations, liveness from /healthz, readiness from
/api/ready on the chat port behind a Service, the auth token from a mounted Secret, a drain that fits the
grace period, and a GPU request exactly where the config puts a stage on a GPU."""

import os
import sys
import tomllib
from pathlib import PurePosixPath

import kubernetes_validate
import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))
import deploy_support as support

MANIFESTS = sorted((support.DEPLOY / "k8s").glob("*.yaml"))
PIPELINES = [p for p in MANIFESTS if p.name.startswith("serve-")]
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


def _service(path):
    return next(doc for doc in _docs(path) if doc["kind"] == "Service")


def _container(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _served(path, tmp_path, memory_bytes=support.HOST_MEMORY_BYTES):
    """(validated config, {stage: device}, serve's parsed arguments): what the pod's command would run."""
    config_map, deployment = _pipeline(path)
    container = _container(deployment)
    return support.served_config(container["args"], config_map["data"]["pipeline.toml"], tmp_path, memory_bytes)


def test_there_is_a_cpu_and_a_gpu_pipeline():
    assert {p.name for p in PIPELINES} == {"serve-cpu.yaml", "serve-gpu.yaml"}


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
    _, deployment = _pipeline(path)
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    dshm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert dshm["medium"] == "Memory"
    config, _, _ = _served(path, tmp_path)  # the rings of serve's pipeline: a row per session, the reply ring
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
    args = support.serve_arguments(container["args"])  # `rtpipe serve`'s own parser takes them
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
    _, deployment = _pipeline(path)
    _, devices, _ = _served(path, tmp_path)
    gpus_used = {d for d in devices.values() if d.startswith("cuda:")}
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
    assert gpus == len(gpus_used)
    assert int(resources["requests"].get("nvidia.com/gpu", 0)) == gpus
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(":cuda" if gpus else ":cpu")


def _image_entrypoint_program() -> str:
    import json

    for line in reversed((support.DEPLOY / "Dockerfile").read_text().splitlines()):
        if line.startswith("ENTRYPOINT"):
            return json.loads(line.partition(" ")[2])[0]
    raise AssertionError("deploy/Dockerfile has no ENTRYPOINT")


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pod_serves_the_config_map_pipeline_over_the_network(path, tmp_path):
    config, _, args = _served(path, tmp_path)
    container = _container(_pipeline(path)[1])
    # the image's own rtpipe (its entrypoint's program), told to serve rather than run
    assert container["command"] == [_image_entrypoint_program(), "serve"]
    assert args.host == "0.0.0.0" and args.port == 8998
    assert args.sessions and config.sessions == args.sessions > 1, "a server pod carries several conversations"
    # serve stands its network edge in for the ConfigMap's source and playback.null for its sink; the
    # stages between are the ConfigMap's own
    config_map, _ = _pipeline(path)
    written = tomllib.loads(config_map["data"]["pipeline.toml"])["stages"]
    assert [s.name for s in config.stages] == list(written)
    assert [s.kind for s in config.stages[1:-1]] == [stage["kind"] for stage in list(written.values())[1:-1]]
    assert (config.stages[0].kind, config.stages[-1].kind) == ("network.edge", "playback.null")
    edge = config.stages[0].params_raw
    assert (edge["host"], edge["port"]) == ("0.0.0.0", args.port) and edge["auth_token_file"]


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_service_sends_the_chat_port_to_the_deployments_pods(path):
    _, deployment = _pipeline(path)
    service = _service(path)
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector and selector.items() <= labels.items(), "the Service selects none of the Deployment's pods"
    assert selector == deployment["spec"]["selector"]["matchLabels"]  # and no other Deployment's
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    container = _container(deployment)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = support.serve_arguments(container["args"])
    assert container_ports["chat"] == args.port and container_ports["metrics"] == args.metrics_port
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["chat"]["targetPort"] == "chat" and service_ports["chat"]["port"] == args.port
    assert service_ports["metrics"]["targetPort"] == "metrics"


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_readiness_is_a_free_slot_on_the_chat_port(path):
    container = _container(_pipeline(path)[1])
    readiness = container["readinessProbe"]
    # /api/ready: 200 while a session slot is free, 503 when all are taken (stages/network/server.py)
    assert readiness["httpGet"] == {"path": "/api/ready", "port": "chat"}
    # a full pod leaves the endpoints at its first 503, not after several
    assert readiness.get("failureThreshold", 3) == 1
    # liveness stays with the supervisor's ticks: a full pod is busy, not broken
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_auth_token_is_the_mounted_secret(path):
    _, deployment = _pipeline(path)
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    args = support.serve_arguments(container["args"])
    assert args.auth_token_file and not args.no_auth, "a pod listening on 0.0.0.0 must ask for a token"
    token = PurePosixPath(args.auth_token_file)
    mounts = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"]}
    mount = mounts[token.parent]
    assert mount.get("readOnly") is True
    secret = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["secret"]
    assert secret["secretName"]
    keys = {item["path"]: item["key"] for item in secret.get("items", [])}
    assert keys.get(token.name, token.name) == "token", f"{token} is not the Secret's `token` key"
    # the pod's user (not root) reads it: group-readable, the pod's fsGroup owning it
    assert secret["defaultMode"] & 0o040 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_grace_period_holds_the_drain_after_sigterm(path, tmp_path):
    from rtpipe.pipeline.runtime.supervisor import EXIT_GRACE_S

    config, _, _ = _served(path, tmp_path)
    _, deployment = _pipeline(path)
    pod = deployment["spec"]["template"]["spec"]
    pre_stop = _container(deployment).get("lifecycle", {}).get("preStop", {})
    pre_stop_s = int(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else 0
    # the grace period runs from the preStop hook; then the end of stream may take stop_timeout_s to reach
    # the sink and the stages EXIT_GRACE_S to exit, before the kubelet's SIGKILL would leave rings behind
    drain_s = pre_stop_s + config.supervisor.stop_timeout_s + EXIT_GRACE_S
    assert pod["terminationGracePeriodSeconds"] >= 2 * drain_s


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_memory_limit_holds_what_the_stages_ask_for(path, tmp_path):
    # each model stage refuses to start (exit 2, one line) unless its weights, its sessions' state and the
    # checkpoint read whole while loading fit in what the pod's cgroup leaves: less the tmpfs volumes
    _, deployment = _pipeline(path)
    pod = deployment["spec"]["template"]["spec"]
    tmpfs = sum(_bytes(v["emptyDir"]["sizeLimit"]) for v in pod["volumes"] if v.get("emptyDir", {}).get("medium"))
    limit = _bytes(_container(deployment)["resources"]["limits"]["memory"])
    config, _, _ = _served(path, tmp_path, memory_bytes=limit - tmpfs)
    assert config.sessions > 1
