"""Tenants: hashed keys, allow-lists, request and token buckets with Retry-After, the key CLI."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from serve.errors import InvalidRequest, RateLimited, Unauthorized
from serve.tenants import Tenants, TenantsFile, app, hash_key

KEY_A, KEY_B = "sk-test-acme-0123456789", "sk-test-beta-9876543210"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def tenants_file(**limits):
    return TenantsFile.model_validate(
        {
            "tenants": [
                {
                    "name": "acme",
                    "key_sha256": hash_key(KEY_A),
                    "adapters": ["support", "sql-*"],
                    **limits,
                },
                {"name": "beta", "key_sha256": hash_key(KEY_B), "adapters": ["*"]},
            ]
        }
    )


def test_keys_authenticate_their_tenant():
    tenants = Tenants(tenants_file())
    assert tenants.authenticate(f"Bearer {KEY_A}").name == "acme"
    assert tenants.authenticate(f"bearer  {KEY_B} ").name == "beta"


@pytest.mark.parametrize(
    "header", [None, "", "Bearer ", f"Basic {KEY_A}", KEY_A, "Bearer sk-wrong", f"Bearer {KEY_A}x"]
)
def test_missing_or_wrong_keys_are_401_and_never_echoed(header):
    with pytest.raises(Unauthorized) as info:
        Tenants(tenants_file()).authenticate(header)
    assert info.value.status == 401
    assert KEY_A not in info.value.message and "sk-" not in info.value.message


def test_allow_list_names_and_patterns():
    tenants = Tenants(tenants_file())
    acme, beta = (tenants.authenticate(f"Bearer {k}") for k in (KEY_A, KEY_B))
    assert acme.may_use("support") and acme.may_use("sql-reports")
    assert not acme.may_use("support2") and not acme.may_use("sql")
    assert beta.may_use("anything") and "sk-" not in repr(acme)


def test_requests_per_minute_gives_429_with_retry_after():
    clock = Clock()
    tenants = Tenants(tenants_file(requests_per_minute=2), clock)
    acme = tenants.authenticate(f"Bearer {KEY_A}")
    tenants.admit(acme, 10)
    tenants.admit(acme, 10)
    with pytest.raises(RateLimited) as info:
        tenants.admit(acme, 10)
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "30"}
    clock.now += 29.0
    with pytest.raises(RateLimited) as info:
        tenants.admit(acme, 10)
    assert info.value.headers == {"Retry-After": "1"}  # rounded up, never 0
    clock.now += 1.0
    tenants.admit(acme, 10)
    beta = tenants.authenticate(f"Bearer {KEY_B}")  # no limits of its own
    for _ in range(100):
        tenants.admit(beta, 10_000)


def test_tokens_per_minute_reserves_then_settles():
    clock = Clock()
    tenants = Tenants(tenants_file(tokens_per_minute=150, requests_per_minute=100), clock)
    acme = tenants.authenticate(f"Bearer {KEY_A}")
    tenants.admit(acme, 100)
    with pytest.raises(RateLimited) as info:
        tenants.admit(acme, 100)  # 50 left, 2.5 tokens/s refill: 20 s
    assert info.value.headers["Retry-After"] == "20"
    assert acme.requests.level == 99  # a refused request takes nothing
    tenants.settle(acme, reserved=100, used=30)  # 70 unused come back: 120 available
    tenants.admit(acme, 100)
    with pytest.raises(InvalidRequest, match="more than your limit of 150 tokens per minute"):
        tenants.admit(acme, 151)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"tenants": [{"name": "a", "key_sha256": "abc"}]}, "key_sha256"),
        ({"tenants": [{"name": "a", "key_sha256": "0" * 64, "limit": 3}]}, "limit"),
        (
            {
                "tenants": [
                    {"name": "a", "key_sha256": "0" * 64},
                    {"name": "a", "key_sha256": "1" * 64},
                ]
            },
            "unique",
        ),
        (
            {
                "tenants": [
                    {"name": "a", "key_sha256": "0" * 64},
                    {"name": "b", "key_sha256": "0" * 64},
                ]
            },
            "share one key",
        ),
        (
            {"tenants": [{"name": "a", "key_sha256": "0" * 64, "requests_per_minute": 0}]},
            "requests_per_minute",
        ),
    ],
)
def test_bad_tenants_files_name_the_problem(tmp_path, bad, message):
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=message):
        Tenants.from_file(path)


def test_example_tenants_file_loads():
    tenants = Tenants.from_file("configs/serve-tenants.example.yaml")
    assert tenants.authenticate("Bearer sk-example-acme-not-a-real-key").name == "acme"


def test_cli_hashes_a_key_from_stdin_and_makes_new_keys():
    runner = CliRunner()
    result = runner.invoke(app, ["hash-key"], input=f"{KEY_A}\n")
    assert result.exit_code == 0 and result.stdout.strip() == hash_key(KEY_A)
    result = runner.invoke(app, ["new-key"])
    key, digest = (line.split()[-1] for line in result.stdout.splitlines())
    assert key.startswith("sk-") and len(key) > 40 and digest == hash_key(key)
