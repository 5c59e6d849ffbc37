"""Running one batch of mixed-adapter requests on an engine whose adapter slots are limited."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from inference.engine import Engine, GenerationRequest, GenerationResult
from serve.adapters import AdapterCache
from serve.errors import ApiError

log = logging.getLogger(__name__)


def group_by_adapter_limit(
    requests: Sequence[GenerationRequest], max_adapters: int
) -> list[list[int]]:
    """Indices of requests in groups with at most max_adapters distinct adapters each (base rows
    join the first group), each group in arrival order."""
    groups: list[tuple[set[str], list[int]]] = []
    for i, request in enumerate(requests):
        key = request.adapter
        for adapters, members in groups:
            if key is None or key in adapters or len(adapters) < max_adapters:
                if key is not None:
                    adapters.add(key)
                members.append(i)
                break
        else:
            groups.append(({key} if key else set(), [i]))
    return [members for _, members in groups]


def generate_in_groups(
    engine: Engine,
    cache: AdapterCache,
    requests: Sequence[GenerationRequest],
    on_group: Callable[[int, int], None] | None = None,
) -> list[GenerationResult | Exception]:
    """Generate for every request: each group's adapters are put on the model, then the group runs
    as one mixed batch. A failing group gives its requests the error; other groups still run.
    on_group(rows, adapters) is called per group (metrics). Call on the model thread."""
    results: list[GenerationResult | Exception] = [None] * len(requests)  # type: ignore[list-item]
    for group in group_by_adapter_limit(requests, cache.max_loaded):
        keys = [requests[i].adapter for i in group if requests[i].adapter]
        try:
            cache.activate(keys)
            outputs: list = engine.generate([requests[i] for i in group])
        except ApiError as e:
            outputs = [e] * len(group)
        except Exception as e:
            log.exception("generate failed for a group of %d requests", len(group))
            outputs = [ApiError(f"generation failed: {type(e).__name__}")] * len(group)
        if on_group is not None:
            on_group(len(group), len(set(keys)))
        for i, out in zip(group, outputs, strict=True):
            if isinstance(out, GenerationResult):
                out.batch_rows, out.batch_adapters = len(group), len(set(keys))
            results[i] = out
    return results
