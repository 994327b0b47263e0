"""The training node: capacity probe, data, model, DiLoCo training loop, aggregation, CLI.

class NodeConfig, RunConfig, ModelConfig, TrainConfig, AggregationConfig, CompressionConfig, PrivacyConfig,
    ShardingConfig, CohortConfig (config.py): configuration
class GPT (model.py): the run's small byte-level GPT
class ByteBatches (data.py): random windows over local bytes; load_corpus, byte_histogram, generate_corpus
data_sketch (sketch.py): the data sketch in a PeerRecord (hashed byte n-gram frequencies)
class HierarchicalAggregator, ParameterPartition (hierarchy.py): cohort/global/local parameters, importance weights
probe_capacity (capacity.py): device, memory and measured samples/s at enrollment
class Aggregator, SecureAggregator, PlainAggregator (aggregator.py): merge pseudo-gradients with a group of peers
class MaskedAllReduce (masked_allreduce.py): secure aggregation on a butterfly all-reduce, dropout-tolerant
class SecureAverager, SecAggEndpoint (secure_averager.py): hivemind matchmaking around it; the receiving side
class FixedPointCodec (fixed_point.py): weighted updates in the ring Z_2^W
pack_bits, select_coordinates (compression.py): low-bit words on the wire and group-seeded random-k in the ring
class WireMeter (wire_meter.py): bytes the node puts on the wire, from the kernel's TCP counters
apply_mask, pair_mask_key (masking.py): ChaCha20 masks; split_secret, combine_secret (shamir.py): t-of-n shares
class Message (secagg_messages.py): the signed, schema-checked wire format of the masked all-reduce
class NoiseShare, PrivacyAccountant (privacy.py): differential-privacy noise and the per-node budget
class StateSharer (state_sharing.py): late joiners download the current state from peers
class TrainingNode (trainer.py): enroll, join, catch up, train outer rounds, checkpoint
class Stage, LocalParts (stages.py): the cut of the GPT into pipeline stages; choose_stages: block selection
class StageServer, ServeConfig (stage_server.py): ``zen-node serve``, hosting stages with forward/backward RPCs
class HostedStage (hosted_stage.py): a served stage's weights, optimizer, exactly-once bookkeeping, anchor
class StageAverager (stage_averaging.py): periodic rounds that leave a stage's replicas bit-identical
class StageRequest, StageReply (stage_messages.py): the msgpack wire format of stage calls
class RemoteStages (remote_stages.py): a trainer's stage calls: server choice, failover, spot-checks, bans
class ShardedTrainer (sharded_trainer.py): a trainer whose middle blocks live on stage servers
main (cli.py): the ``zen-node`` command (join, serve, status, demo)
"""

__version__ = "0.1.0"

from node.aggregator import (
    AggregationError,
    AggregationResult,
    Aggregator,
    PlainAggregator,
    SecureAggregator,
    make_aggregator,
)
from node.compression import pack_bits, select_coordinates
from node.config import (
    AggregationConfig,
    CohortConfig,
    CompressionConfig,
    ConfigError,
    ModelConfig,
    NodeConfig,
    PrivacyConfig,
    RunConfig,
    ShardingConfig,
    TrainConfig,
)
from node.hierarchy import HierarchicalAggregator, ParameterPartition, importance_weight, partition_parameters
from node.masked_allreduce import MaskedAllReduce, SecAggError
from node.model import GPT, build_model
from node.privacy import NoiseShare, PrivacyAccountant
from node.remote_stages import RemoteStages, StageUnavailableError
from node.sharded_trainer import ShardedTrainer, StepReport
from node.sketch import data_sketch
from node.stage_messages import StageMessageError, StageReply, StageRequest
from node.stage_server import ServeConfig, StageServer
from node.stages import LocalParts, Stage, choose_stages, rebalance_target, stage_ranges
from node.state_sharing import StateSharer
from node.trainer import ConfigMismatchError, RoundReport, TrainingNode
from node.wire_meter import WireMeter

__all__ = [
    "GPT",
    "AggregationConfig",
    "AggregationError",
    "AggregationResult",
    "Aggregator",
    "CohortConfig",
    "CompressionConfig",
    "ConfigError",
    "ConfigMismatchError",
    "HierarchicalAggregator",
    "LocalParts",
    "MaskedAllReduce",
    "ModelConfig",
    "NodeConfig",
    "NoiseShare",
    "ParameterPartition",
    "PlainAggregator",
    "PrivacyAccountant",
    "PrivacyConfig",
    "RemoteStages",
    "RoundReport",
    "RunConfig",
    "SecAggError",
    "SecureAggregator",
    "ServeConfig",
    "ShardedTrainer",
    "ShardingConfig",
    "Stage",
    "StageMessageError",
    "StageReply",
    "StageRequest",
    "StageServer",
    "StageUnavailableError",
    "StateSharer",
    "StepReport",
    "TrainConfig",
    "TrainingNode",
    "WireMeter",
    "__version__",
    "build_model",
    "choose_stages",
    "data_sketch",
    "importance_weight",
    "make_aggregator",
    "pack_bits",
    "partition_parameters",
    "rebalance_target",
    "select_coordinates",
    "stage_ranges",
]
