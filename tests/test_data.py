"""Data: formats, bad rows with file:line, chat rendering and loss masking (golden ids), splits, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.config import ConfigError, DataConfig
from jobs.data import (
    IGNORE_INDEX,
    RowError,
    collate,
    dataset_hash,
    epoch_order,
    is_eval_row,
    prepare_data,
    render_and_mask,
    step_micro_batches,
    to_messages,
)
from jobs.demo_data import make_rows, write_jsonl

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


def test_truncation_and_no_assistant_tokens_left(tokenizer):
    ex = render_and_mask(MULTI, tokenizer, 20)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 20
    assert ex["labels"][14:17] == [94, 285, 5]
    with pytest.raises(RowError, match="no assistant tokens within max_seq_len=10"):
        render_and_mask(MULTI, tokenizer, 10)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
         [("user", "q"), ("assistant", "a")]),
        ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                            {"from": "gpt", "value": "a"}]},
         [("system", "s"), ("user", "q"), ("assistant", "a")]),
        ({"instruction": "Sum", "input": "1 2", "output": "3"}, [("user", "Sum\n\n1 2"), ("assistant", "3")]),
        ({"instruction": "Hi", "input": "", "output": "Yo", "system": "S"},
         [("system", "S"), ("user", "Hi"), ("assistant", "Yo")]),
        ({"prompt": "q", "completion": "a"}, [("user", "q"), ("assistant", "a")]),
    ],
)  # fmt: skip
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
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}),
     "roles out of order"),
    (json.dumps({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}),
     "content is list, not a string"),
    (json.dumps({"messages": []}), "missing or empty 'messages' list"),
    (json.dumps(["not", "an", "object"]), "row is list, not an object"),
]  # fmt: skip


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
    cfg = DataConfig(train_files=[str(path)], eval_fraction=0.2, max_seq_len=256)
    data = prepare_data(cfg, tokenizer, seed=0)

    report = data.report
    assert report.rows_read == 40 + len(bad)
    assert report.kept == 40 == len(data.train) + len(data.eval)
    assert sum(report.dropped.values()) == len(bad)
    first_bad_line = 42  # 40 rows, a blank line, then the bad ones
    for i, (_, reason) in enumerate(BAD_ROWS):
        assert any(
            ex.startswith(f"{path}:{first_bad_line + i}: ") and reason in ex
            for ex in report.examples
        ), reason
    assert any("invalid UTF-8" in reason for reason in report.dropped)


def test_on_error_fail_stops_at_the_first_bad_row(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    write_rows(path, 5, [b"{oops"])
    cfg = DataConfig(train_files=[str(path)], on_error="fail")
    with pytest.raises(ConfigError, match=rf"{path}:7: invalid JSON .*on_error=fail"):
        prepare_data(cfg, tokenizer, seed=0)


def test_empty_splits_and_missing_files_are_config_errors(tmp_path, tokenizer):
    path = tmp_path / "few.jsonl"
    write_rows(path, 2, [])
    with pytest.raises(ConfigError, match="data.eval_fraction: the held-out set is empty"):
        prepare_data(DataConfig(train_files=[str(path)], eval_fraction=0.01), tokenizer, seed=0)
    with pytest.raises(ConfigError, match="data: file not found"):
        prepare_data(DataConfig(train_files=[str(tmp_path / "absent.jsonl")]), tokenizer, seed=0)


def test_eval_files_are_used_as_given(tmp_path, tokenizer):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_rows(train, 30, [])
    write_rows(held, 5, [])
    data = prepare_data(
        DataConfig(train_files=[str(train)], eval_files=[str(held)]), tokenizer, seed=0
    )
    assert (len(data.train), len(data.eval)) == (30, 5)


def test_hash_split_is_stable_when_rows_are_added():
    rows = [r["messages"] for r in make_rows(400)]
    sides = [is_eval_row(r, 0.2, seed=7) for r in rows]
    assert 40 < sum(sides) < 120
    more = rows + [r["messages"] for r in make_rows(200, seed=3)]
    assert [is_eval_row(r, 0.2, seed=7) for r in more[:400]] == sides
    assert [is_eval_row(r, 0.2, seed=8) for r in rows] != sides


def test_dataset_hash_follows_content():
    rows = [r["messages"] for r in make_rows(10)]
    h = dataset_hash(rows[:8], rows[8:])
    assert h == dataset_hash(rows[:8], rows[8:]) and h.startswith("sha256:")
    changed = [list(r) for r in rows]
    changed[3] = [*changed[3][:-1], {"role": "assistant", "content": "mixed!"}]
    assert dataset_hash(changed[:8], changed[8:]) != h
    assert dataset_hash(rows[:7], rows[7:]) != h  # moving a row between splits changes it


def test_step_batches_do_not_depend_on_worker_count():
    order = epoch_order(100, seed=1, epoch=0)
    assert sorted(order) == list(range(100))
    assert epoch_order(100, seed=1, epoch=0) == order != epoch_order(100, seed=1, epoch=1)
    one = step_micro_batches(order, 2, effective=16, rank=0, world=1, micro=16)
    two = [step_micro_batches(order, 2, effective=16, rank=r, world=2, micro=4) for r in range(2)]
    assert [len(mb) for mb in two[0]] == [4, 4]
    flat_two = [i for rank in two for mb in rank for i in mb]
    assert flat_two == one[0] == order[32:48]
    assert not set(two[0][0] + two[0][1]) & set(two[1][0] + two[1][1])


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
    assert (tmp_path / "reviews.jsonl").read_bytes() == Path("data/reviews.jsonl").read_bytes()
