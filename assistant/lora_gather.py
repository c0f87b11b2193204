"""Several LoRA adapters in one batch at the cost of one: a gathered matmul per layer.

PEFT serves a batch whose rows use different adapters through `adapter_names`: every LoRA layer loops
over the distinct adapters (a sub-batch, two matmuls, an index-add each), and every forward registers
and removes a hook on each of those layers. With 4 adapters in a batch of 8 on a 2-core CPU that loop
cost about a third of the throughput (docs/benchmarks.md, "Serving").

Here each LoRA linear layer keeps its adapters' weights stacked, `A` as [slots, in, r] and `B` as
[slots, r, out] with the scaling folded in (slot 0 is all zeros: the base model; an adapter with a
smaller rank is zero-padded; one that does not target this layer is all zeros). During a mixed batch
PEFT's own LoRA computation is switched off and a forward hook adds
`bmm(bmm(x, A[slot of each row]), B[slot of each row])`: the same work for 2 adapters or 8, and the
same arithmetic for a row whatever its neighbours use.

Only plain LoRA on linear layers takes this path (no DoRA or other variant, no LoRA bias); a batch
with any other kind of adapter goes through PEFT's `adapter_names` as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class GatheredLora:
    """The stacked weights and hooks for one `PeftModel`. All methods run on the generation thread."""

    def __init__(self, peft_model: Any) -> None:
        self.peft = peft_model
        self.slots: dict[str, int] = {}  # PEFT adapter name -> slot (0 is the base model)
        self.plain: set[str] = set()  # adapters this path can serve
        self._rows: Any = None  # slot of each batch row, set only during a mixed forward
        self._stacks: dict[Any, tuple[Any, Any]] = {}
        self._handles: list[Any] = []
        self._dirty = True

    def invalidate(self) -> None:
        """Adapters were added or deleted: rebuild the stacks before the next mixed batch."""
        self._dirty = True

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._stacks = [], {}

    def supports(self, internals: list[str | None]) -> bool:
        self._rebuild()
        return all(i is None or i in self.plain for i in internals)

    def slots_for(self, internals: list[str | None]) -> list[int]:
        """Each row's slot in the stacks (0: the base model)."""
        self._rebuild()
        return [self.slots[i] if i is not None else 0 for i in internals]

    def forward_for(self, internals: list[str | None]) -> Callable[..., Any]:
        """A callable like the model's forward that serves each row with its own adapter."""
        import torch

        slots = self.slots_for(internals)
        device = next(iter(self._stacks.values()))[0].device if self._stacks else None
        return self.forward_with(torch.tensor(slots, device=device))

    def forward_with(self, rows: Any, model: Any = None) -> Callable[..., Any]:
        """The same with the rows' slots given as a tensor, read at every call: the slot cache keeps one
        tensor and updates it in place, so one captured CUDA graph serves any mix of adapters. `model`:
        the PEFT model to call (default: the PEFT model itself; the slot cache may pass it compiled)."""
        model = model if model is not None else self.peft

        def forward(**kwargs: Any) -> Any:
            self._rows = rows
            try:
                return model(**kwargs)
            finally:
                self._rows = None

        return forward

    # ------------------------------------------------------------------ internals
    def _rebuild(self) -> None:
        if not self._dirty:
            return
        import torch
        from peft.tuners.lora.layer import Linear as LoraLinear

        self.close()
        names = list(self.peft.peft_config)
        self.slots = {n: i + 1 for i, n in enumerate(names)}
        plain = {n for n in names if type(self.peft.peft_config[n]).__name__ == "LoraConfig"}
        layers = []
        for module in self.peft.modules():
            if not hasattr(module, "lora_A"):
                continue
            for n in module.lora_A:
                if not isinstance(module, LoraLinear) or n in module.lora_variant or module.lora_bias.get(n):
                    plain.discard(n)
            if isinstance(module, LoraLinear):
                layers.append(module)
        for module in layers:
            present = [n for n in names if n in module.lora_A and n in plain]
            if not present:
                continue
            a0 = module.lora_A[present[0]].weight
            rank = max(module.lora_A[n].weight.shape[0] for n in present)
            fan_in, fan_out = a0.shape[1], module.lora_B[present[0]].weight.shape[0]
            a = torch.zeros((len(names) + 1, fan_in, rank), dtype=a0.dtype, device=a0.device)
            b = torch.zeros((len(names) + 1, rank, fan_out), dtype=a0.dtype, device=a0.device)
            with torch.no_grad():
                for n in present:
                    wa, wb = module.lora_A[n].weight, module.lora_B[n].weight  # [r, in], [out, r]
                    r = wa.shape[0]
                    a[self.slots[n], :, :r] = wa.t()
                    b[self.slots[n], :r, :] = wb.t() * module.scaling[n]
            self._stacks[module] = (a, b)
            self._handles.append(module.register_forward_hook(self._hook))
        self.plain = plain
        self._dirty = False

    def _hook(self, module: Any, args: tuple[Any, ...], output: Any) -> Any:
        rows = self._rows
        if rows is None:
            return None
        import torch

        a, b = self._stacks[module]
        x = args[0]
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1]).to(a.dtype)  # [batch, tokens, in]
        delta = torch.bmm(torch.bmm(x3, a.index_select(0, rows)), b.index_select(0, rows))
        return output + delta.reshape(*shape[:-1], delta.shape[-1]).to(output.dtype)
