"""Chunked logits (jobs/logits.py): the SFT loss, DPO's and GRPO's log-probs equal the whole-logit
computation they replace, values and gradients, for chunks smaller than, equal to and larger
than the scored rows; the whole [tokens x vocab] logits are never built; a model that changes
its logits after the head is reproduced (Gemma2's softcapping) or refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import jobs.logits
from jobs.evaluation import token_loss_sum
from jobs.objectives.dpo import answer_token_logps
from jobs.rollout import completion_logps

VOCAB, ROWS, LEN = 97, 3, 9


def tiny_llama(tied: bool = False, lora: bool = True):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        for name, p in model.named_parameters():  # non-zero B: every LoRA tensor gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (ROWS, LEN), generator=g)
    attention = torch.ones_like(ids)
    attention[0, -2:] = 0  # a padded row
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    completion[0, -2:] = 0
    labels = ids.masked_fill(completion == 0, -100)
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "labels": labels,
        "completion_mask": completion,
    }


# today's whole-logit code, as it was before jobs/logits.py
def whole_sft(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum"
    )


def whole_dpo(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["input_ids"][:, 1:].masked_fill(b["completion_mask"][:, 1:] == 0, -100)
    return -F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")


def grpo_batch(b):
    return {
        "prompt_ids": b["input_ids"][:, :4],
        "prompt_mask": b["attention_mask"][:, :4],
        "completion_ids": b["input_ids"][:, 4:],
        "completion_mask": b["completion_mask"][:, 4:],
    }


def whole_grpo(model, g, temperature):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    ids = torch.cat([g["prompt_ids"], g["completion_ids"]], dim=1)
    mask = torch.cat([g["prompt_mask"], g["completion_mask"]], dim=1)
    width = g["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1 : -1]
    logits = logits.float() / temperature
    keep = g["completion_mask"]  # padding positions: 0 in the chunked result
    return selective_log_softmax(logits, g["completion_ids"]) * keep, entropy_from_logits(
        logits
    ) * keep


def values_and_grads(model, fn):
    model.zero_grad()
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum(o.sum() * (i + 1) for i, o in enumerate(outs)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def assert_same(model, chunked, whole):
    got, got_grads = values_and_grads(model, chunked)
    want, want_grads = values_and_grads(model, whole)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)


# 13 positions are scored (3 in the padded row, 5 in each other): chunks of 4 (a short last one), 13, 1024
@pytest.mark.parametrize("chunk", [4, 13, 1024])
@pytest.mark.parametrize("tied,lora", [(False, True), (True, False)])
def test_chunked_equals_whole_logits(monkeypatch, chunk, tied, lora):
    monkeypatch.setattr(jobs.logits, "CHUNK_ROWS", chunk)
    model, b = tiny_llama(tied, lora), batch()
    assert_same(model, lambda: token_loss_sum(model, b)[0], lambda: whole_sft(model, b))
    assert_same(model, lambda: answer_token_logps(model, b), lambda: whole_dpo(model, b))
    g = grpo_batch(b)
    assert_same(model, lambda: completion_logps(model, g, 0.7), lambda: whole_grpo(model, g, 0.7))


def test_whole_logits_are_never_built(monkeypatch):
    monkeypatch.setattr(jobs.logits, "CHUNK_ROWS", 4)
    model, b = tiny_llama(), batch()
    shapes = []
    head = model.get_base_model().lm_head
    head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    token_loss_sum(model, b)[0].backward()
    answer_token_logps(model, b).sum().backward()
    completion_logps(model, grpo_batch(b), 1.0)[0].sum().backward()
    assert shapes and all(s[:-1].numel() <= 4 for s in map(torch.Size, shapes)), shapes


def test_softcapped_logits_are_reproduced_and_unknown_changes_refused():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=2.0,  # small: the capping changes every logit
    )
    model, b = Gemma2ForCausalLM(config), batch()
    torch.testing.assert_close(token_loss_sum(model, b)[0], whole_sft(model, b))
    llama = tiny_llama(lora=False)
    llama.config.logit_scale = 2.0  # a scale Llama's forward does not apply: Head would
    with pytest.raises(ValueError, match="changes its logits after its output layer"):
        token_loss_sum(llama, b)
