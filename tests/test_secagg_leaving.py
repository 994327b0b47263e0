"""A peer that ends its round early, for its own failure or because it is done, leaves nobody waiting.

Kept groups run rounds back to back, so a peer that an honest round held up past a message timeout
starts the next round that much later than a peer that was not held up; these tests pin the two
causes found in the efficiency benchmark's node logs (real libp2p peers on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from secagg_harness import SecAggError, SecAggSwarm, module_swarm, random_inputs, results_of

from node.secagg.messages import parse_header
from node.secagg.protocol import MaskedAllReduce, SecAggTimeouts

swarm = module_swarm("leaving", 4)

LONG_DATA = SecAggTimeouts(message=5.0, data=60.0)  # a claims wait as long as a big model's


class FailsAtClaims(MaskedAllReduce):
    """A peer whose own round fails once the others' claims have reached it, before it sends its own
    (as a peer that saw another view of U1 does): they have nothing more to send it, only to wait."""

    async def _claim_parts(self, state: Any) -> None:
        await self.transport.collect("claim", state.live, self.timeouts.data)
        raise SecAggError(f"peer {self.index}: its own failure, before claiming")


class SlowLastWord(MaskedAllReduce):
    """A peer whose digest of the total leaves a second after it has everyone else's (a loaded machine)."""

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        if kind == "total":
            await asyncio.sleep(1.0)
        return await super()._send(to, kind, data, payload, timeout)


class LosesTheReply(MaskedAllReduce):
    """A peer whose stream carrying its total breaks after the receiver took the message, before the reply
    (p2pd resets streams under load); its retry reaches a receiver that has ended its round meanwhile."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        exchange, broken = self.transport._exchange, set()

        async def delivered_then_broken(to: int, header: bytes, payload: Any) -> tuple[bool, str]:
            reply = await exchange(to, header, payload)
            if parse_header(header)[0].kind == "total" and to not in broken:
                broken.add(to)
                await asyncio.sleep(1.0)  # the receiver has everyone's total: it ends its round
                raise ConnectionError("stream reset before the reply")
            return reply

        self.transport._exchange = delivered_then_broken  # type: ignore[method-assign]


def test_a_peer_that_fails_tells_the_others_so_none_waits_for_its_deadline(swarm: SecAggSwarm) -> None:
    vectors, weights = random_inputs(4, seed=41, numel=2_000)
    sessions = swarm.sessions(vectors, weights, classes={3: FailsAtClaims}, timeouts=LONG_DATA)

    started = time.monotonic()
    outcomes = swarm.run(sessions)
    elapsed = time.monotonic() - started

    assert isinstance(outcomes[3], SecAggError)
    results = results_of(outcomes, [0, 1, 2])
    assert all(result.contributors == (0, 1, 2) for result in results)  # its parts were out, its claim never
    assert all(3 in sessions[i].transport.dead for i in range(3))
    assert elapsed < LONG_DATA.data / 2, f"the survivors waited {elapsed:.1f} s for a peer that had left"


def test_a_peer_delivers_its_last_message_before_it_ends_its_round(swarm: SecAggSwarm) -> None:
    vectors, weights = random_inputs(4, seed=42, numel=2_000)
    sessions = swarm.sessions(vectors, weights, classes={3: SlowLastWord}, timeouts=LONG_DATA)

    results = results_of(swarm.run(sessions), [0, 1, 2, 3])

    assert [sorted(s.transport.dead) for s in sessions] == [[], [], [], []]  # nobody waited out peer 3's total
    assert all(np.array_equal(result.mean, results[0].mean) for result in results)
    assert all(result.contributors == (0, 1, 2, 3) for result in results)


def test_a_retry_that_finds_the_round_ended_counts_as_delivered(swarm: SecAggSwarm) -> None:
    vectors, weights = random_inputs(4, seed=43, numel=2_000)
    sessions = swarm.sessions(vectors, weights, classes={3: LosesTheReply}, timeouts=LONG_DATA)

    results = results_of(swarm.run(sessions), [0, 1, 2, 3])

    assert sessions[3].transport.stats["stream_retries"] == 3  # its total to each of the three broke once
    assert [sorted(s.transport.dead) for s in sessions] == [[], [], [], []]  # nobody counted as gone
    assert all(np.array_equal(result.mean, results[0].mean) for result in results)
    assert all(result.contributors == (0, 1, 2, 3) for result in results)
