"""Many LoRA adapters on one base model, each batch row with its own adapter (gathered matmuls).

peft's mixed-adapter path (`adapter_names=`) loops over the adapters of a batch in every LoRA
layer and walks all modules to install hooks on every forward call; on the tiny CPU model that made
a 4-adapter batch 2.1x slower than the base. Here each targeted linear layer keeps a stack of
adapter slots (A: [slots, rank, in], B: [slots, out, rank]) and one gathered bmm applies every
row's own adapter at once (the punica / S-LoRA scheme). Slot 0 is all zeros: base rows, and
adapters that do not target the layer, read it. Loading an adapter copies its matrices into a
slot: no modules are created.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from inference.errors import AdapterIncompatible


class RowSlots:
    """The slot of every row of the batch being generated, shared by all MultiLoraLinear."""

    def __init__(self):
        self.index: torch.Tensor | None = None  # [rows]; None: no row uses an adapter
        self.generation = 0  # changes with every batch: layers then gather their rows' weights


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, slots: int, rows: RowSlots):
        super().__init__()
        self.base = base
        self.rows = rows
        self.slots = slots
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("A", torch.zeros(slots, 0, base.in_features, **kw), persistent=False)
        self.register_buffer("B", torch.zeros(slots, base.out_features, 0, **kw), persistent=False)
        self.rank = torch.zeros(slots, dtype=torch.long)  # live rank of each slot
        self._gathered: tuple | None = None  # (generation, (A rows, B rows) or None)

    def grow(self, rank: int) -> None:
        """Widen every slot to `rank` (zero-padded: a padded rank adds nothing to the output)."""
        have = self.A.shape[1]
        if rank <= have:
            return
        pad = rank - have
        self.A = torch.cat([self.A, self.A.new_zeros(self.slots, pad, self.A.shape[2])], dim=1)
        self.B = torch.cat([self.B, self.B.new_zeros(self.slots, self.B.shape[1], pad)], dim=2)

    def put(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        r = a.shape[0]
        self.grow(r)
        self.clear(slot)
        self.A[slot, :r] = a.to(self.A.dtype)
        # The scale lives in B: one op fewer per layer and step than peft's `B(A(x)) * scale`.
        self.B[slot, :, :r] = (b.float() * scale).to(self.B.dtype)
        self.rank[slot] = r

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.rank[slot] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        index = self.rows.index
        if index is None:
            return out
        if x.dim() != 3 or x.shape[0] != index.shape[0]:
            raise ValueError(
                f"per-row adapters need [rows, tokens, features] inputs; got {tuple(x.shape)} "
                f"for {index.shape[0]} rows"
            )
        gathered = self._rows_weights(index)
        if gathered is None:
            return out
        a, b = gathered
        # Two ops per layer and step: [rows, tokens, in] @ [rows, in, r], then added in place.
        return out.baddbmm_(torch.bmm(x, a), b)

    def _rows_weights(self, index: torch.Tensor) -> tuple | None:
        """Each row's A^T and scaled B^T, gathered once per batch (the rows' slots do not change
        while it generates), not once per decoding step."""
        if self._gathered is None or self._gathered[0] != self.rows.generation:
            r = int(self.rank.max())  # only as wide as the widest adapter in this layer
            weights = None
            if r > 0:
                weights = (
                    self.A[index, :r].transpose(1, 2).contiguous(),  # [rows, in, r]
                    self.B[index, :, :r].transpose(1, 2).contiguous(),  # [rows, r, out]
                )
            self._gathered = (self.rows.generation, weights)
        return self._gathered[1]


# peft saves keys without the adapter name: base_model.model.<module>.lora_A.weight
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def lora_scale(config: dict, module: str, rank: int) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA), with peft's per-module alpha_pattern."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def unsupported_features(config: dict) -> list[str]:
    """LoRA variants whose forward is not plain base + scale * B(A(x))."""
    found = []
    if config.get("use_dora"):
        found.append("DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append("trained biases")
    if config.get("modules_to_save"):
        found.append("modules_to_save (fully trained layers)")
    return found


def split_lora_weights(state_dict: dict[str, torch.Tensor], name: str) -> dict[str, tuple]:
    """{module: (A, B)} from a peft state dict; AdapterIncompatible if anything else is in it."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = LORA_KEY.match(key)
        if m is None or tensor.ndim != 2:
            raise AdapterIncompatible(
                f"adapter {name!r} has a weight this server cannot load: {key} (only LoRA "
                "A/B matrices on linear layers are served)"
            )
        parts.setdefault(m["module"], {})[m["ab"]] = tensor
    incomplete = [module for module, ab in parts.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise AdapterIncompatible(f"adapter {name!r} lacks lora_A or lora_B for {incomplete[0]}")
    return {module: (ab["A"], ab["B"]) for module, ab in parts.items()}


class MultiLora:
    """Installs MultiLoraLinear layers into a base model on demand and assigns adapter slots."""

    def __init__(self, model: nn.Module, max_adapters: int):
        self.model = model
        self.rows = RowSlots()
        self.slots = max_adapters + 1  # slot 0: no adapter
        self.free = list(range(1, self.slots))
        self.slot_of: dict[str, int] = {}
        self.layers: dict[str, MultiLoraLinear] = {}
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def layer(self, module: str) -> MultiLoraLinear:
        if module not in self.layers:
            parent_name, _, child = module.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapped = MultiLoraLinear(self.linears[module], self.slots, self.rows)
            setattr(parent, child, wrapped)
            self.layers[module] = wrapped
        return self.layers[module]

    def load(self, key: str, config: dict, weights: dict[str, tuple], device) -> None:
        if not self.free:
            raise RuntimeError(f"no free adapter slot for {key}: unload one first")
        slot = self.free.pop(0)
        for module, (a, b) in weights.items():
            self.layer(module).put(
                slot, a.to(device), b.to(device), lora_scale(config, module, a.shape[0])
            )
        self.slot_of[key] = slot

    def unload(self, key: str) -> None:
        slot = self.slot_of.pop(key)
        for layer in self.layers.values():
            layer.clear(slot)
        self.free.append(slot)

    def set_rows(self, adapters: list[str | None], device) -> None:
        self.rows.generation += 1
        if all(a is None for a in adapters):
            self.rows.index = None
        else:
            slots = [0 if a is None else self.slot_of[a] for a in adapters]
            self.rows.index = torch.tensor(slots, device=device)
