"""Tenant rate limits across replicas: the token buckets live in one small named Ray actor per
app (and tenants file), which every ingress replica asks before it admits a request.

A replica that cannot reach the actor within `timeout_s` (dead with the replica that owned it,
a slow node) admits with its own buckets for that request, logs a warning, and asks for the
actor again on the next one: limits then hold per replica, as without the actor, until it is
back. The actor is not detached: it lives as long as the replica that created it, so an app that
is deleted leaves nothing behind; a new actor starts with full buckets.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import ray

from serve.errors import ApiError
from serve.tenants import Tenant, Tenants

log = logging.getLogger("ray.serve")

Release = Callable[[int], None]  # give back what a request reserved but did not use


class LocalLimits:
    """This replica's own buckets (serve/tenants.py)."""

    def __init__(self, tenants: Tenants):
        self.tenants = tenants

    async def admit(self, tenant: Tenant, tokens: int) -> Release:
        self.tenants.admit(tenant, tokens)
        return lambda used: self.tenants.settle(tenant, tokens, used)


@ray.remote(num_cpus=0)
class RateLimiter:
    """The app's buckets; returns refusals (RateLimited, with Retry-After) rather than raising."""

    def __init__(self, tenants_file: str):
        self.tenants = Tenants.from_file(tenants_file)

    def admit(self, tenant: str, tokens: int) -> ApiError | None:
        try:
            self.tenants.admit(self.tenants.get(tenant), tokens)
        except ApiError as e:
            return e
        return None

    def settle(self, tenant: str, reserved: int, used: int) -> None:
        self.tenants.settle(self.tenants.get(tenant), reserved, used)


def limiter_name(app: str, tenants_file: str | Path) -> str:
    """One actor per app and tenants file content: a changed file starts a new one."""
    digest = hashlib.sha256(Path(tenants_file).read_bytes()).hexdigest()[:12]
    return f"rayft-rate-limits-{app}-{digest}"


class SharedLimits:
    """Admission against the app's RateLimiter actor, or LocalLimits when it cannot be reached."""

    def __init__(self, tenants: Tenants, tenants_file: str, name: str, timeout_s: float = 1.0):
        self.local = LocalLimits(tenants)
        self.tenants_file = str(tenants_file)
        self.name = name
        self.timeout_s = timeout_s
        self._actor = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Create (or find) the actor and wait until it answers: a new actor is a new worker
        process, seconds on a busy node, and every request until then is limited locally."""
        try:
            ray.get(self.actor().__ray_ready__.remote(), timeout=timeout_s)
        except Exception as e:
            log.warning(
                "shared rate limiter %s did not start (%s); limiting per replica until it does",
                self.name,
                type(e).__name__,
            )

    def actor(self):
        if self._actor is None:
            self._actor = RateLimiter.options(name=self.name, get_if_exists=True).remote(
                self.tenants_file
            )
        return self._actor

    async def admit(self, tenant: Tenant, tokens: int) -> Release:
        try:
            actor = self.actor()
            reply = actor.admit.remote(tenant.name, tokens)

            async def answer():
                return await reply

            refusal = await asyncio.wait_for(answer(), self.timeout_s)
        except Exception as e:  # the actor is gone or slow: this replica's buckets, this time
            log.warning(
                "shared rate limiter %s unavailable (%s); limiting per replica",
                self.name,
                type(e).__name__,
            )
            self._actor = None
            self.actor()  # a new one (or the same, when it was only slow), for the next request
            return await self.local.admit(tenant, tokens)
        if refusal is not None:
            raise refusal

        def release(used: int) -> None:
            if used < tokens:
                actor.settle.remote(tenant.name, tokens, used)  # no reply awaited

        return release
