"""The adapter registry: content-addressed versions, lineage, aliases and rollback, name checks,
concurrent promotions, on local disk and on a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import boto3
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tune.registry import NotInRegistry, Registry, RegistryError, adapter_version, check_name
from tune.registry.cli import app


def make_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, **lora) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(3)]


def test_version_is_a_content_hash_of_the_weights(adapters, tmp_path, tiny_model_dir):
    v0 = adapter_version(adapters[0])
    assert len(v0) == 12 and v0 != adapter_version(adapters[1])
    again = make_adapter(tiny_model_dir, tmp_path / "again", seed=0)
    assert adapter_version(again) == v0  # same weights, same version


@pytest.mark.parametrize("root_kind", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_register_alias_rollback_round_trip(root_kind, adapters, tmp_path, request):
    if root_kind == "s3":
        endpoint = request.getfixturevalue("s3_server")
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="registry")
        root = "s3://registry/team-a"
    else:
        root = str(tmp_path / "registry")
    reg = Registry(root)
    v0 = reg.register(
        adapters[0], "support-bot", {"base_model": "tiny", "dataset_hash": "sha256:x"}
    )
    assert reg.register(adapters[0], "support-bot", {"base_model": "tiny"}) == v0  # no-op
    v1 = reg.register(adapters[1], "support-bot", {"base_model": "tiny"})
    assert [v["version"] for v in reg.versions("support-bot")] == [v0, v1]
    assert reg.lineage(f"support-bot@{v0}")["dataset_hash"] == "sha256:x"
    assert reg.resolve("support-bot") == ("support-bot", v1)  # newest, no alias yet

    reg.set_alias("support-bot", "production", v0)
    reg.set_alias("support-bot", "production", v1)
    assert reg.resolve("support-bot") == ("support-bot", v1)
    assert reg.rollback("support-bot") == v0
    assert reg.resolve("support-bot@production") == ("support-bot", v0)
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("support-bot")
    assert reg.aliases("support-bot") == {"production": v0}
    with pytest.raises(RegistryError, match="is what production points at"):
        reg.delete("support-bot", v0)
    reg.delete("support-bot", v1)
    assert [v["version"] for v in reg.versions("support-bot")] == [v0]
    assert reg.names() == ["support-bot"]
    # the files are a plain peft adapter that loads from where the registry says
    uri = reg.adapter_uri("support-bot")
    assert uri.endswith(f"support-bot/{v0}")


@pytest.mark.parametrize(
    "bad", ["../etc", "a/b", "Upper", "-lead", "a" * 64, "x..y", "", "name@v", "é"]
)
def test_names_are_checked_before_any_path_is_built(bad, tmp_path):
    with pytest.raises(RegistryError, match="invalid name"):
        check_name(bad)
    with pytest.raises(RegistryError):
        Registry(str(tmp_path)).resolve(bad)
    assert not any(tmp_path.iterdir())


def test_an_interrupted_copy_is_invisible_and_completed_by_the_next_promotion(adapters, tmp_path):
    reg = Registry(str(tmp_path))
    version = adapter_version(adapters[0])
    torn = tmp_path / "bot" / version
    torn.mkdir(parents=True)
    (torn / "adapter_config.json").write_text("{}")  # a copy that died before lineage.json
    assert reg.versions("bot") == []
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.resolve("bot")
    assert reg.register(adapters[0], "bot", {}) == version
    assert (torn / "adapter_model.safetensors").is_file()
    assert reg.resolve("bot") == ("bot", version)


def test_concurrent_promotions_to_one_name_do_not_corrupt_it(adapters, tmp_path):
    reg = Registry(str(tmp_path))
    errors = []

    def promote(i):
        try:
            r = Registry(str(tmp_path))
            v = r.register(adapters[i % 3], "bot", {"i": i})
            r.set_alias("bot", "production", v)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    versions = {v["version"] for v in reg.versions("bot")}
    assert versions == {adapter_version(a) for a in adapters}
    assert reg.aliases("bot")["production"] in versions
    assert len(reg.alias_history("bot", "production")) == 12
    for v in versions:  # every version complete and readable
        assert json.loads((tmp_path / "bot" / v / "lineage.json").read_text())["version"] == v
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_cli_list_show_alias_rollback_delete(adapters, tmp_path):
    reg = Registry(str(tmp_path))
    v0 = reg.register(adapters[0], "bot", {"base_model": "tiny"})
    v1 = reg.register(adapters[1], "bot", {"base_model": "tiny"})

    def cli(*args):
        return CliRunner().invoke(app, [*args, "--registry", str(tmp_path)])

    assert cli("alias", f"bot@{v0}", "production").exit_code == 0
    assert cli("alias", f"bot@{v1}", "production").exit_code == 0
    listing = cli("list")
    assert listing.exit_code == 0 and v0 in listing.stdout and "production" in listing.stdout
    shown = cli("show", "bot@production", "--json")
    assert json.loads(shown.stdout)["version"] == v1
    chain = cli("show", "bot@production").stdout  # the readable chain: version, base, dataset, code
    assert chain.startswith(f"adapter   bot@{v1}") and "base      tiny" in chain
    assert cli("rollback", "bot").stdout.strip() == f"bot@production -> {v0}"
    refused = cli("delete", f"bot@{v0}")
    assert refused.exit_code == 2 and "points at" in refused.stderr
    assert cli("delete", f"bot@{v1}").exit_code == 0
    bad = cli("show", "../../etc")
    assert bad.exit_code == 2 and "invalid name" in bad.stderr


def test_a_missing_name_says_what_the_registry_holds_and_how_to_read_another(adapters, tmp_path):
    root = str(tmp_path / "registry")
    reg = Registry(root)
    reg.register(adapters[0], "bot", {})
    v1 = reg.register(adapters[1], "helper", {})
    with pytest.raises(
        NotInRegistry, match=r"nope: not in the registry at .* \(it holds bot, helper\)"
    ):
        reg.lineage("nope")
    with pytest.raises(NotInRegistry, match=r"not in the registry at .*empty \(it is empty\)"):
        Registry(str(tmp_path / "empty")).resolve("bot")
    with pytest.raises(
        NotInRegistry, match=rf"helper@staging: .* \(helper has versions {v1}; aliases none\)"
    ):
        reg.resolve("helper@staging")
    shown = CliRunner().invoke(app, ["show", "nope", "--registry", root])
    assert shown.exit_code == 2
    assert "it holds bot, helper" in shown.output
    assert "--registry ROOT" in shown.output and "RAYFT_REGISTRY" in shown.output
