"""python -m serve [CONFIG]: `serve run CONFIG` (default configs/serve.yaml) on the Ray cluster in
RAY_ADDRESS, or on a new local one: a bare `serve run` would follow a stale
/tmp/ray/ray_current_cluster into a dead cluster. The config is checked first (serve/preflight.py:
the YAML, the app's settings, the files they name): a bad one exits 2 before Ray starts.

    python -m serve                          # configs/serve.yaml on a local Ray
    RAY_ADDRESS=http://head:8265 python -m serve my-serve.yaml
    python -m serve --no-check-files CONFIG  # paths that exist only on the cluster's nodes
    python -m serve.tenants new-key          # API keys: see serve/tenants.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from core import cli
from serve import preflight


def serve_run_command(config: Path, address: str | None) -> list[str]:
    serve_cli = Path(sys.executable).parent / "serve"  # the venv's Ray Serve CLI
    return [str(serve_cli), "run", "-a", address or "local", str(config)]


def main(
    config: Annotated[Path, typer.Argument(help="a Serve config file")] = Path(
        "configs/serve.yaml"
    ),
    check_files: Annotated[
        bool,
        typer.Option(
            help="check here that the tenants file, registry, adapters and base model exist "
            "(off: paths that only the cluster's nodes have)"
        ),
    ] = True,
) -> None:
    if not config.is_file():
        raise typer.BadParameter(f"no such file: {config}", param_hint="CONFIG")
    preflight.check_serve_config(config, check_files=check_files)
    command = serve_run_command(config, os.environ.get("RAY_ADDRESS"))
    os.execv(command[0], command)


if __name__ == "__main__":
    cli.run(main)
