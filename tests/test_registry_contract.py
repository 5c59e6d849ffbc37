"""The registry's writer (tune/registry/store.py) and its reader (serve/adapters.py, serve/names.py)
hold one contract, core/registry.py: what the writer creates the reader accepts, finds and
resolves the same way."""

from __future__ import annotations

import ast
import json
import os

import pytest
from transformers import AutoModelForCausalLM

from core import registry as contract
from serve.adapters import AdapterRegistry
from serve.names import ModelName, parse_model_name
from serve.testing import make_random_adapter
from tests.helpers import REPO
from tune.registry import Registry


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract-adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return [
        make_random_adapter(tiny_model_dir, root / f"a{seed}", seed=seed, r=2, base_model=base)
        for seed in range(3)
    ]


@pytest.fixture()
def written(tmp_path, adapters):
    """A registry the writer filled: three versions of `bot`, oldest first."""
    root = str(tmp_path / "registry")
    writer = Registry(root)
    versions = [writer.register(a, "bot", {"base_model": "tiny"}) for a in adapters]
    return writer, AdapterRegistry(root, ttl_s=0), versions


def read(reader: AdapterRegistry, model: str) -> str:
    return reader.resolve(parse_model_name(model)).version


def rewrite_created_at(writer: Registry, version: str, created_at) -> None:
    path = os.path.join(writer.base, contract.lineage_path("bot", version))
    with open(path) as f:
        lineage = json.load(f)
    lineage["created_at"] = created_at
    with open(path, "w") as f:
        json.dump(lineage, f)


def test_every_version_the_writer_creates_is_one_serve_accepts(written):
    writer, reader, versions = written
    for version in versions:
        assert contract.is_version(version)
        assert parse_model_name(f"bot@{version}") == ModelName("bot", version)
        assert read(reader, f"bot@{version}") == version
        ref = reader.resolve(ModelName("bot", version))
        assert ref.location == os.path.join(writer.base, contract.version_path("bot", version))
    assert reader.names() == writer.names() == ["bot"]


def test_the_writer_lays_files_out_where_the_contract_says(written):
    writer, _, versions = written
    writer.set_alias("bot", "staging", versions[0])
    root = writer.base
    assert all(
        os.path.isfile(os.path.join(root, contract.lineage_path("bot", v))) for v in versions
    )
    with open(os.path.join(root, contract.alias_path("bot", "staging"))) as f:
        assert f.read() == versions[0]
    assert len(os.listdir(os.path.join(root, contract.alias_history_path("bot", "staging")))) == 1


def test_reader_and_writer_agree_on_the_newest_version(written):
    writer, reader, versions = written
    assert writer.resolve("bot") == ("bot", versions[-1]) == ("bot", read(reader, "bot"))
    # the same time for all: the version string decides, for both
    for version in versions:
        rewrite_created_at(writer, version, "2026-01-01T00:00:00+00:00")
    assert writer.resolve("bot")[1] == read(reader, "bot") == max(versions)
    # a time written another way ('Z', another offset) is the same instant for both
    rewrite_created_at(writer, versions[0], "2026-01-01T02:00:00+01:00")
    rewrite_created_at(writer, versions[1], "2026-01-01T01:30:00Z")
    assert writer.resolve("bot")[1] == read(reader, "bot") == versions[1]
    # no readable time: the files' time orders it, for both
    rewrite_created_at(writer, versions[2], None)
    config = os.path.join(
        writer.base, contract.version_path("bot", versions[2]), "adapter_config.json"
    )
    os.utime(config, (4e9, 4e9))
    assert writer.resolve("bot")[1] == read(reader, "bot") == versions[2]
    assert [v["version"] for v in writer.versions("bot")][-1] == versions[2]


def test_aliases_the_writer_sets_are_what_the_reader_resolves(written):
    writer, reader, versions = written
    writer.set_alias("bot", "staging", versions[1])
    assert read(reader, "bot@staging") == writer.resolve("bot@staging")[1] == versions[1]
    writer.set_alias("bot", contract.DEFAULT_ALIAS, versions[0])  # a plain NAME now means it
    assert read(reader, "bot") == writer.resolve("bot")[1] == versions[0]
    writer.set_alias("bot", contract.DEFAULT_ALIAS, versions[2])
    assert writer.rollback("bot") == versions[0]
    assert read(reader, "bot") == read(reader, f"bot@{contract.DEFAULT_ALIAS}") == versions[0]


def test_an_alias_being_written_is_never_listed_as_an_alias(written, monkeypatch):
    writer, _, versions = written
    seen = []
    replace = os.replace

    def look_then_replace(src, dst):
        seen.append(writer.aliases("bot"))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", look_then_replace)
    writer.set_alias("bot", "staging", versions[0])
    writer.set_alias("bot", "staging", versions[1])
    assert all(set(aliases) <= {"staging"} for aliases in seen)
    assert writer.aliases("bot") == {"staging": versions[1]}


def test_the_contract_sits_below_every_other_layer():
    tree = ast.parse((REPO / "core" / "registry.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    above = {"inference", "jobs", "tune", "serve", "cluster"}
    assert not {m for m in imported if m.split(".")[0] in above}
