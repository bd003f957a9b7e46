"""The install paths a user takes, as the user takes them: the sdist and wheel built by
`python -m build` (the build runs protoc), the server wheel installed (not editable) in a
fresh virtual environment and started as `rerank-server` on a random checkpoint written by
the installed package, and the client wheel in a second venv without torch calling it over
REST, gRPC and the `rerank` CLI; and the same server wheel with every dependency at the floor
of its range in pyproject.toml (a third venv, about a minute more). Slow: a few minutes."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
import venv
import zipfile
from pathlib import Path

import pytest
import requests
import tomllib
from helpers import ROOT, SERVED_MODEL, free_port
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = [pytest.mark.install, pytest.mark.serving, pytest.mark.slow]

TORCH = "torch==2.13.0"  # the Makefile's; from this machine's local wheel where there is one


def run(*args, cwd: Path | None = None, timeout: float = 900, env: dict | None = None) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def make_venv(path: Path) -> Path:
    venv.create(path, with_pip=True)
    return path / "bin"


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    run(sys.executable, "-m", "build", "--outdir", out, ROOT / "client")
    return out


def one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_the_server_wheel_holds_only_its_own_packages_and_the_generated_stubs(dist):
    names = zipfile.ZipFile(one(dist, "rerank_server-*.whl")).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rerank_server", "rerank_kernels"}, top  # nothing generic such as server/ or kernels/
    for needed in ("rerank_server/_proto/rerank_pb2.py", "rerank_server/_proto/rerank_pb2_grpc.py",
                   "rerank_server/_proto/rerank.binpb", "rerank_server/assets/xlm-roberta-tokenizer.json.gz",
                   "rerank_server/assets/bert-uncased-tokenizer.json.gz",
                   "rerank_server/assets/qwen3-tokenizer.json.gz", "rerank_server/assets/qwen3-tokenizer_config.json",
                   "rerank_server/models/registry.py", "rerank_server/models/qwen3.py",
                   "rerank_server/assets/NOTICE.md", "rerank_kernels/attention.py", "rerank_kernels/librerank_cpu.so"):
        assert needed in names, needed
    assert not any("/csrc/" in n for n in names), "the C sources stay in the sdist"
    # a compiled library without a Python ABI: py3-none-<platform>, never py3-none-any
    wheel_name = one(dist, "rerank_server-*.whl").name
    assert "-py3-none-" in wheel_name and not wheel_name.endswith("-any.whl"), wheel_name
    entry_points = zipfile.ZipFile(one(dist, "rerank_server-*.whl")).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "rerank-server = rerank_server.__main__:main" in entry_points


def test_the_sdists_carry_the_proto_and_no_generated_stubs(dist):
    for pattern in ("rerank_server-*.tar.gz", "rerank_client-*.tar.gz"):
        names = tarfile.open(one(dist, pattern)).getnames()
        assert any(n.endswith("proto/rerank/v1/rerank.proto") for n in names), pattern
        assert not any(n.endswith("_pb2.py") for n in names), [n for n in names if n.endswith("_pb2.py")]


def test_the_client_wheel_needs_no_server_and_no_torch(dist):
    wheel = zipfile.ZipFile(one(dist, "rerank_client-*.whl"))
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names if ".dist-info" not in n} == {"rerank_client"}
    metadata = wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = sorted(line.split(":", 1)[1].split(">")[0].split("=")[0].split("<")[0].strip()
                      for line in metadata.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["googleapis-common-protos", "grpcio", "protobuf"], requires
    for name in names:
        if name.endswith(".py"):
            text = wheel.read(name).decode()
            assert "rerank_server" not in text and "import torch" not in text, name


@contextlib.contextmanager
def serving(bin_dir: Path, home: Path):
    """``rerank-server`` of the venv ``bin_dir`` on a tiny checkpoint its own package writes,
    started from a directory holding a server.py and a kernels/ package (a user's project): they
    must not shadow the installed service."""
    work = home / "work"
    (work / "kernels").mkdir(parents=True)
    (work / "server.py").write_text("raise SystemExit('the working directory shadowed the installed package')\n")
    (work / "kernels" / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    checkpoint = work / "checkpoint"
    run(bin_dir / "rerank-server", "checkpoint", "--size", "tiny", "--out", checkpoint, cwd=work)
    http_port, grpc_port = free_port(), free_port()
    log = open(home / "server.log", "w")
    process = subprocess.Popen([bin_dir / "rerank-server", "--model", checkpoint, "--host", "127.0.0.1",
                                "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                "--served-model-name", SERVED_MODEL], cwd=work, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, (home / "server.log").read_text()
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, (home / "server.log").read_text()
        time.sleep(0.2)
    yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "checkpoint": checkpoint, "bin": bin_dir,
           "log": home / "server.log"}
    process.terminate()
    assert process.wait(60) == 0, (home / "server.log").read_text()


@pytest.fixture(scope="module")
def installed_server(dist, tmp_path_factory):
    """The server wheel in a fresh venv, its dependencies at the versions constraints.txt pins
    (as `make` installs them)."""
    home = tmp_path_factory.mktemp("server-venv")
    bin_dir = make_venv(home / "venv")
    run(bin_dir / "pip", "install", "-q", TORCH)
    run(bin_dir / "pip", "install", "-q", "-c", ROOT / "constraints.txt", one(dist, "rerank_server-*.whl"))
    with serving(bin_dir, home) as server:
        yield server


def runtime_requirements() -> list[Requirement]:
    return [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


def floor_constraints() -> dict[str, str]:
    """{name: floor} of every runtime dependency, read from pyproject.toml's ranges (so the
    floors tested can never drift from the floors declared); torch: the one installable here."""
    floors = {}
    for requirement in runtime_requirements():
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert len(lower) == 1 and any(s.operator == "<" for s in requirement.specifier), requirement
        floors[canonicalize_name(requirement.name)] = TORCH.split("==")[1] if requirement.name == "torch" else lower[0]
    return floors


def test_dependencies_are_ranges_and_constraints_pin_a_version_inside_each():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":  # the Makefile's TORCH, installed first
            assert TORCH.split("==")[1] in requirement.specifier and name not in pins
            continue
        assert name in pins and pins[name] in requirement.specifier, (requirement, pins.get(name))
    assert "grpcio-tools" not in {canonicalize_name(r.name) for r in runtime_requirements()}


def test_nothing_imports_grpc_tools_at_run_time():
    """grpcio-tools is a build requirement only (protoc, through CMake)."""
    sources = [p for d in ("server", "kernels", "client/rerank_client") for p in (ROOT / d).rglob("*.py")]
    assert sources
    assert not [p for p in sources if "grpc_tools" in p.read_text()]


def test_the_installed_checkpoint_writer_leaves_files_every_user_can_read(installed_server):
    for path in installed_server["checkpoint"].iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, (path, oct(path.stat().st_mode))


def test_the_installed_server_answers_rest_and_grpc(installed_server):
    r = requests.post(installed_server["url"] + "/v1/rerank", timeout=60,
                      json={"model": SERVED_MODEL, "query": "what is a panda?", "documents": ["a bear", "a car"]})
    assert r.status_code == 200, r.text
    assert sorted(x["index"] for x in r.json()["results"]) == [0, 1]
    script = textwrap.dedent(f"""
        import grpc
        from rerank_server.schema import pb, pb_grpc
        from google.protobuf import struct_pb2
        with grpc.insecure_channel({installed_server["grpc"]!r}) as channel:
            reply = pb_grpc.RerankStub(channel).Rerank(pb.RerankRequest(
                model={SERVED_MODEL!r}, query="q", documents=[struct_pb2.Value(string_value="d")]), timeout=60)
        print(len(reply.results))
    """)
    assert run(installed_server["bin"] / "python", "-c", script, cwd=installed_server["checkpoint"]).strip() == "1"


def test_the_client_wheel_in_a_venv_without_torch_calls_the_server(dist, installed_server, tmp_path):
    bin_dir = make_venv(tmp_path / "client-venv")
    run(bin_dir / "pip", "install", "-q", one(dist, "rerank_client-*.whl"))
    probe = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('rerank_server') is None)"
    assert run(bin_dir / "python", "-c", probe).split() == ["True", "True"]
    script = textwrap.dedent(f"""
        import asyncio, json
        from rerank_client import AsyncRerankClient, RerankClient
        with RerankClient({installed_server["grpc"]!r}, timeout=60) as client:
            assert client.health()
            sync = client.rerank("what is a panda?", ["a bear", "a car"], model={SERVED_MODEL!r}, top_n=1)
        async def main():
            async with AsyncRerankClient({installed_server["grpc"]!r}, timeout=60) as client:
                return await client.rerank("what is a panda?", ["a bear", "a car"], model={SERVED_MODEL!r})
        both = asyncio.run(main())
        print(json.dumps([len(sync.results), len(both.results)]))
    """)
    assert json.loads(run(bin_dir / "python", "-c", script)) == [1, 2]
    for transport in (["--transport", "grpc", "--target", installed_server["grpc"]],
                      ["--transport", "http", "--url", installed_server["url"]]):
        out = run(bin_dir / "rerank", "what is a panda?", "a bear", "a car", "--model", SERVED_MODEL, "--json",
                  *transport)
        assert len(json.loads(out)["results"]) == 2, out


def test_the_wheel_serves_with_every_dependency_at_its_floor(installed_server, tmp_path):
    """The installed wheel's venv (its torch reused: the slow install) moved to every
    dependency's floor, checked by pip, then served again. Last in this file: the earlier tests
    use the venv at the pinned versions."""
    bin_dir = installed_server["bin"]
    floors = floor_constraints()
    requirements = tmp_path / "floors.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in floors.items()))
    run(bin_dir / "pip", "install", "-q", "-r", requirements)
    run(bin_dir / "pip", "check")  # the wheel's ranges hold at the floors
    probe = "import json, importlib.metadata as m; print(json.dumps({d.name: d.version for d in m.distributions()}))"
    versions = json.loads(run(bin_dir / "python", "-c", probe))
    installed = {canonicalize_name(name): version.split("+")[0] for name, version in versions.items()}
    assert {name: installed.get(name) for name in floors} == floors
    with serving(bin_dir, tmp_path) as server:
        test_the_installed_server_answers_rest_and_grpc(server)
