"""Write a tiny Llama-architecture model and a locally trained tokenizer, with a chat template.

Nothing can be downloaded here, so tests and the quickstart load this through the same
`from_pretrained` path a real hub model takes:  python -m jobs.tiny_model OUT_DIR
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from jobs.demo_data import corpus

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL = [BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Llama-3 style: each turn is a header plus content closed by <|eot_id|>. Renders of a
# conversation's prefixes are prefixes of the whole render, which loss masking relies on.
#
# Tools (for vLLM's `pythonic` tool-call parser, as Llama 3.2 calls them): a system block
# lists the functions as Python signatures, `get_weather(city, unit=None) # Weather in a
# city.` (optional parameters default to None), an assistant's calls are one Python list of keyword calls,
# `[get_weather(city="Paris"), convert_units(value=3, from_unit="km", to_unit="miles")]`, and a
# tool result is a turn of its own role, `ipython`. Short signatures, not the tools' JSON: with this
# 700-token vocabulary a JSON schema is ~150 tokens a tool, and a 2-layer model trained from
# random weights learns far slower when the question is a few tokens among hundreds. Without
# tools none of this renders: a conversation renders exactly as before tools existed.
# Argument values are written with tojson: JSON strings and numbers are Python literals too,
# but JSON true/false/null are not (vLLM's parser reads those names back; a strict Python
# reader would not), so the demo keeps to strings and numbers.
TOOLS_HEADER = "Tools; to call them, reply with a Python list of calls:\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "<|start_header_id|>system<|end_header_id|>\n\n" + TOOLS_HEADER + "{% for tool in tools %}"
    "{% set fn = tool.function if tool.function is defined else tool %}"
    "{% set params = fn.parameters if fn.parameters is defined else {} %}"
    "{% set required = params.required if params.required is defined else [] %}"
    "{{ fn.name }}("
    "{% for name, spec in (params.properties if params.properties is defined else {}).items() %}"
    "{{ name }}{% if name not in required %}=None{% endif %}{% if not loop.last %}, {% endif %}"
    "{% endfor %})"
    "{{ ' # ' + fn.description if fn.description else '' }}\n"
    "{% endfor %}<|eot_id|>"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.tool_calls %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% if message['content'] %}{{ message['content'] | trim }}\n\n{% endif %}"
    "["
    "{% for call in message.tool_calls %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{% if fn.arguments is string %}"
    "{{ raise_exception('tool call arguments must be a dict, not JSON text') }}"
    "{% endif %}"
    "{{ fn.name }}("
    "{% for name, value in fn.arguments.items() %}"
    "{{ name }}={{ value | tojson }}{% if not loop.last %}, {% endif %}"
    "{% endfor %}"
    "){% if not loop.last %}, {% endif %}"
    "{% endfor %}"
    "]<|eot_id|>"
    "{% else %}"
    "<|start_header_id|>{{ 'ipython' if message['role'] == 'tool' else message['role'] }}"
    "<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token="<|eot_id|>",  # generation stops at the end of the assistant's turn
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_model(vocab_size: int, seed: int = 0, hidden: int = 256, layers: int = 2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(2, hidden // 128),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # A trained model's output layer spans a wide logit range; at the default init scale the
    # largest reachable logit is about 5, too flat for a frozen head to ever predict confidently.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def main(
    out_dir: Path,
    seed: int = typer.Option(0, help="weights are a function of the seed"),
    hidden: int = typer.Option(256),
    layers: int = typer.Option(2),
) -> None:
    """Build the tiny model and tokenizer into OUT_DIR (skipped when already built the same way)."""
    # version 3: the chat template renders tools (same vocabulary and weights as version 2)
    recipe = {"seed": seed, "hidden": hidden, "layers": layers, "version": 3}
    marker = out_dir / "tiny_model.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        print(f"tiny model already at {out_dir}")
        return
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed, hidden=hidden, layers=layers)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(recipe))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny model ({n_params / 1e6:.1f}M params, vocab {len(tokenizer)}) written to {out_dir}")


if __name__ == "__main__":
    typer.run(main)
