"""TRL's DPO and GRPO losses, computed by TRL's own code on log-probs computed elsewhere.

Private API: `DPOTrainer._compute_loss(model, inputs, return_outputs)` and
`GRPOTrainer._compute_loss(model, inputs)`, called unbound on a stand-in for the trainer that
holds only the attributes those methods read, some of them private too (`_metrics`,
`_total_train_tokens`, `_tp_size`, `_get_per_token_logps_and_entropies`,
`_entropy_bonus_enabled`).

Why: TRL 1.x has no public loss function. Its losses live inside the trainers, behind
`compute_loss`, which needs a whole trainer (model, datasets, Accelerate state) and runs the
policy and reference forwards itself. The job computes those log-probs under its own parallel
strategy (the reference being the base with the adapter disabled) and wants only the loss, to
the line TRL's; tests/test_dpo.py and tests/test_grpo.py check it against real trainers.
Supported TRL versions: core.upstream.SUPPORTED["trl"].
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class _Gather:
    """Accelerate's gathers as TRL's DPO loss calls them, for one process: each rank's sums are
    reduced by the caller, not inside the loss."""

    def __init__(self, device):
        self.device = device

    def gather(self, t):
        return t

    gather_for_metrics = gather


class _Accelerator:
    """Accelerate's collectives as TRL's GRPO loss calls them, for one process: the caller reduces."""

    num_processes = 1

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t


def dpo_loss(
    policy_token_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
) -> torch.Tensor:
    """The mean DPO loss over the batch's pairs by `DPOTrainer._compute_loss`: its "model" returns
    the policy's per-token log-probs given here, and the reference's are passed as precomputed
    (ref_logps: [chosen rows; rejected rows])."""
    import torch
    from trl import DPOTrainer

    zeros = torch.zeros_like(policy_token_logps).detach()
    outputs = SimpleNamespace(
        log_probs=policy_token_logps,
        entropy=zeros,  # TRL's logging-only outputs; its metrics are not used here
        mean_logits=zeros,
        is_top1=zeros.bool(),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=_Gather(policy_token_logps.device),
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl",  # standard DPO
        f_alpha_divergence_coef=1.0,
        ld_alpha=None,
        use_weighting=False,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref_chosen, ref_rejected = ref_logps.detach().chunk(2)
    inputs = {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)


def grpo_loss(
    logps: torch.Tensor,
    entropies: torch.Tensor,
    inputs: dict,
    *,
    beta: float,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str,
    use_bias_correction_kl: bool,
    max_completion_length: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a batch by `GRPOTrainer._compute_loss`, and TRL's metrics of it (kl,
    entropy, clip ratios), with the given per-token log-probs and entropies as the policy's.
    `inputs` holds TRL's tensors; TRL's accumulation normalizer is 1 (the caller weights)."""
    from trl import GRPOTrainer

    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        args=SimpleNamespace(
            use_bias_correction_kl=use_bias_correction_kl, delta=None, steps_per_generation=1
        ),
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        accelerator=_Accelerator(),
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items() if v}
    return loss, metrics
