"""Tenants: API keys (stored as sha256 hashes only), adapter allow-lists, rate limits.

A tenants file:
    tenants:
      - name: acme
        key_sha256: 9f86d081884c7d65...      # python -m serve.tenants hash-key < keyfile
        adapters: ["support-bot", "reviews-*"]   # names or fnmatch patterns; "*" is every model
        requests_per_minute: 60
        tokens_per_minute: 20000             # prompt + completion tokens

    python -m serve.tenants new-key    # a random key and its hash
    python -m serve.tenants hash-key   # the hash of a key read from stdin (never from argv)
"""

from __future__ import annotations

import fnmatch
import getpass
import hashlib
import hmac
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core import cli
from serve.errors import InvalidRequest, RateLimited, Unauthorized


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    adapters: list[str] = Field(default_factory=list)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: list[TenantConfig]

    @model_validator(mode="after")
    def _unique(self):
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        if len({t.key_sha256 for t in self.tenants}) != len(self.tenants):
            raise ValueError("two tenants share one key hash")
        return self


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TokenBucket:
    """`capacity` units that refill evenly over a minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float]):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are available (0: now)."""
        self._refill()
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class Tenant:
    def __init__(self, config: TenantConfig, clock: Callable[[], float]):
        self.config = config
        self.name = config.name
        self.requests = (
            TokenBucket(config.requests_per_minute, clock) if config.requests_per_minute else None
        )
        self.tokens = (
            TokenBucket(config.tokens_per_minute, clock) if config.tokens_per_minute else None
        )

    def may_use(self, model_name: str) -> bool:
        return any(fnmatch.fnmatchcase(model_name, p) for p in self.config.adapters)

    def __repr__(self) -> str:  # never the key hash
        return f"Tenant({self.name!r})"


class Tenants:
    """Authenticates API keys and admits requests within each tenant's limits (per replica)."""

    def __init__(self, config: TenantsFile, clock: Callable[[], float] = time.monotonic):
        self._tenants = [Tenant(t, clock) for t in config.tenants]
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, clock: Callable[[], float] = time.monotonic) -> Tenants:
        try:
            data = yaml.safe_load(Path(path).read_text())
            return cls(TenantsFile.model_validate(data), clock)
        except (OSError, yaml.YAMLError, ValidationError) as e:
            raise ValueError(f"tenants file {path}: {e}") from None

    def get(self, name: str) -> Tenant:
        return next(t for t in self._tenants if t.name == name)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant whose key is the bearer token; Unauthorized (401) otherwise."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("Missing API key: send 'Authorization: Bearer YOUR_KEY'.")
        digest = hash_key(key.strip())
        found = None
        for tenant in self._tenants:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(digest, tenant.config.key_sha256):
                found = tenant
        if found is None:
            raise Unauthorized("Incorrect API key provided.")
        return found

    def admit(self, tenant: Tenant, tokens: int) -> None:
        """Take one request and `tokens` (prompt + max completion) from the tenant's buckets, or
        raise RateLimited (429) with Retry-After; nothing is taken from either on refusal."""
        if tenant.tokens is not None and tokens > tenant.tokens.capacity:
            raise InvalidRequest(
                f"this request may use {tokens} tokens (prompt + max_tokens), more than your "
                f"limit of {int(tenant.tokens.capacity)} tokens per minute: lower max_tokens",
                param="max_tokens",
            )
        with self._lock:
            waits = []
            if tenant.requests is not None:
                waits.append(("requests", tenant.requests.wait_for(1)))
            if tenant.tokens is not None:
                waits.append(("tokens", tenant.tokens.wait_for(tokens)))
            limit, wait = max(waits, key=lambda w: w[1], default=("", 0.0))
            if wait > 0:
                retry = max(1, math.ceil(wait))
                raise RateLimited(
                    f"Rate limit reached for {limit} per minute; retry in {retry} s.",
                    headers={"Retry-After": str(retry)},
                )
            if tenant.requests is not None:
                tenant.requests.take(1)
            if tenant.tokens is not None:
                tenant.tokens.take(tokens)

    def settle(self, tenant: Tenant, reserved: int, used: int) -> None:
        """Return the reserved tokens a finished request did not use."""
        if tenant.tokens is not None and reserved > used:
            with self._lock:
                tenant.tokens.give_back(reserved - used)


app = cli.app(help="API keys for the serving app's tenants file.")


@app.command("hash-key")
def hash_key_command() -> None:
    """Print the sha256 of a key read from stdin (or typed, hidden), for key_sha256."""
    key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        raise typer.BadParameter("empty key")
    print(hash_key(key))


@app.command("new-key")
def new_key_command() -> None:
    """Print a new random key (give it to the tenant) and its hash (put it in the tenants file)."""
    key = "sk-" + secrets.token_urlsafe(32)
    print(f"key:        {key}\nkey_sha256: {hash_key(key)}")


if __name__ == "__main__":
    app()
