"""Reinforcement fine-tuning (`train.method: grpo`): GRPO with graders, rollouts on Ray actors.

A step: the step's prompts go to the rollout actors (jobs/rollout.py), which sample a group of
`num_generations` completions per prompt with the adapter version the trainer published last;
the grader (jobs/graders, OpenAI's shapes) scores them; advantages are each reward against its
group (TRL's formula, TRL's nanstd); the loss is TRL's own code (core/upstream/trl.py),
called on a stand-in for the trainer with the log-probs computed here, as DPO reuses TRL's
DPO loss; tests/test_grpo.py checks both against a real GRPOTrainer. After the optimizer step
the adapter's weights are published as the next version.

With rollout.async_steps: 1 the next step's groups are sampled while this one trains, one
version behind; their importance ratio is taken against the producing version's log-probs,
which the actor computes. The reference for beta > 0 is the base with the adapter disabled.
Batch sizes count prompts: micro_batch_size prompts (x num_generations rows) per forward.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from core.upstream.trl import grpo_loss
from jobs.checkpointing import TrainerState
from jobs.config import GrpoConfig
from jobs.distributed import all_gather_objects
from jobs.objectives.base import Objective, StepResult
from jobs.rollout import (
    Group,
    Pending,
    Rollout,
    RolloutPool,
    Sampling,
    completion_logps,
    pad_rollouts,
    sample_seed,
)

# step metrics under TRL's names (train/reward, train/kl, ...)
TRACKED = {
    "reward_std": "reward_std",
    "clip_ratio": "clip_ratio/region_mean",
    "completion_length": "completions/mean_length",
    "truncated": "completions/clipped_ratio",
}


def group_advantages(
    rewards: torch.Tensor, group: int, scale: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, std-is-zero per row): each reward minus its group's mean, divided by the
    group's (or the batch's) std; TRL's sum_then_normalize for one reward."""
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(group)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def trl_grpo_loss(
    logps: torch.Tensor,
    entropies: torch.Tensor,
    inputs: dict,
    grpo: GrpoConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a batch by TRL's GRPOTrainer code (core/upstream/trl.py), and TRL's
    metrics of it (kl, entropy, clip ratios). `inputs` holds TRL's tensors: prompt/completion ids
    and masks, advantages, old_per_token_logps (off-policy rows), ref_per_token_logps (beta > 0),
    num_items_in_batch. TRL's accumulation normalizer is 1 here: the caller weights each
    micro-batch."""
    return grpo_loss(
        logps,
        entropies,
        inputs,
        beta=grpo.beta,
        loss_type=grpo.loss_type,
        epsilon_low=grpo.epsilon,
        epsilon_high=grpo.epsilon_high or grpo.epsilon,
        importance_sampling_level=grpo.importance_sampling_level,
        use_bias_correction_kl=grpo.use_bias_correction_kl,
        max_completion_length=grpo.max_completion_length,
    )


def micro_batch_weight(
    loss_type: str, rows: int, tokens: int, global_rows: int, global_tokens: int
) -> float:
    """A micro-batch's share of the step's loss, so that accumulation and ranks give one big
    batch's loss for each loss type: a mean over sequences (grpo, dr_grpo) or over tokens
    (bnpo); dapo is already divided by the step's tokens (num_items_in_batch)."""
    if loss_type in ("grpo", "dr_grpo"):
        return rows / global_rows
    if loss_type == "bnpo":
        return tokens / max(global_tokens, 1)
    return 1.0


class GRPO(Objective):
    tracked_names = TRACKED
    shown_on_progress = ("reward", "kl")
    shown_on_eval = ("eval_reward",)

    def __init__(self, cfg, rt, tokenizer, data):
        super().__init__(cfg, rt, tokenizer, data)
        self.grpo = cfg.train.grpo
        self.pool: RolloutPool | None = None
        self.grader = None
        self.pending: tuple[int, Pending] | None = None  # async: the next step's groups
        self.state: TrainerState | None = None

    # --- lifecycle
    def start(self, par, state: TrainerState, upcoming, total_steps: int) -> None:
        """Before the loop (after a resume): the actors, the grader, version state.step."""
        from jobs.graders import make_grader

        self.state, self.upcoming, self.total_steps = state, upcoming, total_steps
        if self.rt.is_main:
            self.pool = RolloutPool(self.cfg)
            self.grader = make_grader(self.grpo.grader)
        self.publish(par, state.step)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.grader is not None:
            self.grader.close()

    def publish(self, par, version: int) -> None:
        """The adapter's weights as the rollout actors' next version (every rank takes part in
        the gather; FSDP/ZeRO-3 shards are collective)."""
        from peft.utils import get_peft_model_state_dict

        weights = par.gathered_state_dict(trainable_only=True)
        if self.pool is not None:
            lora = get_peft_model_state_dict(par.module, state_dict=weights)
            config = par.module.peft_config["default"].to_dict()
            self.pool.publish(version, config, {k: v.float() for k, v in lora.items()})

    def batch(self, examples):
        return list(examples)  # prompts: the step's tensors are made from its rollouts

    # --- rollouts (rank 0) and their sharing
    def groups(self, examples: list[dict], step: int) -> list[Group]:
        n, seed = self.grpo.num_generations, self.cfg.run.seed
        return [
            Group(ex["prompt_ids"], [sample_seed(seed, step, ex["index"], j) for j in range(n)])
            for ex in examples
        ]

    def sampling(self, logps: bool) -> Sampling:
        g = self.grpo
        return Sampling(g.max_completion_length, g.temperature, g.top_p, logps)

    def step_rollouts(self, examples: list[dict], step: int) -> tuple[list[Rollout], float]:
        """The step's rollouts (rank 0): sampled now, or collected from the async submission;
        with async_steps the next step's are submitted before returning. Seconds waited too."""
        t0 = time.perf_counter()
        asynchronous = self.cfg.rollout.async_steps > 0
        if self.pending is not None and self.pending[0] == step:
            rollouts = self.pool.collect(self.pending[1])
        else:
            rollouts = self.pool.collect(
                self.pool.submit(self.groups(examples, step), self.sampling(asynchronous))
            )
        waited = time.perf_counter() - t0
        self.pending = None
        if asynchronous and step + 1 < self.total_steps:
            upcoming = [ex for mb in self.upcoming(step + 1) for ex in mb]
            self.pending = (
                step + 1,
                self.pool.submit(self.groups(upcoming, step + 1), self.sampling(True)),
            )
        return rollouts, waited

    def scored(self, examples: list[dict], step: int) -> dict:
        """Rank 0: rollouts, grades and advantages for every rank's prompts, with the metrics."""
        rollouts, gen_s = self.step_rollouts(examples, step)
        t0 = time.perf_counter()
        n = self.grpo.num_generations
        samples = [
            {"output_text": r.text, "item": ex["item"]}
            for ex, group in zip(examples, chunks(rollouts, n), strict=True)
            for r in group
        ]
        grades = self.grader.grade(samples)
        grade_s = time.perf_counter() - t0
        rewards = torch.tensor([g.score for g in grades], dtype=torch.float32)
        advantages, std_zero = group_advantages(rewards, n, self.grpo.scale_rewards)
        metrics = reward_metrics(grades, rewards) | {
            "frac_reward_zero_std": std_zero.view(-1, n)[:, 0].float().mean().item(),
            "completion_length": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
            "truncated": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "staleness": sum(self.state.step - r.version for r in rollouts) / len(rollouts),
            "generation_s": gen_s,
            "grading_s": grade_s,
        }
        return {"rollouts": rollouts, "advantages": advantages.tolist(), "metrics": metrics}

    # --- the step
    def train_step(self, par, micro_batches):
        step = self.state.step
        local = [len(mb) for mb in micro_batches]
        everyone = all_gather_objects([ex["index"] for mb in micro_batches for ex in mb])
        shared = None
        if self.rt.is_main:
            examples = [self.train_examples[i] for indices in everyone for i in indices]
            shared = self.scored(examples, step)
        shared = all_gather_objects(shared)[0]
        t0 = time.perf_counter()
        mine = self.rows_of_rank(shared, everyone, local)
        loss, tokens, trl_metrics = self.optimize(par, mine, micro_batches)
        self.publish(par, step + 1)
        metrics = shared["metrics"] | trl_metrics | {"training_s": time.perf_counter() - t0}
        return StepResult(loss, tokens, metrics)

    def rows_of_rank(
        self, shared: dict, everyone: list[list[int]], local: list[int]
    ) -> list[list[tuple]]:
        """This rank's (rollout, advantage) rows, per micro-batch of prompts."""
        n = self.grpo.num_generations
        start = sum(len(x) for x in everyone[: self.rt.rank]) * n
        rows = list(zip(shared["rollouts"], shared["advantages"], strict=True))[start:]
        out = []
        for count in local:
            out.append(rows[: count * n])
            rows = rows[count * n :]
        return out

    def optimize(self, par, rows_per_mb, micro_batches) -> tuple[float, int, dict]:
        """One optimizer step over this rank's micro-batches; the loss, input tokens and TRL's
        metrics, over every rank."""
        n, rt = self.grpo.num_generations, self.rt
        local_rows = sum(len(r) for r in rows_per_mb)
        local_tokens = sum(len(ro.completion_ids) for r in rows_per_mb for ro, _ in r)
        global_rows, global_tokens = rt.sum_over_ranks([local_rows, local_tokens])
        loss_sum, inputs_sum, sums = 0.0, 0, defaultdict(float)
        for i, (rows, prompts) in enumerate(zip(rows_per_mb, micro_batches, strict=True)):
            inputs = self.trl_inputs(
                par, rows, [ex for ex in prompts for _ in range(n)], global_tokens
            )
            with rt.autocast():
                logps, entropies = completion_logps(par.model, inputs, self.grpo.temperature)
            loss, metrics = trl_grpo_loss(logps, entropies, inputs, self.grpo)
            tokens = int(inputs["completion_mask"].sum())
            weight = micro_batch_weight(
                self.grpo.loss_type, len(rows), tokens, global_rows, global_tokens
            )
            # every strategy averages gradients over ranks; scaling by world undoes that average
            par.backward(loss * weight * rt.world, last=i == len(rows_per_mb) - 1)
            loss_sum += loss.item() * weight
            inputs_sum += int(inputs["prompt_mask"].sum()) + tokens
            for k, v in metrics.items():
                sums[k] += v * len(rows)
        par.step(self.cfg.train.max_grad_norm)
        names = sorted(sums)
        reduced = rt.sum_over_ranks([loss_sum, inputs_sum, *(sums[k] for k in names)])
        trl = {
            TRL_NAMES.get(k, k): v / global_rows for k, v in zip(names, reduced[2:], strict=True)
        }
        return reduced[0], int(reduced[1]), trl

    def trl_inputs(self, par, rows: list[tuple], prompts: list[dict], global_tokens: float) -> dict:
        """TRL's inputs for one micro-batch: padded ids and masks, advantages, the producing
        version's log-probs for rows sampled off-policy, the reference's for beta > 0."""
        rollouts = [r for r, _ in rows]
        batch = pad_rollouts(
            [p["prompt_ids"] for p in prompts], [r.completion_ids for r in rollouts], self.pad_id
        )
        batch = self.rt.to_device(batch)
        batch["advantages"] = torch.tensor([a for _, a in rows], device=self.rt.device)
        batch["num_items_in_batch"] = torch.tensor(float(global_tokens), device=self.rt.device)
        if any(r.version != self.state.step for r in rollouts):
            old = torch.zeros(batch["completion_ids"].shape, device=self.rt.device)
            for i, r in enumerate(rollouts):
                old[i, : len(r.logps)] = torch.tensor(r.logps)
            batch["old_per_token_logps"] = old
        if self.grpo.beta:
            # every rank runs the reference pass too: under FSDP/ZeRO-3 a forward is collective
            with torch.no_grad(), par.adapter_disabled(), self.rt.autocast():
                batch["ref_per_token_logps"] = completion_logps(
                    par.module, batch, self.grpo.temperature
                )[0]
        return batch

    # --- evaluation: held-out prompts, one completion each, the same grader
    def evaluate(self, par, full):
        shared = None
        if self.rt.is_main:
            limit = self.cfg.eval.max_generate_samples or len(self.eval_examples)
            examples = self.eval_examples[:limit]
            groups = [
                Group(ex["prompt_ids"], [sample_seed(self.cfg.run.seed, -1, ex["index"])])
                for ex in examples
            ]
            g = self.grpo
            sampling = Sampling(g.max_completion_length, g.eval_temperature, g.top_p)
            rollouts = self.pool.collect(self.pool.submit(groups, sampling))
            samples = [
                {"output_text": r.text, "item": ex["item"]}
                for ex, r in zip(examples, rollouts, strict=True)
            ]
            grades = self.grader.grade(samples)
            rewards = torch.tensor([gr.score for gr in grades], dtype=torch.float32)
            metrics = reward_metrics(grades, rewards)
            shared = {f"eval_{k}": v for k, v in metrics.items()}
            shared["eval_completion_length"] = sum(len(r.completion_ids) for r in rollouts) / len(
                rollouts
            )
            # lower is better, for early stopping and the best eval: the negative held-out reward
            shared["eval_loss"] = -metrics["reward"]
        return all_gather_objects(shared)[0]

    def evaluates_before_training(self) -> bool:
        return True  # the base to compare with is the starting adapter (a warm start)

    def base_metrics(self, par, state):
        return state.base_metrics  # the starting adapter's, evaluated before the first step

    @staticmethod
    def print_summary(summary):
        m = summary["metrics"]
        print(
            f"held-out reward ({summary['run_name']}, {summary['steps']} steps): "
            f"{m['base_eval_reward']:.3f} at the start -> {m['eval_reward']:.3f} "
            f"(std {m['eval_reward_std']:.3f}, grader errors {m['eval_grader_errors']:.0f})\n"
            f"adapter: {summary['adapter']}"
        )

    @staticmethod
    def write_artifacts(summary: dict, directory) -> None:
        from jobs.plots import plot_rewards

        plot_rewards(summary, directory / "reward_curve.png")


# TRL's metric names for what its loss logs, shortened where the tracker shows them
TRL_NAMES = {"clip_ratio/region_mean": "clip_ratio"}


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def reward_metrics(grades, rewards: torch.Tensor) -> dict[str, float]:
    """Mean and std of the reward, each named grader's mean, and the grading errors."""
    from trl.trainer.utils import nanstd

    metrics = {"reward": rewards.mean().item(), "reward_std": nanstd(rewards).item()}
    per_grader: dict[str, list[float]] = defaultdict(list)
    for g in grades:
        for name, score in g.scores.items():
            per_grader[name].append(score)
    metrics |= {f"reward_{k}": sum(v) / len(v) for k, v in per_grader.items()}
    metrics["grader_errors"] = float(sum(g.error is not None for g in grades))
    return metrics
