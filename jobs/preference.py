"""Preference tuning (`train.method: dpo`): prompt/chosen/rejected pairs, their batches, the step.

Rows, in TRL's preference formats (detected per row):
  {"prompt": "...", "chosen": "...", "rejected": "..."}          the prompt becomes a user turn and
                                                                 each answer an assistant turn
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  {"chosen": [messages], "rejected": [messages]}                 the shared leading turns are the prompt
Every pair is rendered with the chat template, like SFT rows, so the adapter is served the same way.

The loss is TRL's own DPO code (`DPOTrainer._compute_loss`), fed the log-probabilities computed
here; the reference model is the base with the adapter switched off (`par.adapter_disabled()`),
so there is no second copy of the model in memory.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from jobs.config import ConfigError, DataConfig, DpoConfig
from jobs.data import IGNORE_INDEX, normalize_text, to_messages
from jobs.distributed import all_reduce_sum, rank_and_world
from jobs.evaluation import rank_batches
from jobs.prepare import PreparedData
from jobs.sources import RowError, expand_source, read_rows

# ---------------------------------------------------------------- rows -> pairs of conversations


def to_pair(row: Any, system_prompt: str | None = None) -> dict[str, list[dict]]:
    """One preference row -> validated {"prompt", "chosen", "rejected"} message lists."""
    if not isinstance(row, dict):
        raise RowError(f"row is {type(row).__name__}, not an object")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise RowError(f"missing field(s) {missing}; expected prompt/chosen/rejected")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str) or not prompt.strip():
            raise RowError(
                "field 'prompt' must be a non-empty string when chosen/rejected are strings"
            )
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is None:  # implicit prompt: the turns both conversations share
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif not isinstance(prompt, list):
            raise RowError("field 'prompt' must be a list of messages when chosen/rejected are")
    else:
        raise RowError(
            f"chosen is {type(chosen).__name__} and rejected {type(rejected).__name__}: "
            "give two strings or two message lists"
        )
    if not prompt or not chosen or not rejected:
        raise RowError("empty prompt, chosen or rejected (or chosen equals rejected)")
    pair = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        # to_messages checks roles, contents and turn order of the whole conversation
        try:
            whole = to_messages({"messages": prompt + answer}, "messages", system_prompt)
        except RowError as e:
            raise RowError(f"prompt + {side}: {e}") from None
        cut = len(whole) - len(answer)
        if whole[cut]["role"] != "assistant":
            raise RowError(f"{side}: the answer must start with an assistant turn")
        pair.setdefault("prompt", whole[:cut])
        pair[side] = whole[cut:]
    if pair["chosen"] == pair["rejected"]:
        raise RowError("chosen and rejected are the same")
    return pair


def normalize_pair(pair: dict[str, list[dict]], cfg) -> dict[str, list[dict]]:
    out = {}
    for key, messages in pair.items():
        out[key] = [
            {"role": m["role"], "content": normalize_text(m["content"], cfg)} for m in messages
        ]
        if not all(m["content"] for m in out[key]):
            raise RowError(f"{key}: empty content after normalization")
    return out


# ---------------------------------------------------------------- pairs -> token ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(pair: dict[str, list[dict]], tokenizer, max_seq_len: int) -> dict[str, list[int]]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} as TRL's DPOTrainer tokenizes them: the
    prompt rendered with the generation prompt, each answer what the whole render adds after it
    (so an answer's end-of-turn token is learned), prompt first and both cut to max_seq_len."""

    def ids(messages, **kw) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(pair["prompt"], add_generation_prompt=True)
    chosen = ids(pair["prompt"] + pair["chosen"])
    rejected = ids(pair["prompt"] + pair["rejected"])
    # where the prompt's render and the whole render's tokens part (a merge across the boundary)
    cut = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    if cut >= max_seq_len:
        raise RowError(f"the prompt fills max_seq_len={max_seq_len}; no answer token is left")
    room = max_seq_len - cut
    return {"prompt_ids": prompt[:cut], "chosen_ids": chosen[cut:][:room],
            "rejected_ids": rejected[cut:][:room]}  # fmt: skip


# ---------------------------------------------------------------- the job's data


def prepare_pairs(cfg: DataConfig, tokenizer, seed: int):
    """The job's train/eval pairs from data.train_files / data.sources (a source's split, else a
    hash of the pair: the same pair always lands on the same side). A bad row is reported with
    file:line and counted, or stops the job with data.on_error=fail. Dedup and quality filters
    are SFT-only."""
    split_pairs: dict[str, list] = {"train": [], "eval": []}
    counts = {"input_rows": 0, "malformed": 0, "train": 0, "eval": 0}
    errors: list[dict[str, str]] = []
    for index, source in enumerate(cfg.all_sources()):
        for file in expand_source(index, source):
            for where, row in read_rows(file):
                counts["input_rows"] += 1
                try:
                    if isinstance(row, RowError):
                        raise row
                    pair = normalize_pair(to_pair(row, cfg.system_prompt), cfg.normalize)
                    ids = tokenize_pair(pair, tokenizer, cfg.max_seq_len)
                except RowError as e:
                    if cfg.on_error == "fail":
                        raise ConfigError(f"{where}: {e} (data.on_error=fail)") from None
                    counts["malformed"] += 1
                    errors.append({"where": where, "reason": str(e)})
                    continue
                key = json.dumps(pair, sort_keys=True, ensure_ascii=False)
                split = source.split if source.split in ("train", "eval") else _hash_split(
                    key, seed, cfg.eval_fraction
                )  # fmt: skip
                if source.split != "test":
                    split_pairs[split].append((key, ids))
    digest = hashlib.sha256()
    for split in ("train", "eval"):
        counts[split] = len(split_pairs[split])
        for key, _ in split_pairs[split]:
            digest.update(f"{split}\t{key}\n".encode())
    digest.update(f"max_seq_len={cfg.max_seq_len}".encode())
    report = {"counts": counts, "errors": errors[:10], "prepared": "inline (preference pairs)"}
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    if not split_pairs["train"]:
        raise ConfigError(f"data: no usable preference pairs ({summary})")
    if not split_pairs["eval"]:
        raise ConfigError(
            f"data: the held-out set of pairs is empty ({summary}); give more rows, a larger "
            "data.eval_fraction or eval files"
        )
    return PreparedData(
        train=[ids for _, ids in split_pairs["train"]],
        eval=[ids for _, ids in split_pairs["eval"]],
        eval_conversations=[],
        dataset_hash="sha256:" + digest.hexdigest(),
        report=report,
    )


def _hash_split(key: str, seed: int, eval_fraction: float) -> str:
    u = random.Random(hashlib.sha256(f"{seed}:{key}".encode()).digest()).random()
    return "eval" if u < eval_fraction else "train"


# ---------------------------------------------------------------- batches


def collate_pairs(pairs: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """TRL's layout (DataCollatorForPreference): the chosen rows, then the rejected rows, each
    prompt + answer, right-padded; completion_mask marks the answer tokens."""
    rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    rows += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[r, :n] = torch.tensor(prompt + answer)
        attention[r, :n] = 1
        completion[r, len(prompt) : n] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


# ---------------------------------------------------------------- log-probs and TRL's loss


def answer_token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(token | prefix) of every answer token ([rows, len - 1]); 0 elsewhere."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits[:, :-1]
    labels = batch["input_ids"][:, 1:].masked_fill(
        batch["completion_mask"][:, 1:] == 0, IGNORE_INDEX
    )
    return -F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )


class _Gather:
    """Accelerate's gathers as TRL calls them, for one process: each rank's sums are reduced by
    the recipe (all_reduce_sum), not inside the loss."""

    def __init__(self, device):
        self.device = device

    def gather(self, t):
        return t

    gather_for_metrics = gather


def trl_dpo_loss(
    policy_token_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    batch: dict[str, torch.Tensor],
    dpo: DpoConfig,
) -> torch.Tensor:
    """The mean DPO loss over the batch's pairs, computed by TRL's DPOTrainer code.

    TRL 1.x keeps its losses inside `DPOTrainer._compute_loss(model, inputs)`, which runs the
    policy forward itself. It is called here on a minimal stand-in for the trainer (the
    attributes that method reads) with a "model" that returns the log-probs computed above and
    the reference log-probs passed in as precomputed, so the loss (sigmoid, ipo, hinge, robust)
    is TRL's to the line. tests/test_dpo.py checks it against a real DPOTrainer.
    """
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
        beta=dpo.beta,
        loss_types=[dpo.loss_type],
        loss_weights=[1.0],
        label_smoothing=dpo.label_smoothing,
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
        for i, v in enumerate((n, mean_loss * n, chosen.sum(), rejected.sum(),
                               (chosen - rejected).sum(), (chosen > rejected).sum())):  # fmt: skip
            self.sums[i] += float(v)

    def reduced(self, device, prefix: str = "") -> dict[str, float]:
        pairs, loss, chosen, rejected, margin, correct = all_reduce_sum(self.sums, device)
        pairs = max(pairs, 1)
        names = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy")
        values = (loss, chosen, rejected, margin, correct)
        return {f"{prefix}{k}": v / pairs for k, v in zip(names, values, strict=True)}


def dpo_train_step(
    par, micro_batches, device, autocast, max_grad_norm, dpo: DpoConfig
) -> tuple[dict[str, float], int]:
    """One optimizer step of DPO over this rank's micro-batches of pairs; returns the step's
    metrics (loss, rewards, margin, accuracy: means over every pair on every rank) and its
    non-padding input tokens. Like the SFT step, the loss is a mean over all the step's pairs,
    so accumulation and data parallelism give one big batch's gradient."""
    _, world = rank_and_world()
    local_pairs = sum(len(b["input_ids"]) // 2 for b in micro_batches)
    (global_pairs,) = all_reduce_sum([local_pairs], device)
    stats = PairStats(dpo.beta)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # every rank runs the reference pass too: under FSDP/ZeRO-3 a forward is collective
        with torch.no_grad(), par.adapter_disabled(), autocast():
            ref = answer_token_logps(par.module, batch).sum(1)
        with autocast():
            policy = answer_token_logps(par.model, batch)
        loss = trl_dpo_loss(policy, ref, batch, dpo)
        pairs = len(batch["input_ids"]) // 2
        # every strategy averages gradients over ranks; scaling by world undoes that average
        par.backward(loss * pairs * world / global_pairs, last=i == len(micro_batches) - 1)
        stats.add(loss.item(), policy.sum(1), ref)
    par.step(max_grad_norm)
    (tokens,) = all_reduce_sum([sum(int(b["attention_mask"].sum()) for b in micro_batches)], device)
    return stats.reduced(device), int(tokens)


@torch.no_grad()
def preference_metrics(par, pairs, batch_size: int, pad_id: int, device, autocast, dpo) -> dict:
    """Held-out DPO loss, reward margin, reward accuracy and mean rewards, over all ranks."""
    model = par.module
    was_training = model.training
    model.eval()
    stats = PairStats(dpo.beta)
    for chunk in rank_batches(pairs, batch_size, par.collective_forward):
        batch = {k: v.to(device) for k, v in collate_pairs(chunk or pairs[:1], pad_id).items()}
        with par.adapter_disabled(), autocast():
            ref = answer_token_logps(model, batch).sum(1)
        with autocast():
            policy = answer_token_logps(model, batch)
        if chunk is not None:
            stats.add(trl_dpo_loss(policy, ref, batch, dpo).item(), policy.sum(1), ref)
    model.train(was_training)
    return stats.reduced(device, prefix="eval_")
