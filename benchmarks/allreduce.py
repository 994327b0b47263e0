"""Secure (masked) all-reduce vs hivemind's plain DecentralizedAverager, same groups, one run.

Starts N DHT peers on 127.0.0.1, each with a ``SecureAverager`` and a plain ``DecentralizedAverager``
over a float32 vector of M elements, and runs R rounds of each, alternating. A round's time is
the all-reduce alone: every peer steps with ``require_trigger``, and the clock starts when all of
them have found their group and are released together, so matchmaking is not timed::

    python benchmarks/allreduce.py --peers 4 --numel 25000000 --rounds 3 --json

JSON fields: ``peers``, ``numel``, ``rounds``, ``secure_seconds`` and ``plain_seconds`` (median
over rounds, slowest peer), ``ratio`` (median over rounds of secure / plain), ``secure_first_seconds``
and ``plain_first_seconds`` (the first, cold round: buffers are allocated and first touched), ``max_abs_error``
(secure result vs the float64 weighted mean; ``plain_max_abs_error`` likewise),
``bytes_sent_per_peer`` (secure, counted where messages leave the node),
``plain_bytes_per_peer_model`` (2(N-1)/N x 4 x M, hivemind's butterfly without compression),
``mask_gb_per_second`` (one core, ChaCha20 masks added in the ring), ``cpu_count``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dht import NodeIdentity, SwarmConfig, start_dht
from node.secagg.averager import SecureAverager
from node.secagg.masking import apply_mask
from node.secagg.protocol import SecAggIdentity, SecAggTimeouts


def mask_speed(numel: int) -> float:
    """GB/s of one core adding a ChaCha20 mask to a uint32 vector."""
    words = np.ones(min(numel, 1 << 24), dtype=np.uint32)
    apply_mask(words, bytes(32), 1)  # warm the pages
    started = time.perf_counter()
    apply_mask(words, bytes(range(32)), 1)
    return words.nbytes / (time.perf_counter() - started) / 1e9


def timed_round(averagers: list, inputs: list[torch.Tensor], weights: list[float], bits: str, timeout: float) -> float:
    """Run one all-reduce on every averager; seconds from the common trigger to the last result."""
    for averager, values in zip(averagers, inputs, strict=True):
        with averager.get_tensors() as tensors:
            tensors[0].copy_(values)
        averager.set_group_bits(bits)
    controls = [
        averager.step(gather={"round": 0}, weight=w, timeout=timeout, require_trigger=True, wait=False)
        for averager, w in zip(averagers, weights, strict=True)
    ]
    deadline = time.monotonic() + timeout
    while not all(c.stage == AveragingStage.AWAITING_TRIGGER for c in controls):
        if time.monotonic() > deadline or any(c.done() for c in controls):
            raise RuntimeError(f"matchmaking failed: stages {[c.stage for c in controls]}")
        time.sleep(0.01)
    started = time.perf_counter()
    for control in controls:
        control.allow_allreduce()
    results = [c.result(timeout=timeout) for c in controls]
    elapsed = time.perf_counter() - started
    if any(not r or len(r) != len(averagers) for r in results):
        raise RuntimeError("an all-reduce did not include every peer")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4, help="peers in the group, e.g. 4")
    parser.add_argument("--numel", type=float, default=1e6, help="elements of the averaged vector, e.g. 2.5e7")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind, e.g. 3")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per round, e.g. 300")
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    parser.add_argument("--verbose", action="store_true", help="log each all-reduce's phase timings, e.g. --verbose")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    numel, peers = int(args.numel), args.peers
    if peers < 3:
        parser.error("--peers must be >= 3: secure aggregation refuses groups of two")

    scratch = tempfile.TemporaryDirectory()
    dhts, secure, plain = [], [], []
    try:
        identities = [NodeIdentity.load_or_create(Path(scratch.name) / f"peer{i}") for i in range(peers)]
        first = start_dht(SwarmConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), identities[0])
        initial = [str(a) for a in first.get_visible_maddrs()]
        dhts = [first] + [
            start_dht(SwarmConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial), identity)
            for identity in identities[1:]
        ]
        common = dict(start=True, min_group_size=peers, target_group_size=peers, min_matchmaking_time=1.0)
        common |= dict(request_timeout=0.5, allow_state_sharing=False, shutdown_timeout=2)
        for dht, identity in zip(dhts, identities, strict=True):
            signer = SecAggIdentity(identity.sign, identity.signing_public_key, identity.binding)
            timeouts = SecAggTimeouts(message=30.0, data=args.timeout)
            secure.append(
                SecureAverager(
                    [torch.zeros(numel)],
                    dht,
                    identity=signer,
                    clip_bound=8.0,
                    weight_bound=1.0,
                    timeouts=timeouts,
                    prefix="bench_secure",
                    **common,
                )
            )
            plain.append(DecentralizedAverager([torch.zeros(numel)], dht, prefix="bench_plain", **common))

        generator = torch.Generator().manual_seed(0)
        secure_times, plain_times, ratios, errors, plain_errors = [], [], [], [], []
        for round_no in range(args.rounds):
            inputs = [torch.randn(numel, generator=generator) for _ in range(peers)]
            weights = [float(w) for w in torch.rand(peers, generator=generator) * 0.9 + 0.1]
            exact = sum(w * x.double() for w, x in zip(weights, inputs, strict=True)) / sum(weights)
            bits = format(round_no, "016b")
            plain_seconds = timed_round(plain, inputs, weights, bits, args.timeout)
            with plain[0].get_tensors() as tensors:
                plain_errors.append(float((tensors[0].double() - exact).abs().max()))
            secure_seconds = timed_round(secure, inputs, weights, bits, args.timeout)
            with secure[0].get_tensors() as tensors:
                errors.append(float((tensors[0].double() - exact).abs().max()))
            secure_times.append(secure_seconds)
            plain_times.append(plain_seconds)
            ratios.append(secure_seconds / plain_seconds)
            print(f"round {round_no}: secure {secure_seconds:.3f}s plain {plain_seconds:.3f}s", file=sys.stderr)

        bytes_sent = sum(a.bytes_sent.value for a in secure) / peers / args.rounds
        row = {
            "peers": peers,
            "numel": numel,
            "rounds": args.rounds,
            "secure_seconds": round(statistics.median(secure_times), 4),
            "plain_seconds": round(statistics.median(plain_times), 4),
            "ratio": round(statistics.median(ratios), 4),
            "secure_first_seconds": round(secure_times[0], 4),  # cold: buffers are first touched here
            "plain_first_seconds": round(plain_times[0], 4),
            "max_abs_error": max(errors),
            "plain_max_abs_error": max(plain_errors),
            "bytes_sent_per_peer": int(bytes_sent),
            "plain_bytes_per_peer_model": int(2 * (peers - 1) / peers * 4 * numel),
            "mask_gb_per_second": round(mask_speed(numel), 3),
            "cpu_count": len(__import__("os").sched_getaffinity(0)),
        }
    finally:
        for averager in secure + plain:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
        scratch.cleanup()
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:>28}: {value}")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "allreduce-benchmark"
    sys.exit(main())
