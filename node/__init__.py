"""The training node. A folder is a concept; arrows point one way:
cli -> training / sharding -> aggregation -> secagg -> config -> dht.

config (config.py): every configuration section ([run.*], [serve]) as validated dataclasses
class NodeRuntime (runtime.py): the node's life in the swarm: identity, DHT, heartbeat, signed record, close()
class GPT (model.py): the run's small byte-level GPT; build_run_model builds either model family
class HFCausalLM (model_hf.py): a transformers causal LM behind GPT's call signature (family "hf")
ModelConfig (model_config.py): [run.model]; model_files.py checks and digests an "hf" run's local files
class TokenBatches (data.py): random windows of token ids (ByteBatches: of bytes); load_corpus, generate_corpus
class RunTokenizer (tokens.py): bytes or a local tokenizer.json -> token ids
data_sketch (sketch.py): the data sketch in a PeerRecord (hashed byte n-gram frequencies)
probe_capacity (capacity.py): device, memory and measured samples/s at enrollment
class WireMeter (wire_meter.py): bytes the node puts on the wire, from the kernel's TCP counters
main (cli.py): the ``zen-node`` command (join, serve, status, demo, export, generate); demo.py: ``zen-node demo``
export/: ``zen-node export``: a Hugging Face folder (GPT-2 weights, byte tokenizer, model card); generate.py
training/: the DiLoCo loop (TrainingNode), outer step and staleness rule, checkpoints, round reports,
    state sharing for late joiners
aggregation/: the Aggregator interface and its plain, secure and hierarchical (cohort) implementations
secagg/: secure aggregation: the masked butterfly all-reduce, its averager, wire format, fixed-point
    ring, compression, masks, Shamir shares, differential-privacy noise
sharding/: pipeline stages: the cut, the stage server (``zen-node serve``), its RPCs and wire format,
    replica averaging, the trainer's client and the sharded trainer

Nothing is imported here: import from the module that defines a name (``from node.config import RunConfig``).
"""

from node._version import __version__

__all__ = ["__version__"]
