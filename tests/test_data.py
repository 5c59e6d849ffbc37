"""Data: formats, bad rows with file:line, chat rendering and loss masking (golden ids), splits, batches."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from core.config import ConfigError
from jobs.batching import collate, epoch_permutation, step_micro_batches
from jobs.config import DataConfig
from jobs.data.formats import RowError, to_messages
from jobs.data.prepare import prepare_data
from jobs.data.render import IGNORE_INDEX, render_and_mask
from jobs.demo_data import make_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]

SINGLE = [
    {"role": "system", "content": "Classify the sentiment."},
    {"role": "user", "content": "Review: The lid is sturdy."},
    {"role": "assistant", "content": "positive"},
]
MULTI = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "thank you"},
    {"role": "assistant", "content": "good"},
]
M = IGNORE_INDEX


def lenient(**kw) -> DataConfig:
    """The job's data section with only validation on: these tests use tiny, repeated rows."""
    return DataConfig(
        **kw,
        dedup={"exact": False, "near": False},
        length={"min_tokens": 0},
        quality={"scorer": "none"},
    )


def reasons(data) -> dict[str, int]:
    return dict(data.report["counts"]["malformed_by_reason"])


def errors(data) -> list[str]:
    return [f"{e['where']}: {e['reason']}" for e in data.report["errors"]]


def test_golden_ids_single_turn(tokenizer):
    ex = render_and_mask(SINGLE, tokenizer, 512)
    assert ex["input_ids"] == [0, 3, 339, 4, 204, 204, 331, 272, 330, 19, 5, 3, 327, 4, 204, 204, 332, 31,
                               370, 388, 347, 524, 19, 5, 3, 325, 4, 204, 204, 306, 5]  # fmt: skip
    assert ex["labels"] == [M] * 29 + [306, 5]
    assert tokenizer.decode(
        [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != M]
    ) == ("positive<|eot_id|>")


def test_golden_ids_two_assistant_turns(tokenizer):
    ex = render_and_mask(MULTI, tokenizer, 512)
    assert ex["input_ids"] == [0, 3, 327, 4, 204, 204, 269, 598, 5, 3, 325, 4, 204, 204, 94, 285, 5, 3, 327,
                               4, 204, 204, 490, 580, 583, 5, 3, 325, 4, 204, 204, 76, 647, 5]  # fmt: skip
    assert ex["labels"] == [M] * 14 + [94, 285, 5] + [M] * 14 + [76, 647, 5]
    # the ids are exactly those of the whole rendered text
    full = tokenizer.apply_chat_template(MULTI, tokenize=False)
    assert ex["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode(ex["input_ids"][a:b]) for a, b in ((14, 17), (31, 34))] == [
        "yes<|eot_id|>",
        "good<|eot_id|>",
    ]


def test_every_format_renders_to_the_same_golden_ids(tokenizer):
    sharegpt = {
        "conversations": [
            {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in MULTI
        ]
    }
    expected = render_and_mask(MULTI, tokenizer, 512)
    assert render_and_mask(to_messages(sharegpt), tokenizer, 512) == expected
    alpaca = {"instruction": "hello", "output": "yes"}
    completion = {"prompt": "hello", "completion": "yes"}
    first_turn = render_and_mask(MULTI[:2], tokenizer, 512)
    assert first_turn["input_ids"] == expected["input_ids"][:17]
    for row in (alpaca, completion):
        assert render_and_mask(to_messages(row), tokenizer, 512) == first_turn


def test_truncation_and_no_assistant_tokens_left(tokenizer):
    ex = render_and_mask(MULTI, tokenizer, 20)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 20
    assert ex["labels"][14:17] == [94, 285, 5]
    with pytest.raises(RowError, match="no assistant tokens within max_seq_len=10"):
        render_and_mask(MULTI, tokenizer, 10)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            [("user", "q"), ("assistant", "a")],
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            },
            [("system", "s"), ("user", "q"), ("assistant", "a")],
        ),
        (
            {"instruction": "Sum", "input": "1 2", "output": "3"},
            [("user", "Sum\n\n1 2"), ("assistant", "3")],
        ),
        (
            {"instruction": "Hi", "input": "", "output": "Yo", "system": "S"},
            [("system", "S"), ("user", "Hi"), ("assistant", "Yo")],
        ),
        ({"prompt": "q", "completion": "a"}, [("user", "q"), ("assistant", "a")]),
    ],
)
def test_formats_are_detected_and_converted(row, expected):
    assert [(m["role"], m["content"]) for m in to_messages(row)] == expected


def test_declared_format_and_system_prompt():
    msgs = to_messages(
        {"prompt": "q", "completion": "a"}, "prompt_completion", system_prompt="Be brief."
    )
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(RowError, match="missing field 'instruction'"):
        to_messages({"prompt": "q", "completion": "a"}, "alpaca")


BAD_ROWS = [
    ('{"messages": [', "invalid JSON"),
    (json.dumps({"prompt": "q"}), "unknown format"),
    (json.dumps({"prompt": "q", "completion": "  "}), "field 'completion' is empty"),
    (json.dumps({"prompt": "q", "completion": 3}), "field 'completion' is int, not a string"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
    (
        json.dumps(
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
        ),
        "roles out of order",
    ),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": ["x"]},
                    {"role": "assistant", "content": "y"},
                ]
            }
        ),
        "content is list, not a string",
    ),
    (json.dumps({"messages": []}), "missing or empty 'messages' list"),
    (json.dumps(["not", "an", "object"]), "row is list, not an object"),
]


def write_rows(path, good: int, bad_lines: list[bytes]):
    rows = make_rows(good)
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
        f.write(b"\n")  # blank lines are not rows
        for line in bad_lines:
            f.write(line + b"\n")


def test_every_bad_row_is_reported_with_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    bad = [line.encode() for line, _ in BAD_ROWS] + [b'{"prompt": "caf\xe9", "completion": "x"}']
    write_rows(path, 40, bad)
    cfg = lenient(train_files=[str(path)], eval_fraction=0.2, max_seq_len=256)
    data = prepare_data(cfg, tokenizer, seed=0)

    counts = data.report["counts"]
    assert counts["input_rows"] == 40 + len(bad)
    assert 40 == len(data.train) + len(data.eval) == counts["train"] + counts["eval"]
    assert counts["malformed"] == sum(reasons(data).values()) == len(bad)
    first_bad_line = 42  # 40 rows, a blank line, then the bad ones
    for i, (_, reason) in enumerate(BAD_ROWS):
        assert any(
            ex.startswith(f"{path}:{first_bad_line + i}: ") and reason in ex for ex in errors(data)
        ), reason
    assert reasons(data)["invalid UTF-8"] == 1


def qa(q: str, a: str) -> bytes:
    return json.dumps({"prompt": q, "completion": a}).encode()


def msgs(*turns) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}).encode()


ONE_BAD_ROW = [
    (
        b'{"prompt": "q", "completion": "a"',
        "auto",
        "invalid JSON (Expecting ',' delimiter at column 34)",
    ),
    (b'{"prompt": "caf\xe9", "completion": "x"}', "auto", "invalid UTF-8 at byte 15"),
    (json.dumps({"instruction": "x", "output": None}).encode(), "auto", "missing field 'output'"),
    (qa("q", "a"), "alpaca", "missing field 'instruction'"),
    (msgs(("user", "q"), ("assistant", "a")), "sharegpt", "missing or empty 'conversations' list"),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}
        ).encode(),
        "auto",
        "messages[1]: content is NoneType, not a string",
    ),
    (msgs(("user", " \n"), ("assistant", "a")), "auto", "messages[0]: empty content"),
    (qa("q", ""), "auto", "field 'completion' is empty"),
    (
        json.dumps({"conversations": [{"from": "bot", "value": "q"}]}).encode(),
        "auto",
        "conversations[0]: unknown role 'bot'",
    ),
    (msgs(("system", "s")), "auto", "no assistant turn"),
    (
        json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": "a"},
                ]
            }
        ).encode(),
        "auto",
        "conversations: turn 2 is 'user', expected 'assistant' (roles out of order)",
    ),
    (
        json.dumps({"instruction": "x", "input": 5, "output": "y"}).encode(),
        "auto",
        "field 'input' is int, not a string",
    ),
    (json.dumps({"messages": ["hi"]}).encode(), "auto", "messages[0] is not an object"),
]


@pytest.mark.parametrize(("line", "fmt", "reason"), ONE_BAD_ROW, ids=[r for *_, r in ONE_BAD_ROW])
@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_each_bad_row_reason_names_file_and_line(tmp_path, tokenizer, line, fmt, reason, on_error):
    good = {
        "auto": qa("q", "a"),
        "alpaca": b'{"instruction": "q", "output": "a"}',
        "sharegpt": b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
    }[fmt]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_bytes(b"\n".join([good, good, b"", line, good]) + b"\n")  # the bad row is line 4
    held.write_bytes(good + b"\n")
    cfg = lenient(train_files=[str(train)], eval_files=[str(held)], format=fmt, on_error=on_error)
    if on_error == "fail":
        with pytest.raises(ConfigError) as e:
            prepare_data(cfg, tokenizer, seed=0)
        assert str(e.value) == f"{train}:4: {reason} (data.on_error=fail)"
        return
    data = prepare_data(cfg, tokenizer, seed=0)
    assert data.report["counts"]["malformed"] == 1
    assert errors(data) == [f"{train}:4: {reason}"]
    assert (data.report["counts"]["input_rows"], len(data.train), len(data.eval)) == (5, 3, 1)


def test_a_failed_inline_prepare_leaves_no_temporary_directory(tmp_path, tokenizer, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    train = tmp_path / "train.jsonl"
    train.write_bytes(qa("q", "a") + b"\n{not json\n")
    cfg = lenient(train_files=[str(train)], eval_files=[str(train)], on_error="fail")
    with pytest.raises(ConfigError, match="train.jsonl:2"):
        prepare_data(cfg, tokenizer, seed=0)
    assert list(scratch.iterdir()) == []


def test_a_byte_order_mark_does_not_cost_the_first_row(tmp_path, tokenizer):
    train = tmp_path / "bom.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([qa("q", "a"), qa("r", "b")]) + b"\r\n")
    cfg = lenient(train_files=[str(train)], eval_files=[str(train)], on_error="fail")
    data = prepare_data(cfg, tokenizer, seed=0)
    assert (len(data.train), data.report["counts"]["malformed"]) == (2, 0)


def test_rows_too_long_for_max_seq_len_are_dropped(tmp_path, tokenizer):
    train = tmp_path / "train.jsonl"
    long_row = msgs(("user", "Review: " + "the lid is sturdy " * 5), ("assistant", "positive"))
    # a short row renders to 15 tokens with its answer in the last two
    train.write_bytes(b"\n".join([qa("q", "a"), long_row, qa("r", "b")]) + b"\n")
    cfg = lenient(train_files=[str(train)], eval_files=[str(train)], max_seq_len=16)
    data = prepare_data(cfg, tokenizer, seed=0)
    reason = "no assistant tokens within max_seq_len=16"
    # once from each split
    assert data.report["dropped_at_tokenize"] == [f"{train}:2: {reason}", f"{train}:2: {reason}"]
    assert [len(ex["input_ids"]) for ex in data.train] == [15, 15]
    with pytest.raises(ConfigError, match=rf"{train}:2: {reason} \(data.on_error=fail\)"):
        prepare_data(cfg.model_copy(update={"on_error": "fail"}), tokenizer, seed=0)


def test_on_error_fail_stops_at_the_first_bad_row(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    write_rows(path, 5, [b"{oops"])
    cfg = lenient(train_files=[str(path)], on_error="fail")
    with pytest.raises(ConfigError, match=rf"{path}:7: invalid JSON .*on_error=fail"):
        prepare_data(cfg, tokenizer, seed=0)


def test_empty_splits_and_missing_files_are_config_errors(tmp_path, tokenizer):
    path = tmp_path / "few.jsonl"
    write_rows(path, 2, [])
    with pytest.raises(ConfigError, match="data: the held-out set is empty"):
        prepare_data(lenient(train_files=[str(path)], eval_fraction=0.01), tokenizer, seed=0)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path .*absent.jsonl\): not found"):
        prepare_data(lenient(train_files=[str(tmp_path / "absent.jsonl")]), tokenizer, seed=0)


def test_no_usable_rows_and_empty_eval_files_are_config_errors(tmp_path, tokenizer):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_rows(good, 3, [])
    bad.write_bytes(b"{nope\n" + qa("q", " ") + b"\n")
    with pytest.raises(ConfigError, match="data: no usable training rows") as e:
        prepare_data(lenient(train_files=[str(bad)], eval_files=[str(good)]), tokenizer, seed=0)
    assert f"{bad}:1: invalid JSON" in str(e.value)
    assert f"{bad}:2: field 'completion' is empty" in str(e.value)
    with pytest.raises(ConfigError, match="data: the held-out set is empty"):
        prepare_data(lenient(train_files=[str(good)], eval_files=[str(bad)]), tokenizer, seed=0)


def test_eval_files_are_used_as_given(tmp_path, tokenizer):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_rows(train, 30, [])
    write_rows(held, 5, [])
    data = prepare_data(
        lenient(train_files=[str(train)], eval_files=[str(held)]), tokenizer, seed=0
    )
    assert (len(data.train), len(data.eval)) == (30, 5)


def test_prepared_split_is_deterministic_and_stable_when_rows_are_added(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, make_rows(60))
    cfg = lenient(train_files=[str(path)], eval_fraction=0.25, max_seq_len=256)
    first = prepare_data(cfg, tokenizer, seed=3)
    again = prepare_data(cfg, tokenizer, seed=3)
    assert (again.train, again.eval, again.dataset_hash) == (
        first.train,
        first.eval,
        first.dataset_hash,
    )
    assert 5 <= len(first.eval) <= 25
    write_jsonl(path, make_rows(60) + make_rows(40, seed=9))  # 40 new rows at the end
    grown = prepare_data(cfg, tokenizer, seed=3)
    old_eval = [json.dumps(c) for c in first.eval_conversations]
    new_eval = [json.dumps(c) for c in grown.eval_conversations]
    assert new_eval[: len(old_eval)] == old_eval  # every held-out row is still held out
    assert len(grown.train) + len(grown.eval) == 100
    assert len(grown.train) - len(first.train) == 40 - (len(new_eval) - len(old_eval))
    assert prepare_data(cfg, tokenizer, seed=4).dataset_hash != first.dataset_hash


def test_dataset_hash_of_prepared_data_follows_a_changed_row(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    rows = make_rows(30)
    cfg = lenient(train_files=[str(path)], eval_fraction=0.3)
    write_jsonl(path, rows)
    before = prepare_data(cfg, tokenizer, seed=0).dataset_hash
    rows[5]["messages"][1]["content"] += " Really."
    write_jsonl(path, rows)
    assert prepare_data(cfg, tokenizer, seed=0).dataset_hash != before


def test_step_batches_do_not_depend_on_worker_count():
    order = epoch_permutation(100, seed=1, epoch=0).tolist()
    assert sorted(order) == list(range(100))
    assert (
        epoch_permutation(100, seed=1, epoch=0).tolist()
        == order
        != epoch_permutation(100, seed=1, epoch=1).tolist()
    )
    one = step_micro_batches(order, 2, effective=16, rank=0, world=1, micro=16)
    two = [step_micro_batches(order, 2, effective=16, rank=r, world=2, micro=4) for r in range(2)]
    assert [len(mb) for mb in two[0]] == [4, 4]
    flat_two = [i for rank in two for mb in rank for i in mb]
    assert flat_two == one[0] == order[32:48]
    assert not set(two[0][0] + two[0][1]) & set(two[1][0] + two[1][1])


@pytest.mark.parametrize(
    ("n", "effective", "world", "micro"),
    [(100, 16, 2, 4), (103, 12, 3, 2), (64, 8, 4, 1), (50, 8, 1, 8)],
)
def test_every_rank_gets_equal_disjoint_micro_batches_for_a_whole_epoch(n, effective, world, micro):
    order = epoch_permutation(n, seed=5, epoch=2).tolist()
    steps_per_epoch = n // effective  # as jobs.finetune plans it: a short last step is dropped
    seen = []
    for k in range(steps_per_epoch):
        per_rank = [step_micro_batches(order, k, effective, r, world, micro) for r in range(world)]
        for batches in per_rank:
            assert [len(mb) for mb in batches] == [micro] * (effective // world // micro)
            seen += [i for mb in batches for i in mb]
    assert len(seen) == len(set(seen)) == steps_per_epoch * effective  # no example twice
    assert set(seen) <= set(range(n))


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert (
        epoch_permutation(50, seed=1, epoch=3).tolist()
        == epoch_permutation(50, seed=1, epoch=3).tolist()
    )
    orders = {
        tuple(epoch_permutation(50, seed=s, epoch=e).tolist()) for s in (1, 2) for e in (0, 1)
    }
    assert len(orders) == 4


def test_collate_pads_and_masks():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [M, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=2
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[M, 6, 7], [8, M, M]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_shipped_demo_data_regenerates_byte_for_byte(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", make_rows())
    assert (tmp_path / "reviews.jsonl").read_bytes() == (REPO / "data/reviews.jsonl").read_bytes()
