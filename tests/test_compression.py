"""Compression inside the secure ring: low-bit codes, bit packing, shared random-k, error feedback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from secagg_harness import SecAggSwarm, results_of

from node.config import CompressionConfig
from node.secagg.compression import pack_bits, packed_size, select_coordinates, unpack_bits
from node.secagg.fixed_point import FixedPointCodec

NUMEL = 4001


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecAggSwarm]:
    peers = SecAggSwarm(Path(tmp_path_factory.mktemp("compression")), size=4)
    try:
        yield peers
    finally:
        peers.close()


@pytest.mark.parametrize("width", [1, 3, 4, 6, 8, 10, 13, 16, 21, 31, 32])
def test_bit_packing_round_trips_the_low_bits(width: int) -> None:
    rng = np.random.default_rng(width)
    for count in (0, 1, 7, 8, 9, 1003):
        words = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)
        packed = pack_bits(words, width)
        assert len(packed) == packed_size(count, width) == (count * width + 7) // 8
        back = np.empty(count, np.uint32)
        unpack_bits(packed, width, back)
        low = words if width == 32 else words & np.uint32((1 << width) - 1)
        np.testing.assert_array_equal(back, low)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(b"\0" * 3, width, np.empty(100, np.uint32))


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_quantization_is_unbiased_and_within_one_step(bits: int) -> None:
    """Each code is within one step 1/s of the clipped value; the mean over fresh seeds converges to it."""
    codec = FixedPointCodec(group_size=4, bound=1.0, bits=bits)
    assert codec.ring_bits == bits + 2
    values = np.random.default_rng(1).uniform(-1, 1, 2000).astype(np.float32)
    values[:3] = [1.0, -1.0, 0.0]
    words, decoded = np.empty(values.size, np.uint32), np.empty(values.size, np.float32)
    trials, total = 400, np.zeros(values.size)
    for trial in range(trials):
        codec.encode_into(values, 0.5, words, seed=trial.to_bytes(32, "little"))
        codec.dequantize_into(words, 0.5, decoded)
        assert np.abs(decoded - values).max() <= 1 / (codec.scale * 0.5) + 1e-6
        assert np.abs(words.view(np.int32)).max() <= (1 << (bits - 1)) - 1
        total += decoded
    step = 1 / (codec.scale * 0.5)
    # the rounding error of one code has std <= step / 2: its mean over the trials shrinks by sqrt(trials)
    assert np.abs(total / trials - values).max() <= 5 * step / 2 / np.sqrt(trials)
    assert abs(float(np.mean(total / trials - values))) <= 5 * step / 2 / np.sqrt(trials * values.size)


def test_shared_seed_selection_is_data_independent_and_per_round() -> None:
    group = bytes(range(32))
    chosen = select_coordinates(10_000, 500, group, 7)
    assert chosen is not None and chosen.size == 500 and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, select_coordinates(10_000, 500, group, 7))
    assert not np.array_equal(chosen, select_coordinates(10_000, 500, group, 8))
    assert not np.array_equal(chosen, select_coordinates(10_000, 500, bytes(32), 7))
    assert select_coordinates(10_000, 10_000, group, 7) is None
    with pytest.raises(ValueError, match="bits"):
        CompressionConfig(bits=5)
    with pytest.raises(ValueError, match="fraction"):
        CompressionConfig(fraction=0.0)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_group_members_send_the_same_coordinates_and_agree_on_the_mean(swarm: SecAggSwarm, bits: int) -> None:
    rng = np.random.default_rng(bits)
    vectors = [(rng.standard_normal(NUMEL) * 0.1).astype(np.float32) for _ in range(4)]
    weights = [1.0, 0.5, 0.25, 0.8]
    compression = CompressionConfig(bits=bits, fraction=0.1)
    sessions = swarm.sessions(vectors, weights, compression=compression)
    outcomes = results_of(swarm.run(sessions), [0, 1, 2, 3])
    selected = sessions[0].selected
    assert selected is not None and selected.size == compression.count(NUMEL)
    for session in sessions[1:]:
        np.testing.assert_array_equal(session.selected, selected)
    for result in outcomes[1:]:
        np.testing.assert_array_equal(result.mean, outcomes[0].mean)  # bit-identical everywhere
    mean = outcomes[0].mean
    off = np.ones(NUMEL, bool)
    off[selected] = False
    assert not mean[off].any()
    exact = sum(w * np.clip(v, -1, 1).astype(np.float64) for v, w in zip(vectors, weights, strict=True)) / sum(weights)
    codec = FixedPointCodec(group_size=4, bound=1.0, bits=bits)
    bound = codec.quantization_bound(sum(weights), float(np.abs(exact).max()))
    assert np.abs(mean[selected] - exact[selected]).max() <= bound
    # the parts travel packed: (bits + 2 headroom) bits per value, not 32
    for part, (start, stop) in enumerate(sessions[0].parts[:-1]):
        assert sessions[0].layout.wire_size(part) == packed_size(stop - start, bits + 2)


def test_error_feedback_loses_no_mass(swarm: SecAggSwarm) -> None:
    """Over several rounds, what the group's means carried plus every residual is every input."""
    rng = np.random.default_rng(5)
    n, rounds = 4, 4
    residuals = [np.zeros(NUMEL, np.float32) for _ in range(n)]
    inputs_total = np.zeros(NUMEL)
    carried = np.zeros(NUMEL)
    compression = CompressionConfig(bits=4, fraction=0.3)
    for round_no in range(1, rounds + 1):
        vectors = [(rng.standard_normal(NUMEL) * 0.2).astype(np.float32) for _ in range(n)]
        vectors[0][:5] = 3.0  # beyond the clip bound: the excess must come back through the residual
        inputs_total += sum(v.astype(np.float64) for v in vectors)
        # error feedback: each peer sends its new update plus what the last round did not take
        inputs = [v + r for v, r in zip(vectors, residuals, strict=True)]
        sessions = swarm.sessions(inputs, round_no=round_no, compression=compression, residuals=residuals)
        result = results_of(swarm.run(sessions), list(range(n)))[0]
        assert result.weight_sum == n
        carried += n * result.mean.astype(np.float64)  # equal weights: n * mean is the sum of what was sent
    remaining = sum(r.astype(np.float64) for r in residuals)
    np.testing.assert_allclose(carried + remaining, inputs_total, atol=1e-4)
    assert np.abs(remaining).max() > 0.1  # the residual is doing work (clipped excess, unsent coordinates)


def test_group_agrees_on_a_tight_bound_for_low_bit_codes(swarm: SecAggSwarm) -> None:
    """Each peer proposes 2**ceil(log2(3 rms)); everyone uses the largest proposal, capped by the run's bound."""
    rng = np.random.default_rng(9)
    scales = [0.001, 0.002, 0.004, 0.003]
    vectors = [(rng.standard_normal(NUMEL) * s).astype(np.float32) for s in scales]
    sessions = swarm.sessions(vectors, compression=CompressionConfig(bits=8), adaptive_bound=True)
    outcomes = results_of(swarm.run(sessions), [0, 1, 2, 3])
    expected = max(2.0 ** np.ceil(np.log2(3 * np.sqrt(np.mean(np.square(v, dtype=np.float64))))) for v in vectors)
    assert expected < 0.02  # far tighter than the cap of 1.0
    assert all(session.codec.bound == expected for session in sessions)
    exact = sum(np.clip(v, -expected, expected).astype(np.float64) for v in vectors) / 4
    bound = sessions[0].codec.quantization_bound(4.0, float(np.abs(exact).max()))
    assert bound < 1e-3  # a code at the cap of 1.0 would be ~60x coarser
    assert np.abs(outcomes[0].mean - exact).max() <= bound
