"""The tool-calling demo: the user asks for the weather or the time in a city, or a unit
conversion, and the assistant calls the right tool with the right arguments (OpenAI's
fine-tuning format with `tools`; configs/tools.yaml trains the tiny model on it).

Some rows go on past the call: the tool's result, then the assistant's answer from it. Arguments
are JSON strings and numbers only (the tiny model's template writes them as Python literals).

    python -m jobs.demo_tools [OUT.jsonl]              # regenerates data/tools.jsonl exactly
    python -m jobs.demo_tools --eval RUN/adapter       # held-out call accuracy, base vs adapter
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import sys
from pathlib import Path

from jobs.demo_data import write_jsonl

CITIES = ["Paris", "London", "Tokyo", "Rome", "Oslo", "Lima"]
CONVERSIONS = [("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg")]
FACTORS = {
    ("km", "miles"): 0.621,
    ("miles", "km"): 1.609,
    ("kg", "pounds"): 2.205,
    ("pounds", "kg"): 0.454,
}
SKIES = ["sunny", "cloudy", "rainy", "windy", "foggy"]


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    params = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": params},
    }


TOOLS = [
    _tool(
        "get_weather",
        "Weather in a city.",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
    _tool("get_time", "Time in a city.", {"city": {"type": "string"}}, ["city"]),
    _tool(
        "convert_units",
        "Convert units.",
        {
            "value": {"type": "number"},
            "from_unit": {"type": "string"},
            "to_unit": {"type": "string"},
        },
        ["value", "from_unit", "to_unit"],
    ),
]
WEATHER = [
    "What's the weather in {city}?",
    "How is the weather in {city} today?",
    "Is it sunny in {city}?",
    "Weather for {city}, please.",
    "Tell me the weather in {city}.",
    "Is it raining in {city}?",
]
WEATHER_UNIT = [
    "What's the weather in {city} in {unit}?",
    "Give me the temperature in {city} in {unit}.",
    "How warm is it in {city}, in {unit}?",
]
WEATHER_TWO = [
    "What's the weather in {city} and in {other}?",
    "Compare the weather in {city} and {other}.",
    "Weather in {city} and {other}, please.",
]
TIME = [
    "What time is it in {city}?",
    "Tell me the local time in {city}.",
    "Current time in {city}?",
    "What is the time in {city} now?",
]
CONVERT = [
    "Convert {value} {from_unit} to {to_unit}.",
    "How many {to_unit} is {value} {from_unit}?",
    "What is {value} {from_unit} in {to_unit}?",
    "Please convert {value} {from_unit} into {to_unit}.",
    "{value} {from_unit} in {to_unit}?",
]


def _call(rng: random.Random, name: str, **arguments) -> dict:
    call_id = f"call_{rng.randrange(16**8):08x}"
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def make_conversation(rng: random.Random) -> list[dict]:
    """One request, the assistant's tool call, and (for some rows) the result and the answer."""
    kind = rng.choices(
        ["weather", "weather_unit", "weather_two", "time", "convert"], [4, 2, 1, 3, 4]
    )[0]
    city = rng.choice(CITIES)
    if kind == "weather":
        question, calls = rng.choice(WEATHER).format(city=city), [("get_weather", {"city": city})]
    elif kind == "weather_unit":
        unit = rng.choice(["celsius", "fahrenheit"])
        question = rng.choice(WEATHER_UNIT).format(city=city, unit=unit)
        calls = [("get_weather", {"city": city, "unit": unit})]
    elif kind == "weather_two":
        other = rng.choice([c for c in CITIES if c != city])
        question = rng.choice(WEATHER_TWO).format(city=city, other=other)
        calls = [("get_weather", {"city": city}), ("get_weather", {"city": other})]
    elif kind == "time":
        question, calls = rng.choice(TIME).format(city=city), [("get_time", {"city": city})]
    else:
        from_unit, to_unit = rng.choice(CONVERSIONS)
        value = rng.randint(1, 9)
        question = rng.choice(CONVERT).format(value=value, from_unit=from_unit, to_unit=to_unit)
        args = {"value": value, "from_unit": from_unit, "to_unit": to_unit}
        calls = [("convert_units", args)]
    tool_calls = [_call(rng, name, **args) for name, args in calls]
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": tool_calls},
    ]
    if len(calls) == 1 and rng.random() < 0.25:
        result, answer = _result_and_answer(rng, *calls[0])
        messages += [
            {"role": "tool", "tool_call_id": tool_calls[0]["id"], "content": result},
            {"role": "assistant", "content": answer},
        ]
    return messages


def _result_and_answer(rng: random.Random, name: str, args: dict) -> tuple[str, str]:
    if name == "get_weather":
        unit = args.get("unit", "celsius")
        degrees = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
        sky = rng.choice(SKIES)
        result = {"temperature": degrees, "unit": unit, "sky": sky}
        return json.dumps(result), f"It is {degrees} degrees {unit} and {sky} in {args['city']}."
    if name == "get_time":
        time = f"{rng.randint(0, 23):02d}:{rng.choice([0, 15, 30, 45]):02d}"
        return json.dumps({"time": time}), f"It is {time} in {args['city']}."
    value = round(args["value"] * FACTORS[(args["from_unit"], args["to_unit"])], 2)
    return (
        json.dumps({"value": value, "unit": args["to_unit"]}),
        f"{args['value']} {args['from_unit']} is {value} {args['to_unit']}.",
    )


def held_out(question: str) -> bool:
    """A quarter of all questions, fixed by their text: never trained on, asked in evaluation."""
    return hashlib.blake2b(question.encode(), digest_size=2).digest()[0] % 4 == 0


def unique_conversations(rng: random.Random, held: bool = False):
    """Conversations whose question was never asked before, drawn from rng, from the trained
    questions (or the held-out ones)."""
    seen = set()
    while True:
        messages = make_conversation(rng)
        question = messages[0]["content"]
        if question not in seen and held_out(question) == held:
            seen.add(question)
            yield messages


def make_rows(n: int = 240, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"messages": m, "tools": TOOLS, "parallel_tool_calls": True}
        for m in itertools.islice(unique_conversations(rng), n)
    ]


def held_out_rows(n: int = 80, seed: int = 1) -> list[dict]:
    """Rows of held-out questions: combinations of request, city, value and units that no
    training row asks."""
    rng = random.Random(seed)
    return [
        {"messages": m, "tools": TOOLS}
        for m in itertools.islice(unique_conversations(rng, held=True), n)
    ]


# ---------------------------------------------------------------- held-out call accuracy


def expected_calls(row: dict) -> tuple[list[dict], list[tuple[str, dict]]]:
    """The prompt up to the row's first tool-call turn, and that turn's (name, arguments)."""
    messages = row["messages"]
    turn = next(i for i, m in enumerate(messages) if m.get("tool_calls"))
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in messages[turn]["tool_calls"]
    ]
    return messages[:turn], calls


def parsed_calls(reply: str, tokenizer) -> list[tuple[str, dict]] | None:
    """The calls vLLM's pythonic tool-call parser reads in a reply; None when it reads none."""
    from vllm.tool_parsers.pythonic_tool_parser import PythonicToolParser

    info = PythonicToolParser(tokenizer).extract_tool_calls(reply, request=None)
    if not info.tools_called:
        return None
    return [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls]


def generate_replies(model, tokenizer, rows: list[dict], max_new_tokens=48, batch_size=16):
    """Greedy replies to each row's prompt (up to its first tool-call turn), tools header included."""
    from inference.generate import chat_prompt_ids, greedy_generate
    from jobs.data.render import template_messages

    prompts = [
        chat_prompt_ids(tokenizer, template_messages(expected_calls(r)[0]), tools=r["tools"])
        for r in rows
    ]
    replies = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    return [r.text for r in replies]


def call_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Share of rows whose greedy reply parses (PythonicToolParser) to exactly the expected
    calls: tool names and arguments, in order."""
    replies = generate_replies(model, tokenizer, rows)
    right = sum(
        parsed_calls(reply, tokenizer) == expected_calls(row)[1]
        for reply, row in zip(replies, rows, strict=True)
    )
    return right / max(len(rows), 1)


def evaluate_adapter(adapter: str, base: str = ".cache/tiny-llama", n: int = 80) -> dict:
    """Held-out call accuracy of the base model and of base + adapter (fp32, CPU)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    rows = held_out_rows(n)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    result = {"base": call_accuracy(model, tokenizer, rows)}
    model = PeftModel.from_pretrained(model, adapter)
    result["adapter"] = call_accuracy(model, tokenizer, rows)
    return result


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--eval"]:
        scores = evaluate_adapter(*args[1:3])
        print(
            f"held-out tool-call accuracy: base {scores['base']:.2f}, adapter {scores['adapter']:.2f}"
        )
    else:
        write_jsonl(Path(args[0] if args else "data/tools.jsonl"), make_rows())
