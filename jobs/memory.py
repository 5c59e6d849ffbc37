"""Memory planning: will this model, strategy and batch fit the workers, before any worker starts?

`plan_memory(cfg)` counts parameters from the model's config alone (a meta-device model, no
weights read) and estimates each worker's bytes: weights, gradients, optimizer state,
activations, logits and fixed overheads, split into accelerator memory and host memory.
`check_memory(plan, cfg, nodes)` compares that with what the workers get (GPU memory by
accelerator type, host memory per node) and warns above 85% or refuses above 100% with the
numbers. Every estimate is an approximation; each assumption is stated where it is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from core.config import ConfigError
from jobs.config import JobConfig
from jobs.logits import CHUNK_ROWS

GIB = 1024**3
WARN_FRACTION = 0.85  # above this share of a worker's memory: a warning
REFUSE_FRACTION = 1.0  # above this: the job cannot fit, refuse before starting workers

# Fixed costs a worker pays whatever the model: the CUDA context, cuBLAS/NCCL workspaces and
# the caching allocator's fragmentation on a GPU; Python, torch and the Ray worker in host RAM
# (~1.1 GB per CPU worker measured; benchmarks/README.md: peak RSS per worker).
CUDA_OVERHEAD = int(1.5 * GIB)
PROCESS_OVERHEAD = int(1.0 * GIB)

# Usable memory per GPU by Ray's accelerator_type (the `accelerator_type:X` resource), in GiB as
# torch reports it. Where one name covers several sizes (Ray calls every A100 "A100"), a
# (smallest, largest) pair: warn against the smallest, refuse only beyond the largest.
GPU_MEMORY_GIB: dict[str, tuple[float, float]] = {
    "T4": (14.6, 14.6),
    "V100": (15.8, 31.7),
    "A10G": (22.1, 22.1),
    "L4": (22.0, 22.0),
    "L40S": (44.4, 44.4),
    "A100": (39.4, 79.1),
    "A100-40G": (39.4, 39.4),
    "A100-80G": (79.1, 79.1),
    "H100": (79.1, 93.1),
    "H200": (139.8, 139.8),
    "H20": (95.0, 139.8),
    "B200": (178.4, 178.4),
    "RTX-PRO-6000": (94.9, 94.9),
}
GPU_MEMORY_FIELD = "scaling.gpu_memory_gib"  # per-GPU memory in GiB (80 for an 80 GB card), wins
CHECK_FIELD = "scaling.memory_check"  # refuse (default) | warn | off

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------ counting parameters


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs to know about a model, all from its config."""

    total_params: int
    trainable_params: int  # LoRA's parameters, or every parameter for a full fine-tune
    quantizable_params: int  # Linear weights QLoRA stores in 4 bits (all but the output layer)
    layer_params: int  # the largest decoder layer: the unit FSDP / ZeRO-3 gather at a time
    outer_params: int  # outside the decoder layers (embeddings, head, final norm): the root unit
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width per token: kv heads x head dim (GQA makes it < hidden)
    vocab: int
    lora_inputs_per_layer: int  # sum of in_features over the LoRA-wrapped Linears of one layer


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks: the ModuleList holding most of the parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def model_shape(hf_config, lora=None, trust_remote_code: bool = False) -> ModelShape:
    """Count parameters exactly on a meta-device model (nothing allocated, nothing read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    output_layer = model.get_output_embeddings()
    quantizable = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not output_layer
    )
    layers = _decoder_layers(model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    trainable, lora_inputs = total, 0
    if lora is not None:
        from jobs.model import add_lora

        with torch.device("meta"):  # else peft allocates and initialises the adapters for real
            peft_model = add_lora(model, lora)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        lora_inputs = sum(
            m.in_features for m in layers[0].modules() if hasattr(m, "lora_A") and m.lora_A
        )
    text = hf_config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(
        total_params=total,
        trainable_params=trainable,
        quantizable_params=quantizable,
        layer_params=layer_params,
        outer_params=total - sum(p.numel() for p in layers.parameters()),
        num_layers=len(layers),
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=text.vocab_size,
        lora_inputs_per_layer=lora_inputs,
    )


def load_model_shape(cfg: JobConfig) -> ModelShape:
    """The job's model shape from its config.json only (local dir, hub id or s3://)."""
    from transformers import AutoConfig

    from inference.model import resolve_model_path

    hf_config = AutoConfig.from_pretrained(
        resolve_model_path(cfg.model),
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    return model_shape(hf_config, cfg.lora, cfg.model.trust_remote_code)


# ------------------------------------------------------------------------ the per-worker estimate


@dataclass
class MemoryPlan:
    """Estimated bytes per worker. The parts in DEVICE_PARTS live in GPU memory (in host RAM on a
    CPU worker); the `host_*` parts in host RAM beside a GPU (offloaded state, the process)."""

    total_params: int
    trainable_params: int
    weights: int = 0  # the worker's share of the stored weights (4-bit base under QLoRA)
    gathered: int = 0  # full copies of the units FSDP / ZeRO-3 gather for compute
    reference: int = 0  # DPO's frozen reference model (full fine-tune only)
    gradients: int = 0
    optimizer: int = 0  # AdamW moments, plus the fp32 master weights under mixed precision
    activations: int = 0  # kept for backward over one micro-batch
    # Two peaks that do not overlap: the loss over one chunk of logits (in forward, and rebuilt
    # in backward), and one decoder layer rebuilt in backward under gradient checkpointing. The
    # total counts the larger.
    logits: int = 0
    recompute: int = 0
    overhead: int = 0  # CUDA context and fragmentation on a GPU
    host_weights: int = 0
    host_gradients: int = 0
    host_optimizer: int = 0
    host_overhead: int = 0
    on_gpu: bool = False

    @property
    def device_bytes(self) -> int:
        steady = sum(getattr(self, name) for name in DEVICE_PARTS)
        return steady - min(self.logits, self.recompute)

    @property
    def host_bytes(self) -> int:
        return sum(getattr(self, name) for name in HOST_PARTS)


DEVICE_PARTS = (
    "weights",
    "gathered",
    "reference",
    "gradients",
    "optimizer",
    "activations",
    "logits",
    "recompute",
    "overhead",
)
HOST_PARTS = ("host_weights", "host_gradients", "host_optimizer", "host_overhead")


def compute_bytes(cfg: JobConfig) -> int:
    """Bytes per activation element: 16-bit when autocast or the weights are 16-bit."""
    if cfg.model.quantization:
        return DTYPE_BYTES[cfg.model.quantization.compute_dtype]
    precision = cfg.train.precision
    if precision == "auto":  # the job picks bf16 on CUDA (assumed bf16-capable), fp32 on CPU
        precision = "bf16" if cfg.scaling.use_gpu else "fp32"
    return 2 if precision in ("bf16", "fp16") or weight_bytes(cfg) == 2 else 4


def weight_bytes(cfg: JobConfig) -> int:
    """Bytes per stored weight, as inference.runtime.resolve_dtype loads them (auto: bf16 on GPU)."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if cfg.scaling.use_gpu else "float32"
    return DTYPE_BYTES[dtype]


def shard_counts(cfg: JobConfig, gpus_per_node: int | None = None) -> tuple[int, int, int]:
    """How many ways (weights, gradients, optimizer state) are split across workers."""
    n = cfg.scaling.num_workers
    t = cfg.train
    if t.strategy == "fsdp":
        if t.fsdp.sharding == "hybrid":
            n = min(n, t.fsdp.shard_group_size or gpus_per_node or n)
        return (1 if t.fsdp.sharding == "grad_op" else n), n, n
    if t.strategy == "deepspeed":
        stage = t.deepspeed.stage
        return (n if stage == 3 else 1), (n if stage >= 2 else 1), n
    return 1, 1, 1  # ddp: every worker holds everything


def activation_elements_per_token(shape: ModelShape, cfg: JobConfig) -> float:
    """Elements one decoder layer keeps for backward, per token, adapted from Korthikanti et al.
    2022 ("Reducing Activation Recomputation in Large Transformer Models", 34sbh + 5as²b bytes
    for a GPT layer in fp16) to a Llama-style layer: two RMSNorms keeping input and output (4h),
    the QKV input (h), the q/k/v that attention keeps (h + 2·kv), the attention output and its
    reshaped copy for o_proj (2h), and a gated MLP's input, gate, up, act(gate) and product (h +
    4i). No dropout in the base model. SDPA / flash attention keep no seq² scores; the eager path
    adds Korthikanti's 5as²b bytes (2.5 heads·seq elements per token)."""
    h, i = shape.hidden, shape.intermediate
    per_token = 4 * h + h + (h + 2 * shape.kv_dim) + 2 * h + (h + 4 * i)
    if cfg.model.attn_implementation == "eager":
        per_token += 2.5 * shape.heads * cfg.data.max_seq_len
    return per_token


def plan_memory(
    cfg: JobConfig, shape: ModelShape | None = None, gpus_per_node: int | None = None
) -> MemoryPlan:
    """Estimate one worker's memory for this job; `shape` defaults to the job's model config."""
    shape = shape or load_model_shape(cfg)
    plan = MemoryPlan(shape.total_params, shape.trainable_params, on_gpu=cfg.scaling.use_gpu)
    shards = shard_counts(cfg, gpus_per_node)
    plan_model_states(plan, cfg, shape, shards)
    plan_offload(plan, cfg, shape, shards[2])
    plan_activations(plan, cfg, shape)
    if cfg.scaling.use_gpu:
        plan.overhead = CUDA_OVERHEAD
        plan.host_overhead = PROCESS_OVERHEAD
    else:
        plan.overhead = PROCESS_OVERHEAD  # on CPU the "device" is host RAM
    return plan


def plan_model_states(plan: MemoryPlan, cfg: JobConfig, shape: ModelShape, shards) -> None:
    """Weights, gradients, optimizer state (and DPO's reference) per worker, once sharded."""
    t, full = cfg.train, cfg.lora is None
    w_shards, g_shards, o_shards = shards
    wb, cb = weight_bytes(cfg), compute_bytes(cfg)
    # `total_params` counts the base model; LoRA's parameters come on top of it
    if cfg.model.quantization:
        # bitsandbytes 4-bit: half a byte per weight plus one fp32 absmax per 64-weight block;
        # double quantization stores those absmax in 8 bits with an fp32 constant per 256 blocks.
        # The rest (embeddings, norms, output layer) in fp32, as prepare_model_for_kbit_training
        # leaves them.
        q = cfg.model.quantization
        constants = (1 / 64 + 4 / (64 * 256)) if q.double_quant else 4 / 64
        weights = (
            shape.quantizable_params * (0.5 + constants)
            + (shape.total_params - shape.quantizable_params) * 4
        )
    else:
        weights = shape.total_params * wb
    if full:
        grads = shape.total_params * wb
        # AdamW: two fp32 moments; 16-bit weights also need an fp32 master copy to step in
        # (DeepSpeed's and FSDP's mixed precision keep one; pure-bf16 AdamW loses updates).
        optim = shape.total_params * (8 + (4 if wb == 2 else 0))
    else:
        # peft keeps adapter weights in fp32 (autocast_adapter_dtype), so their gradients and
        # AdamW moments are fp32 and no master copy is needed.
        weights += shape.trainable_params * 4
        grads = shape.trainable_params * 4
        optim = shape.trainable_params * 8
    if t.strategy == "ddp" and cfg.scaling.num_workers > 1:
        grads *= 2  # DDP's all-reduce buckets are a second copy of the gradients
    plan.weights = math.ceil(weights / w_shards)
    plan.gradients = math.ceil(grads / g_shards)
    plan.optimizer = math.ceil(optim / o_shards)
    if full and t.method == "dpo":
        # a frozen reference copy, sharded and offloaded like the weights; LoRA's reference is
        # the base with the adapter switched off, at no cost
        plan.reference = math.ceil(shape.total_params * wb / w_shards)
    if w_shards > 1:
        # the root unit (embeddings, head) stays gathered through forward; one decoder layer is
        # computed while the next is prefetched. Gathered in FSDP's param_dtype, else in the
        # compute dtype (an upper bound for a 4-bit base).
        param_dtype = t.fsdp.param_dtype if t.strategy == "fsdp" else "auto"
        gathered_bytes = cb if param_dtype == "auto" else DTYPE_BYTES[param_dtype]
        plan.gathered = (shape.outer_params + 2 * shape.layer_params) * gathered_bytes


def plan_offload(plan: MemoryPlan, cfg: JobConfig, shape: ModelShape, o_shards: int) -> None:
    """What offloading moves from device memory to host memory."""
    t = cfg.train
    ds, fsdp = t.deepspeed, t.fsdp
    if t.strategy == "deepspeed" and ds.offload_optimizer:
        # ZeRO-Offload steps on the CPU: the optimizer state and this worker's gradient
        # partition, in fp32, live in host RAM; the device keeps only reduce buckets (left to
        # the fixed overhead), as in DeepSpeed's own estimator
        plan.host_optimizer, plan.optimizer = plan.optimizer, 0
        plan.host_gradients, plan.gradients = math.ceil(shape.trainable_params * 4 / o_shards), 0
    if (t.strategy == "deepspeed" and ds.stage == 3 and ds.offload_params) or (
        t.strategy == "fsdp" and fsdp.cpu_offload
    ):
        plan.host_weights, plan.weights = plan.weights + plan.reference, 0
        plan.reference = 0
    if t.strategy == "fsdp" and fsdp.cpu_offload:  # FSDP2's CPUOffloadPolicy steps on the CPU
        plan.host_gradients, plan.gradients = plan.gradients, 0
        plan.host_optimizer, plan.optimizer = plan.optimizer, 0


def plan_activations(plan: MemoryPlan, cfg: JobConfig, shape: ModelShape) -> None:
    """Activations and logits for one micro-batch of max_seq_len tokens per sequence (the worst
    case: padding to the longest in the batch, or packing)."""
    t, cb = cfg.train, compute_bytes(cfg)
    sequences = t.micro_batch_size * (2 if t.method == "dpo" else 1)  # chosen + rejected
    tokens = sequences * cfg.data.max_seq_len
    per_layer = activation_elements_per_token(shape, cfg) * cb
    if cfg.lora is not None and cfg.lora.dropout > 0:
        # peft's dropout makes a copy of each wrapped Linear's input (and a 1-byte mask)
        per_layer += shape.lora_inputs_per_layer * (cb + 1)
    if t.gradient_checkpointing:
        # only each layer's input is kept; one layer is recomputed at a time in backward
        kept = shape.num_layers * shape.hidden * cb
        plan.recompute = math.ceil(tokens * per_layer)
    else:
        kept = shape.num_layers * per_layer
    plan.activations = math.ceil(tokens * (kept + shape.hidden * cb))  # + the embedding output
    # The logits exist one chunk of CHUNK_ROWS positions at a time (jobs/logits.py), in forward
    # and again in backward (recomputed): the chunk's logits (compute dtype), their fp32 copy and
    # log-softmax, then its gradient and the input gradient, all fp32: max(cb + 8, 12) = 12 bytes
    # per logit. The whole [tokens x vocab] logits are never built.
    plan.logits = min(tokens, CHUNK_ROWS) * shape.vocab * 12


# ------------------------------------------------------------------------ what the workers have


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node, as far as memory planning cares."""

    node_id: str
    cpus: float
    gpus: float
    memory: int  # Ray's `memory` resource: host RAM tasks and actors may use, in bytes
    accelerator_type: str | None = None
    resources: dict = field(default_factory=dict, compare=False)


def cluster_nodes() -> list[NodeInfo]:
    """The alive nodes of the Ray cluster this process is connected to."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        acc = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        nodes.append(
            NodeInfo(
                n["NodeID"],
                res.get("CPU", 0),
                res.get("GPU", 0),
                int(res.get("memory", 0)),
                acc,
                dict(res),
            )
        )
    return nodes


def worker_resources(cfg: JobConfig) -> dict[str, float]:
    """What Ray Train asks per worker (as jobs.finetune builds its ScalingConfig)."""
    res = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if cfg.scaling.use_gpu:
        res.setdefault("GPU", 1)
    return res


def place_workers(cfg: JobConfig, nodes: list[NodeInfo]) -> dict[str, int]:
    """Where the workers would land: node id -> count (PACK fills the largest nodes first,
    SPREAD deals them round-robin). Workers that fit nowhere yet (an autoscaler may add nodes)
    are left out."""
    need = worker_resources(cfg)

    def capacity(node: NodeInfo) -> int:
        slots = [int(node.resources.get(k, 0) // v) for k, v in need.items() if v > 0]
        return min(slots) if slots else 0

    caps = {n.node_id: capacity(n) for n in nodes if capacity(n) > 0}
    order = sorted(caps, key=lambda k: -caps[k])
    placed, left = dict.fromkeys(order, 0), cfg.scaling.num_workers
    if cfg.scaling.placement_strategy in ("SPREAD", "STRICT_SPREAD"):
        while left and any(placed[k] < caps[k] for k in order):
            for k in order:
                if left and placed[k] < caps[k]:
                    placed[k], left = placed[k] + 1, left - 1
    else:
        for k in order:
            placed[k] = min(caps[k], left)
            left -= placed[k]
    return {k: v for k, v in placed.items() if v}


def gpu_memory_range(cfg: JobConfig, node: NodeInfo) -> tuple[int, int, str] | None:
    """(smallest, largest) bytes of one worker's GPU share and where the number came from."""
    share = worker_resources(cfg).get("GPU", 1)
    if cfg.scaling.gpu_memory_gib:
        given = int(cfg.scaling.gpu_memory_gib * GIB * share)
        return given, given, f"{GPU_MEMORY_FIELD}={cfg.scaling.gpu_memory_gib:g}"
    if node.accelerator_type not in GPU_MEMORY_GIB:
        return None
    low, high = GPU_MEMORY_GIB[node.accelerator_type]
    return int(low * GIB * share), int(high * GIB * share), node.accelerator_type


# ------------------------------------------------------------------------ the check


def _size(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plan(plan: MemoryPlan) -> str:
    """The breakdown as a few aligned lines."""
    lines = [
        f"memory plan per worker ({_count(plan.total_params)} params, "
        f"{_count(plan.trainable_params)} trainable):"
    ]
    device = "= GPU" if plan.on_gpu else "= host RAM"
    for parts, total, need in (
        (DEVICE_PARTS, device, plan.device_bytes),
        (HOST_PARTS, "= host RAM", plan.host_bytes),
    ):
        rows = [(name, getattr(plan, name)) for name in parts if getattr(plan, name)]
        if rows:
            lines += [f"  {name:<14} {_size(b):>10}" for name, b in rows]
            lines.append(f"  {total:<14} {_size(need):>10}")
    if plan.logits and plan.recompute:
        lines.append("  (logits and recompute are separate peaks: the total counts the larger)")
    return "\n".join(lines)


def check_memory(plan: MemoryPlan, cfg: JobConfig, nodes: list[NodeInfo]) -> list[str]:
    """Warnings where a worker would use more than 85% of its memory; a ConfigError with the
    breakdown where it clearly cannot fit. Nodes without room for a worker are not judged (an
    autoscaler may bring others); unknown GPU types are skipped with a note."""
    warnings, refusals = [], []
    by_id = {n.node_id: n for n in nodes}
    placement = place_workers(cfg, nodes)
    if not placement:
        return [
            f"memory check skipped: no alive node has room for a worker ({worker_resources(cfg)})"
        ]
    gpu = cfg.scaling.use_gpu
    for node_id, count in placement.items():
        node = by_id[node_id]
        where = f"node {node_id[:8]}"
        if gpu:
            got = gpu_memory_range(cfg, node)
            if got is None:
                warnings.append(
                    f"memory check: GPU memory of {where} unknown (accelerator_type "
                    f"{node.accelerator_type}); set {GPU_MEMORY_FIELD} to check it"
                )
            else:
                low, high, source = got
                _judge(
                    plan.device_bytes,
                    low,
                    high,
                    f"GPU memory per worker on {where} ({source})",
                    warnings,
                    refusals,
                )
        host_need = (plan.host_bytes if gpu else plan.device_bytes) * count
        _judge(
            host_need,
            node.memory,
            node.memory,
            f"host memory of {where} for its {count} worker(s) (Ray's `memory` resource)",
            warnings,
            refusals,
        )
    if refusals:
        raise ConfigError(
            "the job will not fit in memory:\n"
            + "\n".join(f"  {r}" for r in refusals)
            + "\n"
            + format_plan(plan)
            + "\n  try: lora (or model.quantization for QLoRA), train.gradient_checkpointing, a "
            "smaller train.micro_batch_size or data.max_seq_len, train.strategy fsdp/deepspeed "
            f"with more workers, or offload. {GPU_MEMORY_FIELD}=N sets the GPU memory assumed; "
            f"{CHECK_FIELD}=warn starts the job anyway"
        )
    return warnings


def _judge(need: int, low: int, high: int, what: str, warnings: list, refusals: list) -> None:
    if need > high * REFUSE_FRACTION:
        refusals.append(f"{what}: need ~{_size(need)}, have {_size(high)}")
    elif need > low * WARN_FRACTION:
        warnings.append(
            f"memory: {what}: ~{_size(need)} of {_size(low)} ({need / low:.0%}), close to the limit"
        )


def preflight_memory(cfg: JobConfig) -> MemoryPlan | None:
    """Driver-side check on the connected Ray cluster: print the plan, print warnings, raise
    ConfigError when the job cannot fit. A model the planner cannot read only skips the check."""
    mode = cfg.scaling.memory_check
    if mode == "off":
        return None
    try:
        nodes = cluster_nodes()
        gpus = [int(n.gpus) for n in nodes] if cfg.scaling.use_gpu else []
        gpus_per_node = max(gpus, default=0) or None  # FSDP hybrid's default group
        plan = plan_memory(cfg, gpus_per_node=gpus_per_node)
    except ConfigError:
        raise
    except Exception as e:  # an architecture the meta build does not know: do not block the job
        print(f"memory plan skipped: {type(e).__name__}: {e}")
        return None
    print(format_plan(plan))
    try:
        warnings = check_memory(plan, cfg, nodes)
    except ConfigError as e:
        if mode != "warn":
            raise
        warnings = [f"warning ({CHECK_FIELD}=warn): {e}"]
    for warning in warnings:
        print(warning)
    return plan
