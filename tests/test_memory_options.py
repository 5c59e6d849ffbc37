"""The memory options train the same steps as training without them: activation checkpointing,
activation offloading (alone and with checkpointing), and FSDP2 with its parameters, gradients
and optimizer state offloaded to the CPU.

On this CPU machine the offloads move nothing (the device is the host): the tests show that
each option is applied and changes no loss and no gradient norm; benchmarks/memory_options_bench.py
measures what they cost and save.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from jobs.config import load_config
from jobs.finetune import StepPlan, setup
from jobs.parallel import job_runtime
from tests.helpers import free_port


def train(tiny_model_dir, *overrides: str, steps: int = 3) -> list[float]:
    """The losses, then the gradient norms, of `steps` optimizer steps on one fixed batch, with the model,
    LoRA, memory options and strategy the recipe builds (jobs.finetune.setup)."""
    cfg = load_config(
        "configs/quickstart.yaml", [f"model.name_or_path={tiny_model_dir}", *overrides]
    )
    threads = torch.get_num_threads()  # setup sets the worker's
    try:
        _, par = setup(cfg, job_runtime(cfg, torch.device("cpu")), StepPlan(10, 10, 0))
        par.model.train()  # as the recipe does: checkpointing applies in training mode only
        ids = torch.randint(10, 600, (4, 64), generator=torch.Generator().manual_seed(0))
        losses, norms = [], []
        for _ in range(steps):
            loss = par.model(input_ids=ids, labels=ids).loss
            par.backward(loss, last=True)
            par.step(cfg.train.max_grad_norm)
            losses.append(loss.item())
            norms.append(par.last_grad_norm)
        return losses + norms
    finally:
        torch.set_num_threads(threads)


def test_checkpointing_and_activation_offloading_train_the_same_steps(tiny_model_dir):
    plain = train(tiny_model_dir, "train.gradient_checkpointing=false")
    for option in (
        ["train.gradient_checkpointing=true"],
        ["train.activation_offloading=true"],
        ["train.gradient_checkpointing=true", "train.activation_offloading=true"],
    ):
        assert train(tiny_model_dir, *option) == pytest.approx(plain, rel=1e-6), option


def test_activation_offloading_takes_the_tensors_the_forward_saves(tiny_model_dir):
    """The hooks that offload hold every tensor the model's forward saves for the backward: an
    outer hook (the innermost wins) sees none of them with the option, all of them without it.
    With checkpointing, what it keeps (each layer's input, fewer tensors) is offloaded too."""
    from inference.model import load_base_model
    from jobs.model import add_lora, enable_activation_offloading, enable_gradient_checkpointing

    cfg = load_config("configs/quickstart.yaml", [f"model.name_or_path={tiny_model_dir}"])
    ids = torch.randint(10, 600, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    for checkpointing in (False, True):
        for offload in (False, True):
            model = add_lora(load_base_model(cfg.model, torch.device("cpu")), cfg.lora).train()
            if checkpointing:
                enable_gradient_checkpointing(model)
            if offload:
                enable_activation_offloading(model, torch.device("cpu"))
            seen[checkpointing, offload] = saved_outside(model, ids)
            with torch.no_grad():  # evaluation enters no hooks (and saves nothing)
                model(input_ids=ids)
    assert 0 < seen[True, False] < seen[False, False], seen
    assert seen[False, True] == seen[True, True] == 0, seen


def saved_outside(model, ids) -> int:
    """How many tensors a training step saves for the backward through this outer hook."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return len(packed)


@pytest.mark.integration  # a gloo process group (a listening socket) in this process
def test_fsdp2_cpu_offload_trains_the_same_steps(tiny_model_dir, monkeypatch):
    """FSDP2 with and without train.fsdp.cpu_offload, one rank: the same losses and gradient
    norms (the norm of FSDP2's sharded DTensor gradients), for LoRA and a full fine-tune."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        for method in ([], ["lora=null"]):
            plain = train(tiny_model_dir, *method, "train.gradient_checkpointing=false")
            fsdp = train(tiny_model_dir, *method, "train.strategy=fsdp")
            offload = train(
                tiny_model_dir, *method, "train.strategy=fsdp", "train.fsdp.cpu_offload=true"
            )
            assert fsdp == pytest.approx(plain, rel=1e-6), method
            assert offload == pytest.approx(plain, rel=1e-6), method
    finally:
        dist.destroy_process_group()
