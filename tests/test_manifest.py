"""run.json: secrets redacted at any depth, versions and code state recorded."""

from __future__ import annotations

import json

from jobs.manifest import redact, write_run_manifest


def test_redact_masks_secret_keys_at_any_depth():
    config = {
        "tracking": {"api_key": "sk-live-123", "project": "p"},
        "storage": [{"aws_secret_access_key": "abc", "endpoint": "http://127.0.0.1:9000"}],
        "token": "t0k",
        "password": "",
        "lr": 1e-4,
    }
    out = redact(config)
    assert out["tracking"] == {"api_key": "***", "project": "p"}
    assert out["storage"] == [{"aws_secret_access_key": "***", "endpoint": "http://127.0.0.1:9000"}]
    assert out["token"] == "***" and out["lr"] == 1e-4
    assert out["password"] == ""  # nothing to hide
    assert config["token"] == "t0k"  # the input is untouched


def test_run_manifest_records_versions_and_hides_secrets(tmp_path):
    path = tmp_path / "run.json"
    write_run_manifest(
        path, config={"wandb": {"api_key": "sk-secret"}}, dataset_hash="sha256:x", metrics={"a": 1}
    )
    text = path.read_text()
    assert "sk-secret" not in text
    manifest = json.loads(text)
    assert manifest["config"]["wandb"]["api_key"] == "***"
    assert manifest["dataset_hash"] == "sha256:x" and manifest["metrics"] == {"a": 1}
    assert {"python", "torch", "ray", "transformers", "peft"} <= set(manifest["libraries"])
    assert set(manifest["code"]) == {"sha", "dirty"}
