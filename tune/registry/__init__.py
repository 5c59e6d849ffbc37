"""The adapter registry (store.py), promotion into it (promote.py) and its command line (cli.py,
`python -m tune.registry`); its names and layout are core/registry.py, shared with serving."""

from core.registry import (
    ALIASES,
    DEFAULT_ALIAS,
    DEFAULT_ROOT,
    HISTORY,
    LINEAGE,
    NAME_RE,
    VERSION_RE,
)
from tune.registry.store import (
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
    "DEFAULT_ALIAS",
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
