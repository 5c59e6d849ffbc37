"""python -m serve [CONFIG]: `serve run CONFIG` (default configs/serve.yaml) on the Ray cluster in
RAY_ADDRESS, or on a new local one: a bare `serve run` would follow a stale
/tmp/ray/ray_current_cluster into a dead cluster.

    python -m serve                          # configs/serve.yaml on a local Ray
    RAY_ADDRESS=http://head:8265 python -m serve my-serve.yaml
    python -m serve.tenants new-key          # API keys: see serve/tenants.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from jobs import cli


def serve_run_command(config: Path, address: str | None) -> list[str]:
    serve_cli = Path(sys.executable).parent / "serve"  # the venv's Ray Serve CLI
    return [str(serve_cli), "run", "-a", address or "local", str(config)]


def main(
    config: Annotated[Path, typer.Argument(help="a Serve config file")] = Path(
        "configs/serve.yaml"
    ),
) -> None:
    if not config.is_file():
        raise typer.BadParameter(f"no such file: {config}", param_hint="CONFIG")
    command = serve_run_command(config, os.environ.get("RAY_ADDRESS"))
    os.execv(command[0], command)


if __name__ == "__main__":
    cli.run(main)
