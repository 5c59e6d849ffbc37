"""Many LoRA trials on one copy of the base model: each trial's rows through its own adapter.

`PackedTrainer` holds one base model and up to N adapter *slots* (peft adapters of one
PeftModel, each with its own r, alpha and target modules). A joint step concatenates every
slot's micro-batch into one batch, each slot's rows one block; each LoRA layer's forward adds
every block's own adapter to the base output, so a row only ever meets its own slot's weights. The loss is the sum over slots of each slot's own token-mean loss: the
slots share no parameter, so each slot's gradient is the one it gets trained alone. Clipping,
AdamW and the cosine-warmup schedule are per slot.

Why peft's adapters and not slot tensors of our own (inference/lora.py): `add_adapter` after
`seed_everything(seed)` draws the same initial weights as `add_lora` in the normal job, and
`save_pretrained` writes the adapter that evaluation and serving already read, so a packed
trial equals the trial run alone by construction, not by a copy of peft's init order. Why our
own LoRA forward and not peft's mixed-batch one (`adapter_names`, what serving uses): peft
gathers each adapter's rows by index and scatters its output back (index_put): 25% of a 4-slot
step's CPU time in a profile. Contiguous blocks need only `split` views and one `cat`.

No Ray here: tune/packed_trials.py runs this inside a Ray actor; the tests run it in-process.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from peft import get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from transformers import get_cosine_schedule_with_warmup

from core.config import ConfigError
from inference.runtime import Runtime
from jobs.batching import collate
from jobs.checkpointing import TrainerState
from jobs.config import JobConfig
from jobs.data.render import IGNORE_INDEX
from jobs.distributed import seed_everything
from jobs.evaluation import rank_batches
from jobs.finetune import StepBatches, StepPlan, plan_steps
from jobs.logits import cross_entropy, last_hidden_states, scores_at
from jobs.model import peft_lora_config
from jobs.objectives import Objective, StepResult, make_objective

# What a packed trial may set differently from the others: its adapter, optimizer and schedule.
# Anything else changes the shared base, data or batch shape; run.seed too: it seeds the
# train/eval split of the data preparation, not only the LoRA init and the example order.
PACKABLE_KEYS = {
    "lora.r",
    "lora.alpha",
    "lora.target_modules",
    "lora.use_rslora",
    "train.lr",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.max_grad_norm",
    "train.max_steps",
    "train.epochs",
}
# Where a trial's outputs go: each trial has its own (tune.sweep sets them); not training.
OUTPUT_KEYS = {"run.name", "checkpoint.storage_path"}
BASE_ROWS = "__base__"  # no slot has this name: its rows get no adapter


def check_packable(job: JobConfig, swept: Iterable[str], where: str = "sweep") -> None:
    """ConfigError unless trials of `job` differing in `swept` keys can share one base model."""
    for key in swept:
        if key not in PACKABLE_KEYS:
            raise ConfigError(
                f"{where}: space.{key} cannot vary between packed trials (they share one base "
                f"model, data and batch shape); packable keys: {', '.join(sorted(PACKABLE_KEYS))}. "
                "Set pack_trials: 1 to sweep it"
            )
    problems = {
        "scaling.num_workers": (job.scaling.num_workers != 1, "must be 1 (one pack host)"),
        "lora": (job.lora is None, "must be set: packed trials train LoRA adapters"),
        "train.method": (job.train.method != "sft", "must be sft"),
        "train.strategy": (job.train.strategy != "ddp", "must be ddp (one unsharded base)"),
        "run.stop_after_steps": (job.run.stop_after_steps is not None, "must be unset"),
    }
    if job.lora is not None:
        # slots share one RNG stream: dropout masks would depend on the other trials
        problems["lora.dropout"] = (job.lora.dropout > 0, "must be 0 (add lora.dropout=0)")
        problems["lora.use_dora"] = (job.lora.use_dora, "must be false")
    for key, (bad, why) in problems.items():
        if bad:
            raise ConfigError(f"{where}: pack_trials > 1: {key} {why}")


@dataclass
class Slot:
    """One trial's adapter and its own optimizer, schedule, data order and history."""

    name: str
    cfg: JobConfig
    plan: StepPlan
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches: StepBatches
    state: TrainerState = field(default_factory=TrainerState)


class PackedTrainer:
    """One base model, the prepared data and the live slots; every method runs torch work on
    the caller's thread (the pack host serializes calls)."""

    def __init__(self, job: JobConfig, rt: Runtime, tokenizer, base_model, data: dict):
        self.job, self.rt, self.tokenizer = job, rt, tokenizer
        self.obj: Objective = make_objective(job, rt, tokenizer, data)
        self.base = base_model
        self.model = None  # the PeftModel, made with the first slot
        self.slots: dict[str, Slot] = {}
        # during a forward pass: (adapter, rows) blocks covering the batch, or one adapter for all
        self.blocks: list[tuple[str, int]] | str | None = None
        self._packed_layers: set[int] = set()
        self._base_metrics: dict | None = None

    # ---------------------------------------------------------------- slots

    def add(self, name: str, cfg: JobConfig) -> Slot:
        """A new slot training `cfg` (the job plus this trial's values) from step 0."""
        if name in self.slots:
            raise ValueError(f"slot {name!r} is already training")
        diff = [k for k in changed_keys(self.job, cfg) if k not in OUTPUT_KEYS]
        check_packable(self.job, diff, where=f"trial {name}")
        # the same draws as the job's seed_everything(seed) then add_lora, whatever ran before
        cuda = [self.rt.device] if self.rt.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            seed_everything(cfg.run.seed)
            config = peft_lora_config(cfg.lora)
            if self.model is None:
                self.model = get_peft_model(self.base, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
        self._take_over_new_layers()
        self.model.train()
        slot = self._new_slot(name, cfg)
        self.slots[name] = slot
        self._refresh_trainable()
        return slot

    def _new_slot(self, name: str, cfg: JobConfig) -> Slot:
        params = [
            p
            for n, p in self.model.named_parameters()
            if f".lora_A.{name}." in n or f".lora_B.{name}." in n
        ]
        if not params:
            raise ConfigError(f"trial {name}: lora.target_modules matched no layer of the model")
        plan = plan_steps(len(self.obj.train_examples), cfg)
        train = cfg.train
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
        batches = StepBatches(cfg, self.rt, self.obj, plan)
        return Slot(name, cfg, plan, params, optimizer, scheduler, batches)

    def remove(self, name: str) -> None:
        """Frees the slot: its adapter and optimizer state are dropped."""
        if self.slots.pop(name, None) is None:
            return
        self.model.delete_adapter(name)
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        # peft's forward reads its active adapter's config: it must be a live one (deleting the
        # last adapter leaves none active, and add_adapter activates none)
        if self.slots and self.model.active_adapter not in self.slots:
            self.model.set_adapter(next(iter(self.slots)))
        # peft trains only its active adapter: adding or deleting one freezes the others
        for slot in self.slots.values():
            for p in slot.params:
                p.requires_grad_(True)

    def _take_over_new_layers(self) -> None:
        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer) or id(module) in self._packed_layers:
                continue
            if not isinstance(module, LoraLinear):
                raise ConfigError(
                    f"lora.target_modules: {name} is a {type(module).__name__}; packed trials "
                    "train LoRA on linear layers only"
                )
            module.forward = partial(self._lora_forward, module)
            self._packed_layers.add(id(module))

    def _lora_forward(self, layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base(x) plus, on each block of rows, that block's adapter: scale * B(A(x))."""
        out = layer.base_layer(x, *args, **kwargs)
        blocks = self.blocks
        if blocks is None:  # peft's own forward would apply its active adapter to every row
            raise RuntimeError("a packed forward pass without row adapters")
        if isinstance(blocks, str):  # one adapter for the whole batch (evaluation, generation)
            blocks = [(blocks, x.shape[0])]
        sizes = [rows for _, rows in blocks]
        # split, not indexing: views forward, one cat backward
        parts = []
        for (name, _), xs, outs in zip(blocks, x.split(sizes), out.split(sizes), strict=True):
            if name not in layer.lora_A:  # the base's rows, or a slot not targeting this layer
                parts.append(outs)
                continue
            a, b = layer.lora_A[name], layer.lora_B[name]
            delta = b(a(layer.lora_dropout[name](xs.to(a.weight.dtype)))) * layer.scaling[name]
            parts.append(outs + delta.to(outs.dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @contextmanager
    def row_adapters(self, blocks: list[tuple[str, int]] | str) -> Iterator[None]:
        self.blocks = blocks
        try:
            yield
        finally:
            self.blocks = None

    # ---------------------------------------------------------------- training and evaluation

    def train_step(self, names: list[str]) -> dict[str, StepResult]:
        """One optimizer step of each named slot, all slots' rows in each forward pass."""
        slots = [self.slots[n] for n in names]
        per_slot = [s.batches.micro_batches(s.state.step) for s in slots]
        tokens = [
            sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in mb) for mb in per_slot
        ]
        loss_sums = torch.zeros(len(slots))
        for micro in zip(*per_slot, strict=True):
            batch = concat_rows(list(micro), self.obj.pad_id)
            blocks = [(s.name, len(b["labels"])) for s, b in zip(slots, micro, strict=True)]
            with self.row_adapters(blocks), self.rt.autocast():
                sums = block_loss_sums(
                    self.model, self.rt.to_device(batch), [rows for _, rows in blocks]
                )
            # each slot's own token mean: its gradient is the one it gets alone
            (sums / torch.tensor(tokens, device=sums.device)).sum().backward()
            loss_sums += sums.detach().cpu()
        results = {}
        for i, slot in enumerate(slots):
            if slot.cfg.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(slot.params, slot.cfg.train.max_grad_norm)
            slot.optimizer.step()
            slot.scheduler.step()
            slot.optimizer.zero_grad(set_to_none=True)
            slot.state.step += 1
            inputs = sum(int(b["attention_mask"].sum()) for b in per_slot[i])
            results[slot.name] = StepResult(float(loss_sums[i]) / tokens[i], inputs)
            slot.state.history.append(
                {
                    "step": slot.state.step,
                    "loss": results[slot.name].loss,
                    "lr": slot.scheduler.get_last_lr()[0],
                }
            )
        return results

    @torch.no_grad()
    def eval_losses(self, names: list[str]) -> dict[str, float]:
        """Each slot's held-out loss (as jobs.evaluation.eval_loss), the slots batched together:
        each chunk of examples is repeated once per slot, so a batch stays eval.batch_size rows."""
        self.model.eval()
        per_chunk = max(1, self.job.eval.batch_size // len(names))
        totals, count = torch.zeros(len(names)), 0
        for chunk in rank_batches(self.obj.eval_examples, per_chunk, self.rt):
            one = collate(chunk, self.obj.pad_id)
            batch = concat_rows([one] * len(names), self.obj.pad_id)
            with self.row_adapters([(n, len(chunk)) for n in names]), self.rt.autocast():
                sums = block_loss_sums(
                    self.model, self.rt.to_device(batch), [len(chunk)] * len(names)
                )
            totals += sums.cpu()
            count += int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        return {n: float(t) / max(count, 1) for n, t in zip(names, totals, strict=True)}

    def record_eval(self, name: str, loss: float) -> bool:
        """The eval in the slot's history; True when early stopping (patience) ends the slot."""
        state = self.slots[name].state
        state.record_eval(state.step, loss)
        patience = self.job.eval.early_stopping_patience
        state.stopped_early = bool(patience and state.evals_without_improvement >= patience)
        return state.stopped_early

    def evaluate(self, adapter: str, full: bool = True) -> dict[str, float]:
        """The objective's held-out metrics (exact match with `full`) through one adapter."""
        view = SimpleNamespace(module=self.model)  # what Objective.evaluate reads of a strategy
        with self.row_adapters(adapter):
            return self.obj.evaluate(view, full=full)

    def final_metrics(self, name: str, tokens_per_s: float = 0.0) -> dict[str, float]:
        """What the normal job reports at its end: base vs tuned on the held-out set. The base
        is the same for every slot, so it is evaluated once per trainer."""
        if self._base_metrics is None:
            self._base_metrics = self.evaluate(BASE_ROWS)
        state = self.slots[name].state
        final = {"step": state.step, "train_tokens_per_s": tokens_per_s}
        final |= {f"base_{k}": v for k, v in self._base_metrics.items()}
        final |= self.evaluate(name)
        state.completed, state.final_metrics = True, final
        return final

    def save_adapter(self, name: str, out: Path) -> None:
        """The slot's adapter as a peft directory (adapter_config.json + weights) at `out`."""
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[name])
            # peft saves a non-default adapter in a subdirectory named after it
            saved = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(saved, out)

    def done(self, name: str) -> bool:
        slot = self.slots[name]
        return slot.state.step >= slot.plan.total_steps or slot.state.stopped_early


def changed_keys(job: JobConfig, cfg: JobConfig) -> list[str]:
    """Dotted keys whose value differs between two job configs (sections compared leaf-wise)."""
    return sorted(_diff(job.model_dump(), cfg.model_dump(), ""))


def _diff(a, b, prefix: str) -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return set().union(*(_diff(a.get(k), b.get(k), f"{prefix}{k}.") for k in keys))
    return {prefix.rstrip(".")} if a != b else set()


def concat_rows(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Micro-batches stacked row-wise, right-padded to the widest (collate's padding: masked
    out of attention and loss; packed rows' position ids run on through the padding)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t, pad = b[key], width - b[key].shape[1]
            if pad and key == "position_ids":
                t = torch.cat([t, t[:, -1:] + torch.arange(1, pad + 1)], dim=1)
            elif pad:
                t = F.pad(t, (0, pad), value=fill[key])
            parts.append(t)
        out[key] = torch.cat(parts)
    return out


def block_loss_sums(
    model, batch: dict[str, torch.Tensor], rows_per_block: list[int]
) -> torch.Tensor:
    """Summed next-token cross-entropy over the label positions of each block of rows
    (jobs.evaluation.token_loss_sum, split by the slot that owns the rows)."""
    if "position_ids" in batch:  # as token_loss_sum: the resets, not the mask, separate examples
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hidden, head = last_hidden_states(model, **inputs)
    labels = batch["labels"][:, 1:]
    sums = []
    # each block's positions scored apart: the head's matmuls have the shapes of the trial run
    # alone, so the same bits (one matmul over all blocks' positions drifted in the last bits)
    blocks = zip(hidden[:, :-1].split(rows_per_block), labels.split(rows_per_block), strict=True)
    for h, y in blocks:
        (per_token,) = scores_at(head, h, y, y != IGNORE_INDEX, cross_entropy)
        sums.append(per_token.sum(1).sum())
    return torch.stack(sums)
