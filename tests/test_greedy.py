"""One greedy generation: evaluation's answers (tune.evaluate, jobs.evaluation) and the hf engine's
temperature-0 answers are the same tokens for the same prompt and adapter; every caller decodes
through inference/generate.py, which stops at any EOS of the generation config, autocasts as the
runtime says and keeps ranks in lockstep."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import inference.engine as engine_module
import inference.generate as generation
from inference.engine import GenerationRequest, HFEngine, SamplingParams, read_adapter
from inference.generate import chat_prompt_ids, greedy_generate
from inference.runtime import Runtime
from jobs.config import load_config
from jobs.data.prepare import prepare_data
from jobs.data.render import prompt_and_answer
from jobs.demo_tools import generate_replies, held_out_rows
from jobs.evaluation import exact_match
from tests.helpers import REPO, train_lora
from tune.evaluate import Models

MAX_TOKENS = 12
CPU = Runtime(torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reviews(tiny_model_dir, tokenizer):
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"model.name_or_path={tiny_model_dir}"])
    return cfg, prepare_data(cfg.data, tokenizer, cfg.run.seed)


@pytest.fixture(scope="module")
def adapter(reviews, tokenizer, tmp_path_factory) -> Path:
    """A LoRA adapter trained for a few steps on the review task: it answers a label and ends
    its turn (and peft's zero-initialised B has moved: the adapter is not the base)."""
    cfg, data = reviews
    model = train_lora(cfg, data, tokenizer, steps=15, batch_size=8)
    out = tmp_path_factory.mktemp("greedy") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompts(reviews) -> list[list[dict]]:
    """Two held-out reviews of the adapter's task and two chats it was not trained for."""
    held_out = [prompt_and_answer(c)[0] for c in reviews[1].eval_conversations[:2]]
    chats = [
        [{"role": "user", "content": "How was the delivery?"}],
        [{"role": "user", "content": "hi"}],
    ]
    return [held_out[0], *chats, held_out[1]]


@pytest.fixture(scope="module")
def models(tiny_model_dir, adapter) -> Models:
    """What the gate evaluates with: the base and base + adapter (peft), on the CPU."""
    return Models.load(str(tiny_model_dir), adapter, batch_size=4)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer, adapter) -> HFEngine:
    """What serve/ answers with: the base, the adapter in a slot (per-row LoRA)."""
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    engine.load_adapter("a", read_adapter(adapter))
    return engine


def served(engine: HFEngine, prompts, adapter: str | None, max_tokens: int = MAX_TOKENS):
    """The engine's temperature-0 answers to the prompts, in one batch beside a sampled row and
    a base row that run to max_tokens (rows that end early ride along)."""
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)
    rows = [GenerationRequest(engine.encode_chat(p), adapter, greedy) for p in prompts]
    sampled = GenerationRequest(rows[0].prompt_ids, "a", SamplingParams(max_tokens, 1.5, seed=3))
    base = GenerationRequest(engine.encode_text("The quick brown fox"), None, greedy)
    results = engine.generate([*rows, sampled, base])
    assert results[-1].finish_reason == "length", "no row runs on: the batch shows nothing"
    return results[: len(prompts)]


def test_offline_and_served_greedy_answers_are_the_same_tokens(models, engine, tokenizer, prompts):
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    assert ids == [engine.encode_chat(p) for p in prompts]
    offline = greedy_generate(models.tuned, tokenizer, ids, MAX_TOKENS, batch_size=len(ids))
    online = served(engine, prompts, "a")
    assert [r.token_ids for r in offline] == [r.token_ids for r in online]
    assert [r.finish_reason for r in offline] == [r.finish_reason for r in online]
    assert {r.finish_reason for r in online} == {"stop"}  # the trained adapter ends its turn
    alone = [
        engine.generate([GenerationRequest(i, "a", SamplingParams(MAX_TOKENS, 0))])[0] for i in ids
    ]
    assert [r.token_ids for r in alone] == [r.token_ids for r in online]

    # The gate's replies (tune.evaluate), of the adapter and of the base
    replies = models.replies(prompts, MAX_TOKENS, adapter=True)
    assert replies == [r.text.strip() for r in online]
    base = models.replies(prompts, MAX_TOKENS, adapter=False)
    assert base == [r.text.strip() for r in served(engine, prompts, None)]
    assert all(r != b for r, b in zip(replies, base, strict=True)), (replies, base)


def test_the_jobs_exact_match_scores_the_served_answers_right(models, engine, tokenizer, prompts):
    online = [r.text for r in served(engine, prompts, "a")]
    convs = [
        [*p, {"role": "assistant", "content": r}] for p, r in zip(prompts, online, strict=True)
    ]
    assert exact_match(models.tuned, tokenizer, convs, MAX_TOKENS, 3, CPU) == 1.0
    with models.as_base():
        assert exact_match(models.tuned, tokenizer, convs, MAX_TOKENS, 3, CPU) == 0.0


@pytest.fixture
def decode_calls(monkeypatch) -> list[int]:
    """The batch size of every call of inference/generate.py's decoding loop, whoever calls."""
    real = generation.decode
    assert engine_module.decode is real, "the hf engine decodes with a loop of its own"
    calls: list[int] = []

    def spy(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "decode", spy)
    monkeypatch.setattr(engine_module, "decode", spy)
    return calls


def test_every_caller_decodes_through_inference_generate(
    decode_calls, models, engine, tokenizer, prompts
):
    convs = [[*p, {"role": "assistant", "content": "fine"}] for p in prompts]
    callers = {
        "jobs.evaluation.exact_match": lambda: exact_match(
            models.tuned, tokenizer, convs, 4, 3, CPU
        ),
        "tune.evaluate.Models.replies": lambda: models.replies(prompts, 4, adapter=True),
        "jobs.demo_tools.generate_replies": lambda: generate_replies(
            models.tuned, tokenizer, held_out_rows(3), max_new_tokens=4
        ),
        "inference.engine.HFEngine.generate": lambda: served(engine, prompts, "a", 4),
    }
    batches = {}
    for name, call in callers.items():
        decode_calls.clear()
        call()
        batches[name] = list(decode_calls)
    assert batches == {
        "jobs.evaluation.exact_match": [3, 1],
        "tune.evaluate.Models.replies": [4],
        "jobs.demo_tools.generate_replies": [3],
        "inference.engine.HFEngine.generate": [6],
    }


def test_any_eos_of_the_generation_config_ends_the_reply_offline_and_served(
    tiny_model_dir, tokenizer
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": "How was the delivery?"}])]
    full = greedy_generate(model, tokenizer, ids, MAX_TOKENS, batch_size=1)[0]
    assert full.finish_reason == "length"
    end_of_turn = full.token_ids[4]  # as if the model's config named a second end-of-turn token
    cut = full.token_ids.index(end_of_turn) + 1
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    offline = greedy_generate(model, tokenizer, ids, MAX_TOKENS, batch_size=1)[0]
    assert offline.token_ids == full.token_ids[:cut] and offline.finish_reason == "stop"
    assert offline.text == tokenizer.decode(full.token_ids[: cut - 1], skip_special_tokens=True)

    served_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    served_model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    online = HFEngine(served_model, tokenizer).generate(
        [GenerationRequest(ids[0], None, SamplingParams(MAX_TOKENS, 0))]
    )[0]
    assert (online.token_ids, online.text) == (offline.token_ids, offline.text)


def forward_passes(model) -> list[bool]:
    """Whether autocast was on, for every forward pass of the model from now on."""
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


def test_a_rank_whose_rows_are_done_keeps_joining_the_others_passes(
    tiny_model_dir, tokenizer, prompts, monkeypatch
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts[:2]]
    first = greedy_generate(model, tokenizer, ids, 1, batch_size=2)
    # This rank's rows end at their first token; the other rank's go on for 3 more steps.
    model.generation_config.eos_token_id = [r.token_ids[0] for r in first]
    others_busy = iter([1.0, 1.0, 1.0])
    monkeypatch.setattr(Runtime, "sum_over_ranks", lambda self, v: [v[0] + next(others_busy, 0.0)])
    passes = forward_passes(model)
    rt = Runtime(torch.device("cpu"), rank=0, world=2, collective_forward=True)
    replies = greedy_generate(model, tokenizer, ids, MAX_TOKENS, batch_size=2, rt=rt)
    assert [r.token_ids for r in replies] == [r.token_ids for r in first]
    assert len(passes) == 1 + 3  # the prompt's pass, then one per step the other rank makes

    passes.clear()
    greedy_generate(model, tokenizer, ids, MAX_TOKENS, batch_size=2)  # one rank: no waiting
    assert len(passes) == 1


def test_the_runtime_decides_autocast(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    passes = forward_passes(model)
    ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])]
    greedy_generate(model, tokenizer, ids, 2, batch_size=1, rt=CPU)
    bf16 = Runtime(torch.device("cpu"), precision="bf16")
    greedy_generate(model, tokenizer, ids, 2, batch_size=1, rt=bf16)
    assert passes == [False, False, True, True]


def test_only_the_last_positions_logits_are_made(models, tokenizer, prompts):
    """A prompt's pass makes [rows, 1, vocabulary] logits, not one row per prompt token (peft
    models included: the argument reaches the model underneath)."""
    shapes = []
    hook = models.tuned.register_forward_hook(lambda m, a, out: shapes.append(out.logits.shape))
    try:
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
        greedy_generate(models.tuned, tokenizer, ids, 2, batch_size=len(ids))
    finally:
        hook.remove()
    assert shapes[0] == (len(ids), 1, models.base.config.vocab_size)
