"""Tool-calling rows (OpenAI fine-tuning's format with `tools`): validation with file:line and the
field, the tiny template's pythonic render, loss masking, storage, and a trained demo adapter."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError
from jobs.config import DataConfig
from jobs.data.formats import RowError, to_example
from jobs.data.prepare import prepare_data, read_split
from jobs.data.render import IGNORE_INDEX, render, render_and_mask, template_messages
from jobs.demo_data import make_rows as review_rows
from jobs.demo_data import write_jsonl
from jobs.demo_tools import TOOLS, parsed_calls
from jobs.tiny_model import CHAT_TEMPLATE

# The tiny model's template before it rendered tools: without tools nothing may change.
OLD_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
WEATHER, TIME = TOOLS[0], TOOLS[1]
REPO = Path(__file__).resolve().parents[1]


def call(name: str, arguments, call_id: str = "call_1") -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def tool_row() -> dict:
    """A call, its result and the answer from it."""
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18}'},
            {"role": "assistant", "content": "It is 18 degrees."},
        ],
        "tools": [WEATHER, TIME],
        "parallel_tool_calls": True,
    }


def two_calls(row: dict) -> None:
    row["messages"][2]["tool_calls"].append(call("get_time", {"city": "Rome"}, "call_2"))


def lenient(**kw) -> DataConfig:
    return DataConfig(
        **kw,
        dedup={"exact": False, "near": False},
        length={"min_tokens": 0},
        quality={"scorer": "none"},
    )


# ---------------------------------------------------------------- validation


def mutate(path: str, value):
    """A tool_row() with the value at a dotted path (list indices as numbers) replaced;
    value DELETE removes the key."""

    def change(row):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = row
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return change


DELETE = object()
ARGS = "messages[2].tool_calls[0].function.arguments"
BAD_TOOL_ROWS = [
    (
        mutate("messages.2.tool_calls.0.function.name", "get_news"),
        "messages[2].tool_calls[0]: unknown tool 'get_news' (the row's tools: get_weather, get_time)",
        "unknown tool",
    ),
    (
        mutate("messages.2.tool_calls.0.function.arguments", '{"city": '),
        f"{ARGS} are not valid JSON (Expecting value at column 10)",
        "arguments are not valid JSON",
    ),
    (
        mutate("messages.2.tool_calls.0.function.arguments", '["Paris"]'),
        f'{ARGS} are not a JSON object (a list: ["Paris"])',
        "arguments are not a JSON object",
    ),
    (
        mutate("messages.2.tool_calls.0.function.arguments", {"city": "Paris"}),
        f"{ARGS} is dict, not a string (OpenAI's format: a JSON object as text)",
        "not a string",
    ),
    (
        mutate("messages.2.tool_calls.0.function.arguments", "{}"),
        f"{ARGS} lack required ['city'] of tool 'get_weather'",
        "arguments lack required",
    ),
    (
        mutate("messages.3.tool_call_id", "call_9"),
        "messages[3]: tool_call_id 'call_9' matches no earlier call",
        "matches no earlier call",
    ),
    (
        mutate("messages.3.tool_call_id", DELETE),
        "messages[3]: missing field 'tool_call_id' (the id of the call it answers)",
        "missing field",
    ),
    (
        lambda row: (two_calls(row), row.update(parallel_tool_calls=False)),
        "messages[2].tool_calls: 2 calls in one turn, but the row sets parallel_tool_calls: false",
        "parallel_tool_calls: false",
    ),
    (
        mutate("parallel_tool_calls", "no"),
        "field 'parallel_tool_calls' is str, not a boolean",
        "not a boolean",
    ),
    (
        mutate("messages.2.tool_calls", []),
        "messages[2].tool_calls is not a non-empty list",
        "non-empty list",
    ),
    (
        mutate("messages.2.tool_calls.0.id", DELETE),
        "messages[2].tool_calls[0]: missing field 'id'",
        "missing field",
    ),
    (
        mutate("messages.4.content", None),
        "messages[4]: content is NoneType, not a string",
        "not a string",
    ),
    (
        lambda row: row["messages"].pop(2),
        "messages: turn 2 is 'tool', expected 'assistant' (roles out of order)",
        "roles out of order",
    ),
    (
        mutate("tools.0.type", "fn"),
        "tools[0]: malformed tool: type is 'fn', expected 'function'",
        "malformed tool",
    ),
    (
        mutate("tools.1.function", DELETE),
        "tools[1]: malformed tool: 'function' is missing or not an object",
        "malformed tool",
    ),
    (
        mutate("tools.1.function.name", "get weather"),
        "tools[1]: malformed tool: function.name 'get weather' is not a name "
        "(letters, digits, _ or -; 1-64)",
        "malformed tool",
    ),
    (
        mutate("tools.1", WEATHER),
        "tools[1]: malformed tool: a second tool named 'get_weather'",
        "malformed tool",
    ),
    (
        mutate("tools.0.function.parameters", {"type": "string"}),
        "tools[0]: malformed tool: function.parameters of 'get_weather' is not a JSON schema of "
        'an object ({"type": "object", "properties": {...}, "required": [...]})',
        "malformed tool",
    ),
    (mutate("tools", {"get_weather": {}}), "field 'tools' is dict, not a list", "not a list"),
    # without `tools` a row is read as before; tool turns in it say what is missing
    (
        mutate("tools", DELETE),
        "messages[2]: tool_calls, but the row has no 'tools' list",
        "the row has no 'tools' list",
    ),
    (
        lambda row: (
            row.pop("tools"),
            row["messages"].__setitem__(2, {"role": "assistant", "content": "x"}),
        ),
        "messages[3]: unknown role 'tool' (a tool result needs the row's 'tools' list)",
        "unknown role",
    ),
]


@pytest.mark.parametrize(
    ("change", "reason", "kind"), BAD_TOOL_ROWS, ids=[r for _, r, _ in BAD_TOOL_ROWS]
)
def test_each_bad_tool_row_is_reported_with_file_line_and_field(
    tmp_path, tokenizer, change, reason, kind
):
    bad = copy.deepcopy(tool_row())
    change(bad)
    good = json.dumps(tool_row())
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("\n".join([good, good, "", json.dumps(bad), good]) + "\n")  # bad: line 4
    held.write_text(good + "\n")
    data = prepare_data(lenient(train_files=[str(train)], eval_files=[str(held)]), tokenizer, 0)
    errors = [f"{e['where']}: {e['reason']}" for e in data.report["errors"]]
    assert errors == [f"{train}:4: {reason}"]
    assert kind in next(iter(data.report["counts"]["malformed_by_reason"]))
    assert (len(data.train), len(data.eval)) == (3, 1)
    cfg = lenient(train_files=[str(train)], eval_files=[str(held)], on_error="fail")
    with pytest.raises(ConfigError) as e:
        prepare_data(cfg, tokenizer, 0)
    assert str(e.value) == f"{train}:4: {reason} (data.on_error=fail)"


def test_a_valid_tool_row_is_kept_in_canonical_form():
    row = tool_row()
    row["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{ "city":"Paris" }'
    ex = to_example(row)
    assert ex["tools"] == [WEATHER, TIME]
    assert ex["messages"][2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [call("get_weather", {"city": "Paris"})],  # arguments re-serialized
    }
    assert ex["messages"][3] == {
        "role": "tool",
        "content": '{"temperature": 18}',
        "tool_call_id": "call_1",
    }
    two = tool_row()
    two_calls(two)
    assert len(to_example(two)["messages"][2]["tool_calls"]) == 2  # parallel calls are allowed


def test_rows_without_tools_are_read_as_before():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_example(row) == row
    assert to_example({**row, "tools": []}) == row
    assert to_example({**row, "tools": None}) == row
    with pytest.raises(RowError, match=r"messages\[1\]: unknown role 'robot'$"):
        to_example({"messages": [row["messages"][0], {"role": "robot", "content": "a"}]})


# ---------------------------------------------------------------- render


def old_render(tokenizer, messages, **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=OLD_TEMPLATE, **kw)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_conversations_without_tools_render_exactly_as_with_the_old_template(
    tokenizer, generation_prompt
):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    conversations = [r["messages"] for r in review_rows(20)] + [
        [{"role": "user", "content": "hello "}, {"role": "assistant", "content": " yes\n"}],
        [{"role": "user", "content": "q"}],
    ]
    for messages in conversations:
        new = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        assert new == old_render(tokenizer, messages, add_generation_prompt=generation_prompt)
    for messages in conversations[:20]:  # through the pipeline too (no tools keyword at all)
        assert render({"messages": messages}, tokenizer) == old_render(tokenizer, messages)


TOOL_RENDER = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Tools; to call them, reply with a Python list of calls:\n"
    "get_weather(city, unit=None) # Weather in a city.\n"
    "get_time(city) # Time in a city.\n"
    "<|eot_id|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    '[get_weather(city="Paris"), get_time(city="Rome")]<|eot_id|>'
    '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 18}<|eot_id|>'
    "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 18 degrees.<|eot_id|>"
)


def test_a_tool_conversation_renders_the_header_pythonic_calls_and_results(tokenizer):
    row = tool_row()
    two_calls(row)
    assert render(to_example(row), tokenizer) == TOOL_RENDER


def test_vllms_pythonic_parser_reads_the_rendered_calls_back(tokenizer):
    calls = [
        call("get_weather", {"city": 'Saint "Paris"', "unit": "celsius"}),
        call("convert_units", {"value": 2.5, "from_unit": "km", "to_unit": "miles"}, "c2"),
    ]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": calls}]
    text = tokenizer.apply_chat_template(template_messages(messages), tools=TOOLS, tokenize=False)
    reply = text.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1]
    reply = reply.removesuffix("<|eot_id|>")
    assert reply == (
        '[get_weather(city="Saint \\"Paris\\"", unit="celsius"), '
        'convert_units(value=2.5, from_unit="km", to_unit="miles")]'
    )
    assert parsed_calls(reply, tokenizer) == [
        ("get_weather", {"city": 'Saint "Paris"', "unit": "celsius"}),
        ("convert_units", {"value": 2.5, "from_unit": "km", "to_unit": "miles"}),
    ]


# ---------------------------------------------------------------- masking and storage


def test_labels_cover_the_assistant_turns_and_the_call_only(tokenizer):
    ex = to_example(tool_row())
    out = render_and_mask(ex["messages"], tokenizer, 512, ex["tools"])
    ids, labels = out["input_ids"], out["labels"]
    assert ids == tokenizer(render(ex, tokenizer), add_special_tokens=False)["input_ids"]
    learned = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert [label for label in labels if label != IGNORE_INDEX] == learned
    assert tokenizer.decode(learned) == (
        '[get_weather(city="Paris")]<|eot_id|>It is 18 degrees.<|eot_id|>'
    )
    # the tools header, the question and the tool's result are prompt
    prompt = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label == -100])
    assert "get_time(city)" in prompt and '{"temperature": 18}' in prompt


def test_tool_rows_survive_the_prepared_set_and_plain_rows_keep_their_hash(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, [tool_row(), *review_rows(30)])
    cfg = lenient(train_files=[str(path)], eval_files=[str(path)])
    out = tmp_path / "prepared"
    data = prepare_data(cfg, tokenizer, seed=0, inline_output=str(out))
    back = dict(read_split(str(out), "eval"))
    assert back[f"{path}:1"] == to_example(tool_row())
    assert back[f"{path}:2"] == review_rows(1)[0]
    ex = to_example(tool_row())
    assert data.eval[0] == render_and_mask(ex["messages"], tokenizer, 512, ex["tools"])
    # held-out chats for exact match are plain chats only
    assert len(data.eval_conversations) == 30
    # rows without tools: the dataset hash they always had (pinned before tools existed)
    plain = tmp_path / "plain.jsonl"
    write_jsonl(plain, review_rows(30))
    cfg = lenient(train_files=[str(plain)], eval_fraction=0.3)
    assert prepare_data(cfg, tokenizer, seed=0).dataset_hash == (
        "sha256:6f517a7fcb106f952ea609e50b4f47a8ace9ffffcdd7d18f315611c36a1d3659"
    )


# ---------------------------------------------------------------- the demo, trained


def test_shipped_tool_demo_data_regenerates_byte_for_byte(tmp_path):
    from jobs.demo_tools import make_rows

    write_jsonl(tmp_path / "tools.jsonl", make_rows())
    assert (tmp_path / "tools.jsonl").read_bytes() == (REPO / "data/tools.jsonl").read_bytes()


@pytest.mark.integration
@pytest.mark.slow
def test_the_trained_tools_adapter_calls_the_right_tool_with_the_right_arguments(
    tiny_model_dir, tools_adapter
):
    # Through the command the README shows: held-out questions the training file never asks.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.demo_tools",
            "--eval",
            str(tools_adapter),
            str(tiny_model_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"base (\d+\.\d+), adapter (\d+\.\d+)", out.stdout)
    assert found, out.stdout
    untrained, tuned = float(found[1]), float(found[2])
    assert untrained == 0.0
    # a quarter of the shipped config's steps (tests/conftest.py): some calls exactly right,
    # where the untrained model gets none (0.38 at the shipped config's steps)
    assert tuned >= 0.05, f"held-out call accuracy {tuned:.2f} (untrained {untrained:.2f})"
