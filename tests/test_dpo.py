"""Preference tuning (train.method: dpo): pair formats, TRL's tokenization and loss, a Ray job."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.batching import collate_pairs
from jobs.config import DataConfig, DpoConfig, load_config
from jobs.data.pairs import prepare_pairs, to_pair, tokenize_pair
from jobs.data.sources import RowError
from jobs.demo_data import SYSTEM, make_preference_rows
from jobs.finetune import run_job
from jobs.objectives.dpo import answer_token_logps, trl_dpo_loss
from tests.helpers import local_ray

USER = {"role": "user", "content": "Is the sky blue?"}
YES, NO = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}


def test_standard_and_chat_pair_formats_parse_to_the_same_pair():
    expected = {"prompt": [USER], "chosen": [YES], "rejected": [NO]}
    standard = {"prompt": "Is the sky blue?", "chosen": "yes", "rejected": "no"}
    explicit = {"prompt": [USER], "chosen": [YES], "rejected": [NO]}
    implicit = {"chosen": [USER, YES], "rejected": [USER, NO]}  # the shared turns are the prompt
    for row in (standard, explicit, implicit):
        assert to_pair(row) == expected
    with_system = to_pair(standard, system_prompt=SYSTEM)
    assert with_system["prompt"] == [{"role": "system", "content": SYSTEM}, USER]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "chosen": "a"}, "missing field"),
        ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "give two strings or two message"),
        ({"chosen": [USER, YES], "rejected": [USER, YES]}, "chosen equals rejected"),
        ({"prompt": [USER], "chosen": [USER, YES], "rejected": [NO]}, "roles out of order"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string"),
    ],
)
def test_malformed_pairs_say_why(row, reason):
    with pytest.raises(RowError, match=reason):
        to_pair(row)


def test_a_malformed_row_names_its_file_and_line(tmp_path, tokenizer):
    rows = [json.dumps(r) for r in make_preference_rows(12)]
    rows[2] = json.dumps({"prompt": "q", "chosen": "only one answer"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(train_files=[str(path)], eval_fraction=0.3, on_error="fail")
    with pytest.raises(Exception, match=rf"{path}:3: missing field\(s\) \['rejected'\]"):
        prepare_pairs(cfg, tokenizer, seed=0)
    data = prepare_pairs(cfg.model_copy(update={"on_error": "skip"}), tokenizer, seed=0)
    assert data.report["counts"]["malformed"] == 1
    assert data.report["errors"][0]["where"] == f"{path}:3"
    assert len(data.train) + len(data.eval) == 11 and data.eval


def test_tokenization_and_loss_equal_trl_dpo_trainer(tiny_model_dir, tokenizer, tmp_path):
    """Our pairs tokenize and batch as TRL's DPOTrainer does, and the loss (TRL's code, called on
    our log-probs with the adapter switched off for the reference) equals the trainer's own."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = make_preference_rows(4)
    torch.manual_seed(0)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        # a random adapter: policy and reference (adapter off) differ, so the rewards are not 0
        peft_config=LoraConfig(
            r=8,
            target_modules="all-linear",
            init_lora_weights=False,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
        args=DPOConfig(
            output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=256
        ),
    )
    ours = [tokenize_pair(to_pair(r), tokenizer, 256) for r in rows]
    for i, pair in enumerate(ours):
        assert pair == {k: trainer.train_dataset[i][k] for k in pair}
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    batch = collate_pairs(ours, tokenizer.pad_token_id)
    for key in batch:
        assert torch.equal(batch[key], trl_batch[key]), key

    model = trainer.model
    model.train()
    with torch.no_grad(), model.disable_adapter():
        ref = answer_token_logps(model, batch).sum(1)
    with torch.no_grad():
        policy = answer_token_logps(model, batch)
    for loss_type, smoothing in (("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)):
        trainer.loss_types, trainer.label_smoothing = [loss_type], smoothing
        with torch.no_grad():
            expected = trainer.compute_loss(model, trl_batch).item()
        got = trl_dpo_loss(
            policy, ref, batch, DpoConfig(loss_type=loss_type, label_smoothing=smoothing)
        )
        assert got.item() == pytest.approx(expected, rel=1e-5), loss_type
    margins = trainer._metrics["train"]["rewards/margins"][-1]
    chosen, rejected = (0.1 * (policy.sum(1) - ref)).chunk(2)
    assert (chosen - rejected).mean().item() == pytest.approx(margins, rel=1e-4, abs=1e-6)


@pytest.mark.integration
def test_dpo_job_grows_the_chosen_vs_rejected_margin(tiny_model_dir, tmp_path):
    """A Ray Train job (1 worker): the reward margin on its pairs grows from eval to eval.

    The margin starts at exactly 0 (a new LoRA adapter leaves the policy equal to its reference,
    the base); the pairs are evaluated as the held-out set so the growth is measured on a fixed
    set, 12 steps over 32 pairs.
    """
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_preference_rows(32)))
    cfg = load_config(
        "configs/dpo.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"checkpoint.storage_path={tmp_path}",
            "run.name=dpo",
            f"data.train_files=[{path}]",
            f"data.eval_files=[{path}]",
            "train.max_steps=12",
            "train.dpo.beta=0.5",
            "train.warmup_ratio=0",
            "eval.every_steps=4",
            "checkpoint.every_steps=null",
            "scaling.local=true",  # in this process: no worker to start
        ],
    )
    local_ray()
    summary = run_job(cfg)
    assert summary["objective"] == "dpo" and summary["method"] == "lora"
    margins = [e["eval_margin"] for e in summary["eval_history"]]
    assert [e["step"] for e in summary["eval_history"]] == [4, 8, 12]
    assert margins[-1] > margins[0] and margins[-1] > 0.3, margins
    final = summary["metrics"]
    assert final["eval_margin"] == pytest.approx(margins[-1])
    assert (
        final["eval_accuracy"] > 0.6 and final["eval_loss"] < 0.6931
    )  # below log 2: better than the base
    assert {"rewards_chosen", "rewards_rejected", "margin", "accuracy"} <= set(
        summary["loss_history"][-1]
    )
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
