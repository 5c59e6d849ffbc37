"""Adapter lookup (registry or plain directories) and the two-tier adapter cache.

The registry is written by tune/registry/store.py and only read here, both by the names, layout
and "newest version" rule of core/registry.py: a version directory without lineage.json is a
copy in progress (or an interrupted one) and is not served. ROOT is a local directory or
s3://bucket/prefix, read through core.storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from core import registry as contract
from core import storage
from inference.engine import AdapterWeights, Engine, read_adapter
from serve.config import ServeSettings
from serve.errors import AdapterUnavailable, ModelNotFound
from serve.names import ModelName, is_valid_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """One immutable adapter version: where its files are and the key the engine knows it by."""

    name: str
    version: str
    location: str  # local directory or s3:// URI

    @property
    def key(self) -> str:
        # peft adapter names become module-dict keys, which may not contain "."
        digest = hashlib.sha256(f"{self.name}@{self.version}".encode()).hexdigest()[:16]
        return f"adapter_{digest}"

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"


class _RegistryFiles:
    """Where the registry lives: a local directory or s3:// (core.storage underneath)."""

    def __init__(self, root: str):
        if not storage.is_remote(root):
            root = str(Path(root).expanduser().resolve())
        self.scheme = storage.protocol(root)
        self.fs, path = storage.filesystem(root)
        self.root = path.rstrip("/")

    def uri(self, name: str, version: str) -> str:
        return self.scheme + contract.at(self.root, contract.version_path(name, version))


class AdapterRegistry:
    """Resolves request model names to adapter versions; alias moves are seen within ttl_s."""

    def __init__(
        self,
        root: str | None = None,
        adapters: dict[str, str] | None = None,
        *,
        ttl_s: float = 1.0,
        download_dir: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.files = _RegistryFiles(root) if root else None
        self.plain = {name: str(Path(p).expanduser()) for name, p in (adapters or {}).items()}
        bad = [n for n in self.plain if not is_valid_name(n)]
        if bad:
            raise ValueError(f"adapters: invalid adapter names {bad} (use {contract.NAME_RULE})")
        for name, path in self.plain.items():  # a typo should stop the start, not fail requests
            if not (Path(path) / "adapter_config.json").is_file():
                raise ValueError(
                    f"adapters.{name}: no peft adapter at {path} (no adapter_config.json there; "
                    f"relative paths are resolved from {Path.cwd()})"
                )
        self.ttl_s = ttl_s
        self.download_dir = Path(
            download_dir or Path.home() / ".cache" / "rayft" / "adapters"
        ).expanduser()
        self.clock = clock
        self._resolved: dict[ModelName, tuple[float, AdapterRef]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, s: ServeSettings) -> AdapterRegistry:
        return cls(s.registry, s.adapters, ttl_s=s.alias_ttl_s, download_dir=s.adapter_download_dir)

    def resolve(self, model: ModelName) -> AdapterRef:
        """The version `model` names now; ModelNotFound (404) when there is none. Blocking I/O."""
        now = self.clock()
        with self._lock:
            cached = self._resolved.get(model)
        if cached and cached[0] > now:
            return cached[1]
        ref = self._resolve_uncached(model)
        with self._lock:
            self._resolved[model] = (now + self.ttl_s, ref)
        return ref

    def _resolve_uncached(self, model: ModelName) -> AdapterRef:
        if model.name in self.plain:
            if model.selector is not None:
                raise ModelNotFound(str(model))  # plain directories have a single version
            return self._plain_ref(model.name)
        if self.files is None:
            raise ModelNotFound(str(model))
        try:
            version = self._registry_version(model)
        except (OSError, PermissionError) as e:
            if isinstance(e, FileNotFoundError):
                raise ModelNotFound(str(model)) from None
            # The storage error (bucket, endpoint) goes to the log, not to the client.
            log.warning("registry lookup of %s failed: %s: %s", model, type(e).__name__, e)
            raise AdapterUnavailable(f"adapter '{model}' cannot be read right now") from None
        if version is None:
            raise ModelNotFound(str(model))
        return AdapterRef(model.name, version, self.files.uri(model.name, version))

    def _registry_version(self, model: ModelName) -> str | None:
        return contract.resolve(self.files.fs, self.files.root, model.name, model.selector)

    def _plain_ref(self, name: str) -> AdapterRef:
        path = Path(self.plain[name])
        try:
            config = (path / "adapter_config.json").read_bytes()
            stat = (path / "adapter_model.safetensors").stat()
        except OSError:
            log.warning("adapter %s: no readable adapter at its configured path", name)
            raise AdapterUnavailable(f"adapter '{name}' cannot be read right now") from None
        # A version that changes when the directory is rewritten in place.
        digest = hashlib.sha256(config + f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        return AdapterRef(name, digest.hexdigest()[: contract.VERSION_LEN], str(path))

    def version_ref(self, name: str, version: str | None) -> AdapterRef:
        """The files of a version resolve() returned before (e.g. in another process)."""
        if name in self.plain:
            return AdapterRef(name, version or "", self.plain[name])
        if self.files is None or version is None or not contract.is_version(version):
            raise ModelNotFound(f"{name}@{version}")
        return AdapterRef(name, version, self.files.uri(name, version))

    def names(self) -> list[str]:
        """Every adapter name that can be served (plain ones and the registry's)."""
        found = set(self.plain)
        if self.files is not None:
            try:
                found.update(contract.names(self.files.fs, self.files.root))
            except OSError as e:
                log.warning("listing the registry failed: %s", type(e).__name__)
        return sorted(found)

    def local_path(self, ref: AdapterRef) -> Path:
        """A local directory with the version's files (downloaded from s3 once: versions are
        immutable, so a complete copy is reused)."""
        if not storage.is_remote(ref.location):
            return Path(ref.location)
        try:
            return storage.cached_copy(ref.location, self.download_dir)
        except OSError as e:
            log.warning("downloading %s failed: %s: %s", ref.id, type(e).__name__, e)
            raise AdapterUnavailable(f"adapter '{ref.name}' cannot be read right now") from None


class AdapterCache:
    """Adapters on the model (LRU of max_loaded) backed by a CPU-RAM tier (LRU of max_cpu).

    `prepare` runs on the event loop: it reads an adapter from storage at most once however many
    requests ask for it at the same time. `activate` runs on the model thread, right before a
    batch: it loads the batch's adapters, evicting the least recently used others to RAM.
    """

    def __init__(
        self,
        engine: Engine,
        registry: AdapterRegistry,
        *,
        max_loaded: int,
        max_cpu: int,
        on_event: Callable[[str], None] | None = None,
    ):
        if max_loaded < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
        self.engine = engine
        self.registry = registry
        self.max_loaded = max_loaded
        self.max_cpu = max_cpu
        self.stats: Counter[str] = Counter()
        self._on_event = on_event
        self._loaded: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._cpu: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._refs: dict[str, AdapterRef] = {}
        self._lock = threading.Lock()  # the dicts are shared by the event loop and model thread
        self._key_locks: dict[str, asyncio.Lock] = {}

    def _count(self, event: str) -> None:
        self.stats[event] += 1
        if self._on_event is not None:
            self._on_event(event)

    async def prepare(self, ref: AdapterRef) -> None:
        """Make `ref` ready to activate: on the model, in RAM, or read now (checked against the
        base: AdapterIncompatible is a 400)."""
        key = ref.key
        with self._lock:
            if key in self._loaded:
                self._count("hit")
                return
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        async with lock:
            with self._lock:
                if key in self._loaded or key in self._cpu:
                    self._count("hit" if key in self._loaded else "cpu_hit")
                    if key in self._cpu:
                        self._cpu.move_to_end(key)
                    return
            self._count("miss")
            weights = await asyncio.to_thread(self._read, ref)
            with self._lock:
                self._refs[key] = ref
                self._put_cpu(key, weights)

    def _read(self, ref: AdapterRef) -> AdapterWeights:
        weights = read_adapter(self.registry.local_path(ref))
        self.engine.check_adapter(weights)
        self._count("storage_read")
        return weights

    def _put_cpu(self, key: str, weights: AdapterWeights) -> None:
        self._cpu[key] = weights
        self._cpu.move_to_end(key)
        while len(self._cpu) > self.max_cpu:
            self._cpu.popitem(last=False)
            self._count("cpu_eviction")

    def activate(self, keys: Iterable[str]) -> None:
        """Load `keys` onto the model (at most max_loaded of them). Call on the model thread."""
        keys = list(dict.fromkeys(keys))
        if len(keys) > self.max_loaded:
            raise ValueError(f"{len(keys)} adapters in one batch, max_loaded is {self.max_loaded}")
        for key in keys:
            with self._lock:
                if key in self._loaded:
                    self._loaded.move_to_end(key)
                    continue
                weights = self._cpu.pop(key, None)
            if weights is None:  # dropped from RAM since prepare(): read it again
                weights = self._read(self._refs[key])
            self._make_room(keep=keys)
            self.engine.load_adapter(key, weights)
            self._count("load")
            with self._lock:
                self._loaded[key] = weights

    def _make_room(self, keep: list[str]) -> None:
        while len(self._loaded) >= self.max_loaded:
            victim = next(k for k in self._loaded if k not in keep)
            self.engine.unload_adapter(victim)
            with self._lock:
                weights = self._loaded.pop(victim)
                self._put_cpu(victim, weights)
            self._count("eviction")

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def held_keys(self) -> dict[str, list[str]]:
        """Adapters this replica serves without reading storage: on the model, and in RAM."""
        with self._lock:
            return {"loaded": list(self._loaded), "ram": list(self._cpu)}
