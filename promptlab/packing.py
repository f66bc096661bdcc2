"""Packing: a batch laid out without padding, shared prefixes stored once, for the frozen backbone.

One module owns the whole mechanism: the plan (`pack_batch`, `PackedBatch`), the inputs and 4-D mask the
backbone gets (`packed_inputs`), laying a packed KV cache back out as the padded batch (`unpack_cache`), and
the choice of when to pack at all (`should_pack`).

When to pack was decided by measurement on CPU (bench/speed.py, bench/RESULTS.md): there the dense (R, 1, S, S)
mask costs little and skipping padding and shared prefixes saves 25-50% of a training step. On a GPU the
dense mask would keep attention off its fused kernels (flash / memory-efficient SDPA need no mask or a
causal one), so a GPU gets plain padded rows; no GPU measurement has been made to overturn that.
Results are the same either way: tests/test_packing.py checks losses, gradients and generated text.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

# Cost of one attended (query, key) pair relative to one token through the linear layers, forward plus
# backward; measured on CPU with SmolLM2-135M in float32. It decides how many packed rows a batch gets.
ATTENTION_COST = 1 / 1300


@dataclass
class PackedBatch:
    """A right-padded (B, T) batch packed into (R, S) rows: no padding inside, shared prefixes stored once.

    Rows of one task that begin with the same tokens (the virtual tokens and template text, or the same
    sentence scored with several labels) share those positions: they form a tree, each node stored once per
    packed row, and a position attends only to its own node (causally) and the node's ancestors. Every
    position therefore sees exactly the keys it sees in its own padded row, at the same position ids.

    Attributes:
        source: (R, S) index into the flattened (B*T) batch of the token at each packed slot (0 at padding).
        position_ids: (R, S) that token's position in its own row.
        attention: (R, 1, S, S) bool, True where the query slot (dim 2) may attend the key slot (dim 3).
        target: (B, T) index into the flattened (R*S) packed output of each real position (0 at padding).
    """

    source: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    target: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.source.numel()


def _prefix_tree(rows: list[int], keys: list[list[tuple[int, int]]], nodes: list[list[int]],
                 paths: list[list[int]]) -> int:
    """Append the tree of ``rows`` (all starting at position 0) to ``nodes`` ([parent, start, length, row]);
    ``paths[b]`` gets the nodes row b passes through. Returns the root's index."""
    root = -1
    stack = [(rows, 0, -1)]
    while stack:
        group, start, parent = stack.pop()
        first, end = group[0], min(len(keys[b]) for b in group)
        stop = start
        while stop < end and all(keys[b][stop] == keys[first][stop] for b in group):
            stop += 1
        node = len(nodes)
        nodes.append([parent, start, stop - start, first])
        root = node if parent < 0 else root
        branches: dict[tuple[int, int], list[int]] = {}
        for b in group:
            paths[b].append(node)
            if len(keys[b]) > stop:
                branches.setdefault(keys[b][stop], []).append(b)
        stack += [(g, stop, node) for g in branches.values()]
    return root


def pack_batch(input_ids: torch.Tensor, virtual_index: torch.Tensor, attention_mask: torch.Tensor,
               tasknames: Sequence[str], attention_cost: float = ATTENTION_COST) -> PackedBatch | None:
    """Plan packing a right-padded batch (see `PackedBatch`); None when it would not save work.

    The packed width S and row count R minimise R*S*(1 + attention_cost*S) (tokens through the linear
    layers plus attended pairs) over row counts, each filled longest-first into the least loaded row.
    """
    mask = attention_mask.bool()
    if mask.shape[1] < 2 or not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None  # left padding (generation) or holes: not a training batch
    B, T = mask.shape
    lengths = mask.sum(1).tolist()
    ids, virtual = input_ids.tolist(), virtual_index.tolist()
    keys = [list(zip(ids[b][: lengths[b]], virtual[b][: lengths[b]])) for b in range(B)]
    nodes: list[list[int]] = []  # [parent, start, length, representative row]
    paths: list[list[int]] = [[] for _ in range(B)]
    by_task: dict[str, list[int]] = {}
    for b, task in enumerate(tasknames):
        by_task.setdefault(task, []).append(b)
    roots = [_prefix_tree(rows, keys, nodes, paths) for rows in by_task.values()]
    children: dict[int, list[int]] = {}
    for n, (parent, *_rest) in enumerate(nodes):
        children.setdefault(parent, []).append(n)

    def subtree(n: int) -> list[int]:  # preorder: a parent before its children
        out, stack = [], [n]
        while stack:
            m = stack.pop()
            out.append(m)
            stack += reversed(children.get(m, []))
        return out

    # units placed in packed rows: each subtree under a task root (the root is stored once per packed row)
    units = [(root, subtree(c)) for root in roots for c in children.get(root, [])]
    units += [(root, []) for root in roots if root not in children]
    units.sort(key=lambda u: -sum(nodes[n][2] for n in u[1]))
    best = None
    for count in range(1, len(units) + 1):
        loads, members = [0] * count, [dict() for _ in range(count)]  # per packed row: root -> its units
        for root, sub in units:
            size = sum(nodes[n][2] for n in sub)
            costs = [loads[k] + size + (0 if root in members[k] else nodes[root][2]) for k in range(count)]
            k = min(range(count), key=costs.__getitem__)
            loads[k] = costs[k]
            members[k].setdefault(root, []).append(sub)
        width = max(loads)
        cost = count * width * (1 + attention_cost * width)
        if best is None or cost < best[0]:
            best = (cost, width, members)
    if best is None or best[0] >= B * T * (1 + attention_cost * T):
        return None
    _, width, members = best
    count = len(members)
    source = [[0] * width for _ in range(count)]
    position = [[0] * width for _ in range(count)]
    instance = [[-1] * width for _ in range(count)]  # node instance of each slot (-1: padding)
    parents: list[int] = []  # parent instance of each instance
    slot_of: dict[tuple[int, int], tuple[int, int]] = {}  # (packed row, node) -> (instance, first slot)
    for k, placed in enumerate(members):
        at = 0
        for root, subs in placed.items():
            for n in [root] + [m for sub in subs for m in sub]:
                parent, start, length, row = nodes[n]
                inst = len(parents)
                parents.append(slot_of[(k, parent)][0] if parent >= 0 else -1)
                slot_of[(k, n)] = (inst, at)
                for j in range(length):
                    source[k][at + j] = row * T + start + j
                    position[k][at + j] = start + j
                    instance[k][at + j] = inst
                at += length
    home = {n: k for k, placed in enumerate(members) for subs in placed.values() for sub in subs for n in sub}
    target = [[0] * T for _ in range(B)]
    for b in range(B):
        k = home.get(paths[b][-1], None)
        if k is None:  # the row is its task's root alone
            k = next(k for k, placed in enumerate(members) if paths[b][0] in placed)
        for n in paths[b]:
            _, start, length, _ = nodes[n]
            first = slot_of[(k, n)][1]
            for j in range(length):
                target[b][start + j] = k * width + first + j
    n_inst = len(parents)
    ancestor = torch.eye(n_inst + 1, dtype=torch.bool)  # [x, y]: y is x or an ancestor of x; last: padding
    for x in range(n_inst):
        y = parents[x]
        while y >= 0:
            ancestor[x, y] = True
            y = parents[y]
    device = input_ids.device
    inst = torch.tensor(instance)  # (R, S); -1 indexes the padding row/column of `ancestor`
    slots = torch.arange(width)
    causal = slots[None, :] <= slots[:, None]  # (S, S): key <= query
    attention = causal[None] & ancestor[inst[:, :, None], inst[:, None, :]]  # (R, S, S)
    return PackedBatch(torch.tensor(source, device=device), torch.tensor(position, device=device),
                       attention[:, None].to(device), torch.tensor(target, device=device))


def should_pack(lm: nn.Module) -> bool:
    """Whether to pack batches for ``lm``: transformers' mask utilities take a ready (B, 1, T, T) mask with
    SDPA or eager attention (other kernels, e.g. flash-attention, get padded rows), and only on CPU (above)."""
    device = next(lm.parameters()).device
    return (device.type == "cpu" and getattr(lm.config, "_attn_implementation", None) in ("sdpa", "eager")
            and importlib.util.find_spec("transformers.masking_utils") is not None)


def packed_inputs(lm: nn.Module, embeds: torch.Tensor, plan: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) embeddings gathered into the plan's (R, S, D) rows, and the backbone's 4-D mask."""
    packed = embeds.reshape(-1, embeds.shape[-1])[plan.source]  # (R, S, D)
    mask = plan.attention  # (R, 1, S, S) bool, used as is by SDPA; eager attention adds a float mask
    if lm.config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=packed.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(packed.dtype).min)
    return packed, mask


def unpack_cache(cache, index: torch.Tensor) -> bool:
    """Lay out a packed prompt's KV cache, (R, H, S, d) per layer, as the left-padded batch's (B, H, T, d):
    ``index`` (B, T) gives the packed slot of each position. False when the cache type is not known."""
    def remap(x: torch.Tensor) -> torch.Tensor:
        flat = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])  # (R*S, H, d)
        return flat[index].transpose(1, 2).contiguous()  # (B, H, T, d)

    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        if any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return False
        for layer in layers:
            layer.keys, layer.values = remap(layer.keys), remap(layer.values)
        return True
    if isinstance(getattr(cache, "key_cache", None), list):
        cache.key_cache = [remap(k) for k in cache.key_cache]
        cache.value_cache = [remap(v) for v in cache.value_cache]
        return True
    return False
