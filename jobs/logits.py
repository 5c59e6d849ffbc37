"""Per-token scores (cross-entropy, log-probs, entropies) from a causal LM's last hidden states,
chunk by chunk: the whole [tokens x vocab] logits, and their fp32 copy, are never built.

    hidden, head = last_hidden_states(model, input_ids=..., attention_mask=...)
    (ce,) = scores_at(head, hidden[:, :-1], labels[:, 1:], mask, cross_entropy)   # [rows, len-1]

The model's forward runs with its output layer stood in (under every strategy: DDP, FSDP2,
ZeRO, peft), so the model computes no logits; `head` then applies the real output module
(a peft LoRA on it, a quantized head, ZeRO-3's gather hooks all keep working) to
CHUNK_ROWS scored positions at a time, upcasts to fp32 and scores them. Under autograd one
chunk's logits live at a time: a frozen head's (LoRA) chunk gradient is taken in forward; a
trained head's chunk is recomputed in backward (torch.utils.checkpoint).
Measured (benchmarks/logits_bench.py, CPU): a LoRA step at 4 x 2048 tokens with a 128k
vocabulary peaked at 0.21x the whole-logit path's memory (2.7 vs 13.0 GiB), at 1.88x its speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Scored positions per chunk: 1024 x 128k fp32 logits are 0.5 GiB, a few of which live at once
# (logits, log-softmax, their gradient): a 128k-vocabulary step peaked at 2.7 GiB
CHUNK_ROWS = 1024

Score = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


class Head:
    """The model's output layer as its forward applies it: the module, then the model's own
    post-processing (Gemma's final softcapping, Cohere's logit_scale, Granite's
    logits_scaling), then fp32 as the losses have always used."""

    def __init__(self, module: torch.nn.Module, config):
        self.module = module
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.softcap = getattr(text, "final_logit_softcapping", None)
        scale = getattr(text, "logit_scale", None) or getattr(text, "output_multiplier", None)
        self.scale = scale
        self.divide = getattr(text, "logits_scaling", None)

    def postprocess(self, z: torch.Tensor) -> torch.Tensor:
        """In the compute dtype, in the order the models' forwards use."""
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.scale is not None:
            z = z * self.scale
        if self.divide is not None:
            z = z / self.divide
        return z

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.postprocess(self.module(hidden)).float()


class _Capture(torch.nn.Module):
    """Stands in for the output layer during the model's forward: keeps its input (the final,
    normed hidden states) and hands back a detached alias, so the model builds no logits."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        # detached: FSDP2 hooks no backward on it, and whatever the model does to it after
        # the head (softcapping, scaling) builds no autograd graph
        return hidden.detach()


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / a DeepSpeed engine (`.module`) and peft."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _parent_of(root: torch.nn.Module, child: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    for module in root.modules():
        for name, sub in module.named_children():
            if sub is child:
                return module, name
    raise ValueError(f"{type(root).__name__}: its output layer is not one of its modules")


def last_hidden_states(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, Head]:
    """Runs `model(**inputs)` (any wrapper: DDP, FSDP2, DeepSpeed, peft) without its output
    layer; returns the hidden states the output layer would have been given ([rows, len,
    hidden]) and the Head that turns rows of them into the model's fp32 logits."""
    base = transformers_model(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output layer (get_output_embeddings)")
    parent, name = _parent_of(base, head)
    stand_in = _Capture()
    setattr(parent, name, stand_in)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        setattr(parent, name, head)
    if stand_in.hidden is None:
        raise ValueError(
            f"{type(base).__name__}'s forward does not call its output layer "
            f"({name}): chunked logits cannot be computed for it"
        )
    _gather_root(base)
    scorer = Head(head, base.config)
    _check_postprocessing(out.logits, stand_in.hidden, scorer, type(base).__name__)
    return stand_in.hidden, scorer


def _gather_root(base: torch.nn.Module) -> None:
    """FSDP2 reshards its root (embeddings, norm, head) after forward unless told not to; the
    head is called after the forward, in chunks (and again in backward): gather it again, every
    rank at once as the forward (the root's post-backward reshards it, as after any step)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(base, FSDPModule):
        base.unshard()


def _check_postprocessing(returned, hidden: torch.Tensor, head: Head, name: str) -> None:
    """What the model did after its output layer (to the stand-in's output) must be what Head
    applies, or the chunked logits would differ from the model's: refuse."""
    untouched = returned.data_ptr() == hidden.data_ptr() and returned.shape == hidden.shape
    if untouched and head.softcap is None and head.scale is None and head.divide is None:
        return  # nothing done after the head, and nothing for Head to apply
    with torch.no_grad():
        ours = head.postprocess(hidden.detach())
        if returned.shape != ours.shape or not torch.equal(returned.to(ours.dtype), ours):
            raise ValueError(
                f"{name} changes its logits after its output layer in a way jobs/logits.py "
                "does not reproduce: its losses cannot be computed chunk by chunk"
            )


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor]:
    """Per-row next-token cross-entropy (the SFT loss, -log p for DPO)."""
    return (F.cross_entropy(logits, targets, reduction="none"),)


def logps_and_entropies(temperature: float) -> Score:
    """Per-row log p(target) and entropy at `temperature`, by TRL's GRPOTrainer functions."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits / temperature
        return selective_log_softmax(logits, targets), entropy_from_logits(logits)

    return score


def _score_chunk(head: Head, score: Score, hidden: torch.Tensor, targets: torch.Tensor):
    return score(head(hidden), targets)


class _GradInForward(torch.autograd.Function):
    """One chunk's scores through a head none of whose parameters trains (LoRA elsewhere):
    each score's gradient w.r.t. the rows is taken in forward (a row's score depends on that
    row alone), so backward only scales it and no logits are rebuilt: two matmuls per chunk,
    as the whole-logit path, where recomputing in backward costs a third."""

    @staticmethod
    def forward(ctx, hidden, targets, head, score):
        ctx.set_materialize_grads(False)
        with torch.enable_grad():
            h = hidden.detach().requires_grad_()
            outs = score(head(h), targets)
            grads = [
                torch.autograd.grad(o, h, torch.ones_like(o), retain_graph=i < len(outs) - 1)[0]
                for i, o in enumerate(outs)
            ]
        ctx.save_for_backward(*grads)
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        grad = None
        for g, row_grads in zip(grad_outs, ctx.saved_tensors, strict=True):
            if g is not None:
                term = row_grads * g.unsqueeze(-1).to(row_grads.dtype)
                grad = term if grad is None else grad + term
        return grad, None, None, None


def _chunk_scores(head: Head, score: Score, h: torch.Tensor, t: torch.Tensor, frozen: bool):
    if not torch.is_grad_enabled():
        return _score_chunk(head, score, h, t)
    if frozen and h.requires_grad:
        return _GradInForward.apply(h, t, head, score)
    return checkpoint(_score_chunk, head, score, h, t, use_reentrant=False)


def score_rows(
    head: Head, hidden: torch.Tensor, targets: torch.Tensor, score: Score, chunk_rows: int
) -> tuple[torch.Tensor, ...]:
    """`score` of every row of `hidden` ([n, hidden]) against `targets` ([n]), CHUNK_ROWS rows
    at a time; under autograd no chunk's logits are kept for backward: their gradient is taken
    in forward (a frozen head) or they are recomputed in backward (a head that trains)."""
    if not len(hidden):  # TRL's functions refuse no rows: score one zero row, return none
        padded = score_rows(head, F.pad(hidden, (0, 0, 0, 1)), F.pad(targets, (0, 1)), score, 1)
        return tuple(r[:0] for r in padded)
    frozen = not any(p.requires_grad for p in head.module.parameters())
    parts = [
        _chunk_scores(head, score, h, t, frozen)
        for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows), strict=True)
    ]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def scores_at(
    head: Head,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    score: Score,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """`score` at the masked positions of `hidden` ([rows, len, hidden]) against `targets`
    ([rows, len]); each result is [rows, len], 0 where the mask is off (those positions'
    logits are never computed)."""
    mask = mask.bool()
    rows = score_rows(head, hidden[mask], targets[mask], score, chunk_rows or CHUNK_ROWS)
    return tuple(r.new_zeros(mask.shape).masked_scatter(mask, r) for r in rows)
