"""Supervised fine-tuning: next-token loss on the answer tokens (prompts and padding masked)."""

from __future__ import annotations

from functools import partial

from inference.runtime import Runtime
from jobs.batching import collate, pack
from jobs.evaluation import eval_loss, exact_match, perplexity, token_loss_sum
from jobs.objectives.base import Objective, StepResult


def train_step(par, micro_batches, rt: Runtime, max_grad_norm) -> tuple[float, int]:
    """One optimizer step over this rank's micro-batches (gradient accumulation); returns the
    step's loss and its non-padding input tokens, both over all ranks.

    The loss is the mean over every label token in the step on every rank, so accumulation and
    data parallelism give the same gradient as one big batch (not a mean of micro-batch means).
    """
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    (global_tokens,) = rt.sum_over_ranks([local_tokens])
    loss_sum = 0.0
    for i, batch in enumerate(micro_batches):
        with rt.autocast():
            loss, _ = token_loss_sum(par.model, rt.to_device(batch))
        # every strategy averages gradients over ranks; scaling by world undoes that average
        par.backward(loss * rt.world / global_tokens, last=i == len(micro_batches) - 1)
        loss_sum += loss.item()
    par.step(max_grad_norm)
    local_inputs = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    total_loss, inputs = rt.sum_over_ranks([loss_sum, local_inputs])
    return total_loss / global_tokens, int(inputs)


class SFT(Objective):
    def __init__(self, cfg, rt, tokenizer, data):
        super().__init__(cfg, rt, tokenizer, data)
        if cfg.train.packing:
            self._batch = partial(pack, max_len=cfg.data.max_seq_len, pad_id=self.pad_id)
        else:
            self._batch = partial(collate, pad_id=self.pad_id)

    def batch(self, examples):
        return self._batch(examples)

    def train_step(self, par, micro_batches):
        return StepResult(*train_step(par, micro_batches, self.rt, self.cfg.train.max_grad_norm))

    def evaluate(self, par, full):
        ev = self.cfg.eval
        loss = eval_loss(par.module, self.eval_examples, ev.batch_size, self.pad_id, self.rt)
        if not full:
            return {"eval_loss": loss}
        metrics = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
        conversations = self.eval_conversations[: ev.max_generate_samples]
        if ev.task_metric == "exact_match" and conversations:
            metrics["exact_match"] = exact_match(
                par.module, self.tokenizer, conversations, ev.max_new_tokens, ev.batch_size, self.rt
            )
        return metrics

    @staticmethod
    def print_summary(summary):
        from rich.console import Console
        from rich.table import Table

        m = summary["metrics"]
        table = Table(
            title=f"held-out evaluation ({summary['run_name']}, {summary['steps']} steps)"
        )
        table.add_column("model")
        for col in ("eval loss", "perplexity", "exact match"):
            table.add_column(col, justify="right")
        tuned = "base + adapter" if summary["adapter"] else "fine-tuned"
        for name, prefix in (("base", "base_"), (tuned, "")):
            em = m.get(f"{prefix}exact_match")
            table.add_row(
                name,
                f"{m[f'{prefix}eval_loss']:.4f}",
                f"{m[f'{prefix}eval_ppl']:.2f}",
                "-" if em is None else f"{em:.1%}",
            )
        Console().print(table)
        # plain print: a path must stay whole on one line, whatever the terminal's width
        kind = "adapter" if summary["adapter"] else "model"
        out = summary[kind]
        print(f"{kind}: {out}\nmanifest: {out.rsplit('/', 1)[0]}/run.json")
