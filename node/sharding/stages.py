"""Pipeline stages: how the run's GPT is cut, and which stage(s) a serving node should host.

The cut. A trainer keeps the embeddings, the first ``sharding.local_blocks`` blocks, the final
norm and the (tied) head, so raw bytes and labels never leave it. The remaining blocks are cut
into ``sharding.stages`` contiguous ranges of near-equal length (earlier stages take the
remainder); ``zen-node serve`` processes host them.

Block selection (after Petals' ``block_selection.py``, per stage instead of per block). A
stage's throughput is the sum of the measured throughputs (samples/s, from the signed records)
of the servers that announce it; the pipeline is as fast as its weakest stage. A new server
takes the stage(s) with the lowest throughput, ties to the lower stage number, so the swarm's
minimum rises. Rebalancing: a running server moves only if leaving its stage for the weakest
one raises the swarm's minimum by more than ``hysteresis`` (a relative margin: measured
throughputs are noisy, and a move costs a state download), and, of the servers of an
over-served stage, only the one with the smallest PeerID moves in one period, so servers that
read the same records do not all jump at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dht import PeerRecord
from node.config import DEFAULT_HYSTERESIS, ModelConfig, ShardingConfig
from node.model import GPT, build_model


def stage_ranges(n_layer: int, sharding: ShardingConfig) -> list[range]:
    """The block indices of each remote stage, in order.

    Raises:
        ValueError: sharding is off, or there are fewer remote blocks than stages.
    """
    remote = n_layer - sharding.local_blocks
    if sharding.stages < 1 or remote < sharding.stages:
        raise ValueError(
            f"cannot cut {remote} remote block(s) into {sharding.stages} stage(s); "
            "set sharding.stages in [1, model.n_layer - sharding.local_blocks]"
        )
    base, extra = divmod(remote, sharding.stages)
    ranges, start = [], sharding.local_blocks
    for stage in range(sharding.stages):
        length = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + length))
        start += length
    return ranges


class Stage(nn.Module):
    """A contiguous range of the GPT's blocks: hidden states in, hidden states out (same shape)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


def build_stage(model: ModelConfig, sharding: ShardingConfig, seed: int, stage: int) -> Stage:
    """Stage ``stage`` of the run's model, with the same initial weights as the full model built with ``seed``.

    The full model is built and sliced, so a sharded run starts exactly where an unsharded one
    does (this costs the whole model's memory once, at start; fine at this project's sizes).
    """
    blocks = stage_ranges(model.n_layer, sharding)[stage]
    full = build_model(model, seed)
    return Stage([full.blocks[i] for i in blocks])


class LocalParts(nn.Module):
    """What a trainer keeps: embeddings, the first blocks, the final norm and the tied head."""

    def __init__(self, full: GPT, local_blocks: int):
        super().__init__()
        self.wte, self.wpe, self.ln_f = full.wte, full.wpe, full.ln_f
        self.blocks = nn.ModuleList(full.blocks[:local_blocks])

    def front(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden

    def head(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.ln_f(hidden) @ self.wte.weight.T
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def stage_throughputs(records: Sequence[PeerRecord], num_stages: int, exclude: str | None = None) -> list[float]:
    """Summed server throughput (samples/s) per stage, from the records' announced stages."""
    totals = [0.0] * num_stages
    for record in records:
        if record.peer_id == exclude or "server" not in record.roles:
            continue
        for stage in record.stages:
            if stage < num_stages:
                totals[stage] += max(record.capacity.samples_per_second, 1e-9)
    return totals


def choose_stages(records: Sequence[PeerRecord], num_stages: int, count: int, me: str | None = None) -> list[int]:
    """The ``count`` stages a new server should host: the weakest first, ties to the lower number."""
    totals = stage_throughputs(records, num_stages, exclude=me)
    order = sorted(range(num_stages), key=lambda stage: (totals[stage], stage))
    return sorted(order[: max(1, min(count, num_stages))])


def rebalance_target(
    records: Sequence[PeerRecord],
    num_stages: int,
    me: str,
    current: int,
    throughput: float,
    hysteresis: float = DEFAULT_HYSTERESIS,
) -> int | None:
    """The stage this server should move to from ``current``, or None to stay.

    It moves when, without it, ``current`` would still not be the weakest stage and moving to the
    weakest raises the swarm's minimum throughput by more than ``hysteresis``; among servers of
    ``current``, only the smallest PeerID moves (the others wait for the next period's records).
    """
    others = stage_throughputs(records, num_stages, exclude=me)
    before = list(others)
    before[current] += throughput
    target = min(range(num_stages), key=lambda stage: (others[stage], stage))
    if target == current:
        return None
    after = list(others)
    after[target] += throughput
    if min(after) <= min(before) * (1 + hysteresis):
        return None
    peers_here = sorted(r.peer_id for r in records if "server" in r.roles and current in r.stages)
    if peers_here and min([*peers_here, me]) != me:
        return None
    return target
