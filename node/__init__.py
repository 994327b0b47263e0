"""The training node: capacity probe, data, model, DiLoCo training loop, aggregation, CLI.

class NodeConfig, RunConfig, ModelConfig, TrainConfig, AggregationConfig (config.py): configuration
class GPT (model.py): the run's small byte-level GPT
class ByteBatches (data.py): random windows over local bytes; load_corpus, byte_histogram, generate_corpus
probe_capacity (capacity.py): device, memory and measured samples/s at enrollment
class Aggregator, PlainAggregator (aggregator.py): merge pseudo-gradients with a group of peers
class StateSharer (state_sharing.py): late joiners download the current state from peers
class TrainingNode (trainer.py): enroll, join, catch up, train outer rounds, checkpoint
main (cli.py): the ``zen-node`` command (join, status, demo)
"""

__version__ = "0.1.0"

from node.aggregator import AggregationError, AggregationResult, Aggregator, PlainAggregator, make_aggregator
from node.config import AggregationConfig, ConfigError, ModelConfig, NodeConfig, RunConfig, TrainConfig
from node.model import GPT, build_model
from node.state_sharing import StateSharer
from node.trainer import ConfigMismatchError, RoundReport, TrainingNode

__all__ = [
    "GPT",
    "AggregationConfig",
    "AggregationError",
    "AggregationResult",
    "Aggregator",
    "ConfigError",
    "ConfigMismatchError",
    "ModelConfig",
    "NodeConfig",
    "PlainAggregator",
    "RoundReport",
    "RunConfig",
    "StateSharer",
    "TrainConfig",
    "TrainingNode",
    "__version__",
    "build_model",
    "make_aggregator",
]
