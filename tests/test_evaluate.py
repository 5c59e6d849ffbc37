"""tune.evaluate, the gate, servability and promotion: a trained adapter passes, a random one
is rejected, each servability problem is named, and promotion records what it did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inference.model import load_tokenizer
from jobs.config import JudgeConfig, load_config
from jobs.data.prepare import prepare_data
from tests.helpers import REPO, openai_chat_stub, train_lora
from tests.test_registry import make_adapter
from tune.evaluate import (
    EvalSuiteConfig,
    evaluate_target,
    gate,
    load_eval_config,
    macro_f1,
    predicted_label,
    with_few_shot,
)
from tune.registry import Registry, RegistryError
from tune.registry.promote import promote_run
from tune.servability import ServingLimits, servability_problems


def write_run(run_dir: Path, adapter_model, tokenizer, cfg, dataset_hash: str) -> Path:
    """A run directory as jobs.finetune leaves it: adapter/ (+ tokenizer) and run.json."""
    adapter_model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    run = {
        "run_name": run_dir.name,
        "base_model": cfg.model.name_or_path,
        "seed": cfg.run.seed,
        "dataset_hash": dataset_hash,
        "config": cfg.model_dump(),
        "metrics": {},
    }
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A good run (LoRA trained on the review task) and a bad one (random LoRA weights)."""
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"model.name_or_path={tiny_model_dir}"])
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.run.seed)
    model = train_lora(cfg, data, tokenizer, steps=160, batch_size=16)
    root = tmp_path_factory.mktemp("runs")
    good = write_run(root / "good", model, tokenizer, cfg, data.dataset_hash)
    bad_dir = root / "bad"
    make_adapter(tiny_model_dir, bad_dir / "adapter", seed=3, r=8)
    tokenizer.save_pretrained(bad_dir / "adapter")
    shutil.copy(good / "run.json", bad_dir / "run.json")
    return good, bad_dir


@pytest.fixture(scope="module")
def eval_cfg() -> EvalSuiteConfig:
    cfg = load_eval_config(REPO / "configs/eval_reviews.yaml")
    task = cfg.tasks[0].model_copy(update={"max_samples": 24})
    return cfg.model_copy(update={"tasks": [task]})


@pytest.fixture(scope="module")
def evaluated(runs, eval_cfg):
    good, bad = runs
    return evaluate_target(good, eval_cfg)[0], evaluate_target(bad, eval_cfg)[0]


@pytest.mark.integration  # `runs` trains an adapter for 160 steps
def test_a_trained_adapter_passes_the_gate_with_all_numbers_stored(evaluated, runs):
    good, _ = evaluated
    scores = good["tasks"]["sentiment"]
    assert set(scores) == {"rows", "base", "base_few_shot", "adapter"}
    assert scores["adapter"]["exact_match"] > 0.6 > scores["base"]["exact_match"]
    assert scores["adapter"]["loss"] < scores["base"]["loss"] / 3
    assert (
        0 <= scores["adapter"]["f1"] <= 1
        and scores["adapter"]["accuracy"] >= scores["adapter"]["exact_match"]
    )
    assert good["gate"]["passed"], good["gate"]["reasons"]
    assert good["gate"]["best_baseline"] in ("base", "base_few_shot")
    assert json.loads((runs[0] / "eval.json").read_text())["gate"] == good["gate"]


@pytest.mark.integration  # `runs` trains an adapter for 160 steps
def test_an_adapter_that_does_not_beat_the_baseline_is_rejected(evaluated):
    _, bad = evaluated
    g = bad["gate"]
    assert not g["passed"]
    assert any("improvement" in r and "< margin 0.2" in r for r in g["reasons"])


def test_the_guard_catches_forgetting():
    results = {
        "tasks": {"t": {"base": {"exact_match": 0.1}, "adapter": {"exact_match": 0.9}}},
        "guard": {"base_loss": 2.0, "adapter_loss": 2.5},
    }
    from tune.evaluate import GateConfig

    decision = gate(GateConfig(metric="t.exact_match", margin=0.1, guard_tolerance=0.1), results)
    assert not decision["passed"] and "forgetting" in decision["reasons"][0]
    ok = gate(GateConfig(metric="t.exact_match", margin=0.1, guard_tolerance=0.3), results)
    assert ok["passed"]
    lower = {
        "tasks": {
            "t": {"base": {"loss": 2.0}, "base_few_shot": {"loss": 1.5}, "adapter": {"loss": 1.2}}
        }
    }
    d = gate(GateConfig(metric="t.loss", margin=0.2), lower)
    assert d["passed"] and d["best_baseline"] == "base_few_shot"
    assert not gate(GateConfig(metric="t.loss", margin=0.5), lower)["passed"]


def test_metric_helpers():
    assert (
        predicted_label("It is Negative, maybe mixed", ["positive", "negative", "mixed"])
        == "negative"
    )
    assert predicted_label("no idea", ["positive"]) is None
    assert macro_f1(["a", "a", "b"], ["a", "b", "b"], ["a", "b"]) == pytest.approx(
        (2 / 3 + 2 / 3) / 2
    )
    shots = [[{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]]
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert with_few_shot(prompt, shots) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q"},
    ]


@pytest.mark.integration  # `runs` trains an adapter for 160 steps
def test_promotion_needs_a_passed_gate_or_force(evaluated, runs, tmp_path):
    good, bad = runs
    reg = Registry(str(tmp_path / "registry"))
    version = promote_run(reg, good, "reviews")
    lineage = reg.lineage("reviews@production")
    assert lineage["version"] == version and lineage["gate"]["passed"]
    assert lineage["dataset_hash"].startswith("sha256:") and lineage["evaluation"]["tasks"]
    # promoting it again changes nothing: the alias already points at it, no move is recorded
    assert promote_run(reg, good, "reviews") == version
    assert [e["reason"] for e in reg.alias_history("reviews", "production")] == ["promote"]
    assert lineage["base_model_fingerprint"].startswith("sha256:")
    with pytest.raises(RegistryError, match="the gate failed: sentiment.exact_match"):
        promote_run(reg, bad, "reviews")
    forced = promote_run(reg, bad, "reviews", alias="staging", force=True)
    assert reg.lineage(f"reviews@{forced}")["gate"]["forced"] is True
    assert reg.aliases("reviews") == {"production": version, "staging": forced}
    fresh = tmp_path / "fresh"
    shutil.copytree(good, fresh)
    (fresh / "eval.json").unlink()
    with pytest.raises(RegistryError, match="no gate result"):
        promote_run(reg, fresh, "reviews")


def test_servability_names_each_problem(tiny_model_dir, tmp_path, tokenizer):
    def problems(out, **kw):
        return servability_problems(out, tiny_model_dir, ServingLimits(max_lora_rank=16))

    ok = make_adapter(tiny_model_dir, tmp_path / "ok", seed=1, r=8)
    tokenizer.save_pretrained(ok)
    assert problems(ok) == []
    big = make_adapter(tiny_model_dir, tmp_path / "big", seed=1, r=32)
    assert problems(big) == ["LoRA rank 32 is above the server's max_lora_rank 16"]
    saved = make_adapter(tiny_model_dir, tmp_path / "saved", seed=1, modules_to_save=["lm_head"])
    found = problems(saved)
    assert any("modules_to_save ['lm_head']" in p for p in found)
    assert any("embedding/output weights" in p for p in found)
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", seed=1, use_dora=True)
    tokenizer.save_pretrained(dora)
    assert problems(dora) == ["DoRA adapters (use_dora) are not supported by the server"]
    odd = tmp_path / "odd"
    shutil.copytree(ok, odd)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "conv1d"]
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    assert any("['conv1d'] are not supported" in p for p in problems(odd))
    # a tokenizer saved after use records its padding settings: not a difference
    used = tmp_path / "used"
    shutil.copytree(ok, used)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    tokenizer(["a", "bb cc"], padding=True)
    tokenizer.save_pretrained(used)
    tokenizer.padding_side = side
    assert problems(used) == []
    vocab = tmp_path / "vocab"
    shutil.copytree(ok, vocab)
    spec = json.loads((vocab / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": 9999, "content": "<|new|>"})
    (vocab / "tokenizer.json").write_text(json.dumps(spec))
    assert any("tokenizer.json differs" in p for p in problems(vocab))
    template = tmp_path / "template"
    shutil.copytree(ok, template)
    (template / "chat_template.jinja").write_text("{{ messages }}")
    assert any("chat_template differs" in p for p in problems(template))


@pytest.mark.integration  # `runs` trains an adapter for 160 steps
def test_promotion_refuses_an_unservable_adapter(runs, tmp_path):
    good, _ = runs
    run = tmp_path / "run"
    shutil.copytree(good, run)
    (run / "adapter" / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(RegistryError, match="not servable: the adapter's chat_template differs"):
        promote_run(Registry(str(tmp_path / "reg")), run, "reviews", force=True)


def grade_by_reference(body: dict, headers: dict, path: str) -> str:
    """The stub grader: 10 when the reply equals the reference, else 1."""
    reply, _, reference = body["messages"][-1]["content"].rpartition("\n\nREFERENCE: ")
    reply = reply.rsplit("ASSISTANT:\n", 1)[-1].strip()
    return "10" if reply == reference.strip() else "1"


@pytest.mark.integration  # a judge server on 127.0.0.1, and `runs`
def test_llm_judge_metric_through_a_local_endpoint(runs, eval_cfg):
    with openai_chat_stub(grade_by_reference) as url:
        judge = {"base_url": url, "model": "g", "api_key_env": None}
        task = eval_cfg.tasks[0].model_copy(
            update={
                "metrics": ["exact_match", "judge"],
                "few_shot": 0,
                "judge": JudgeConfig(**judge),
                "max_samples": 16,
            }
        )
        cfg = eval_cfg.model_copy(update={"tasks": [task], "gate": None, "guard": None})
        results, _ = evaluate_target(runs[0], cfg)
    scores = results["tasks"]["sentiment"]
    # the grader agrees with exact match: (grade - 1) / 9 is 1 for a match and 0 otherwise
    for who in ("base", "adapter"):
        assert scores[who]["judge"] == pytest.approx(scores[who]["exact_match"])
    assert scores["adapter"]["judge"] > scores["base"]["judge"]


def test_answer_metrics_contains_and_regex():
    from tune.evaluate import TaskConfig, answer_metrics

    task = TaskConfig(name="t", metrics=["contains", "regex", "exact_match"], regex=r"^\d+$")
    out = answer_metrics(task, [[]] * 3, ["42", "it is 7", "x"], ["42", "7", "y"])
    assert out == {
        "exact_match": pytest.approx(1 / 3),
        "contains": pytest.approx(2 / 3),
        "regex": pytest.approx(1 / 3),
    }
