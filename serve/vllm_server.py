"""engine: vllm. The model deployment is Ray Serve LLM's `LLMServer` on vLLM; our ingress
(serve/app.py) stays in front of it and calls it through a handle (serve/vllm_gateway.py).

What is ours here, and why:
- `registry_adapter_path`: Ray Serve LLM loads adapters only from `dynamic_lora_loading_path`,
  which must be s3://, gs:// or azure:// (a laptop's registry on local disk is refused). Ours reads
  the registry through serve/adapters.py, local or s3, and hands vLLM a local directory. The model id
  is the adapter's immutable `NAME@VERSION`: a promotion or rollback is a new id, so a new vLLM
  LoRA id, and no replica serves a stale adapter.
- Concurrency: the first requests for a new adapter take turns loading it (VllmServer).
- Resources: on CPU the replica actor takes no CPU of its own and the engine's bundle takes
  `vllm.replica_cpus` (Ray Serve LLM's CPU accelerator config waited forever for resources here).
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from core.upstream import ray as upstream_ray
from serve.adapters import AdapterRegistry
from serve.config import ServeSettings
from serve.errors import AdapterIncompatible
from serve.names import parse_model_name

DEPLOYMENT = "VllmServer"  # the name `deployments:` in a Serve config overrides options of
LORA_FIX_ENV = "RAYFT_VLLM_LORA_FIX"  # read by serve/vllm_plugin.py in every vLLM process


def local_model_path(name_or_path: str) -> str:
    """Replicas may start in another directory than `serve run`: local paths are made absolute."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    from inference.config import ModelConfig
    from inference.model import resolve_model_path

    return resolve_model_path(ModelConfig(name_or_path=name_or_path))


def engine_kwargs(s: ServeSettings) -> dict[str, Any]:
    on_cpu = s.vllm.replica_gpus == 0
    kwargs: dict[str, Any] = {
        "enable_lora": True,
        "max_loras": s.max_loaded_adapters,
        "max_cpu_loras": max(s.max_cpu_adapters, s.max_loaded_adapters),
        "max_lora_rank": s.max_lora_rank,
        "max_num_seqs": s.max_batch_size,
        "dtype": s.dtype,
        # CUDA graphs do not exist on CPU; compiling for them there costs start-up only.
        "enforce_eager": on_cpu,
    }
    if s.context_window is not None:
        kwargs["max_model_len"] = s.context_window
    if s.vllm.compact_json:
        kwargs["structured_outputs_config"] = {
            "backend": "xgrammar",
            "disable_any_whitespace": True,
        }
    if s.vllm.tool_call_parser:
        kwargs |= {"enable_auto_tool_choice": True, "tool_call_parser": s.vllm.tool_call_parser}
    return kwargs | s.vllm.engine_kwargs


def llm_config(s: ServeSettings) -> LLMConfig:
    on_cpu = s.vllm.replica_gpus == 0
    env = {LORA_FIX_ENV: "1" if s.vllm.fix_cpu_lora_base_rows else "0"}
    if on_cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(s.vllm.cpu_kv_cache_gib)
    bundle = {"CPU": s.vllm.replica_cpus} if on_cpu else {"GPU": s.vllm.replica_gpus}
    return LLMConfig(
        model_loading_config={
            "model_id": s.base_model_id,
            "model_source": local_model_path(s.base_model),
        },
        engine_kwargs=engine_kwargs(s),
        # No dynamic_lora_loading_path: registry_adapter_path finds the adapters.
        lora_config={"max_num_adapters_per_replica": max(s.max_cpu_adapters, 1)},
        placement_group_config={"bundles": [bundle]},
        runtime_env={"env_vars": env},
        deployment_config={"ray_actor_options": {"num_cpus": 0}},
    )


def check_base(config: dict, base_names: set[str], adapter: str) -> None:
    """The base the adapter was trained on, checked as the hf engine checks it; vLLM checks the
    shapes and the rank itself when it loads the adapter."""
    from inference.engine import check_trained_on

    check_trained_on(config, base_names, adapter)
    if config.get("peft_type") != "LORA":
        raise AdapterIncompatible(f"adapter '{adapter}' is not a LoRA adapter")


def registry_adapter_path(registry: AdapterRegistry, base_names: set[str], model_id: str) -> str:
    """Serve's multiplexed model id `NAME@VERSION` → a local directory of that version."""
    name = parse_model_name(model_id)
    ref = registry.version_ref(name.name, name.selector)
    path = registry.local_path(ref)
    check_base(json.loads((path / "adapter_config.json").read_text()), base_names, ref.id)
    return str(path)


async def one_load_per_adapter(server: VllmServer, resolve) -> None:
    """Ray Serve LLM's VLLMEngine.resolve_lora checks "already loaded?" and then loads: two first
    requests for one adapter at once both load it, and vLLM refuses the second ("has already been
    loaded"). One lock per adapter id makes them take turns."""
    async with server._lora_locks[serve.get_multiplexed_model_id()]:
        await resolve()


@upstream_ray.around_adapter_resolution(one_load_per_adapter)
class VllmServer(LLMServer):
    """LLMServer with adapters read from our registry."""

    async def __init__(self, llm_config: LLMConfig, settings: dict):
        from inference.engine import base_name

        self._lora_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        s = ServeSettings.model_validate(settings)
        names = [s.base_model, *s.base_model_aliases] if s.check_base_name else []
        adapter_path = functools.partial(
            registry_adapter_path,
            AdapterRegistry.from_settings(s),
            {base_name(n) for n in names if n},
        )
        loader = upstream_ray.adapter_loader(adapter_path)
        await super().__init__(llm_config, model_downloader=loader)


def vllm_deployment(s: ServeSettings):
    """The bound VllmServer deployment; Serve options (replicas, autoscaling) from the settings
    here, or from `deployments: - name: VllmServer` in a Serve config."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
    }
    if s.model_replicas is not None:
        options["num_replicas"] = s.model_replicas
    elif s.model_autoscaling is not None:
        options["autoscaling_config"] = s.model_autoscaling
    return build_llm_deployment(
        llm_config(s),
        deployment_cls=VllmServer,
        bind_kwargs={"settings": s.model_dump()},
        override_serve_options=options,
    )
