"""Sample packing: several examples per row, each attending only to itself, same loss as padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from jobs.batching import collate, pack
from jobs.data.render import IGNORE_INDEX
from jobs.evaluation import token_loss_sum


def examples(lengths, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 3  # prompt-masked: the first third carries no loss
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


def per_example_losses_padded(model, exs):
    batch = collate(exs, pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = []
    for row, e in enumerate(exs):
        n = len(e["input_ids"])
        out.append(
            F.cross_entropy(
                logits[row, : n - 1],
                batch["labels"][row, 1:n],
                reduction="none",
                ignore_index=IGNORE_INDEX,
            )
        )
    return out


def test_rows_are_filled_first_fit_decreasing():
    exs = examples([100, 60, 50, 40, 30, 20, 10, 5])
    batch = pack(exs, max_len=128, pad_id=0)
    # 315 tokens in rows of 128: 100+20+5, 60+50+10, 40+30
    assert batch["input_ids"].shape == (3, 125)
    assert batch["attention_mask"].sum() == sum(len(e["input_ids"]) for e in exs)
    starts = ((batch["position_ids"] == 0) & (batch["attention_mask"] == 1)).sum(dim=1)
    assert starts.tolist() == [3, 3, 2]
    # the padding at a row's end is a block of its own (positions restart there too)
    assert batch["position_ids"][1, 120:].tolist() == [0, 1, 2, 3, 4]
    # every example's labels are there, minus the first token, which nothing predicts
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in exs
    )


@torch.no_grad()
def test_packed_loss_equals_padded_loss_per_example(model):
    exs = examples([90, 7, 33, 64, 12, 41, 5, 80])
    padded_sum, padded_n = token_loss_sum(model, collate(exs, pad_id=0))
    packed = pack(exs, max_len=128, pad_id=0)
    packed_sum, packed_n = token_loss_sum(model, packed)
    assert packed["input_ids"].shape[0] < len(exs)
    assert packed_n == padded_n
    assert packed_sum.item() == pytest.approx(padded_sum.item(), rel=1e-5)

    # example by example: find each one in the packed rows and compare its token losses
    # (use_cache=False, as in training: with a cache transformers ignores the position resets)
    logits = model(
        input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
    ).logits
    expected = per_example_losses_padded(model, exs)
    found = 0
    for e, ref in zip(exs, expected, strict=True):
        n = len(e["input_ids"])
        target = torch.tensor(e["input_ids"])
        for row in range(packed["input_ids"].shape[0]):
            starts = (packed["position_ids"][row] == 0).nonzero().flatten().tolist()
            for s in starts:
                if s + n <= packed["input_ids"].shape[1] and torch.equal(
                    packed["input_ids"][row, s : s + n], target
                ):
                    got = F.cross_entropy(
                        logits[row, s : s + n - 1],
                        torch.tensor(e["labels"][1:]),
                        reduction="none",
                        ignore_index=IGNORE_INDEX,
                    )
                    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
                    found += 1
    assert found == len(exs)


@torch.no_grad()
def test_examples_in_one_row_do_not_attend_to_each_other(model):
    a, b = examples([30, 30], seed=1)
    b2 = {"input_ids": [7] * 30, "labels": b["labels"]}
    row1 = pack([a, b], max_len=64, pad_id=0)
    row2 = pack([a, b2], max_len=64, pad_id=0)
    assert row1["input_ids"].shape[0] == 1  # both in one row
    out1 = model(
        input_ids=row1["input_ids"], position_ids=row1["position_ids"], use_cache=False
    ).logits
    out2 = model(
        input_ids=row2["input_ids"], position_ids=row2["position_ids"], use_cache=False
    ).logits
    first = slice(0, 30)  # equal lengths keep the input order: `a` comes first
    torch.testing.assert_close(out1[0, first], out2[0, first])
    assert not torch.allclose(out1[0, 30:60], out2[0, 30:60])
