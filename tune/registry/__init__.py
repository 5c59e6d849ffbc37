"""The adapter registry (store.py) and its command line (cli.py, `python -m tune.registry`)."""

from tune.registry.store import (
    ALIASES,
    DEFAULT_ROOT,
    HISTORY,
    LINEAGE,
    NAME_RE,
    VERSION_RE,
    NotInRegistry,
    Registry,
    RegistryError,
    adapter_version,
    check_name,
    check_version,
    lineage_chain,
)

__all__ = [
    "ALIASES",
    "DEFAULT_ROOT",
    "HISTORY",
    "LINEAGE",
    "NAME_RE",
    "VERSION_RE",
    "NotInRegistry",
    "Registry",
    "RegistryError",
    "adapter_version",
    "check_name",
    "check_version",
    "lineage_chain",
]
