"""Stage split, block selection with hysteresis, the stage wire format and records that announce stages."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest
import torch

from dht import Capacity, NodeIdentity, PeerRecord, RecordError
from node.config import ModelConfig, RunConfig, ShardingConfig, parse_memory
from node.model import build_model
from node.sharding.messages import MAX_MESSAGE_BYTES, StageMessageError, StageReply, StageRequest
from node.sharding.stages import LocalParts, build_stage, choose_stages, rebalance_target, stage_ranges

RecordFactory = Callable[..., PeerRecord]


@pytest.mark.parametrize(
    ("n_layer", "local", "stages", "expected"),
    [
        (4, 1, 2, [range(1, 3), range(3, 4)]),
        (4, 0, 2, [range(0, 2), range(2, 4)]),
        (8, 2, 3, [range(2, 4), range(4, 6), range(6, 8)]),
        (5, 1, 4, [range(1, 2), range(2, 3), range(3, 4), range(4, 5)]),
    ],
)
def test_stage_ranges_cover_the_remote_blocks_contiguously(
    n_layer: int, local: int, stages: int, expected: list[range]
) -> None:
    """Remote blocks are cut into contiguous, near-equal ranges, earlier stages taking the remainder."""
    # Execute
    ranges = stage_ranges(n_layer, ShardingConfig(stages=stages, local_blocks=local))

    # Assert
    assert ranges == expected


def test_too_many_stages_are_refused_naming_the_fields() -> None:
    """A run cannot have more stages than remote blocks; the error names the fields."""
    # Execute / Assert
    with pytest.raises(ValueError, match="local_blocks \\+ stages"):
        RunConfig(model=ModelConfig(n_layer=2), sharding=ShardingConfig(stages=2, local_blocks=1))


def test_local_parts_and_stages_compose_to_the_full_model() -> None:
    """front -> stages -> head computes exactly the unsharded GPT's loss from the same seed."""
    # Prepare
    model_config, sharding = ModelConfig(n_layer=4, d_model=32, context=16), ShardingConfig(stages=2, local_blocks=1)
    full = build_model(model_config, seed=7)
    local = LocalParts(build_model(model_config, seed=7), sharding.local_blocks)
    stages = [build_stage(model_config, sharding, 7, i) for i in range(2)]
    tokens = torch.randint(0, 256, (3, 16))

    # Execute
    hidden = local.front(tokens)
    for stage in stages:
        hidden = stage(hidden)
    sharded, reference = local.head(hidden, tokens), full(tokens, tokens)

    # Assert
    assert torch.allclose(sharded, reference, atol=1e-6)


def _server(identity: NodeIdentity, factory: RecordFactory, stages: tuple[int, ...], speed: float) -> PeerRecord:
    capacity = Capacity(device_kind="cpu", memory_bytes=2**34, samples_per_second=speed)
    return factory(identity, roles=("server",), stages=stages, capacity=capacity)


def test_a_new_server_takes_the_weakest_stage(
    identity_factory: Callable[..., NodeIdentity], record_factory: RecordFactory
) -> None:
    """Stage throughput is summed per stage; the newcomer picks the lowest, ties to the lower number."""
    # Prepare
    a, b, c = (identity_factory(None) for _ in range(3))
    records = [_server(a, record_factory, (0,), 10.0), _server(b, record_factory, (1,), 4.0)]
    records.append(_server(c, record_factory, (2,), 4.0))

    # Execute
    one, two, empty = choose_stages(records, 3, 1), choose_stages(records, 3, 2), choose_stages([], 3, 1)

    # Assert
    assert (one, two, empty) == ([1], [1, 2], [0])


def test_rebalancing_moves_only_past_the_hysteresis(
    identity_factory: Callable[..., NodeIdentity], record_factory: RecordFactory
) -> None:
    """A doubly served stage gives a server to an uncovered one; a small gain does not move anyone."""
    # Prepare
    a, b, c = (identity_factory(None) for _ in range(3))
    me, other = sorted([a, b], key=lambda i: i.peer_id)
    crowded = [_server(me, record_factory, (0,), 10.0), _server(other, record_factory, (0,), 10.0)]
    crowded.append(_server(c, record_factory, (1,), 10.0))
    balanced = [_server(me, record_factory, (0,), 10.0), _server(c, record_factory, (1,), 9.0)]

    # Execute
    four_stages = [*crowded, _server(identity_factory(None), record_factory, (2,), 10.0)]
    moves = rebalance_target(four_stages, 4, me.peer_id, 0, 10.0)
    waits = rebalance_target(crowded, 3, other.peer_id, 0, 10.0)
    stays = rebalance_target(balanced, 2, me.peer_id, 0, 10.0)

    # Assert
    assert moves == 3  # the uncovered stage
    assert waits is None  # the smaller PeerID of stage 0 moves first
    assert stays is None  # 9 -> 10 is under the 20% hysteresis


def test_records_announce_stages_and_stay_compatible(alice: NodeIdentity, record_factory: RecordFactory) -> None:
    """Stages round-trip; a record without them encodes without the field; bad stage lists are refused."""
    # Prepare
    server = record_factory(alice, roles=("server",), stages=(0, 3))
    trainer = record_factory(alice)

    # Execute
    decoded = PeerRecord.verify(server.sign(alice))
    body = msgpack.unpackb(msgpack.unpackb(trainer.sign(alice))[1])

    # Assert
    assert decoded.stages == (0, 3)
    assert "stages" not in body and PeerRecord.verify(trainer.sign(alice)).stages == ()
    for bad in [dict(stages=(1, 1), roles=("server",)), dict(stages=(64,), roles=("server",)), dict(stages=(0,))]:
        with pytest.raises(RecordError):
            record_factory(alice, **bad).sign(alice)


@pytest.fixture
def alice(identity_factory: Callable[..., NodeIdentity]) -> NodeIdentity:
    return identity_factory("alice")


def test_stage_messages_round_trip_and_refuse_bad_input() -> None:
    """Requests and replies round-trip; wrong dtypes, sizes, fields and oversized messages are refused."""
    # Prepare
    hidden = torch.randn(2, 4, 8)
    request = StageRequest("backward", 1, "12D3KooWx", 5, 1, 2, (hidden, hidden * 2))
    wire = msgpack.unpackb(request.encode())
    short = {**wire, "tensors": [["float32", [2, 4, 8], b"\0" * 10]]}
    wrong_dtype = {**wire, "tensors": [["float64", [1], b"\0" * 8]]}
    extra_field = {**wire, "admin": True}

    # Execute
    decoded = StageRequest.decode(request.encode())
    reply = StageReply.decode(StageReply(ok=False, reason="busy", missing=(0, 1)).encode())

    # Assert
    assert torch.equal(decoded.tensors[1], hidden * 2) and decoded.micro_batch == 1 and decoded.step == 5
    assert reply.reason == "busy" and reply.missing == (0, 1)
    for bad in (short, wrong_dtype, extra_field, {**wire, "method": "exec"}, {**wire, "micro_batch": 2}):
        with pytest.raises(StageMessageError):
            StageRequest.decode(msgpack.packb(bad))
    with pytest.raises(StageMessageError):
        StageRequest("forward", 0, tensors=(torch.zeros(MAX_MESSAGE_BYTES // 4 + 1),)).encode()
    with pytest.raises(StageMessageError):
        StageRequest("forward", 0, tensors=(torch.zeros(3, dtype=torch.float64),)).encode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GB", 20 * 1024**3), ("512MiB", 512 * 1024**2), ("1.5G", int(1.5 * 1024**3)), ("4096", 4096)],
)
def test_parse_memory(text: str, expected: int) -> None:
    """--max-memory takes sizes with K/M/G/T units."""
    # Execute / Assert
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "20 XB", ""])
def test_parse_memory_refuses_junk(text: str) -> None:
    """A size that does not parse is a one-line error with an example."""
    # Execute / Assert
    with pytest.raises(ValueError, match=r"e\.g\. 20GB"):
        parse_memory(text)
