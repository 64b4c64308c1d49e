"""deploy/Dockerfile installs and runs exactly as README's quick start says, for the CPU and CUDA variants,
and its build context leaves a host's .venv out."""

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(__file__))
import deploy_support as support


def _instructions():
    """[(stage name, INSTRUCTION, argument text)] with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in (support.DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    out, stage = [], None
    for line in lines:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
        out.append((stage, word, rest.strip()))
    return out


def _commands(shell_text: str) -> list[str]:
    return [" ".join(shlex.split(part)) for part in shell_text.split("&&")]


def _exec_form(text: str) -> str:
    import json

    return " ".join(json.loads(text))


def test_image_installs_and_runs_with_readmes_commands():
    (setup, run), (setup_test, test) = support.readme_commands()
    assert (setup, run) == ("bash deploy/setup.sh", ".venv/bin/rtpipe run")
    instructions = _instructions()
    last_stage = instructions[-1][0]
    runs = {
        stage: [c for s, w, text in instructions if s == stage and w == "RUN" for c in _commands(text)]
        for stage in {s for s, _, _ in instructions}
    }
    assert setup in runs[last_stage], f"the default image does not run README's `{setup}`"
    entrypoint = [text for s, w, text in instructions if s == last_stage and w == "ENTRYPOINT"]
    assert entrypoint and _exec_form(entrypoint[-1]) == run
    assert setup_test in runs["test"], f"the test image does not run README's `{setup_test}`"
    test_cmd = [text for s, w, text in instructions if s == "test" and w == "CMD"]
    assert test_cmd and _exec_form(test_cmd[-1]) == test


def test_setup_runs_in_the_copied_repository_root():
    instructions = _instructions()
    source = [(w, text) for s, w, text in instructions if s == "source"]
    assert ("WORKDIR", "/opt/rtpipe") in source and ("COPY", ". .") in source
    # the run and test images both build on that copy
    froms = {s: text.split()[0] for s, w, text in instructions if w == "FROM"}
    assert froms["runtime"] == froms["test"] == "source"


def test_cpu_and_cuda_variants_by_build_argument():
    instructions = _instructions()
    args = [text for s, w, text in instructions if w == "ARG" and s is None]
    assert "VARIANT=cpu" in args
    froms = {s: text for s, w, text in instructions if w == "FROM"}
    assert froms["source"].split()[0] == "base-${VARIANT}"
    assert {"base-cpu", "base-cuda"} <= set(froms)
    env = {s: text for s, w, text in instructions if w == "ENV" and s in ("base-cpu", "base-cuda")}
    assert env["base-cpu"].endswith("/whl/cpu") and "/whl/cu" in env["base-cuda"]
    # setup.sh makes its venv with the system python3: the CUDA base must install it with venv
    assert "python3 -m venv .venv" in (support.DEPLOY / "setup.sh").read_text()
    cuda_runs = " ".join(text for s, w, text in instructions if s == "base-cuda" and w == "RUN")
    assert "python3-venv" in cuda_runs


def test_build_context_leaves_a_hosts_venv_out():
    ignored = [
        line.strip()
        for line in (support.DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".venv" in ignored and ".git" in ignored
    assert "!stages/data/*.wav" in ignored  # the built-in speech sample stays in


def test_image_user_is_the_one_the_pods_run_as():
    instructions = _instructions()
    user = [text for s, w, text in instructions if s == "runtime" and w == "USER"][-1]
    pods = _pod_specs()
    for pod in pods:
        pod_security = pod["securityContext"]
        assert user == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
        assert pod_security["runAsNonRoot"] is True


def test_image_exposes_the_ports_the_pods_serve_on():
    instructions = _instructions()
    exposed = {
        int(port.split("/")[0])
        for s, w, text in instructions
        if s == "runtime" and w == "EXPOSE"
        for port in text.split()
    }
    for pod in _pod_specs():
        assert {p["containerPort"] for p in pod["containers"][0]["ports"]} <= exposed


def _pod_specs() -> list[dict]:
    """The pod templates of deploy/k8s's Deployments (one per serve-*.yaml)."""
    import yaml

    paths = sorted((support.DEPLOY / "k8s").glob("serve-*.yaml"))
    assert paths, "deploy/k8s has no serve-*.yaml"
    pods = []
    for path in paths:
        deployment = next(d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "Deployment")
        pods.append(deployment["spec"]["template"]["spec"])
    return pods
