"""Calls from the ingress into a model deployment (the hf engine's ModelServer or the vllm
engine's VllmServer): overload and dead replicas as our 503, a call sent again when its replica
died before answering. Generation has no side effects, so running it twice is safe."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from serve.errors import Overloaded

log = logging.getLogger("ray.serve")

# A model replica that dies under a request: the request is sent again (to another replica) this
# many times.
REPLICA_RETRIES = 2
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
RETRY_AFTER_S = 1

T = TypeVar("T")


def overloaded(why: str) -> Overloaded:
    return Overloaded(
        f"The server is overloaded ({why}); retry after {RETRY_AFTER_S} s.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def with_replica_retries(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()` until it returns, again when its replica died (an attempt that opened a
    stream cancels it before raising); full queues and a deployment that cannot start are a
    503 at once."""
    for n in range(REPLICA_RETRIES + 1):
        try:
            return await attempt()
        except BackPressureError:
            raise overloaded("the model replicas' queues are full") from None
        except DeploymentUnavailableError:
            raise overloaded("the model deployment failed to start") from None
        except REPLICA_GONE:
            if n == REPLICA_RETRIES:
                raise overloaded("model replicas failed under this request") from None
            log.warning("a model replica died under a request; sending it again")
    raise AssertionError("unreachable")
