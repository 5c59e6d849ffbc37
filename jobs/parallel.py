"""How the model is spread over the workers: DDP, FSDP2 or DeepSpeed ZeRO (`train.strategy`).

The recipe (jobs/finetune.py) sees one interface and never branches on the strategy:

    par = make_parallel(cfg, rt)
    par.setup(model, build_optimizer, build_scheduler)   # wraps; owns optimizer and scheduler
    loss = forward(par.model, batch)                       # training forward
    par.backward(loss, last=...)                           # per micro-batch, gradient sync on the last
    par.step(max_grad_norm)                                # clip, optimizer, scheduler, zero grads
    par.last_grad_norm                                     # that step's gradient norm, before clipping
    par.module                                             # the bare (peft) model: eval, generate
    par.gathered_state_dict(trainable_only)                # full weights on rank 0 (collective)
    par.save_state(dir) / par.load_state(dir)              # resume state, sharded where sharded

Every rank calls every method: under FSDP and ZeRO-3 a forward pass, a state-dict gather and a
save are collective: `Runtime.lockstep` (inference/runtime.py) tells evaluation and generation when they
must keep ranks in step (the same number of forward passes on each: inference/generate.py keeps a
rank that finished early joining the others' passes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.config import ConfigError
from core.upstream.deepspeed import zero3_state_dict
from inference.runtime import Runtime, rank_and_world, resolve_dtype, resolve_precision
from jobs.config import JobConfig
from jobs.model import trainable_parameters

BuildOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
BuildScheduler = Callable[[torch.optim.Optimizer], Any]


def make_parallel(cfg: JobConfig, rt: Runtime) -> Parallel:
    return {"ddp": Parallel, "fsdp": FSDP, "deepspeed": DeepSpeed}[cfg.train.strategy](cfg, rt)


def job_runtime(cfg: JobConfig, device: torch.device) -> Runtime:
    """The Runtime of a job's worker: its rank and world, its precision, and whether its forward
    passes are collective."""
    rank, world = rank_and_world()
    precision = resolve_precision(cfg.train.precision, device)
    return Runtime(device, rank, world, precision, collective_forward(cfg))


def collective_forward(cfg: JobConfig) -> bool:
    """Whether every forward pass is collective (parameters sharded: FSDP, ZeRO-3), so that ranks
    must run the same number of passes, in evaluation and generation too."""
    strategy = cfg.train.strategy
    return strategy == "fsdp" or (strategy == "deepspeed" and cfg.train.deepspeed.stage == 3)


def decoder_layer_classes(model: torch.nn.Module) -> set[type]:
    """The model's repeated block (LlamaDecoderLayer, ...): HF names it in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    classes = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"train.strategy: cannot find the decoder layers of {type(base).__name__} to shard "
            f"(its _no_split_modules is {sorted(names) or 'empty'})"
        )
    return classes


class Parallel:
    """DDP is the base case: each worker holds the whole model, gradients are all-reduced."""

    def __init__(self, cfg: JobConfig, rt: Runtime):
        self.cfg, self.rt, self.device = cfg, rt, rt.device
        self.rank, self.world = rt.rank, rt.world
        self.lora = cfg.lora is not None
        self.last_grad_norm: float | None = None  # of the last step, before clipping

    def setup(self, model, build_optimizer: BuildOptimizer, build_scheduler: BuildScheduler):
        self.trainable_tensors = len(trainable_parameters(model))  # what a save must hold
        self.module = model
        self.model = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.optimizer = build_optimizer(trainable_parameters(model))
        self.scheduler = build_scheduler(self.optimizer)

    def adapter_disabled(self):
        """The base model for an evaluation: the adapter switched off (peft), then on again."""
        return self.module.disable_adapter()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        skip_sync = not last and isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        with self.model.no_sync() if skip_sync else nullcontext():
            loss.backward()

    def step(self, max_grad_norm: float | None) -> None:
        self.last_grad_norm = self._clip(max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def last_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _clip(self, max_grad_norm: float | None) -> float:
        """The global L2 norm of the gradients before clipping (the same on every rank),
        clipped to max_grad_norm when set. Under FSDP the gradients are DTensors: the norm is
        taken over every shard."""
        params = trainable_parameters(self.module)
        if max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(norm, "full_tensor"):  # a DTensor: its shards' partial norms combined
            norm = norm.full_tensor()
        return float(norm)

    def gathered_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        if self.rank != 0:
            return None
        keep = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {
            k: v.detach().cpu()
            for k, v in self.module.state_dict().items()
            if not trainable_only or k in keep
        }

    # Resume state: the trainable weights, optimizer and scheduler (identical on every DDP rank).
    def save_state(self, directory: Path) -> None:
        if self.rank == 0:
            torch.save(
                {
                    "model": self.gathered_state_dict(trainable_only=True),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                directory / "ddp_state.pt",
            )

    def load_state(self, directory: Path) -> None:
        state = torch.load(directory / "ddp_state.pt", weights_only=False, map_location="cpu")
        missing = self.module.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {directory}: unexpected keys {missing.unexpected_keys[:3]}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class FSDP(Parallel):
    """FSDP2: `fully_shard` on every decoder layer, then on the model that holds them.

    The root is the transformers model, not the peft wrapper around it: peft's generate() and
    disable_adapter() call into the inner model, and FSDP2 gathers the root's own parameters
    (embeddings, final norm, head) in the root's forward hook.
    """

    def setup(self, model, build_optimizer: BuildOptimizer, build_scheduler: BuildScheduler):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.trainable_tensors = len(trainable_parameters(model))

        fsdp = self.cfg.train.fsdp
        kwargs: dict[str, Any] = {
            "mesh": self._mesh(),
            # grad_op keeps gathered parameters from forward to backward (ZeRO-2 like)
            "reshard_after_forward": fsdp.sharding != "grad_op",
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=resolve_dtype(fsdp.param_dtype, self.device),
                reduce_dtype=resolve_dtype(fsdp.reduce_dtype, self.device),
            ),
        }
        if fsdp.cpu_offload:
            # parameters, gradients and optimizer state on the host; pinned memory needs CUDA
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=self.device.type == "cuda")
        classes = tuple(decoder_layer_classes(model))
        root = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in [m for m in root.modules() if isinstance(m, classes)]:
            fully_shard(layer, **kwargs)
        fully_shard(root, **kwargs)
        self.root, self.module, self.model = root, model, model
        self.optimizer = build_optimizer(trainable_parameters(model))
        self.scheduler = build_scheduler(self.optimizer)

    @contextmanager
    def adapter_disabled(self):
        # peft switches the adapter off and on by setting requires_grad on the parameters that
        # are registered at that moment; FSDP2 swaps sharded and gathered parameters in and out,
        # and grad_op leaves the gathered ones registered after a forward pass. Resharding first
        # makes both switches land on the sharded parameters the optimizer holds: otherwise the
        # adapter stays "frozen" and is left out of the saved state (an empty adapter file).
        self._reshard()
        with self.module.disable_adapter():
            yield
            self._reshard()

    def _reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for m in self.root.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        fsdp = self.cfg.train.fsdp
        if fsdp.sharding != "hybrid":
            return init_device_mesh(self.device.type, (self.world,))
        group = fsdp.shard_group_size or _gpus_per_node() or self.world
        if self.world % group:
            raise ConfigError(
                f"train.fsdp.sharding: hybrid needs a multiple of {group} workers "
                f"(train.fsdp.shard_group_size), got {self.world}"
            )
        return init_device_mesh(
            self.device.type, (self.world // group, group), mesh_dim_names=("replicate", "shard")
        )

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.root.set_requires_gradient_sync(last)
        loss.backward()

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kw)

    def gathered_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(
            self.module,
            options=self._options(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
            ),
        )
        return full if self.rank == 0 else None

    # Resume state: torch.distributed.checkpoint, each rank writes its own shard (Ray Train
    # merges the ranks' files into one checkpoint directory); loading reshards if the worker
    # count changed.
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(
            self.module, self.optimizer, options=self._options(ignore_frozen_params=self.lora)
        )
        return {"model": model_sd, "optimizer": optim_sd}

    def save_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(directory / "fsdp"))
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load_state(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(directory / "fsdp"))
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self._options(ignore_frozen_params=self.lora, strict=not self.lora),
        )
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))


class DeepSpeed(Parallel):
    """DeepSpeed ZeRO 1/2/3; the engine owns the optimizer step, clipping and accumulation."""

    def setup(self, model, build_optimizer: BuildOptimizer, build_scheduler: BuildScheduler):
        import deepspeed

        self.trainable_tensors = len(trainable_parameters(model))

        deepspeed.init_distributed(
            dist_backend=dist.get_backend() if dist.is_initialized() else None
        )
        config = deepspeed_config(self.cfg, self.world, self.device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(trainable_parameters(model)),
            lr_scheduler=build_scheduler,
            config=config,
        )
        self.module, self.model = self.engine.module, self.engine

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # our loss is already a share of the step's token-mean: no division by accumulation steps
        self.engine.backward(loss, scale_wrt_gas=False)
        # reduces gradients, clips and steps the optimizer and scheduler at the accumulation boundary
        self.engine.step()
        if last and not self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed did not step at the end of a step's micro-batches")
        if last:  # the engine's own norm of this step, unscaled, before its clipping
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = None if norm is None else float(norm)

    def step(self, max_grad_norm: float | None) -> None:
        pass  # done in backward(last=True) by the engine

    def gathered_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        if self.rt.collective_forward:  # ZeRO-3: parameters are partitioned, gather layer by layer
            sd = zero3_state_dict(self.engine, trainable_only)
            return sd if self.rank == 0 else None
        return super().gathered_state_dict(trainable_only)

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(
            str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=self.lora
        )

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_module_strict=not self.lora
        )
        if path is None:
            raise RuntimeError(f"checkpoint {directory}: no DeepSpeed state under deepspeed/state")


def _gpus_per_node() -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return None


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_config(cfg: JobConfig, world: int, device: torch.device | None = None) -> dict:
    """The DeepSpeed JSON for this job: generated from the job config, a user's file merged over it.

    The user's file wins, except where it contradicts the job's batch sizes (an error naming the
    key): DeepSpeed would otherwise train a different batch than the one the data was planned for.
    """
    ds = cfg.train.deepspeed
    micro, grad_accum = (
        cfg.train.micro_batch_size,
        cfg.train.effective_batch_size // (cfg.train.micro_batch_size * world),
    )
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {
            "device": "cpu",
            "pin_memory": device is not None and device.type == "cuda",
        }
    if ds.offload_params:
        zero["offload_param"] = {
            "device": "cpu",
            "pin_memory": device is not None and device.type == "cuda",
        }
    if ds.stage == 3:
        # the consolidated state dict for the saved adapter / model is gathered on demand
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    precision = cfg.train.precision
    if precision == "auto":
        cuda = device is not None and device.type == "cuda"
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    config: dict[str, Any] = {
        "train_batch_size": cfg.train.effective_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # the optimizer is torch's AdamW, built by the recipe: no op to compile; with offload it
        # steps on the CPU copy (DeepSpeedCPUAdam would be faster on GPU nodes, at a compile)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.config:
        user = read_deepspeed_json(ds.config)
        for key in BATCH_KEYS:
            if key in user and user[key] not in ("auto", config[key]):
                raise ConfigError(
                    f"{ds.config}: {key} is {user[key]}, but the job's train.* settings give "
                    f'{config[key]} on {world} worker(s); remove it or set it to "auto"'
                )
            user.pop(key, None)
        config = _merge(config, user)
    return config


def read_deepspeed_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed.config: file not found: {path}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed.config: {path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed.config: {path}: expected a JSON object")
    return data


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
