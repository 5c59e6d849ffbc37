"""Packed trials (jobs/packed_trials.py, tune/packed_trials.py): several LoRA configurations trained in one
process on one base model equal each configuration trained alone by the normal recipe (its
setup, StepBatches and SFT train_step on a peft model); a freed slot's successor trains like
it would alone; a packed ASHA sweep runs end to end and leaves a promotable run directory.

Each was seen to fail with the code it covers broken: one joint token mean instead of each
slot's own (adapter weights differ), one learning rate for all slots, clipping over all slots'
gradients at once, slots not seeded as the job seeds add_lora, slots left frozen after peft
adds another adapter, and the run.seed split (found by benchmarks/packed_bench.py)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict

from core.config import ConfigError
from inference.model import load_base_model, load_tokenizer
from inference.runtime import Runtime
from jobs.config import load_config
from jobs.data import load_for_job
from jobs.finetune import StepBatches, plan_steps, setup
from jobs.objectives import make_objective
from jobs.packed_trials import PackedTrainer, check_packable
from tests.helpers import REPO

CPU = Runtime(torch.device("cpu"))
STEPS, EVERY = 4, 2
# r, alpha, lr, weight decay, rslora, target modules, clipping: three slots unlike in packable ways
CONFIGS = [
    ["lora.r=4", "lora.alpha=16", "train.lr=3e-3"],
    ["lora.r=8", "lora.alpha=8", "train.lr=1e-3", "train.weight_decay=0.1"],
    [
        "lora.r=2",
        "lora.alpha=32",
        "train.lr=2e-3",
        "lora.use_rslora=true",
        "lora.target_modules=[q_proj,v_proj]",
        "train.max_grad_norm=0.01",  # clips every step: per-slot clipping matters
    ],
]


def job_config(tiny_model_dir: Path, *extra: str):
    return load_config(
        REPO / "configs/quickstart.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"data.train_files=[{REPO / 'data/reviews.jsonl'}]",
            "lora.dropout=0",
            f"train.max_steps={STEPS}",
            "train.micro_batch_size=4",
            "train.effective_batch_size=8",  # two micro-batches: accumulation is exercised
            "train.warmup_ratio=0.3",
            f"eval.every_steps={EVERY}",
            "eval.batch_size=16",
            "scaling.cpus_per_worker=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def prepared(tiny_model_dir):
    cfg = job_config(tiny_model_dir)
    with tempfile.TemporaryDirectory() as scratch:
        data = load_for_job(cfg, load_tokenizer(cfg.model), scratch)
        yield {"train": data.train, "eval": data.eval[:24], "eval_conversations": []}


def alone(cfg, data) -> dict:
    """The normal recipe's losses, evals and final adapter for one config."""
    plan = plan_steps(len(data["train"]), cfg)
    tokenizer, par = setup(cfg, CPU, plan)
    obj = make_objective(cfg, CPU, tokenizer, data)
    batches = StepBatches(cfg, CPU, obj, plan)
    losses, evals = [], []
    for step in range(STEPS):
        losses.append(obj.train_step(par, batches.micro_batches(step)).loss)
        if (step + 1) % EVERY == 0:
            evals.append(obj.evaluate(par, full=False)["eval_loss"])
    return {"losses": losses, "evals": evals, "adapter": get_peft_model_state_dict(par.module)}


def packed_trainer(cfg, data) -> PackedTrainer:
    tokenizer = load_tokenizer(cfg.model)
    return PackedTrainer(cfg, CPU, tokenizer, load_base_model(cfg.model, CPU.device), data)


def train_packed(trainer: PackedTrainer, names: list[str], steps: int) -> dict[str, dict]:
    out = {n: {"losses": [], "evals": []} for n in names}
    for _ in range(steps):
        for name, result in trainer.train_step(names).items():
            out[name]["losses"].append(result.loss)
        if trainer.slots[names[0]].state.step % EVERY == 0:
            for name, loss in trainer.eval_losses(names).items():
                out[name]["evals"].append(loss)
    for name in names:
        state = get_peft_model_state_dict(trainer.model, adapter_name=name)
        out[name]["adapter"] = state
    return out


def assert_same_run(packed: dict, reference: dict, label: str) -> None:
    torch.testing.assert_close(packed["losses"], reference["losses"], rtol=1e-4, atol=0)
    torch.testing.assert_close(packed["evals"], reference["evals"], rtol=1e-4, atol=0)
    assert packed["adapter"].keys() == reference["adapter"].keys(), label
    for key, weight in reference["adapter"].items():
        torch.testing.assert_close(packed["adapter"][key], weight, rtol=1e-4, atol=1e-6, msg=key)


def test_three_packed_slots_train_like_each_config_alone(tiny_model_dir, prepared):
    cfgs = [job_config(tiny_model_dir, *extra) for extra in CONFIGS]
    trainer = packed_trainer(cfgs[0], prepared)
    names = ["one", "two", "three"]
    for name, cfg in zip(names, cfgs, strict=True):
        trainer.add(name, cfg)
    packed = train_packed(trainer, names, STEPS)
    assert len({json.dumps(p["losses"]) for p in packed.values()}) == 3  # the slots differ
    for name, cfg in zip(names, cfgs, strict=True):
        assert_same_run(packed[name], alone(cfg, prepared), name)


def test_a_freed_slot_is_taken_by_a_new_config_that_trains_like_it_would_alone(
    tiny_model_dir, prepared
):
    first, second, late = (job_config(tiny_model_dir, *extra) for extra in CONFIGS)
    trainer = packed_trainer(first, prepared)
    trainer.add("first", first)
    trainer.add("second", second)
    train_packed(trainer, ["first", "second"], 1)
    trainer.remove("first")  # ASHA stopped it: its rows leave the batch
    assert "first" not in trainer.model.peft_config
    trainer.add("late", late)
    # "late" starts at step 0 while "second" is one step in; eval each on its own schedule
    out = {"second": {"losses": []}, "late": {"losses": [], "evals": []}}
    for _ in range(STEPS):
        names = [n for n in ("second", "late") if not trainer.done(n)]
        for name, result in trainer.train_step(names).items():
            out[name]["losses"].append(result.loss)
        if trainer.slots["late"].state.step % EVERY == 0:
            out["late"]["evals"].append(trainer.eval_losses(["late"])["late"])
    out["late"]["adapter"] = get_peft_model_state_dict(trainer.model, adapter_name="late")
    assert_same_run(out["late"], alone(late, prepared), "late")
    torch.testing.assert_close(
        out["second"]["losses"], alone(second, prepared)["losses"][1:], rtol=1e-4, atol=0
    )
    # every slot freed (the host idle between trials), then a new one: it trains
    trainer.remove("second")
    trainer.remove("late")
    trainer.add("again", late)
    assert trainer.train_step(["again"])["again"].loss == pytest.approx(out["late"]["losses"][0])


def test_final_metrics_and_saved_adapter_match_the_normal_job(tiny_model_dir, prepared, tmp_path):
    from peft import PeftModel

    cfg = job_config(tiny_model_dir)
    trainer = packed_trainer(cfg, prepared)
    trainer.add("only", cfg)
    train_packed(trainer, ["only"], 1)
    final = trainer.final_metrics("only")
    assert {"eval_loss", "eval_ppl", "base_eval_loss", "step"} <= final.keys()
    trainer.save_adapter("only", tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        load_base_model(cfg.model, CPU.device), tmp_path / "adapter"
    )
    saved = get_peft_model_state_dict(reloaded)
    for key, weight in get_peft_model_state_dict(trainer.model, adapter_name="only").items():
        torch.testing.assert_close(saved[key], weight)


def test_unpackable_sweeps_are_refused_with_the_key_named(tiny_model_dir):
    cfg = job_config(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"space\.train\.micro_batch_size"):
        check_packable(cfg, ["train.lr", "train.micro_batch_size"])
    with pytest.raises(ConfigError, match=r"space\.run\.seed"):  # it seeds the data's split
        check_packable(cfg, ["run.seed"])
    with pytest.raises(ConfigError, match=r"space\.model\.name_or_path"):
        check_packable(cfg, ["model.name_or_path"])
    with pytest.raises(ConfigError, match=r"lora\.dropout"):
        check_packable(job_config(tiny_model_dir, "lora.dropout=0.1"), [])
    with pytest.raises(ConfigError, match=r"scaling\.num_workers"):
        check_packable(job_config(tiny_model_dir, "scaling.num_workers=2"), [])
    check_packable(cfg, ["lora.r", "lora.alpha", "train.lr"])


# ---------------------------------------------------------------- a packed sweep through Tune


@pytest.mark.integration
@pytest.mark.slow
def test_packed_asha_sweep_shares_one_host_and_leaves_a_promotable_run(tmp_path, tiny_model_dir):
    import ray

    from tests.helpers import local_ray, ray_is_idle
    from tests.test_sweep import first_reviews, sweep_yaml
    from tune.sweep import load_sweep_config, promote_best, run_sweep

    rows = first_reviews(tmp_path, 240)
    job = [
        f"data.train_files=[{rows}]",
        "lora.dropout=0",
        "train.max_steps=12",
        "eval.every_steps=3",
        "eval.max_generate_samples=8",
    ]
    # in this order: the first two pass the first rung (the first unopposed), the last two,
    # barely learning, are below the cutoff the first two leave there: ASHA stops them
    config = sweep_yaml(
        tmp_path,
        tiny_model_dir,
        job,
        pack_trials=2,
        max_concurrent_trials=2,
        search="grid",
        num_trials=1,
        space={"train.lr": {"grid": [3e-3, 1e-5, 2e-5, 5e-6]}},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 4, "shuffle_grid": False},
    )
    cfg = load_sweep_config(config)
    local_ray()
    summary = run_sweep(cfg, resume=False)
    outcome = promote_best(cfg, summary)
    # the pack host is gone with the sweep: its CPUs are free for what runs next on this Ray
    assert ray_is_idle(timeout=60), ray.available_resources()

    trials = summary["trials"]
    assert len(trials) == 4 and not any(t["error"] for t in trials), trials
    assert sum(t["stopped_early"] for t in trials) >= 1  # ASHA stopped one at an eval
    finished = [t for t in trials if t["exact_match"] is not None]
    assert finished and all(t["steps"] == 12 for t in finished)
    runs = [json.loads((Path(t["run_dir"]) / "run.json").read_text()) for t in finished]
    assert len({r["packed"]["host"] for r in runs}) == 1  # one host, one base model
    assert max(r["packed"]["peak_slots_used"] for r in runs) == 2  # two trained at once
    assert all(len(r["loss_history"]) == 12 and r["status"] == "completed" for r in runs)
    # promotion evaluated the best finished trial's run directory (gate passed or not)
    assert outcome["trial"] == finished[0]["trial"] and "gate" in outcome, outcome
    assert (Path(finished[0]["run_dir"]) / "eval.json").is_file()


def test_a_packed_sweep_of_an_unpackable_key_fails_before_any_trial(tmp_path, tiny_model_dir):
    from tests.test_sweep import sweep_yaml
    from tune.packed_trials import packed_trainable
    from tune.sweep import load_sweep_config

    config = sweep_yaml(tmp_path, tiny_model_dir, ["lora.dropout=0"], pack_trials=2)
    cfg = load_sweep_config(config)
    cfg.space["train.micro_batch_size"] = {"choice": [2, 4]}
    with pytest.raises(ConfigError, match=r"space\.train\.micro_batch_size"):
        packed_trainable(cfg, load_config(cfg.job, cfg.overrides), {})
