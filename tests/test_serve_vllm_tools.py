"""A tool-calling fine-tune end to end: configs/tools.yaml trained (the session's tools_adapter),
served on vLLM with the pythonic tool-call parser, and the openai client gets parsed tool_calls
back: the same calls as the adapter's offline greedy replies parsed by the same parser, and the
right calls on held-out questions at the offline rate. Slow: the training takes minutes."""

from __future__ import annotations

import json

import pytest
import torch
from openai import OpenAI
from peft import PeftModel
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.demo_tools import TOOLS, expected_calls, generate_replies, held_out_rows, parsed_calls
from serve.app import build_app
from tests.helpers import start_local_serve

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = 24
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def client(tiny_model_dir, tools_adapter):
    port = start_local_serve()
    settings = {
        "engine": "vllm",
        "base_model": str(tiny_model_dir),
        "adapters": {"tools": str(tools_adapter)},
        "allow_unauthenticated": True,
        "dtype": "float32",
        "context_window": 1024,
        "ingress_cpus": 0,
        "vllm": {"tool_call_parser": "pythonic"},
    }
    serve.run(build_app(settings), name="tools", route_prefix="/")
    yield OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300)
    serve.shutdown()


def served_calls(message) -> list[tuple[str, dict]] | None:
    if not message.tool_calls:
        return None
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_served_tool_calls_are_the_adapters_own_and_mostly_right(
    client, tiny_model_dir, tools_adapter
):
    rows = held_out_rows(ROWS)
    tokenizer = AutoTokenizer.from_pretrained(tools_adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tools_adapter).eval()
    offline = [
        parsed_calls(r, tokenizer) for r in generate_replies(model, tokenizer, rows, MAX_TOKENS)
    ]
    served, right = [], 0
    for row in rows:
        prompt, want = expected_calls(row)
        out = client.chat.completions.create(
            model="tools",
            messages=prompt,
            tools=TOOLS,
            tool_choice="auto",
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        calls = served_calls(out.choices[0].message)
        served.append(calls)
        right += calls == want
        if calls:
            assert out.choices[0].finish_reason == "tool_calls"
    assert served == offline  # the parser, the template and the adapter agree with peft's
    assert sum(c is not None for c in served) >= ROWS // 2, served
    assert right / ROWS >= 0.1, f"{right}/{ROWS} held-out calls right"  # as offline (conftest)


def test_streamed_and_required_tool_calls_from_the_adapter(client):
    for row in held_out_rows(ROWS):  # the first question the adapter answers with a call
        prompt, _ = expected_calls(row)
        kw = {"model": "tools", "messages": prompt, "tools": TOOLS, "max_tokens": MAX_TOKENS}
        whole = client.chat.completions.create(**kw, tool_choice="auto", temperature=0)
        if whole.choices[0].message.tool_calls:
            break
    chunks = list(
        client.chat.completions.create(**kw, tool_choice="auto", temperature=0, stream=True)
    )
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    streamed = {}
    for tc in deltas:
        entry = streamed.setdefault(tc.index, {"name": "", "arguments": ""})
        entry["name"] += tc.function.name or ""
        entry["arguments"] += tc.function.arguments or ""
    got = [(e["name"], json.loads(e["arguments"])) for _, e in sorted(streamed.items())]
    assert got == served_calls(whole.choices[0].message)
    # required: vLLM guides a JSON list of calls, a format this adapter never saw; a tiny model
    # may not close the list before max_tokens, so only the shape is asserted.
    required = client.chat.completions.create(
        **{**kw, "max_tokens": 200}, tool_choice="required", temperature=0
    )
    choice = required.choices[0]
    names = {c.function.name for c in choice.message.tool_calls or []}
    assert names <= {t["function"]["name"] for t in TOOLS}
    assert choice.finish_reason in ("tool_calls", "length")
