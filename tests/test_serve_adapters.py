"""Model names, registry resolution (aliases, newest version, plain directories) and the two-tier
adapter cache (LRU on the model, RAM behind it, one storage read for concurrent first requests)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
from transformers import AutoModelForCausalLM

from inference.engine import GenerationRequest, HFEngine, SamplingParams
from serve.adapters import AdapterCache, AdapterRegistry
from serve.errors import AdapterIncompatible, InvalidModelName, ModelNotFound
from serve.names import ModelName, parse_model_name
from serve.testing import make_random_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V1, V2, V3 = "a1b2c3d4e5f6", "0f0f0f0f0f0f", "123456abcdef"


@pytest.mark.parametrize(
    "model, name, selector",
    [
        ("support", "support", None),
        ("support@" + V1, "support", V1),
        ("support@production", "support", "production"),
        ("a.b-c_d9", "a.b-c_d9", None),
    ],
)
def test_valid_model_names(model, name, selector):
    assert parse_model_name(model) == ModelName(name, selector)


@pytest.mark.parametrize(
    "model",
    [
        "",
        "../etc",
        "..",
        "a/b",
        "a\\b",
        "Support",
        "-x",
        "x" * 64,
        "a@",
        "a@b@c",
        "a@../x",
        "a@B",
        "a..b",
        "%2e%2e",
        "a b",
        "a\x00",
        "é",
        "x@" + "a" * 65,
        "y" * 200,
    ],
)
def test_malformed_model_names_are_refused_before_any_lookup(model):
    with pytest.raises(InvalidModelName) as info:
        parse_model_name(model)
    assert info.value.status == 400 and info.value.param == "model"


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-files")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return [
        make_random_adapter(tiny_model_dir, root / f"s{seed}", seed=seed, base_model=base)
        for seed in range(1, 7)
    ]


def publish(root, name, version, source, created_at="2026-01-01T00:00:00+00:00"):
    """Write a version the way tune/registry/store.py does: the files, then lineage.json (the commit)."""
    dest = root / name / version
    shutil.copytree(source, dest)
    (dest / "lineage.json").write_text(json.dumps({"created_at": created_at}))
    return dest


def set_alias(root, name, alias, version):
    aliases = root / name / "aliases"
    aliases.mkdir(exist_ok=True)
    tmp = aliases / f".{alias}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, aliases / alias)  # atomic, like the writer


@pytest.fixture()
def registry_root(tmp_path, adapter_files):
    root = tmp_path / "registry"
    publish(root, "support", V1, adapter_files[0], "2026-01-01T00:00:00Z")
    publish(root, "support", V2, adapter_files[1], "2026-02-01T00:00:00Z")
    set_alias(root, "support", "production", V1)
    publish(root, "sql", V2, adapter_files[2], "2026-03-01T00:00:00+00:00")
    publish(root, "sql", V3, adapter_files[3], "2026-01-15T00:00:00+00:00")
    return root


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_registry_resolves_aliases_versions_and_newest(registry_root):
    registry = AdapterRegistry(str(registry_root))
    assert registry.resolve(parse_model_name("support")).version == V1  # production alias
    assert registry.resolve(parse_model_name(f"support@{V2}")).version == V2
    assert registry.resolve(parse_model_name("support@production")).version == V1
    newest = registry.resolve(parse_model_name("sql"))  # no alias: created_at decides, not names
    assert newest.version == V2 and newest.location == str(registry_root / "sql" / V2)
    assert registry.names() == ["sql", "support"]
    for missing in ("nope", "support@staging", f"support@{V3}", "aliases"):
        with pytest.raises(ModelNotFound):
            registry.resolve(parse_model_name(missing))


def test_a_version_without_lineage_is_an_unfinished_copy_and_not_served(tmp_path, adapter_files):
    root = tmp_path / "reg"
    publish(root, "x", V3, adapter_files[0], "2026-01-01T00:00:00+00:00")
    shutil.copytree(adapter_files[1], root / "x" / V1)  # newer, but lineage.json not written yet
    set_alias(root, "x", "staging", V1)
    registry = AdapterRegistry(str(root), ttl_s=0)
    assert registry.resolve(ModelName("x", None)).version == V3
    for selector in (V1, "staging"):
        with pytest.raises(ModelNotFound):
            registry.resolve(ModelName("x", selector))
    (root / "x" / V1 / "lineage.json").write_text('{"created_at": "not a date"}')
    os.utime(root / "x" / V1 / "adapter_config.json", (4e9, 4e9))  # then the files' time decides
    assert registry.resolve(ModelName("x", None)).version == V1


def test_reads_what_the_registry_writer_writes(tmp_path, adapter_files):
    """The contract with tune/registry/store.py: versions, aliases and alias moves it writes."""
    from tune.registry import Registry

    writer = Registry(str(tmp_path / "reg"))
    first = writer.register(adapter_files[0], "support", {"run": "a"})
    second = writer.register(adapter_files[1], "support", {"run": "b"})
    registry = AdapterRegistry(str(tmp_path / "reg"), ttl_s=0)
    assert registry.resolve(ModelName("support", None)).version == second  # newest, no alias
    writer.set_alias("support", "production", first)
    assert registry.resolve(ModelName("support", None)).version == first
    writer.set_alias("support", "production", second)
    ref = registry.resolve(ModelName("support", "production"))
    assert ref.version == second and registry.names() == ["support"]
    assert registry.resolve(ModelName("support", first)).location.endswith(f"support/{first}")


def test_alias_move_is_seen_after_the_ttl(registry_root):
    clock = Clock()
    registry = AdapterRegistry(str(registry_root), ttl_s=1.0, clock=clock)
    assert registry.resolve(ModelName("support", None)).version == V1
    set_alias(registry_root, "support", "production", V2)
    assert registry.resolve(ModelName("support", None)).version == V1  # within the TTL
    clock.now += 1.01
    assert registry.resolve(ModelName("support", None)).version == V2


def test_alias_to_a_missing_version_is_not_found(registry_root):
    set_alias(registry_root, "support", "broken", "ffffffffffff")
    with pytest.raises(ModelNotFound):
        AdapterRegistry(str(registry_root)).resolve(ModelName("support", "broken"))


def test_plain_adapter_directories(adapter_files, tmp_path):
    local = shutil.copytree(adapter_files[0], tmp_path / "mine")
    registry = AdapterRegistry(adapters={"mine": str(local)}, ttl_s=0)
    ref = registry.resolve(ModelName("mine", None))
    assert ref.location == str(local) and registry.names() == ["mine"]
    with pytest.raises(ModelNotFound):
        registry.resolve(ModelName("mine", "production"))
    shutil.copy(adapter_files[1] / "adapter_model.safetensors", local)
    assert registry.resolve(ModelName("mine", None)).version != ref.version  # rewritten in place
    with pytest.raises(ValueError, match="invalid adapter names"):
        AdapterRegistry(adapters={"../x": str(local)})
    with pytest.raises(ValueError, match="adapters.typo: no peft adapter at"):
        AdapterRegistry(adapters={"typo": str(tmp_path / "nope")})


class RecordingEngine:
    """Stands in for HFEngine where only the cache's load/unload decisions matter."""

    def __init__(self):
        self.loaded: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def check_adapter(self, adapter):
        if adapter.rank > 8:
            raise AdapterIncompatible("rank too high")

    def load_adapter(self, key, adapter):
        self.loaded.add(key)
        self.calls.append(("load", key))

    def unload_adapter(self, key):
        self.loaded.discard(key)
        self.calls.append(("unload", key))


def make_registry(tmp_path, adapter_files, n):
    root = tmp_path / "reg"
    for i in range(n):
        publish(root, f"m{i}", V1, adapter_files[i % len(adapter_files)])
    return AdapterRegistry(str(root))


def test_lru_on_the_model_with_a_ram_tier_behind_it(tmp_path, adapter_files):
    registry = make_registry(tmp_path, adapter_files, 5)
    engine = RecordingEngine()
    cache = AdapterCache(engine, registry, max_loaded=2, max_cpu=2)
    refs = [registry.resolve(ModelName(f"m{i}", None)) for i in range(5)]

    async def use(i):
        await cache.prepare(refs[i])
        cache.activate([refs[i].key])

    async def scenario():
        for i in (0, 1, 0, 2):  # m1 is least recently used when m2 arrives
            await use(i)
        assert set(cache.loaded_keys()) == {refs[0].key, refs[2].key}
        assert cache.stats["eviction"] == 1 and cache.stats["storage_read"] == 3
        await use(1)  # back from RAM, not from storage
        assert cache.stats["cpu_hit"] == 1 and cache.stats["storage_read"] == 3
        for i in (3, 4):  # RAM holds 2: the oldest evicted one (m0) is dropped
            await use(i)
        assert cache.stats["cpu_eviction"] >= 1
        await use(0)
        assert cache.stats["storage_read"] == 6

    asyncio.run(scenario())
    assert cache.stats["hit"] == 1 and cache.stats["miss"] == 6
    assert cache.stats["load"] == 7 and engine.loaded == set(cache.loaded_keys())


def test_activate_keeps_every_adapter_of_the_batch(tmp_path, adapter_files):
    registry = make_registry(tmp_path, adapter_files, 3)
    engine = RecordingEngine()
    cache = AdapterCache(engine, registry, max_loaded=2, max_cpu=4)
    refs = [registry.resolve(ModelName(f"m{i}", None)) for i in range(3)]

    async def scenario():
        for ref in refs:
            await cache.prepare(ref)

    asyncio.run(scenario())
    cache.activate([refs[0].key, refs[1].key])
    cache.activate([refs[1].key, refs[2].key])  # evicts m0, never m1 which this batch needs
    assert engine.loaded == {refs[1].key, refs[2].key}
    with pytest.raises(ValueError, match="3 adapters in one batch"):
        cache.activate([r.key for r in refs])


def test_concurrent_first_requests_read_storage_once(tmp_path, adapter_files):
    registry = make_registry(tmp_path, adapter_files, 1)
    cache = AdapterCache(RecordingEngine(), registry, max_loaded=2, max_cpu=2)
    ref = registry.resolve(ModelName("m0", None))

    async def scenario():
        await asyncio.gather(*(cache.prepare(ref) for _ in range(20)))

    asyncio.run(scenario())
    assert cache.stats["storage_read"] == 1 and cache.stats["miss"] == 1
    assert cache.stats["cpu_hit"] == 19


def test_incompatible_adapter_is_a_client_error_and_not_cached(tmp_path, tiny_model_dir):
    root = tmp_path / "reg"
    make_random_adapter(tiny_model_dir, root / "big" / V1, seed=1, r=16, created_at="2026-01-01")
    registry = AdapterRegistry(str(root))
    cache = AdapterCache(RecordingEngine(), registry, max_loaded=2, max_cpu=2)
    with pytest.raises(AdapterIncompatible):
        asyncio.run(cache.prepare(registry.resolve(ModelName("big", None))))
    assert cache.loaded_keys() == [] and not cache._cpu


def test_adapter_reloaded_from_ram_gives_the_same_output(
    tmp_path, adapter_files, tiny_model_dir, tokenizer
):
    registry = make_registry(tmp_path, adapter_files, 3)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    cache = AdapterCache(engine, registry, max_loaded=1, max_cpu=3)
    refs = [registry.resolve(ModelName(f"m{i}", None)) for i in range(3)]
    prompt = engine.encode_text("The delivery was")
    greedy = SamplingParams(max_tokens=8, temperature=0)

    def run(ref):
        asyncio.run(cache.prepare(ref))
        cache.activate([ref.key])
        return engine.generate([GenerationRequest(prompt, ref.key, greedy)])[0].text

    first = [run(ref) for ref in refs]
    again = [run(ref) for ref in refs]
    assert first == again and len(set(first)) == 3
    assert cache.stats["storage_read"] == 3 and cache.stats["eviction"] == 5
