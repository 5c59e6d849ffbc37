"""Reinforcement fine-tuning (train.method: grpo): prompt rows, TRL's advantages and loss, the
rollout actors, and the job (rewards, resume, a killed rollout actor)."""

from __future__ import annotations

import json

import pytest
import torch

# Imported while the module is collected, not inside a test: loading TRL's GRPO trainer loads
# DeepSpeed, whose cpuinfo runs `file -b python` (a process), which a unit test may not start.
import trl.trainer.grpo_trainer  # noqa: F401

from core.config import ConfigError
from jobs.config import DataConfig, GrpoConfig, load_config
from jobs.data.prompts import prepare_prompts, to_prompt
from jobs.data.sources import RowError
from jobs.demo_data import SYSTEM, make_prompt_rows
from jobs.objectives.grpo import group_advantages, trl_grpo_loss
from jobs.rollout import completion_logps, pad_rollouts, sample_seed, split_evenly

USER = {"role": "user", "content": "Is the sky blue?"}
GRADER = {
    "type": "string_check",
    "name": "label",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}


# ------------------------------------------------------------------------ data


def test_prompt_formats_parse_to_the_same_prompt_and_keep_the_other_fields_as_the_item():
    rows = [
        {"prompt": "Is the sky blue?", "answer": "yes"},
        {"prompt": [USER], "answer": "yes"},
        {"messages": [USER], "answer": "yes"},
        {"conversations": [{"from": "human", "value": "Is the sky blue?"}], "answer": "yes"},
    ]
    for row in rows:
        assert to_prompt(row) == ([USER], {"answer": "yes"})
    messages, _ = to_prompt(rows[0], system_prompt=SYSTEM)
    assert messages == [{"role": "system", "content": SYSTEM}, USER]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"answer": "yes"}, "missing field 'prompt' or 'messages'"),
        ({"messages": [USER, {"role": "assistant", "content": "yes"}]}, "ends with an assistant"),
        ({"prompt": ""}, "empty content"),
        ({"prompt": 3}, "non-empty string or list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "role"),
    ],
)
def test_malformed_prompt_rows_say_why(row, reason):
    with pytest.raises(RowError, match=reason):
        to_prompt(row)


def test_a_malformed_prompt_row_names_its_file_and_line(tmp_path, tokenizer):
    rows = [json.dumps(r) for r in make_prompt_rows(20)]
    rows[4] = json.dumps({"answer": "positive"})
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(train_files=[str(path)], eval_fraction=0.3, on_error="fail")
    with pytest.raises(ConfigError, match=rf"{path}:5: missing field 'prompt'"):
        prepare_prompts(cfg, tokenizer, seed=0, completion_len=4)
    data = prepare_prompts(cfg.model_copy(update={"on_error": "skip"}), tokenizer, 0, 4)
    assert (
        data.report["counts"]["malformed"] == 1 and data.report["errors"][0]["where"] == f"{path}:5"
    )
    assert len(data.train) + len(data.eval) == 19 and data.eval
    ex = data.train[0]
    rendered = tokenizer.apply_chat_template(
        ex["messages"], tokenize=False, add_generation_prompt=True
    )
    assert ex["prompt_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ex["item"]["answer"] in ("positive", "negative", "mixed")
    assert [e["index"] for e in data.train] == list(range(len(data.train)))


def test_grpo_config_errors_name_the_field():
    base = ["train.method=grpo", "train.grpo.grader.type=string_check"]
    with pytest.raises(ConfigError, match="train.grpo"):
        load_config("configs/grpo.yaml", ["train.grpo=null"])
    with pytest.raises(ConfigError, match="train.grpo.grader"):
        load_config("configs/grpo.yaml", [*base, "train.grpo.grader.operation=similar"])
    with pytest.raises(ConfigError, match="train.grpo.num_generations"):
        load_config("configs/grpo.yaml", ["train.grpo.num_generations=1"])
    with pytest.raises(ConfigError, match="rollout.async_steps: 1 runs with scaling.num_workers"):
        load_config(
            "configs/grpo.yaml",
            ["rollout.async_steps=1", "scaling.num_workers=2", "train.micro_batch_size=8"],
        )
    with pytest.raises(ConfigError, match="lora section"):
        load_config("configs/grpo.yaml", ["lora=null"])
    with pytest.raises(ConfigError, match="train.grpo is read by train.method: grpo only"):
        load_config("configs/quickstart.yaml", [f"train.grpo={json.dumps({'grader': GRADER})}"])


def test_seeds_and_chunks_do_not_depend_on_the_actor_count():
    assert sample_seed(42, 3, 7, 0) == sample_seed(42, 3, 7, 0) != sample_seed(42, 3, 7, 1)
    assert 0 <= sample_seed(1, 2, 3) < 2**63
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 3) == [[1], [], []]


# ------------------------------------------------------------------------ TRL equality


def trl_trainer(tiny_model_dir, tokenizer, tmp_path, prompts, completions, rewards, **kw):
    """A real GRPOTrainer whose rollouts are the given completions (TRL's rollout_func) and whose
    reward function returns the given rewards, in order."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    n = kw["num_generations"]
    by_completion = dict(zip(map(tuple, completions), rewards, strict=True))

    def rollout(batch_prompts, trainer):
        assert len(batch_prompts) == len(completions)
        return {
            "prompt_ids": [p for p in prompts for _ in range(n)],
            "completion_ids": completions,
            "logprobs": None,
        }

    def reward(completions, completion_ids, **_):
        return [by_completion[tuple(ids)] for ids in completion_ids]

    torch.manual_seed(0)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=len(completions),
        max_completion_length=max(map(len, completions)) + 2,
        **kw,
    )
    texts = [{"prompt": tokenizer.decode(p)} for p in prompts]
    return GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(texts * n),
        processing_class=tokenizer,
        rollout_func=rollout,
    )


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_advantages_and_loss_equal_trl_grpo_trainer(tiny_model_dir, tokenizer, tmp_path, loss_type):
    """TRL's GRPOTrainer on the same prompts, completions and rewards: our advantages (group
    normalized), log-probs (at the sampling temperature) and loss (TRL's code on a stand-in
    trainer) equal the trainer's own, with the KL term and a stale batch's importance ratio."""
    import os

    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    eos = tokenizer.eos_token_id
    prompts = [
        tokenizer("Review: the battery was great")["input_ids"],
        tokenizer("Review: awful")["input_ids"],
    ]
    completions = [
        [11, 12, eos],
        [13, eos],
        [14, 15, 16, eos],
        [17, eos],
        [11, eos],
        [12, 13, eos],
        [14, eos],
        [15, 16, eos],
    ]
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.25]
    kw = {
        "num_generations": 4,
        "loss_type": loss_type,
        "beta": 0.04,
        "temperature": 0.7,
        "epsilon": 0.2,
    }
    kw |= {"epsilon_high": 0.28, "scale_rewards": "group"}
    trainer = trl_trainer(tiny_model_dir, tokenizer, tmp_path, prompts, completions, rewards, **kw)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.training_step
    inputs = trainer._generate_and_score_completions([{"prompt": "x"}] * len(completions))

    ours, _ = group_advantages(torch.tensor(rewards), 4, "group")
    assert torch.allclose(ours, inputs["advantages"], rtol=1e-5, atol=1e-6)
    batch = pad_rollouts(
        [p for p in prompts for _ in range(4)], completions, tokenizer.pad_token_id
    )
    for key in ("completion_ids", "completion_mask"):
        assert torch.equal(batch[key][:, : inputs[key].shape[1]], inputs[key]), key
    grpo = GrpoConfig(grader=GRADER, **kw, max_completion_length=trainer.max_completion_length)

    # a stale batch (async_steps): the producing version's log-probs, here perturbed
    with torch.no_grad():
        logps, _ = completion_logps(trainer.model, batch, 0.7)
    # per token, so that ratios differ and some are clipped: the loss is then far from 0
    width = inputs["completion_ids"].shape[1]
    noise = torch.rand(logps[:, :width].shape, generator=torch.Generator().manual_seed(0))
    inputs["old_per_token_logps"] = logps[:, :width] + (noise - 0.5) * 0.8
    inputs["ref_per_token_logps"] = logps[:, :width] + noise * 0.3
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, inputs).item()
    ours_in = {k: v[:, :width] if k.startswith("completion") else v for k, v in batch.items()}
    ours_in |= {
        k: inputs[k]
        for k in ("advantages", "old_per_token_logps", "ref_per_token_logps", "num_items_in_batch")
    }
    logps, entropies = completion_logps(trainer.model, ours_in, 0.7)
    got, metrics = trl_grpo_loss(logps, entropies, ours_in, grpo)
    assert abs(expected) > 1e-3  # a loss away from 0, or a relative tolerance would prove little
    # float32, and TRL's log-probs come from its own forward pass (another batch shape, another
    # reduction order): measured differences reach 1.1e-5 relative on some CPUs
    assert got.item() == pytest.approx(expected, rel=1e-4), loss_type
    assert metrics["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-4)
    assert got.requires_grad  # the gradient flows through our log-probs


def test_scale_rewards_batch_and_none_follow_trl():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv, zero = group_advantages(rewards, 3, "none")
    assert torch.allclose(adv, torch.tensor([1 / 3, -2 / 3, 1 / 3, 2 / 3, -1 / 3, -1 / 3]))
    adv, _ = group_advantages(rewards, 3, "batch")
    centred = torch.tensor([1 / 3, -2 / 3, 1 / 3, 2 / 3, -1 / 3, -1 / 3])
    assert torch.allclose(adv, centred / (rewards.std() + 1e-4))  # the batch's (unbiased) std
    same = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv, zero = group_advantages(same, 3, "group")
    assert adv[:3].tolist() == [0.0, 0.0, 0.0] and zero.tolist() == [True] * 3 + [False] * 3


def test_lora_init_from_loads_a_trained_adapter_and_refuses_one_that_does_not_fit(
    tiny_model_dir, tmp_path
):
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from jobs.config import LoraConfig
    from jobs.model import add_lora

    trained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        PeftLora(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    trained.save_pretrained(tmp_path / "warm")
    model = add_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, init_from=str(tmp_path / "warm")),
    )
    want = {k: v for k, v in trained.state_dict().items() if "lora_B" in k}
    got = model.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())
    with pytest.raises(ConfigError, match="lora.init_from"):
        add_lora(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=8, init_from=str(tmp_path / "warm")),
        )
