"""model.name_or_path: a local directory, or s3:// through a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import torch

from core.config import ConfigError
from inference.config import ModelConfig
from inference.model import attn_implementation, load_base_model, load_tokenizer, resolve_model_path
from tests.helpers import upload_dir


def test_local_directory_loads_through_from_pretrained(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    assert resolve_model_path(cfg) == str(tiny_model_dir)
    tokenizer = load_tokenizer(cfg)
    model = load_base_model(cfg, torch.device("cpu"))
    assert model.config.num_hidden_layers == 2
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert attn_implementation(cfg, torch.device("cpu")) == "sdpa"


def test_missing_local_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope")))


@pytest.mark.integration
def test_s3_model_is_downloaded_once_and_loads(s3_server, tiny_model_dir, tmp_path):
    upload_dir(s3_server, tiny_model_dir, "models", "tiny/v1")
    cfg = ModelConfig(name_or_path="s3://models/tiny/v1", cache_dir=str(tmp_path / "cache"))

    local = Path(resolve_model_path(cfg))
    assert local == tmp_path / "cache" / "models" / "tiny" / "v1"
    assert (local / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()
    model = load_base_model(cfg, torch.device("cpu"))
    reference = load_base_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(model(ids).logits, reference(ids).logits)
    assert load_tokenizer(cfg).chat_template

    # A second resolve reads the cache: it works even when the object is gone from the bucket.
    boto3.client("s3", endpoint_url=s3_server).delete_object(
        Bucket="models", Key="tiny/v1/config.json"
    )
    assert Path(resolve_model_path(cfg)) == local


@pytest.mark.integration
def test_s3_errors_name_the_field(s3_server, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="empty")
    with pytest.raises(ConfigError, match=r"model.name_or_path: no files under s3://empty/absent"):
        resolve_model_path(ModelConfig(name_or_path="s3://empty/absent", cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.name_or_path: cannot list s3://no-such-bucket"):
        resolve_model_path(
            ModelConfig(name_or_path="s3://no-such-bucket/x", cache_dir=str(tmp_path))
        )


@pytest.mark.parametrize("path", ["/no/such/model", ".cache/no-such-model", "~/no-such-model"])
def test_missing_local_path_says_so(path):
    with pytest.raises(ConfigError, match="model.name_or_path: no such directory"):
        resolve_model_path(ModelConfig(name_or_path=path))


@pytest.mark.parametrize(
    ("option", "check"),
    [
        (
            "use_rslora",
            lambda m: (
                m.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
                == pytest.approx(32 / 8**0.5)
            ),
        ),
        ("use_dora", lambda m: any("lora_magnitude_vector" in n for n, _ in m.named_parameters())),
    ],
)
def test_rslora_and_dora_options_reach_peft(tiny_model_dir, option, check):
    from jobs.config import LoraConfig
    from jobs.model import add_lora

    model = load_base_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    tuned = add_lora(
        model, LoraConfig(r=8, alpha=32, target_modules=["q_proj", "v_proj"], **{option: True})
    )
    assert check(tuned)
