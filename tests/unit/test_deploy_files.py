"""The deployment files agree with each other, with the CLI and with docs/operations.md.

Static checks only: scripts/docker-smoke builds and runs the image for real.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from sidecar.cli import build_parser
from sidecar.config import load_config, parse_config, parse_duration, parse_host_port

ROOT = Path(__file__).resolve().parents[2]
PROXY_PORT, ADMIN_PORT, DEMO_PORT = 8088, 8089, 8090
CONFIG_IN_IMAGE = "/etc/sidecar/upstreams.yaml"


# ------------------------------------------------------------------ Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    result = []
    for entry in logical:
        keyword, _, args = entry.strip().partition(" ")
        result.append(Instruction(keyword.upper(), " ".join(args.split())))
    return result


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in stage if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def test_dockerfile_base_image_is_an_argument_and_needs_no_frontend() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE), "no # syntax= line"
    assert "<<" not in text, "no heredocs: the classic builder and old BuildKit do not have them"
    instructions = dockerfile()
    assert instructions[0] == Instruction("ARG", "BASE_IMAGE=python:3.12-slim")
    froms = [ins.args.split()[0] for ins in instructions if ins.keyword == "FROM"]
    assert froms and all(image == "${BASE_IMAGE}" for image in froms)


def test_dockerfile_runtime_stage_is_non_root_unbuffered_with_config_in_etc() -> None:
    stage = final_stage(dockerfile())
    user = one(stage, "USER").args.split(":")[0]
    assert user not in ("", "0", "root")
    env = env_of(stage)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["SIDECAR_CONFIG"] == CONFIG_IN_IMAGE
    copies = [ins.args.split() for ins in stage if ins.keyword == "COPY"]
    assert ["config/upstreams.yaml", CONFIG_IN_IMAGE] in copies
    assert set(one(stage, "EXPOSE").args.split()) == {str(PROXY_PORT), str(ADMIN_PORT)}
    assert one(stage, "STOPSIGNAL").args == "SIGTERM"


def test_dockerfile_command_listens_on_all_interfaces_with_real_cli_flags() -> None:
    stage = final_stage(dockerfile())
    command = exec_form(one(stage, "ENTRYPOINT")) + exec_form(one(stage, "CMD"))
    assert command[0] == "sidecar"  # exec form: the sidecar itself gets SIGTERM
    args = build_parser().parse_args(command[1:])
    assert args.command == "run"
    assert args.listen == parse_host_port(f"0.0.0.0:{PROXY_PORT}")
    assert args.admin == parse_host_port(f"0.0.0.0:{ADMIN_PORT}")


def test_dockerfile_healthcheck_probes_healthz_on_the_admin_port() -> None:
    healthcheck = one(final_stage(dockerfile()), "HEALTHCHECK").args
    test = exec_form(Instruction("CMD", healthcheck.split(" CMD ", 1)[1]))
    assert test[:2] == ["python3", "-c"]  # no curl in a slim image
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in test[2]
    compile(test[2], "<healthcheck>", "exec")


def test_dockerignore_is_a_whitelist_that_keeps_everything_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "start from nothing: no .git, .venv or local files in the context"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for ins in dockerfile():
        if ins.keyword != "COPY" or ins.args.startswith("--from"):
            continue
        for source in ins.args.split()[:-1]:
            source = source.rstrip("/")
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"
            assert (ROOT / source).exists(), source


def test_build_trust_files_are_never_committed() -> None:
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/docker/build-trust/*" in ignore
    probe = ROOT / "deploy/docker/build-trust/ca-certificates.crt"
    result = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", str(probe)], capture_output=True, check=False
    )
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0, "a CA bundle dropped into build-trust/ would not be ignored by git"


# --------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def with_defaults(value: str) -> str:
    """Compose interpolation with nothing set: ${VAR:-default} -> default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_compose_sidecar_mounts_config_read_only_and_publishes_on_loopback_only() -> None:
    sidecar = compose()["services"]["sidecar"]
    assert "./config:/etc/sidecar:ro" in sidecar["volumes"]
    assert str(PurePosixPath(CONFIG_IN_IMAGE).parent) == "/etc/sidecar"
    ports = [with_defaults(p) for p in sidecar["ports"]]
    assert ports == [f"127.0.0.1:{PROXY_PORT}:{PROXY_PORT}", f"127.0.0.1:{ADMIN_PORT}:{ADMIN_PORT}"]
    assert sidecar["init"] is True
    assert sidecar["read_only"] is True and sidecar["cap_drop"] == ["ALL"]
    assert sidecar["build"]["context"] == "."
    assert with_defaults(sidecar["build"]["args"]["BASE_IMAGE"]) == "python:3.12-slim"


def test_compose_healthchecks_match_the_listeners() -> None:
    services = compose()["services"]
    sidecar_test = services["sidecar"]["healthcheck"]["test"]
    assert sidecar_test[0] == "CMD" and f"http://127.0.0.1:{ADMIN_PORT}/healthz" in sidecar_test[-1]
    demo = services["demo"]
    assert f"http://127.0.0.1:{DEMO_PORT}/" in demo["healthcheck"]["test"][-1]
    assert demo["entrypoint"] == ["python3", "-m", "sidecar.demo"]
    assert demo["command"] == [f"0.0.0.0:{DEMO_PORT}"]
    assert demo["init"] is True
    assert demo["image"] == services["sidecar"]["image"]  # the same image


def test_compose_demo_upstream_is_reachable_through_the_shipped_config() -> None:
    services = compose()["services"]
    env = services["sidecar"]["environment"]
    assert env["DEMO_UPSTREAM_URL"] == f"http://demo:{DEMO_PORT}"
    shipped = load_config(ROOT / "config/upstreams.yaml", env={"DEMO_UPSTREAM_URL": env["DEMO_UPSTREAM_URL"]})
    demo = shipped.upstream("demo")
    assert demo is not None and (demo.host, demo.port) == ("demo", DEMO_PORT)
    assert demo.route.path_prefix == "/demo"
    # Without the variable (scripts/run on the host) it is the local demo.
    local = load_config(ROOT / "config/upstreams.yaml", env={}).upstream("demo")
    assert local is not None and (local.host, local.port) == ("127.0.0.1", DEMO_PORT)
    # Stopping the sidecar first lets it drain while the demo still answers.
    assert "demo" in services["sidecar"]["depends_on"]


def test_compose_gives_the_drain_its_full_shutdown_timeout() -> None:
    sidecar = compose()["services"]["sidecar"]
    shipped = load_config(ROOT / "config/upstreams.yaml", env={})
    assert parse_duration(sidecar["stop_grace_period"]) > shipped.shutdown_timeout


# ------------------------------------------------------------------ kubernetes


def kubernetes_documents() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted((ROOT / "deploy/kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), path
            for key in ("apiVersion", "kind", "metadata"):
                assert key in document, f"{path}: {document.get('kind')} has no {key}"
            assert document["metadata"].get("name"), path
            documents.append(document)
    return documents


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in kubernetes_documents() if d["kind"] == kind]


def pod_spec() -> dict[str, Any]:
    (deployment,) = of_kind("Deployment")
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod: dict[str, Any] = spec["template"]["spec"]
    for container in pod.get("initContainers", []) + pod["containers"]:
        assert container["name"] and container["image"]
    return pod


def sidecar_container() -> dict[str, Any]:
    native = [c for c in pod_spec().get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert len(native) == 1, "the sidecar is a native sidecar: an initContainer with restartPolicy: Always"
    return native[0]


def probe_port(container: dict[str, Any], probe: str) -> tuple[str, int]:
    get = container[probe]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    return get["path"], port


def test_kubernetes_sidecar_probes_use_the_admin_endpoints() -> None:
    container = sidecar_container()
    args = build_parser().parse_args(container["args"])
    assert args.command == "run"
    admin_port = args.admin.port
    assert args.admin.host == "0.0.0.0", "the kubelet probes the Pod IP"
    assert probe_port(container, "readinessProbe") == ("/readyz", admin_port)
    assert probe_port(container, "livenessProbe") == ("/healthz", admin_port)
    assert probe_port(container, "startupProbe") == ("/readyz", admin_port)
    assert admin_port == ADMIN_PORT


def test_kubernetes_config_map_is_a_valid_sidecar_config_mounted_where_the_image_reads_it() -> None:
    pod, container = pod_spec(), sidecar_container()
    (config_map,) = of_kind("ConfigMap")
    filename = PurePosixPath(CONFIG_IN_IMAGE).name
    text = config_map["data"][filename]
    variables = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    config = parse_config(text, source="configmap", env={name: "x" for name in variables})
    assert config.upstreams
    # Every ${VAR} comes from the container's environment.
    given = {e["name"] for e in container.get("env", [])}
    assert variables <= given
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("SIDECAR_CONFIG", CONFIG_IN_IMAGE) == CONFIG_IN_IMAGE
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(PurePosixPath(CONFIG_IN_IMAGE).parent)]
    assert "subPath" not in mount, "subPath mounts never see ConfigMap updates: no hot reload"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    # Kubernetes must not kill the sidecar before its drain budget is spent.
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_timeout


def test_kubernetes_app_calls_the_sidecar_on_the_pod_loopback_as_non_root() -> None:
    pod, container = pod_spec(), sidecar_container()
    listen = build_parser().parse_args(container["args"]).listen
    assert listen == parse_host_port(f"127.0.0.1:{PROXY_PORT}")
    urls = [e["value"] for c in pod["containers"] for e in c.get("env", []) if "value" in e]
    assert urls and all(u.startswith(f"http://{listen}/") for u in urls if u.startswith("http"))
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False


# ------------------------------------------------------------ shared limits


def test_the_shared_limits_compose_file_runs_two_sidecars_on_one_redis() -> None:
    document = yaml.safe_load((ROOT / "docker-compose.shared.yml").read_text())
    services = document["services"]
    sidecars = [name for name in services if name.startswith("sidecar-")]
    assert len(sidecars) == 2 and "redis" in services
    mounts = {services[name]["volumes"][0] for name in sidecars}
    (mount,) = mounts
    host, container = mount.split(":")[:2]
    assert container == str(PurePosixPath(CONFIG_IN_IMAGE).parent)
    text = (ROOT / host / "upstreams.yaml").read_text()
    config = parse_config(text, source="compose", env={"REDIS_PASSWORD": "x"})
    assert config.shared is not None and "@redis:6379" in config.shared.redis
    demo = config.upstream("demo")
    assert demo is not None and demo.rate_limit is not None and demo.rate_limit.shared
    for name in sidecars:
        assert "REDIS_PASSWORD" in services[name]["environment"]
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])


def test_the_kubernetes_shared_limits_example_has_replicas_sharing_a_redis_service() -> None:
    path = ROOT / "deploy/kubernetes/shared-limits/orders-shared-limits.yaml"
    documents = list(yaml.safe_load_all(path.read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    service = kinds[("Service", "sidecar-redis")]
    app = kinds[("Deployment", "orders")]
    assert app["spec"]["replicas"] >= 2
    text = kinds[("ConfigMap", "orders-sidecar-shared-config")]["data"]["upstreams.yaml"]
    config = parse_config(text, source="configmap", env={"REDIS_PASSWORD": "x"})
    assert config.shared is not None and service["metadata"]["name"] in config.shared.redis
    (sidecar,) = app["spec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: e for e in sidecar["env"]}
    assert "secretKeyRef" in env["REDIS_PASSWORD"]["valueFrom"]
