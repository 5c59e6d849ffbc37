"""HFEngine: mixed-adapter batches match one-by-one runs and offline peft; sampling, stops, streaming,
and adapters for another base or above the rank limit are refused."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from inference.engine import (
    GenerationRequest,
    HFEngine,
    SamplingParams,
    _top_p_filter,
    read_adapter,
)
from jobs.tiny_model import main as build_tiny_model
from serve.errors import AdapterIncompatible
from serve.testing import make_random_adapter

GREEDY = SamplingParams(max_tokens=16, temperature=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_random_adapter(tiny_model_dir, root / "a", seed=1),
        "b": make_random_adapter(tiny_model_dir, root / "b", seed=2, target_modules=("v_proj",)),
    }


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer, adapters):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = HFEngine(model, tokenizer, max_lora_rank=16, base_names=[str(tiny_model_dir)])
    for key, path in adapters.items():
        engine.load_adapter(key, read_adapter(path))
    return engine


@pytest.fixture(scope="module")
def prompts(engine):
    return [
        engine.encode_chat([{"role": "user", "content": "How was the delivery?"}]),
        engine.encode_text("The quick brown fox jumps"),
        engine.encode_chat([{"role": "user", "content": "hi"}]),
    ]


def offline_greedy(model, prompt_ids, max_new_tokens):
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, len(prompt_ids) :].tolist()


def test_each_adapter_matches_offline_peft_and_they_differ(
    engine, adapters, prompts, tiny_model_dir, tokenizer
):
    texts = {}
    for key, path in adapters.items():
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), path
        ).eval()
        want = tokenizer.decode(offline_greedy(reference, prompts[0], 16), skip_special_tokens=True)
        got = engine.generate([GenerationRequest(prompts[0], key, GREEDY)])[0]
        assert got.text == want
        texts[key] = got.text
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_want = tokenizer.decode(
        offline_greedy(base_model, prompts[0], 16), skip_special_tokens=True
    )
    texts["base"] = engine.generate([GenerationRequest(prompts[0], None, GREEDY)])[0].text
    assert texts["base"] == base_want
    assert len(set(texts.values())) == 3, texts


def test_mixed_batch_equals_one_by_one(engine, prompts):
    requests = [
        GenerationRequest(prompt, adapter, SamplingParams(max_tokens=n, temperature=0))
        for prompt in prompts
        for adapter, n in (("a", 12), (None, 5), ("b", 16))
    ]
    batched = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in batched] == [
        (r.text, r.completion_tokens, r.finish_reason) for r in alone
    ]
    assert [r.completion_tokens for r in batched[:3]] == [12, 5, 16]
    assert [r.prompt_tokens for r in batched] == [len(p) for p in prompts for _ in range(3)]


def test_seeded_sampling_does_not_depend_on_the_batch(engine, prompts):
    sampled = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    alone = engine.generate([GenerationRequest(prompts[0], "a", sampled)])[0].text
    in_batch = engine.generate(
        [
            GenerationRequest(prompts[1], "b", SamplingParams(max_tokens=16, temperature=1.5)),
            GenerationRequest(prompts[0], "a", sampled),
            GenerationRequest(prompts[2], None, GREEDY),
        ]
    )[1].text
    assert in_batch == alone
    others = {
        engine.generate([GenerationRequest(prompts[0], "a", SamplingParams(16, 1.5, 0.95, s))])[
            0
        ].text
        for s in range(1, 6)
    }
    assert len(others) > 1  # the seed matters: sampling is not silently greedy


def test_max_tokens_stop_strings_and_stop_tokens(engine, prompts, tokenizer):
    full = engine.generate([GenerationRequest(prompts[1], "a", GREEDY)])[0]
    assert full.finish_reason == "length" and full.completion_tokens == 16
    stop = full.text[5:8]
    cut = engine.generate(
        [GenerationRequest(prompts[1], "a", SamplingParams(16, 0, stop=("zzzz", stop)))]
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]

    stop_token = full.token_ids[3]
    first = full.token_ids.index(stop_token)
    saved = set(engine.stop_ids)
    engine.stop_ids = saved | {stop_token}  # as if the model ended its turn there
    try:
        stopped = engine.generate([GenerationRequest(prompts[1], "a", GREEDY)])[0]
    finally:
        engine.stop_ids = saved
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens == first + 1
    assert stopped.text == tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)


def test_streamed_pieces_add_up_to_the_text_and_never_leak_a_stop_string(engine, prompts):
    pieces: list[str] = []
    full = engine.generate([GenerationRequest(prompts[0], "b", GREEDY, pieces.append)])[0].text
    assert "".join(pieces) == full and len(pieces) > 3

    stop = full[len(full) // 2 : len(full) // 2 + 3]
    pieces.clear()
    result = engine.generate(
        [GenerationRequest(prompts[0], "b", SamplingParams(16, 0, stop=(stop,)), pieces.append)]
    )[0]
    assert "".join(pieces) == result.text == full[: full.find(stop)]


def test_a_cancelled_row_stops_and_the_others_run_on(engine, prompts):
    others = [
        GenerationRequest(prompts[1], "a", GREEDY),
        GenerationRequest(prompts[2], None, GREEDY),
    ]
    alone = [engine.generate([r])[0].text for r in others]
    victim = GenerationRequest(prompts[0], "b", GREEDY)
    victim.on_text = lambda text: setattr(victim, "cancelled", True)  # gone after one piece
    results = engine.generate([others[0], victim, others[1]])
    assert results[1].finish_reason == "cancelled" and results[1].completion_tokens < 4
    assert [results[0].text, results[2].text] == alone


def test_unloading_the_active_adapter_keeps_the_others_applied(
    tiny_model_dir, tokenizer, adapters, prompts
):
    engine = HFEngine(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, max_adapters=2
    )
    for key, path in adapters.items():
        engine.load_adapter(key, read_adapter(path))
    before = engine.generate([GenerationRequest(prompts[0], "b", GREEDY)])[0].text
    engine.unload_adapter("a")  # "a" holds slot 1
    assert engine.loaded_adapters() == {"b"}
    assert engine.generate([GenerationRequest(prompts[0], "b", GREEDY)])[0].text == before
    engine.load_adapter("a", read_adapter(adapters["a"]))  # a freed slot can be reused
    with pytest.raises(RuntimeError, match="no free adapter slot"):
        engine.load_adapter("c", read_adapter(adapters["a"]))
    assert engine.loaded_adapters() == {"a", "b"}
    for key in ("a", "b"):
        engine.unload_adapter(key)
    base = engine.generate([GenerationRequest(prompts[0], None, GREEDY)])[0].text
    assert base not in (before, "")


def test_adapter_for_another_base_is_refused(engine, tmp_path):
    other_base = tmp_path / "other-base"
    build_tiny_model(other_base, seed=0, hidden=128, layers=2)
    adapter = make_random_adapter(other_base, tmp_path / "other", seed=3)
    weights = read_adapter(adapter)
    with pytest.raises(AdapterIncompatible, match="trained on base model 'other-base'"):
        engine.check_adapter(weights)
    weights.config["base_model_name_or_path"] = engine_base_name(engine)
    with pytest.raises(AdapterIncompatible, match="which do not fit .* trained for another base"):
        engine.check_adapter(weights)


def engine_base_name(engine) -> str:
    return next(iter(engine.base_names))


def test_rank_above_the_limit_and_unknown_modules_are_refused(engine, tiny_model_dir, tmp_path):
    big = read_adapter(make_random_adapter(tiny_model_dir, tmp_path / "big", seed=4, r=32))
    with pytest.raises(AdapterIncompatible, match="rank 32, above this server's max_lora_rank 16"):
        engine.load_adapter("big", big)
    assert "big" not in engine.loaded_adapters()
    small = read_adapter(make_random_adapter(tiny_model_dir, tmp_path / "s", seed=5, r=4))
    ghost = "base_model.model.model.layers.9.mlp.up_proj"
    small.state_dict[f"{ghost}.lora_A.weight"] = torch.zeros(4, 256)
    small.state_dict[f"{ghost}.lora_B.weight"] = torch.zeros(512, 4)
    with pytest.raises(AdapterIncompatible, match="layers.9.mlp.up_proj, which is not a linear"):
        engine.check_adapter(small)
    del small.state_dict[f"{ghost}.lora_B.weight"]
    with pytest.raises(AdapterIncompatible, match="lacks lora_A or lora_B"):
        engine.check_adapter(small)
    dora = read_adapter(make_random_adapter(tiny_model_dir, tmp_path / "d", seed=6, r=4))
    dora.config["use_dora"] = True
    with pytest.raises(AdapterIncompatible, match="uses DoRA"):
        engine.check_adapter(dora)


def test_a_directory_without_adapter_files_is_refused(tmp_path):
    with pytest.raises(AdapterIncompatible, match="lacks adapter_config.json"):
        read_adapter(tmp_path)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert _top_p_filter(probs.clone(), 0.7).tolist() == pytest.approx([0, 0.5, 0.3, 0])
    assert _top_p_filter(probs.clone(), 0.5).tolist() == pytest.approx([0, 0.5, 0, 0])
    assert _top_p_filter(probs.clone(), 0.01).tolist() == pytest.approx([0, 0.5, 0, 0])
