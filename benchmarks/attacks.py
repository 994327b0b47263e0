"""Deviating peers against the masked all-reduce: one row per attack, what leaks and what it costs honest peers.

Real libp2p peers on 127.0.0.1 and real crypto, driven by the tests' malicious-peer harness
(``tests/secagg_harness.py``); each attack is the deviation a test of ``tests/test_secagg_*.py`` or
``tests/test_dp_accounting.py`` exercises. Every attack is bounded by --timeout::

    python benchmarks/attacks.py --json
    python benchmarks/attacks.py --only isolate_victim,forged_sum --peers 5 --numel 10000 --json
    python benchmarks/attacks.py --integrity --json   # issue 15's rows instead: benchmarks/integrity.py --help

Attacks: ``ATTACKS`` below and --help (n = --peers). The harness forges no value words, so ``value_range``
reaches the value-range check through the weight word (weight check passed, values decoded too large).

JSON fields (one line): ``peers``, ``numel``, ``message_timeout``, ``data_timeout`` (the sessions';
the flood's are 20 / 30 s, to outlast it), ``cpu_count``, ``honest_baseline_seconds`` (median of 3 clean
rounds after a warm-up, slowest peer), ``attacks``: per row ``attack``, ``leaked`` (see ``leaked``),
``result_consistent`` (honest peers that decoded got the same U and mean), ``releases_counted_ok`` (DP:
each ledger and accountant count equals the rounds whose parts another peer received; else null),
``honest_seconds`` (slowest honest peer), ``cost_ratio`` (over the baseline), ``detected`` (every
attacker named by an honest peer: see ``named_peers``; null where the protocol cannot name one),
``honest_outcome``, ``details`` (honest peers named or revealing, secrets exposed, first error), ``error``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from nacl.public import PrivateKey
from nacl.signing import SigningKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the harness lives with the tests

from secagg_harness import DroppingAllReduce, MaliciousAllReduce, SecAggSwarm, colluders_can_unmask, deviating

from node.config import CompressionConfig
from node.secagg.fixed_point import WEIGHT_FLOOR, FixedPointCodec
from node.secagg.messages import NO_BOUND, Message
from node.secagg.privacy import NoiseShare, PrivacyAccountant, ReleaseLedger, ReleaseRefused
from node.secagg.protocol import MaskedAllReduce, SecAggError, SecAggResult, SecAggTimeouts

PEER: ContextVar[int | None] = ContextVar("attacks_peer", default=None)  # which session logged a record
FLOOD_TIMEOUTS = SecAggTimeouts(message=20.0, data=30.0)
Body = Callable[[list[float]], Coroutine[Any, Any, list[Any]]]  # a scenario: sessions' seconds in, outcomes out
Row = dict[str, Any]  # one attack's JSON row
Classes = dict[int, type[MaskedAllReduce]]  # the deviating peers' classes, by index
DP_SHARE = NoiseShare(noise_multiplier=1.0, clip_norm=1.0, max_dropouts=1)


class SumForger(MaliciousAllReduce):
    """A holder that withholds its partial sums (``sum_offset`` None) or adds ``sum_offset + recipient`` to
    word 0 of each (a different forged sum for every recipient)."""

    sum_offset: int | None = 0

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        if kind == "sum" and self.sum_offset is None:
            return True  # pretend it left
        if kind == "sum" and self.sum_offset:
            words = np.frombuffer(bytearray(payload), np.uint32)  # a copy: the workspace buffer stays intact
            words[:1] += np.uint32((self.sum_offset + to) % (1 << 32))  # wraps in the ring
            payload = words.tobytes()
        return await super()._send(to, kind, data, payload, timeout)


class RevealOrder(MaliciousAllReduce):
    """The liar (``corrupt_reveal``) reveals first; honest peers hold their reveals until it reached every peer."""

    gate: asyncio.Event
    acknowledged = 0

    async def _send(self, to: int, kind: str, data: dict[str, Any], payload: Any = b"", timeout: float = 0) -> bool:
        if kind == "reveal" and not self.corrupt_reveal:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gate.wait(), self.timeouts.message)
        delivered = await super()._send(to, kind, data, payload, timeout)
        self.acknowledged += kind == "reveal" and self.corrupt_reveal  # the liar counts its delivered reveals
        if self.acknowledged == self.n - 1:
            self.gate.set()
        return delivered


class LogCapture(logging.Handler):
    """Keeps (session index or None, level, message) of every node.secagg record."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int | None, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((PEER.get(), record.levelno, record.getMessage()))


class Played(NamedTuple):  # one attacked round: its sessions, how each ended, their seconds, the logs it left
    sessions: list[MaskedAllReduce]
    outcomes: list[Any]
    seconds: list[float]
    logs: list[tuple[int | None, int, str]]


async def timed(i: int, session: MaskedAllReduce, seconds: list[float]) -> Any:
    """Run one session (its log records tagged with ``i``); its wall seconds go to ``seconds[i]``."""
    PEER.set(i)
    started = time.perf_counter()
    try:
        return await session.run()
    finally:
        seconds[i] = time.perf_counter() - started


class Bench:
    """The swarms, inputs and bookkeeping every attack shares."""

    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args, self.folder, self.n = args, folder, args.peers
        self.timeouts = SecAggTimeouts(message=args.message_timeout, data=args.data_timeout)
        self.capture = LogCapture()
        logging.getLogger("node.secagg").addHandler(self.capture)
        logging.getLogger("node.secagg").setLevel(logging.INFO)
        self.swarm = SecAggSwarm(folder / "main", size=self.n)
        self.baseline = math.nan

    def inputs(self, seed: int, scale: float = 0.3) -> tuple[list[np.ndarray], list[float]]:
        rng = np.random.default_rng(seed)
        vectors = [(rng.standard_normal(self.args.numel) * scale).astype(np.float32) for _ in range(self.n)]
        return vectors, [float(w) for w in rng.uniform(0.3, 1.0, self.n)]

    def sessions(self, vectors: list[np.ndarray], weights: list[float], **options: Any) -> list[MaskedAllReduce]:
        return self.swarm.sessions(vectors, weights, record_view=True, **{"timeouts": self.timeouts} | options)

    def play(
        self, sessions: list[MaskedAllReduce], swarm: SecAggSwarm | None = None, body: Body | None = None
    ) -> Played:
        """Run the sessions (or ``body``) bounded by --timeout; TimeoutError past it (the round is cancelled)."""
        swarm = swarm or self.swarm
        seconds = [math.nan] * len(sessions)

        async def everyone(seconds: list[float]) -> list[Any]:
            return await asyncio.gather(*(timed(i, s, seconds) for i, s in enumerate(sessions)), return_exceptions=True)

        first = len(self.capture.records)
        try:
            scenario = asyncio.wait_for((body or everyone)(seconds), self.args.timeout)
            outcomes = swarm.call(scenario, timeout=self.args.timeout + 30)
        finally:
            for session, endpoint in zip(sessions, swarm.endpoints, strict=False):
                endpoint.unregister(session)
        return Played(sessions, outcomes, seconds, self.capture.records[first:])

    def measure_baseline(self) -> float:
        """Median over 3 clean rounds (after one warm-up) of the slowest peer's seconds."""
        times = []
        for seed in range(4):
            vectors, weights = self.inputs(seed=100 + seed)
            played = self.play(self.sessions(vectors, weights))
            if failed := [o for o in played.outcomes if not isinstance(o, SecAggResult)]:
                raise RuntimeError(f"a clean round failed: {failed[0]!r}")
            times.append(max(played.seconds))
        self.baseline = statistics.median(times[1:])
        return self.baseline


@dataclass
class Scene:
    """What a row is judged against: the inputs, the attackers (everyone else is honest), the code, the PeerIDs."""

    vectors: list[np.ndarray]
    weights: list[float]
    attackers: list[int]
    codec: FixedPointCodec  # its bound clips the inputs; its scale sets the leak tolerance
    peer_ids: list[str]
    names: bool = True  # False: the protocol cannot name this attacker (``detected`` is null)

    @property
    def honest(self) -> list[int]:
        return [i for i in range(len(self.vectors)) if i not in self.attackers]


def leaked(results: list[SecAggResult], scene: Scene, colluders: list[int]) -> bool:
    """Whether the colluders, subtracting their weighted inputs from a decoded result (any peer's: a result is
    applied and served) or from the difference of two, get an honest weighted input within 400 n / scale."""
    tolerance, b = 100 * 4 * scene.codec.group_size / scene.codec.scale, scene.codec.bound
    weighted = [w * np.clip(x.astype(np.float64), -b, b) for x, w in zip(scene.vectors, scene.weights, strict=True)]
    distinct = {(r.contributors, r.mean.tobytes()): r for r in results}.values()
    candidates = [
        r.mean.astype(np.float64) * r.weight_sum - sum((weighted[m] for m in colluders if m in r.contributors), 0.0)
        for r in distinct
    ]
    candidates += [a - b for a, b in itertools.combinations(candidates, 2)]
    return any(float(np.abs(c - weighted[j]).max()) <= tolerance for c in candidates for j in scene.honest)


def named_peers(played: Played, scene: Scene) -> set[int]:
    """Peers an honest session names: blamed, bad shares, a blame or refusal in its logs, or its error."""
    honest, named = scene.honest, set()
    for i in honest:
        named |= set(played.sessions[i].state.blamed) | set(played.sessions[i].state.bad_shares)
    texts = [str(played.outcomes[i]) for i in honest if isinstance(played.outcomes[i], BaseException)]
    texts += [  # an honest session's blames, and refusals logged by an endpoint (no session: None)
        message
        for peer, level, message in played.logs
        if level >= logging.WARNING
        and (peer is None or peer in honest)
        and ("blamed" in message or ("refused a secure" in message and "finished" not in message))
    ]
    for j, peer_id in enumerate(scene.peer_ids):  # its PeerID, or its index where an error means the sender
        pattern = re.compile(rf"\bblamed peer {j}\b|part \d+ from peer {j}\b|\bpeer {j} summed|{re.escape(peer_id)}")
        named |= {j} if any(pattern.search(text) for text in texts) else set()
    return named


def judge(name: str, played: Played, scene: Scene, releases_ok: bool | None = None, details: Row | None = None) -> Row:
    """The row of one attacked round (the module docstring says what each field means)."""
    outcomes, honest = played.outcomes, scene.honest
    colluders = [a for a in scene.attackers if a < len(played.sessions)]  # the flooder is outside the group
    decoded = [outcomes[i] for i in honest if isinstance(outcomes[i], SecAggResult)]
    consistent = all(
        r.contributors == decoded[0].contributors and np.array_equal(r.mean, decoded[0].mean) for r in decoded[1:]
    )
    if not consistent:  # how far apart the honest means are
        details = dict(details or {}, result_spread=max(float(np.abs(r.mean - decoded[0].mean).max()) for r in decoded))
    errors = [outcomes[i] for i in honest if isinstance(outcomes[i], BaseException)]
    named = named_peers(played, scene)
    revealed = [i for i in honest if "reveal" in dict(played.sessions[i].stats["phases"])]
    details = dict(details or {}, honest_named=sorted(named & set(honest)), honest_revealed=revealed)
    details["secrets_exposed"] = colluders_can_unmask(played.sessions, colluders, honest) if colluders else None
    details["unclean_errors"] = [repr(e)[:160] for e in errors if not isinstance(e, SecAggError | ReleaseRefused)]
    details["honest_error"] = str(errors[0])[:160] if errors else None
    outcome = "all decoded" if len(decoded) == len(honest) else f"{len(decoded)} of {len(honest)} decoded"
    return {
        "attack": name,
        "leaked": leaked([o for o in outcomes if isinstance(o, SecAggResult)], scene, colluders),
        "result_consistent": consistent,
        "releases_counted_ok": releases_ok,
        "honest_seconds": round(max(played.seconds[i] for i in honest), 4),
        "cost_ratio": None,
        "detected": set(scene.attackers) <= named if scene.names else None,
        "honest_outcome": "all failed" if not decoded else outcome,
        "details": details,
        "error": None,
    }


def group_ids(swarm: SecAggSwarm) -> list[str]:
    return [str(p2p.peer_id) for p2p in swarm.p2ps]


def received_parts(sessions: list[MaskedAllReduce]) -> set[int]:
    """The peers whose masked parts another peer received: a DP release on the wire."""
    return {m.sender for s in sessions for m in s.view or [] if m.kind == "part" and m.sender != s.index}


def simple_attack(bench: Bench, name: str, classes: Classes, attackers: list[int], **options: Any) -> Row:
    """One round with the given deviating classes (options: seed, scale, names, and session options)."""
    seed, scale, names = options.pop("seed"), options.pop("scale", 0.3), options.pop("names", True)
    vectors, weights = bench.inputs(seed, scale)
    played = bench.play(bench.sessions(vectors, weights, classes=classes, **options))
    bits = options.get("compression", CompressionConfig()).bits
    codec = FixedPointCodec(bench.n, options.get("bound", 1.0), bits)
    return judge(name, played, Scene(vectors, weights, attackers, codec, group_ids(bench.swarm), names))


def bad_box(bench: Bench, name: str) -> Row:
    return simple_attack(bench, name, {bench.n - 1: deviating("BadBox", bad_box_to=(1,))}, [bench.n - 1], seed=21)


def isolate_victim(bench: Bench, name: str) -> Row:
    victim, colluders = 0, [1, 2]
    attacker = deviating("Isolate", bad_box_to=tuple(range(3, bench.n)), claim_maskset=(victim, *colluders))
    return simple_attack(bench, name, dict.fromkeys(colluders, attacker), colluders, seed=5)


def equivocate_claims(bench: Bench, name: str) -> Row:
    n, colluders = bench.n, [1, 2]
    targets = [j for j in range(n) if j not in colluders][-2:]  # to each: "I did not mask with you"
    split = {t: tuple(j for j in range(n) if j != t) for t in targets}
    attacker = deviating("Equivocate", claim_to=split)
    return simple_attack(bench, name, dict.fromkeys(colluders, attacker), colluders, seed=31)


def forged_bound(bench: Bench, name: str) -> Row:
    attacker = deviating("TwoBounds", bound_exp_to={2: -1})  # 0.5 to peer 2; the others agree on about 0.03
    low_bits = {"compression": CompressionConfig(bits=8), "adaptive_bound": True, "scale": 0.01}
    return simple_attack(bench, name, {1: attacker}, [1], seed=41, **low_bits)


def low_order_keys(bench: Bench, name: str, to_all: bool) -> Row:
    to = tuple(j for j in range(bench.n) if j != 1) if to_all else (min(3, bench.n - 1),)
    return simple_attack(bench, name, {1: deviating("LowOrder", low_order_keys_to=to)}, [1], seed=7)


def forged_weight_word(bench: Bench, name: str, at_floor: bool) -> Row:
    """The weight sum forged to 1 ring unit (the mean explodes), or to |U| x the floor (the values overflow)."""
    n, attacker, (_, weights) = bench.n, bench.n - 1, bench.inputs(seed=13)
    codec = FixedPointCodec(group_size=n, bound=1.0)
    others = sum(codec.encode_weight(w) for w in weights[:attacker])
    word = n * codec.encode_weight(WEIGHT_FLOOR) - others if at_floor else -others + 1
    classes: Classes = {attacker: deviating("Forger", weight_word=word)}
    return simple_attack(bench, name, classes, [attacker], seed=13, names=False)


def corrupt_reveal(bench: Bench, name: str) -> Row:
    liar, gate = 2, asyncio.Event()  # bound to the swarm's loop at its first wait
    classes: Classes = {
        i: type(f"Peer{i}", (RevealOrder,), {"gate": gate, "corrupt_reveal": i == liar}) for i in range(bench.n)
    }
    return simple_attack(bench, name, classes, [liar], seed=11)


def dp_round(bench: Bench, name: str, classes: Classes, attackers: list[int], **options: Any) -> Row:
    """A DP round (a permit, a ledger and an accountant per peer), then a retry on the same inputs, no permit."""
    share, bound, retry = options.get("share", DP_SHARE), options.get("bound", 11.0), options.get("retry", True)
    vectors, weights = bench.inputs(seed=options.get("seed", 3))
    ledgers = [ReleaseLedger() for _ in range(bench.n)]
    accountants = [PrivacyAccountant(1.0, 1e-5, math.inf, ledger=ledger) for ledger in ledgers]
    for accountant in accountants:
        accountant.permit_round()

    def with_noise(sessions: list[MaskedAllReduce]) -> list[MaskedAllReduce]:
        for session, ledger in zip(sessions, ledgers, strict=True):
            session.noise = NoiseShare(share.noise_multiplier, share.clip_norm, share.max_dropouts, ledger=ledger)
        return sessions

    played = bench.play(with_noise(bench.sessions(vectors, weights, classes=classes, bound=bound)))
    wire = [int(i in received_parts(played.sessions)) for i in range(bench.n)]
    details: dict[str, Any] = {}
    if retry:  # hivemind would retry a failed step on the same tensors: no new permit, so nothing may leave
        again = bench.play(with_noise(bench.sessions(vectors, weights, bound=bound)))
        wire = [w + int(i in received_parts(again.sessions)) for i, w in enumerate(wire)]
        details["retry_refused"] = all(isinstance(o, ReleaseRefused) for o in again.outcomes)
    for accountant in accountants:
        accountant.sync()
    details |= {"releases": [ledger.released for ledger in ledgers], "on_wire": wire}
    ok = all(a.rounds == ledger.released == w for a, ledger, w in zip(accountants, ledgers, wire, strict=True))
    codec = FixedPointCodec(bench.n, bound)
    scene = Scene(vectors, weights, attackers, codec, group_ids(bench.swarm), options.get("names", True))
    return judge(name, played, scene, releases_ok=ok, details=details)


def sum_attack(bench: Bench, name: str, **attributes: Any) -> Row:
    return dp_round(bench, name, {bench.n - 1: type("Holder", (SumForger,), attributes)}, [bench.n - 1])


def dp_undersized_u(bench: Bench, name: str) -> Row:
    gone = type("Gone", (DroppingAllReduce,), {"drop_at": "parts"})  # leaves after sharing its secrets
    droppers = [bench.n - 2, bench.n - 1]
    options = {"share": NoiseShare(0.5, 0.5, max_dropouts=1), "bound": 2.0, "retry": False, "names": False, "seed": 51}
    return dp_round(bench, name, dict.fromkeys(droppers, gone), droppers, **options)


def keys_header(swarm: SecAggSwarm, sender: int, group: bytes, sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """A keys message for ``group`` with ``sender``'s signing key and binding, signed by it (or by ``sign``)."""
    identity, c_pk, s_pk = swarm.identities[sender], PrivateKey.generate().public_key, PrivateKey.generate().public_key
    data = {"c_pk": bytes(c_pk), "s_pk": bytes(s_pk), "b_commit": os.urandom(32), "bound_exp": NO_BOUND}
    data |= {"signing_pk": identity.signing_public_key, "binding": identity.binding}
    return Message("keys", group, 1, 0, 1, data).seal(sign or identity.sign)


async def until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the flood scenario's condition never held")
        await asyncio.sleep(0.02)


def queue_flood(bench: Bench, name: str) -> Row:
    """The flooder sends while the honest keys wait for the receiver's group; then the receiver joins."""
    n, receiver, flooder = bench.n, bench.n - 1, bench.n  # a message waits 10 s for its group (the default)
    swarm, pool = SecAggSwarm(bench.folder / "flood", size=n + 1, wait_for_group=10.0), ThreadPoolExecutor(8)
    vectors, weights = bench.inputs(seed=61)
    stranger, facts = SigningKey.generate(), Row()
    flood = (
        [keys_header(swarm, flooder, os.urandom(32)) for _ in range(120)]  # signed, each for a fake group
        + [keys_header(swarm, flooder, os.urandom(32), lambda b: stranger.sign(b).signature) for _ in range(40)]
        + [keys_header(swarm, 0, os.urandom(32)) for _ in range(40)]  # peer 0's binding on the flooder's stream
    )
    room, members = swarm.endpoints[receiver].room, group_ids(swarm)[:receiver]

    async def body(seconds: list[float]) -> list[Any]:
        running = [asyncio.ensure_future(timed(i, s, seconds)) for i, s in enumerate(sessions[:receiver])]
        await until(lambda: all(room.waiting(h) == 1 for h in members), 20)  # their keys wait for the receiver
        started, loop = time.perf_counter(), asyncio.get_running_loop()
        sending = [loop.run_in_executor(pool, swarm.send_raw, flooder, receiver, header) for header in flood]
        await until(lambda: sum(s.done() for s in sending) >= len(sending) - 4, 60)  # 4 fake groups may wait
        kept, waiting = all(room.waiting(h) == 1 for h in members), room.waiting(group_ids(swarm)[flooder])
        facts.update(flood_seconds=round(time.perf_counter() - started, 3), honest_kept=kept, flooder_waiting=waiting)
        swarm.endpoints[receiver].register(sessions[receiver])
        running.append(asyncio.ensure_future(timed(receiver, sessions[receiver], seconds)))
        outcomes = await asyncio.gather(*running, return_exceptions=True)
        replies = await asyncio.gather(*sending, return_exceptions=True)  # p2pd may reset a stream
        answered = [r[0] for r in replies if isinstance(r, tuple)]
        facts.update(accepted=sum(answered), refused=answered.count(False), broken=len(replies) - len(answered))
        return outcomes

    try:
        sessions = swarm.sessions(vectors, weights, timeouts=FLOOD_TIMEOUTS, record_view=True, unregistered=(receiver,))
        played = bench.play(sessions, swarm, body)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        swarm.close()
    scene = Scene(vectors, weights, [flooder], FixedPointCodec(n, 1.0), group_ids(swarm))
    return judge(name, played, scene, details=facts)


ATTACKS: dict[str, tuple[Callable[[Bench, str], Row], str]] = {  # name: (attack, what it does)
    "bad_box": (bad_box, "peer n-1's share box to peer 1 does not open"),
    "isolate_victim": (isolate_victim, "peers 1, 2 send bad boxes to peers 3.. and claim maskset {victim 0, 1, 2}"),
    "equivocate_claims": (equivocate_claims, "peers 1, 2 claim to each of the last two honest peers U without it"),
    "forged_bound": (forged_bound, "peer 1 proposes code bound 0.5 to peer 2 only (8-bit codes, adaptive bound)"),
    "withheld_sum": (partial(sum_attack, sum_offset=None), "DP: peer n-1 never sends its sums; then a retry"),
    "forged_sum": (partial(sum_attack, sum_offset=1), "DP: peer n-1 adds 1 + recipient to word 0 of its sums"),
    "forged_sum_large": (
        partial(sum_attack, sum_offset=1 << 31),
        "DP: adds 2^31 + recipient (out of the honest range)",
    ),
    "dp_undersized_u": (dp_undersized_u, "DP shares sized for n - 1; peers n-2, n-1 leave at parts"),
    "low_order_keys_all": (partial(low_order_keys, to_all=True), "peer 1's keys: a low-order point, to all"),
    "low_order_keys_one": (partial(low_order_keys, to_all=False), "the same to peer 3 only"),
    "corrupt_reveal": (corrupt_reveal, "peer 2 reveals off-by-one shares first (the others wait for them)"),
    "forged_weight": (partial(forged_weight_word, at_floor=False), "peer n-1's weight word: weight sum 1 ring unit"),
    "value_range": (partial(forged_weight_word, at_floor=True), "peer n-1's weight word: weight sum |U| x floor"),
    "queue_flood": (queue_flood, "peer n sends peer n-1 200 keys for fake groups while the others' keys wait"),
}
ROW_FIELDS = ("leaked", "result_consistent", "releases_counted_ok", "honest_seconds", "cost_ratio", "detected")


def run_attack(bench: Bench, name: str) -> Row:
    """One attack's row; an attack that fails or runs past --timeout gives a row with ``error`` set."""
    started = time.perf_counter()
    try:
        row = ATTACKS[name][0](bench, name)
    except Exception as e:
        row = dict.fromkeys(("attack", *ROW_FIELDS, "honest_outcome", "details"), None)
        row.update(attack=name, error=f"{type(e).__name__} after {time.perf_counter() - started:.1f}s: {e}"[:300])
    if row["honest_seconds"] is not None and bench.baseline > 0:
        row["cost_ratio"] = round(row["honest_seconds"] / bench.baseline, 2)
    print(f"{name}: {json.dumps({k: row[k] for k in ROW_FIELDS})} {row['error'] or ''}", file=sys.stderr)
    return row


def main() -> int:
    if "--integrity" in sys.argv:  # loss_vs_honest rows on sharded training: their own module and flags
        return importlib.import_module("integrity").main([arg for arg in sys.argv[1:] if arg != "--integrity"])
    tail = "attacks:\n" + "\n".join(f"  {name:<20}{what}" for name, (_, what) in ATTACKS.items())
    parser = argparse.ArgumentParser(description=__doc__, epilog=tail, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--peers", type=int, default=5, help="peers in each attacked group, e.g. 5")
    parser.add_argument("--numel", type=float, default=10000, help="elements of each peer's vector, e.g. 1e4")
    parser.add_argument("--only", default="", help=f"attacks to run, e.g. bad_box,forged_sum; of {', '.join(ATTACKS)}")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds an attack may take, e.g. 120")
    parser.add_argument("--message-timeout", type=float, default=5.0, help="sessions' small-message wait, e.g. 5")
    parser.add_argument("--data-timeout", type=float, default=20.0, help="sessions' parts and sums wait, e.g. 20")
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    args = parser.parse_args()
    args.numel = int(args.numel)
    names = [name for name in args.only.split(",") if name] or list(ATTACKS)
    if unknown := sorted(set(names) - set(ATTACKS)):
        parser.error(f"unknown attacks {unknown}; known: {list(ATTACKS)}")
    if args.peers < 4:
        parser.error("--peers must be >= 4: two colluders, a victim and an honest peer")

    scratch, bench = tempfile.TemporaryDirectory(), None
    try:
        bench = Bench(args, Path(scratch.name))
        baseline = bench.measure_baseline()
        rows = [run_attack(bench, name) for name in names]
    finally:
        if bench is not None:
            bench.swarm.close()
        scratch.cleanup()
    report = {key: getattr(args, key) for key in ("peers", "numel", "message_timeout", "data_timeout")}
    report |= {"cpu_count": len(os.sched_getaffinity(0)), "honest_baseline_seconds": round(baseline, 4)}
    report["attacks"] = rows
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
