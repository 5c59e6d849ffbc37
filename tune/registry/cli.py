"""The registry's command line; the root comes from --registry or RAYFT_REGISTRY, default ./registry.

    python -m tune.registry list
    python -m tune.registry show NAME[@VERSION|@ALIAS]
    python -m tune.registry promote RUN_DIR --name NAME [--alias production] [--force]
    python -m tune.registry alias NAME@VERSION production
    python -m tune.registry rollback NAME [--alias production]
    python -m tune.registry delete NAME@VERSION

Every command exits 2 with `error: ...` when the registry refuses (core/cli.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Annotated

import typer

from core import cli
from core.registry import DEFAULT_ALIAS, DEFAULT_ROOT
from tune.registry.store import NotInRegistry, Registry, lineage_chain

app = cli.app(no_args_is_help=True)
RegistryOpt = Annotated[
    str, typer.Option("--registry", envvar="RAYFT_REGISTRY", help="registry root (dir or s3://)")
]
ELSEWHERE = "to read another registry, pass --registry ROOT or set RAYFT_REGISTRY=ROOT"


def command(fn: Callable) -> Callable:
    """A registry command: a refusal is `error: ...`, exit 2; a missing name also says how to
    point at another registry."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotInRegistry as e:
            cli.fail(f"{e}; {ELSEWHERE}")

    return cli.config_errors_exit_2(wrapper)


@app.command("list")
@command
def list_cmd(registry: RegistryOpt = DEFAULT_ROOT) -> None:
    """Every adapter with its versions and aliases."""
    from rich.console import Console
    from rich.table import Table

    reg = Registry(registry)
    table = Table(title=f"registry: {registry}")
    for col in ("name", "version", "aliases", "created", "base model", "gate"):
        table.add_column(col)
    for name in reg.names():
        aliases = reg.aliases(name)
        for v in reg.versions(name):
            gate = v.get("gate") or {}
            table.add_row(
                name,
                v["version"],
                ", ".join(a for a, x in aliases.items() if x == v["version"]),
                v["created_at"][:19],
                str(v.get("base_model")),
                "forced" if gate.get("forced") else ("passed" if gate.get("passed") else "-"),
            )
    Console().print(table)


@app.command()
@command
def show(
    ref: str,
    registry: RegistryOpt = DEFAULT_ROOT,
    as_json: Annotated[bool, typer.Option("--json", help="the whole lineage.json")] = False,
) -> None:
    """The lineage of NAME[@VERSION|@ALIAS]: adapter -> run -> dataset -> sources and code."""
    lineage = Registry(registry).lineage(ref)
    typer.echo(json.dumps(lineage, indent=2) if as_json else "\n".join(lineage_chain(lineage)))


@app.command()
@command
def promote(
    run: Annotated[
        str, typer.Argument(help="a run directory (adapter/ + run.json), local or s3://")
    ],
    name: Annotated[str, typer.Option(help="registry name")],
    alias: Annotated[str, typer.Option(help="alias to point at the new version")] = DEFAULT_ALIAS,
    force: Annotated[bool, typer.Option(help="skip the gate (recorded in lineage)")] = False,
    registry: RegistryOpt = DEFAULT_ROOT,
) -> None:
    """Register a run's adapter and move the alias, if its gate passed (or --force)."""
    from tune.registry.promote import (
        promote_run,
    )  # loads transformers: seconds the other commands skip

    version = promote_run(Registry(registry), run, name, alias=alias, force=force)
    typer.echo(f"{name}@{version} ({alias})")


@app.command("alias")
@command
def alias_cmd(ref: str, alias: str, registry: RegistryOpt = DEFAULT_ROOT) -> None:
    """Point ALIAS at NAME@VERSION."""
    name, version = Registry(registry).resolve(ref)
    Registry(registry).set_alias(name, alias, version)
    typer.echo(f"{name}@{alias} -> {version}")


@app.command()
@command
def rollback(name: str, alias: str = DEFAULT_ALIAS, registry: RegistryOpt = DEFAULT_ROOT) -> None:
    """Move ALIAS back to the version it pointed at before."""
    version = Registry(registry).rollback(name, alias)
    typer.echo(f"{name}@{alias} -> {version}")


@app.command()
@command
def delete(ref: str, registry: RegistryOpt = DEFAULT_ROOT) -> None:
    """Delete NAME@VERSION (refused while an alias points at it)."""
    name, _, version = ref.partition("@")
    Registry(registry).delete(name, version)
    typer.echo(f"deleted {name}@{version}")
