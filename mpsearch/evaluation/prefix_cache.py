"""Reuse the activations of an identically quantized prefix of the network across evaluations.

Consecutive evaluations in a search often agree on the precisions of the first layers (the
pinned stem, a greedy walk that lowers one late layer at a time, siblings of one parent). For a
model whose forward pass is a chain of stages (timm's ResNets: stem, each residual block, pool,
classifier), the output of every stage up to the first one holding a layer whose precision
changed is the same as last time, so it is kept per image batch and the forward pass resumes
from there. Results are bitwise identical: the same modules run on the same tensors. A stage
whose parameters or buffers were modified since (fine-tuning) counts as changed.

Stages are the model's top-level children, flattened through ``nn.Sequential`` containers, in
registration order. That this chain *is* the model's forward pass is checked once, on a real
batch, against ``model(x)`` (exact equality); a model whose forward does more (a ViT adds
position embeddings between its children) fails the check and is evaluated without the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["sequential_stages", "PrefixCache"]


def sequential_stages(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children flattened through ``nn.Sequential`` containers, in registration order."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Sequential) and len(child):
                walk(f"{prefix}{name}.", child)
            else:
                out.append((f"{prefix}{name}", child))

    walk("", module)
    return out


class PrefixCache:
    """Per batch, the stage inputs of the last policy evaluated on one split part, reused by the next.

    ``signature(layer)`` gives whatever decides a layer's quantized behaviour (its precision);
    only inputs of stages that hold a policy layer are kept (a resumption point is always such a
    stage). One split part (the last one evaluated) is kept, and at most ``max_bytes`` of it:
    batches beyond that are recomputed, so a pass over a whole test split costs no memory.
    """

    def __init__(self, module: nn.Module, policy_layers: Iterable[str], *, max_bytes: int = 512 << 20) -> None:
        self.module = module
        self.stages = sequential_stages(module)
        layers = list(policy_layers)
        self.stage_layers = [[n for n in layers if n == name or n.startswith(name + ".")] for name, _ in self.stages]
        self.max_bytes = max_bytes
        self.usable: bool | None = None  # decided by the first check
        self._key: Any = None
        self._sig: list[Any] | None = None
        self._outs: list[dict[int, torch.Tensor]] = []
        self.stages_run = 0
        self.stages_reused = 0

    def _tensor_versions(self, stage: int) -> tuple:
        """Identity and in-place version counter of every parameter and buffer of a stage: training
        (fine-tuning, LSQ step sizes, batch-norm statistics) changes them, and a stage whose
        tensors changed is recomputed even if its layers' precisions did not."""
        module = self.stages[stage][1]
        return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))

    def _forward_from(self, h: torch.Tensor, first: int, keep: dict[int, torch.Tensor] | None) -> torch.Tensor:
        for i in range(first, len(self.stages)):
            if keep is not None and self.stage_layers[i]:
                keep[i] = h
            h = self.stages[i][1](h)
            self.stages_run += 1
        return h

    def check(self, x: torch.Tensor) -> bool:
        """Whether the stage chain reproduces ``module(x)`` exactly (decided once)."""
        if self.usable is None:
            try:
                with torch.inference_mode():
                    self.usable = bool(torch.equal(self._forward_from(x, 0, None), self.module(x)))
            except Exception:  # noqa: BLE001 - a forward that needs more than chained children: no cache
                self.usable = False
            self.stages_run = 0
        return self.usable

    def logits(
        self, key: Any, signature: Callable[[str], Any], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, labels) per batch of ``batches`` (the same batches every time for ``key``)."""
        sig = [(tuple(signature(n) for n in names), self._tensor_versions(i)) for i, names in enumerate(self.stage_layers)]
        old_sig, old_outs = (self._sig, self._outs) if key == self._key else (None, [])
        self._key, self._sig, self._outs = None, None, []  # until this pass completes
        first = 0
        if old_sig is not None:  # the first stage whose layers changed holds a layer, so its input was kept
            first = next((i for i in range(len(sig)) if sig[i] != old_sig[i]), -1)
            if first < 0:  # the same policy again: rerun from the last stage that holds a layer
                first = max((i for i, names in enumerate(self.stage_layers) if names), default=0)
        room = self.max_bytes
        outs: list[dict[int, torch.Tensor]] = []
        for b, (x, y) in enumerate(batches):
            kept = old_outs[b] if b < len(old_outs) else {}
            start = first if first in kept else 0
            keep = {i: t for i, t in kept.items() if i <= start}
            h = kept[start] if start else x
            self.stages_reused += start
            out = self._forward_from(h, start, keep)
            size = sum(t.numel() * t.element_size() for t in keep.values())
            if size <= room:
                room -= size
                outs.append(keep)
            else:
                outs.append({})  # over the memory budget: recomputed next time
            yield out, y
        self._key, self._sig, self._outs = key, sig, outs
