"""Ray's private names, the only place in the project that touches them.

Each function says which private name it reaches, what it is, and why no public API does the
same. The Ray versions they are known to work with are `SUPPORTED["ray"]` (core/upstream); a
config that will reach one calls `require("ray")` when it loads. Every import is inside its
function: importing this module costs nothing and needs neither vLLM nor Ray Serve LLM.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

# The step of Ray Serve LLM's LLMServer that loads the adapter a request's multiplexed model id
# names (ray/llm/_internal/serve/core/server/llm_server.py).
_RESOLVE_LORA = "_maybe_resolve_lora_from_multiplex"


def asha_bracket(grace_steps: float, max_t: int, reduction_factor: float):
    """Ray Tune's ASHA bracket (`ray.tune.schedulers.async_hyperband._Bracket`, s=0): its
    `on_result(trial, step, metric)` answers CONTINUE or STOP as ASHAScheduler would.

    Why private: ASHAScheduler builds its brackets inside and exposes none; replaying measured
    eval curves through Tune's own rung logic (tune.search.replay_asha) needs one on its own.
    """
    from ray.tune.schedulers.async_hyperband import _Bracket

    return _Bracket(grace_steps, max_t, reduction_factor, s=0)


def deploy_serve_config(config) -> None:
    """Start Serve with the config's HTTP options and deploy its applications, as
    `serve run CONFIG` does (`ray.serve._private.api.serve_start(...).deploy_apps(config)`,
    ray/serve/scripts.py). `config` is a `ray.serve.schema.ServeDeploySchema`.

    Why private: the public `serve.run` takes a built Application, not a config's schema (its
    `deployments:` overrides such as autoscaling are lost), and `serve deploy` goes through the
    dashboard's REST API, which a driver inside the cluster does not need.
    """
    from ray.serve._private.api import serve_start

    serve_start(http_options=config.http_options.model_dump()).deploy_apps(config)


def adapter_loader(local_path: Callable[[str], str]) -> type:
    """The `model_downloader` class for `LLMServer(llm_config, model_downloader=...)`: Ray Serve
    LLM's adapter loader (`ray.llm._internal.serve.utils.lora_serve_utils.LoraModelLoader`) with
    the adapter of a multiplexed model id read from `local_path(model_id)`, a local directory
    (it may raise an error for the client). Each adapter gets a new LoRA int id from the
    replica's counter Ray's own loader uses (`ray.llm._internal.common.models.global_id_manager`),
    in the loader's result type (`...core.configs.llm_config.DiskMultiplexConfig`).

    Why private: LLMServer is public, but the loader it takes, the loader's result and the id
    counter are not exported; Ray's own loader reads only `dynamic_lora_loading_path` on s3://,
    gs:// or azure://.
    """
    from ray.llm._internal.common.models import global_id_manager
    from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
    from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

    class LocalAdapterLoader(LoraModelLoader):
        async def load_model_from_config(self, lora_model_id: str, llm_config):
            # No mirror config to fetch first: the model id is all local_path needs.
            return await self.load_model(lora_model_id, lora_model_id)

        def _load_model_sync(self, lora_model_id: str):
            return DiskMultiplexConfig(
                model_id=lora_model_id,
                max_total_tokens=None,
                local_path=local_path(lora_model_id),
                lora_assigned_int_id=global_id_manager.next(),
            )

    return LocalAdapterLoader


def picklable_chat_request(request):
    """A chat request whose tool-call messages can cross a handle call: Ray Serve LLM's ingress
    does the same before its own handle call
    (`ray.llm._internal.serve.core.ingress.utils._sanitize_chat_completion_request`).

    Why private: pydantic keeps iterators in tool-call messages, which cannot be pickled, and
    only Ray's ingress knows which fields hold them.
    """
    from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request

    return _sanitize_chat_completion_request(request)


Around = Callable[[Any, Callable[[], Awaitable[None]]], Awaitable[None]]


def around_adapter_resolution(around: Around) -> Callable[[type], type]:
    """Class decorator for an LLMServer subclass: `await around(server, resolve)` runs in place of
    the step that loads a request's adapter (`LLMServer._maybe_resolve_lora_from_multiplex`);
    `await resolve()` runs Ray's own step.

    Why private: no public hook runs before that step, and it checks "already loaded?" before it
    loads, so two first requests for one adapter both load it (vLLM refuses the second).
    """

    def decorate(server_cls: type) -> type:
        inherited = getattr(server_cls, _RESOLVE_LORA, None)
        if inherited is None:
            raise TypeError(
                f"{server_cls.__name__} has no {_RESOLVE_LORA}: this Ray is not one that "
                "core/upstream supports (see SUPPORTED['ray'])"
            )

        async def resolve_lora(self) -> None:
            await around(self, lambda: inherited(self))

        setattr(server_cls, _RESOLVE_LORA, resolve_lora)
        return server_cls

    return decorate
