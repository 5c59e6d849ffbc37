"""Preference tuning (`train.method: dpo`): TRL's DPO loss on our log-probs, the reference being
the base with the adapter switched off (`par.adapter_disabled()`): no second copy in memory.

The data side (TRL's pair formats -> prompt/chosen/rejected token ids) is jobs/data/pairs.py.
The loss is TRL's own DPO code (core/upstream/trl.py), fed the log-probabilities computed
here; tests/test_dpo.py checks it against a real DPOTrainer.
"""

from __future__ import annotations

import torch

from core.upstream.trl import dpo_loss
from inference.runtime import Runtime
from jobs.batching import collate_pairs
from jobs.config import DpoConfig
from jobs.evaluation import rank_batches
from jobs.logits import cross_entropy, last_hidden_states, scores_at
from jobs.objectives.base import Objective, StepResult

# DPO metric names as TRL logs them (train/rewards/margins, ...)
TRACKED = {
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "margin": "rewards/margins",
    "accuracy": "rewards/accuracies",
}


def answer_token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(token | prefix) of every answer token ([rows, len - 1]); 0 elsewhere (the logits
    computed chunk by chunk at the answer positions only: jobs/logits.py)."""
    hidden, head = last_hidden_states(
        model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    mask = batch["completion_mask"][:, 1:] != 0
    (ce,) = scores_at(head, hidden[:, :-1], batch["input_ids"][:, 1:], mask, cross_entropy)
    return -ce


def trl_dpo_loss(
    policy_token_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    batch: dict[str, torch.Tensor],
    dpo: DpoConfig,
) -> torch.Tensor:
    """The mean DPO loss over the batch's pairs, computed by TRL's DPOTrainer code
    (core/upstream/trl.py): the policy's log-probs computed above, the reference's passed in as
    precomputed, so the loss (sigmoid, ipo, hinge, robust) is TRL's to the line.
    tests/test_dpo.py checks it against a real DPOTrainer."""
    return dpo_loss(
        policy_token_logps,
        ref_logps,
        batch,
        beta=dpo.beta,
        loss_type=dpo.loss_type,
        label_smoothing=dpo.label_smoothing,
    )


class PairStats:
    """Sums over pairs (loss, rewards, margins, accuracy) across micro-batches, then ranks.

    Rewards as TRL logs them: beta * (log p_policy(answer) - log p_reference(answer)).
    """

    def __init__(self, beta: float):
        self.beta, self.sums = beta, [0.0] * 6  # pairs, loss, chosen, rejected, margin, correct

    def add(self, mean_loss: float, policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> None:
        rewards = self.beta * (policy_logps.detach().float() - ref_logps.float())
        chosen, rejected = rewards.chunk(2)
        n = len(chosen)
        margins = chosen - rejected
        values = (
            n,
            mean_loss * n,
            chosen.sum(),
            rejected.sum(),
            margins.sum(),
            (margins > 0).sum(),
        )
        for i, v in enumerate(values):
            self.sums[i] += float(v)

    def reduced(self, rt: Runtime, prefix: str = "") -> dict[str, float]:
        pairs, loss, chosen, rejected, margin, correct = rt.sum_over_ranks(self.sums)
        pairs = max(pairs, 1)
        names = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy")
        values = (loss, chosen, rejected, margin, correct)
        return {f"{prefix}{k}": v / pairs for k, v in zip(names, values, strict=True)}


def dpo_train_step(
    par, micro_batches, rt: Runtime, max_grad_norm, dpo: DpoConfig
) -> tuple[dict[str, float], int]:
    """One optimizer step of DPO over this rank's micro-batches of pairs; returns the step's
    metrics (loss, rewards, margin, accuracy: means over every pair on every rank) and its
    non-padding input tokens. Like the SFT step, the loss is a mean over all the step's pairs,
    so accumulation and data parallelism give one big batch's gradient."""
    local_pairs = sum(len(b["input_ids"]) // 2 for b in micro_batches)
    (global_pairs,) = rt.sum_over_ranks([local_pairs])
    stats = PairStats(dpo.beta)
    for i, batch in enumerate(micro_batches):
        batch = rt.to_device(batch)
        # every rank runs the reference pass too: under FSDP/ZeRO-3 a forward is collective
        with torch.no_grad(), par.adapter_disabled(), rt.autocast():
            ref = answer_token_logps(par.module, batch).sum(1)
        with rt.autocast():
            policy = answer_token_logps(par.model, batch)
        loss = trl_dpo_loss(policy, ref, batch, dpo)
        pairs = len(batch["input_ids"]) // 2
        # every strategy averages gradients over ranks; scaling by world undoes that average
        par.backward(loss * pairs * rt.world / global_pairs, last=i == len(micro_batches) - 1)
        stats.add(loss.item(), policy.sum(1), ref)
    par.step(max_grad_norm)
    (tokens,) = rt.sum_over_ranks([sum(int(b["attention_mask"].sum()) for b in micro_batches)])
    return stats.reduced(rt), int(tokens)


@torch.no_grad()
def preference_metrics(par, pairs, batch_size: int, pad_id: int, rt: Runtime, dpo) -> dict:
    """Held-out DPO loss, reward margin, reward accuracy and mean rewards, over all ranks."""
    model = par.module
    was_training = model.training
    model.eval()
    stats = PairStats(dpo.beta)
    for chunk in rank_batches(pairs, batch_size, rt):
        batch = rt.to_device(collate_pairs(chunk or pairs[:1], pad_id))
        with par.adapter_disabled(), rt.autocast():
            ref = answer_token_logps(model, batch).sum(1)
        with rt.autocast():
            policy = answer_token_logps(model, batch)
        if chunk is not None:
            stats.add(trl_dpo_loss(policy, ref, batch, dpo).item(), policy.sum(1), ref)
    model.train(was_training)
    return stats.reduced(rt, prefix="eval_")


class DPO(Objective):
    tracked_names = TRACKED
    shown_on_progress = ("margin", "accuracy")

    def batch(self, examples):
        return collate_pairs(examples, self.pad_id)

    def train_step(self, par, micro_batches):
        train = self.cfg.train
        metrics, tokens = dpo_train_step(
            par, micro_batches, self.rt, train.max_grad_norm, train.dpo
        )
        return StepResult(metrics.pop("loss"), tokens, metrics)

    def evaluate(self, par, full):
        bs, dpo = self.cfg.eval.batch_size, self.cfg.train.dpo
        return preference_metrics(par, self.eval_examples, bs, self.pad_id, self.rt, dpo)

    def base_metrics(self, par, state):
        return {}  # the base is DPO's reference: margin 0 and accuracy 0 by definition

    @staticmethod
    def print_summary(summary):
        m = summary["metrics"]
        print(
            f"held-out pairs ({summary['run_name']}, {summary['steps']} steps): DPO loss "
            f"{m['eval_loss']:.4f}, reward margin {m['eval_margin']:.3f}, accuracy "
            f"{m['eval_accuracy']:.1%} (chosen {m['eval_rewards_chosen']:.3f}, rejected "
            f"{m['eval_rewards_rejected']:.3f})\nadapter: {summary['adapter']}"
        )
