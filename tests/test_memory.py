"""Memory planning: exact parameter counts from a config, the sharding and offload arithmetic,
known model sizes against known hardware, a cross-check with DeepSpeed's and accelerate's own
estimators, and the estimate against a measured CPU training step. No Ray: nodes are given."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.config import ConfigError, apply_overrides, parse_overrides
from jobs.config import load_config, validate_config
from jobs.evaluation import token_loss_sum
from jobs.logits import CHUNK_ROWS
from jobs.memory import (
    GIB,
    GPU_MEMORY_FIELD,
    GPU_MEMORY_GIB,
    ModelShape,
    NodeInfo,
    check_memory,
    format_plan,
    load_model_shape,
    model_shape,
    place_workers,
    plan_memory,
    preflight_memory,
)
from jobs.model import add_lora

REPO = Path(__file__).resolve().parent.parent


def job(*overrides: str):
    raw = {
        "run": {"name": "mem"},
        "model": {"name_or_path": "unused"},
        "data": {"train_files": ["unused.jsonl"], "max_seq_len": 1024},
        "train": {"micro_batch_size": 4, "effective_batch_size": 4},
    }
    return validate_config(apply_overrides(raw, parse_overrides(list(overrides))))


def gpu_node(acc: str, gpus: int = 1, host_gib: float = 200, node_id: str = "gpu-node") -> NodeInfo:
    res = {
        "CPU": 8.0 * gpus,
        "GPU": float(gpus),
        "memory": host_gib * GIB,
        f"accelerator_type:{acc}": 1,
    }
    return NodeInfo(node_id, 8.0 * gpus, gpus, int(host_gib * GIB), acc, res)


def cpu_node(cpus: float, host_gib: float, node_id: str) -> NodeInfo:
    res = {"CPU": cpus, "memory": host_gib * GIB}
    return NodeInfo(node_id, cpus, 0, int(host_gib * GIB), None, res)


def small_llama(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**base, **kw})


LLAMA_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=11008,
    vocab_size=32000,
    num_attention_heads=32,
    num_key_value_heads=32,
)
LLAMA_70B = dict(
    hidden_size=8192,
    num_hidden_layers=80,
    intermediate_size=28672,
    vocab_size=32000,
    num_attention_heads=64,
    num_key_value_heads=8,
)


@pytest.fixture(scope="module")
def shapes_7b() -> dict[str, ModelShape]:
    cfg = LlamaConfig(**LLAMA_7B)
    return {"full": model_shape(cfg), "lora": model_shape(cfg, job().lora)}


@pytest.fixture(scope="module")
def shapes_70b() -> dict[str, ModelShape]:
    cfg = LlamaConfig(**LLAMA_70B)
    return {"full": model_shape(cfg), "lora": model_shape(cfg, job().lora)}


# ------------------------------------------------------------------------ counting


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_counts_equal_an_instantiated_model_and_peft(tied, targets):
    cfg = small_llama(tie_word_embeddings=tied)
    lora = job().lora.model_copy(update={"target_modules": targets, "r": 8})
    shape = model_shape(cfg, lora)

    model = LlamaForCausalLM(cfg)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    assert shape.layer_params == sum(p.numel() for p in layer.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert shape.quantizable_params == sum(
        m.weight.numel() for m in linears if m is not model.lm_head
    )
    peft_model = add_lora(model, lora)
    assert shape.trainable_params == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad
    )
    # r x (in + out) for every wrapped Linear, as LoRA's A and B matrices
    wrapped = [m for m in peft_model.modules() if hasattr(m, "lora_A") and m.lora_A]
    assert shape.trainable_params == sum(8 * (m.in_features + m.out_features) for m in wrapped)


def test_shape_read_from_a_model_directory(tmp_path):
    small_llama().save_pretrained(tmp_path)  # config.json only: no weights to read
    cfg = job(f"model.name_or_path={tmp_path}")
    assert load_model_shape(cfg) == model_shape(small_llama(), cfg.lora)
    with pytest.raises(ConfigError, match="no such directory"):
        load_model_shape(job(f"model.name_or_path={tmp_path}/missing"))


def test_known_model_sizes(shapes_7b, shapes_70b):
    # Llama-2-7B and Llama-2-70B as published: 6,738,415,616 and 68,976,648,192 parameters
    assert shapes_7b["full"].total_params == 6_738_415_616
    assert shapes_70b["full"].total_params == 68_976_648_192
    # all-linear r=16 on 7B, r x (in + out) per Linear: 32 layers x 16 x (q, k, v, o: 4 x 8192;
    # gate, up, down: 3 x (4096 + 11008))
    assert shapes_7b["lora"].trainable_params == 32 * 16 * (4 * 8192 + 3 * 15104)


# ------------------------------------------------------------------------ arithmetic

SHAPE = ModelShape(
    total_params=1_000_000,
    trainable_params=1_000_000,
    quantizable_params=800_000,
    layer_params=100_000,
    outer_params=200_000,
    num_layers=8,
    hidden=64,
    intermediate=256,
    heads=4,
    kv_dim=64,
    vocab=1000,
    lora_inputs_per_layer=0,
)


@pytest.mark.parametrize(
    "strategy, divided",
    [
        (["train.strategy=ddp"], set()),
        (
            ["train.strategy=fsdp", "train.fsdp.sharding=full"],
            {"weights", "gradients", "optimizer"},
        ),
        (["train.strategy=fsdp", "train.fsdp.sharding=grad_op"], {"gradients", "optimizer"}),
        (["train.strategy=deepspeed", "train.deepspeed.stage=1"], {"optimizer"}),
        (["train.strategy=deepspeed", "train.deepspeed.stage=2"], {"gradients", "optimizer"}),
        (
            ["train.strategy=deepspeed", "train.deepspeed.stage=3"],
            {"weights", "gradients", "optimizer"},
        ),
    ],
)
def test_sharding_divides_model_states_by_the_workers(strategy, divided):
    one = plan_memory(job("lora=null", "scaling.use_gpu=true", *strategy), SHAPE)
    four = plan_memory(
        job(
            "lora=null",
            "scaling.use_gpu=true",
            "train.effective_batch_size=16",
            "scaling.num_workers=4",
            *strategy,
        ),
        SHAPE,
    )
    for part in ("weights", "gradients", "optimizer"):
        expected = getattr(one, part) / (4 if part in divided else 1)
        if part == "gradients" and strategy == ["train.strategy=ddp"]:
            expected *= 2  # DDP's buckets: a second copy of the gradients
        assert getattr(four, part) == pytest.approx(expected, rel=1e-6), part
    # bf16 weights: 2 + 2 bytes, AdamW 8 + fp32 master 4 = the ZeRO paper's 16 bytes per param
    assert one.weights + one.gradients + one.optimizer == 16 * SHAPE.total_params
    assert four.activations == one.activations and four.logits == one.logits
    assert bool(four.gathered) == ("weights" in divided)


def test_hybrid_shards_within_a_group_and_offload_moves_to_host():
    base = [
        "lora=null",
        "scaling.use_gpu=true",
        "train.effective_batch_size=32",
        "scaling.num_workers=8",
        "train.strategy=fsdp",
    ]
    full = plan_memory(job(*base), SHAPE)
    hybrid = plan_memory(
        job(*base, "train.fsdp.sharding=hybrid", "train.fsdp.shard_group_size=2"), SHAPE
    )
    assert hybrid.optimizer == 4 * full.optimizer  # sharded 2 ways instead of 8
    by_node = plan_memory(job(*base, "train.fsdp.sharding=hybrid"), SHAPE, gpus_per_node=4)
    assert by_node.optimizer == 2 * full.optimizer

    offloaded = plan_memory(job(*base, "train.fsdp.cpu_offload=true"), SHAPE)
    assert offloaded.weights == offloaded.gradients == offloaded.optimizer == 0
    assert offloaded.host_weights + offloaded.host_gradients + offloaded.host_optimizer == (
        full.weights + full.gradients + full.optimizer
    )
    ds = [
        "lora=null",
        "scaling.use_gpu=true",
        "train.strategy=deepspeed",
        "train.deepspeed.stage=3",
    ]
    opt_only = plan_memory(job(*ds, "train.deepspeed.offload_optimizer=true"), SHAPE)
    assert opt_only.optimizer == 0 and opt_only.host_optimizer == 12 * SHAPE.total_params
    assert opt_only.weights == 2 * SHAPE.total_params  # parameters stay on the GPU


def test_dpo_doubles_sequences_and_needs_a_reference_only_without_lora():
    def as_dpo(cfg):  # the job refuses method dpo until its recipe lands; the planner is ready
        cfg.train.method = "dpo"
        return cfg

    sft, dpo = plan_memory(job(), SHAPE), plan_memory(as_dpo(job()), SHAPE)
    assert dpo.activations == pytest.approx(2 * sft.activations, rel=1e-6)
    assert dpo.reference == 0
    # the logits exist one chunk at a time (jobs/logits.py): 4 x 1024 tokens, 1024 at a time
    assert dpo.logits == sft.logits == CHUNK_ROWS * SHAPE.vocab * 12
    short = plan_memory(job("data.max_seq_len=128", "train.micro_batch_size=1"), SHAPE)
    assert short.logits == 128 * SHAPE.vocab * 12  # fewer tokens than a chunk
    full_dpo = plan_memory(as_dpo(job("lora=null")), SHAPE)
    assert full_dpo.reference == full_dpo.weights == 4 * SHAPE.total_params  # fp32 on CPU


# ------------------------------------------------------------------------ known hardware


def test_7b_on_one_24gb_gpu(shapes_7b):
    a10g = [gpu_node("A10G")]
    full_cfg = job("lora=null", "scaling.use_gpu=true")
    with pytest.raises(ConfigError) as refused:
        check_memory(plan_memory(full_cfg, shapes_7b["full"]), full_cfg, a10g)
    message = str(refused.value)
    assert "A10G" in message and "have 22.1 GiB" in message and "optimizer" in message
    print(message)

    lora_cfg = job("scaling.use_gpu=true")
    lora = plan_memory(lora_cfg, shapes_7b["lora"])
    check_memory(lora, lora_cfg, a10g)  # fits: no ConfigError
    assert 13 * GIB < lora.device_bytes < 22.1 * GIB

    qlora_cfg = job("scaling.use_gpu=true", "model.quantization.bits=4")
    qlora = plan_memory(qlora_cfg, shapes_7b["lora"])
    assert qlora.weights < lora.weights / 2 and qlora.device_bytes < lora.device_bytes
    t4 = [gpu_node("T4")]  # 16 GB: QLoRA fits where bf16 LoRA does not
    assert check_memory(qlora, qlora_cfg, t4) == []
    with pytest.raises(ConfigError, match="T4"):
        check_memory(lora, lora_cfg, t4)
    print(format_plan(lora), format_plan(qlora), sep="\n")


def test_70b_zero3_on_8_gpus_of_80gb(shapes_70b):
    a100x8 = [gpu_node("A100-80G", gpus=8, host_gib=1800)]
    zero3 = [
        "scaling.use_gpu=true",
        "scaling.num_workers=8",
        "train.effective_batch_size=32",
        "train.strategy=deepspeed",
        "train.deepspeed.stage=3",
    ]
    full_cfg = job("lora=null", *zero3)
    full = plan_memory(full_cfg, shapes_70b["full"])
    with pytest.raises(ConfigError, match="need ~1[34]\\d.\\d GiB, have 79.1 GiB"):
        check_memory(full, full_cfg, a100x8)

    offload_cfg = job(
        "lora=null",
        *zero3,
        "train.deepspeed.offload_optimizer=true",
        "train.deepspeed.offload_params=true",
    )
    offload = plan_memory(offload_cfg, shapes_70b["full"])
    assert offload.device_bytes < 20 * GIB
    check_memory(offload, offload_cfg, a100x8)  # 8 workers x ~150 GiB host on a 1.8 TiB node
    with pytest.raises(ConfigError, match="host memory .* its 8 worker"):
        check_memory(offload, offload_cfg, [gpu_node("A100-80G", gpus=8, host_gib=512)])

    lora_cfg = job(*zero3)
    lora = plan_memory(lora_cfg, shapes_70b["lora"])
    assert check_memory(lora, lora_cfg, a100x8) == []
    print(format_plan(full), format_plan(offload), format_plan(lora), sep="\n")


def test_model_states_agree_with_deepspeed_and_accelerate(shapes_7b, shapes_70b, monkeypatch):
    """Our weights + gradients + optimizer (+ gathered layers) against the libraries' own
    estimators. DeepSpeed counts 18 bytes per parameter where we count 16 (it adds an fp32
    gradient partition); within 20% is agreement for a planning estimate."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from accelerate.commands.estimate import estimate_training_usage
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    s70, s7 = shapes_70b["full"], shapes_7b["full"]
    zero3 = [
        "lora=null",
        "scaling.use_gpu=true",
        "scaling.num_workers=8",
        "train.effective_batch_size=32",
        "train.strategy=deepspeed",
        "train.deepspeed.stage=3",
    ]
    ours = plan_memory(job(*zero3), s70)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        s70.total_params, s70.layer_params, num_gpus_per_node=8, cpu_offload=False
    )
    states = ours.weights + ours.gradients + ours.optimizer + ours.gathered
    assert 0.8 < states / ds_gpu < 1.2, (states, ds_gpu)

    offloaded = plan_memory(
        job(
            *zero3, "train.deepspeed.offload_optimizer=true", "train.deepspeed.offload_params=true"
        ),
        s70,
    )
    ds_cpu, _, _ = estimate_zero3_model_states_mem_needs(
        s70.total_params, s70.layer_params, num_gpus_per_node=8, additional_buffer_factor=1.0
    )
    host_states = 8 * (offloaded.host_bytes - offloaded.host_overhead)  # one node, 8 workers
    assert 0.8 < host_states / ds_cpu < 1.2, (host_states, ds_cpu)

    zero2 = plan_memory(job(*zero3[:-1], "train.deepspeed.stage=2"), s7)
    _, ds2_gpu = estimate_zero2_model_states_mem_needs(s7.total_params, 8, cpu_offload=False)
    assert 0.8 < (zero2.weights + zero2.gradients + zero2.optimizer) / ds2_gpu < 1.2

    # accelerate's `estimate-memory`: fp32 Adam training at 16 bytes per parameter, like ours
    fp32 = plan_memory(
        job("lora=null", "scaling.use_gpu=true", "model.dtype=float32", "train.precision=fp32"), s7
    )
    accel = max(estimate_training_usage(4 * s7.total_params, "float32").values())
    fp32_states = fp32.weights + fp32.gradients + fp32.optimizer
    assert fp32_states / accel == pytest.approx(1.0)
    print(
        f"70B ZeRO-3 x8 model states per GPU: ours {states / GIB:.1f} GiB, DeepSpeed {ds_gpu / GIB:.1f} GiB;"
        f" offloaded host per node: ours {host_states / GIB:.0f} GiB, DeepSpeed {ds_cpu / GIB:.0f} GiB;"
        f" 7B ZeRO-2 x8: ours {(zero2.weights + zero2.gradients + zero2.optimizer) / GIB:.1f} GiB,"
        f" DeepSpeed {ds2_gpu / GIB:.1f} GiB; 7B fp32 Adam: ours {fp32_states / GIB:.1f} GiB,"
        f" accelerate {accel / GIB:.1f} GiB"
    )


# ------------------------------------------------------------------------ CPU and placement


def test_cpu_workers_on_one_node_share_its_host_memory():
    cfg = job("scaling.num_workers=2", "scaling.cpus_per_worker=2", "train.effective_batch_size=8")
    plan = plan_memory(cfg, SHAPE)
    per_worker = plan.device_bytes
    assert not plan.on_gpu and plan.host_bytes == 0  # on CPU all of it is host RAM
    assert place_workers(cfg, [cpu_node(4, 16, "a"), cpu_node(4, 16, "b")]) == {"a": 2}
    spread = cfg.model_copy(
        update={"scaling": cfg.scaling.model_copy(update={"placement_strategy": "SPREAD"})}
    )
    assert place_workers(spread, [cpu_node(4, 16, "a"), cpu_node(4, 16, "b")]) == {"a": 1, "b": 1}

    roomy = per_worker * 2 / GIB / 0.5  # both workers use half the node
    assert check_memory(plan, cfg, [cpu_node(4, roomy, "a")]) == []
    tight = per_worker * 2 / GIB / 0.9
    (warning,) = check_memory(plan, cfg, [cpu_node(4, tight, "a")])
    assert "90%" in warning and "2 worker(s)" in warning
    with pytest.raises(ConfigError, match="host memory of node a for its 2 worker"):
        check_memory(plan, cfg, [cpu_node(4, per_worker * 1.5 / GIB, "a")])
    # spread over two nodes each needs only one worker's share
    assert (
        check_memory(plan, spread, [cpu_node(2, tight / 1.6, "a"), cpu_node(2, tight / 1.6, "b")])
        == []
    )


def test_unknown_gpu_or_no_room_is_not_refused(monkeypatch, shapes_7b):
    cfg = job("lora=null", "scaling.use_gpu=true")
    plan = plan_memory(cfg, shapes_7b["full"])
    (note,) = check_memory(plan, cfg, [gpu_node("Z9000")])
    assert GPU_MEMORY_FIELD in note
    (note,) = check_memory(plan, cfg, [cpu_node(8, 64, "cpu-only")])  # an autoscaler adds GPUs
    assert "skipped" in note
    given = cfg.model_copy(
        update={"scaling": cfg.scaling.model_copy(update={"gpu_memory_gib": 200})}
    )
    assert check_memory(plan, given, [gpu_node("Z9000")]) == []
    # Ray calls every A100 "A100": warn against 40 GB, refuse only beyond 80 GB
    fifty = plan_memory(job("scaling.use_gpu=true"), shapes_7b["lora"])
    fifty.activations += 50 * GIB - fifty.device_bytes
    (warning,) = check_memory(fifty, cfg, [gpu_node("A100")])
    assert "50.0 GiB of 39.4 GiB" in warning
    with pytest.raises(ConfigError, match="need ~50.0 GiB, have 39.4 GiB"):
        check_memory(fifty, cfg, [gpu_node("A100-40G")])
    assert set(GPU_MEMORY_GIB) >= {"A100", "H100", "A10G", "L4", "T4"}


def test_quickstart_and_tiny_test_jobs_fit_a_small_laptop(tmp_path):
    from jobs.tiny_model import build_model

    build_model(1024).config.save_pretrained(tmp_path)  # the quickstart model's architecture
    laptop = [cpu_node(2, 4, "laptop")]  # Ray's `memory` on an 8 GB laptop is about 4 GiB
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"model.name_or_path={tmp_path}"])
    assert check_memory(plan_memory(cfg), cfg, laptop) == []
    two = load_config(
        REPO / "configs/quickstart.yaml",
        [
            f"model.name_or_path={tmp_path}",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=1",
            "train.micro_batch_size=8",
        ],
    )
    assert check_memory(plan_memory(two), two, laptop) == []


def test_preflight_prints_the_plan_and_refuses(monkeypatch, tmp_path, capsys):
    LlamaConfig(**LLAMA_7B).save_pretrained(tmp_path)
    monkeypatch.setattr("jobs.memory.cluster_nodes", lambda: [gpu_node("L4")])
    cfg = job(f"model.name_or_path={tmp_path}", "scaling.use_gpu=true", "model.quantization.bits=4")
    assert preflight_memory(cfg).trainable_params > 0
    assert "memory plan per worker (6.74B params" in capsys.readouterr().out
    full = cfg.model_copy(
        update={"lora": None, "model": cfg.model.model_copy(update={"quantization": None})}
    )
    with pytest.raises(ConfigError, match="will not fit"):
        preflight_memory(full)
    full.scaling.memory_check = "warn"  # the user's escape hatch
    assert preflight_memory(full) is not None
    assert "warning (scaling.memory_check=warn): the job will not fit" in capsys.readouterr().out
    full.scaling.memory_check = "off"
    assert preflight_memory(full) is None and capsys.readouterr().out == ""
    full.scaling.memory_check = "refuse"
    # a model the planner cannot build does not block the job
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert preflight_memory(cfg) is None
    assert "memory plan skipped" in capsys.readouterr().out


# ------------------------------------------------------------------------ against a measurement


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_second_step(overrides: list[str]) -> int:
    """Peak RSS growth over a second training step (weights and optimizer state already
    allocated). Run in a fresh process (see the test): allocations above 64 KiB are mmapped so
    that freed tensors leave RSS, and the kernel's peak-RSS mark is reset just before the step;
    inside a long test session, pages freed by earlier tests would absorb the growth."""
    ctypes.CDLL(None).mallopt(-3, 65536)  # M_MMAP_THRESHOLD (glibc)
    arch = small_llama(vocab_size=2048, hidden_size=256, intermediate_size=512)
    cfg = job("data.max_seq_len=256", "train.micro_batch_size=4", *overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(arch)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, arch.vocab_size, (cfg.train.micro_batch_size, cfg.data.max_seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step():
        loss, _ = token_loss_sum(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.set_num_threads(1)  # OpenMP threads crawl on a busy shared machine
    step()  # one-off allocations (thread pools, optimizer state) stay out of the measurement
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _proc_status("VmRSS")
    step()
    return _proc_status("VmHWM") - before


@pytest.mark.integration  # the step is measured in a process of its own
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("overrides", [[], ["lora=null", "train.gradient_checkpointing=false"]])
def test_estimate_within_2x_of_a_measured_cpu_step(overrides):
    """The plan's gradients + activations + logits against a measured step."""
    code = (
        "import json, sys; from tests.test_memory import measure_second_step; "
        "print(measure_second_step(json.loads(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(overrides)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    measured = int(out.stdout.strip().splitlines()[-1])
    cfg = job("data.max_seq_len=256", "train.micro_batch_size=4", *overrides)
    arch = small_llama(vocab_size=2048, hidden_size=256, intermediate_size=512)
    plan = plan_memory(cfg, model_shape(arch, cfg.lora))
    estimated = plan.device_bytes - plan.weights - plan.optimizer - plan.overhead
    print(
        f"{overrides}: estimated {estimated / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB"
    )
    assert 0.5 < measured / estimated < 2.0
