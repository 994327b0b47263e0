"""Batching a stage's forward calls: the requests that arrive together run as one pass.

As in hivemind.moe's TaskPool, the first forward waits up to ``batch_wait`` seconds for others of
the same stage, up to ``max_batch`` rows in all; the ones of the same sequence length are then
concatenated, run at once, and each caller gets its own rows back. One failing pass fails only
the callers in it. Each caller also gets the stage's version the pass ran at (read on the compute
thread with the pass, so a commit landing before the reply cannot make it name weights it did not use).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import torch

# one forward through the stage, off the event loop: its output and the stage's version it ran at
StagePass = Callable[[torch.Tensor], Awaitable[tuple[torch.Tensor, int]]]
Pending = tuple[torch.Tensor, "asyncio.Future[tuple[torch.Tensor, int]]"]


class ForwardBatcher:
    """The forward queue of one hosted stage (lives on the server's event loop).

    Args:
        run_pass: runs a batch of hidden states through the stage and returns its output.
        max_batch: rows (sequences) one pass may hold.
        batch_wait: seconds the first forward of a batch waits for others.
    """

    def __init__(self, run_pass: StagePass, max_batch: int, batch_wait: float):
        self.run_pass = run_pass
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()

    async def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The stage's output for ``hidden`` (on CPU), computed in a batch with those that arrived with it, and the
        stage's version that pass ran at."""
        future: asyncio.Future[tuple[torch.Tensor, int]] = asyncio.get_running_loop().create_future()
        await self._queue.put((hidden, future))
        return await future

    async def run(self) -> None:
        """Take batches off the queue and run them, until cancelled."""
        while True:
            items = await self._collect()
            for length in {hidden.shape[1] for hidden, _ in items}:
                await self._run_group([(h, f) for h, f in items if h.shape[1] == length])

    async def _collect(self) -> list[Pending]:
        """The next forward and those that arrive within ``batch_wait`` of it, up to ``max_batch`` rows."""
        items = [await self._queue.get()]
        deadline = time.monotonic() + self.batch_wait
        rows = items[0][0].shape[0]
        while rows < self.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                item = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                break
            items.append(item)
            rows += item[0].shape[0]
        return items

    async def _run_group(self, group: list[Pending]) -> None:
        """One pass over forwards of the same sequence length; each future gets its rows (and the version) or the
        error."""
        try:
            output, version = await self.run_pass(torch.cat([h for h, _ in group]))
        except Exception as e:
            for _, future in group:
                if not future.done():
                    future.set_exception(e)
            return
        pieces = output.cpu().split([h.shape[0] for h, _ in group])
        for (_, future), piece in zip(group, pieces, strict=True):
            if not future.done():
                future.set_result((piece, version))
