"""Configuration: one dataclass per component, loaded from TOML and overridden by flags.

``RunConfig`` (node/run_config.py, re-exported here) is what every peer of a run must share;
``NodeConfig`` is this machine's own settings. A TOML file maps onto them section by section::

    [run]             run_id, min_memory_gb
    [run.model]       ModelConfig
    [run.train]       TrainConfig
    [run.aggregation] AggregationConfig
    [run.privacy]     PrivacyConfig
    [run.compression] CompressionConfig
    [run.sharding]    ShardingConfig
    [run.cohorts]     CohortConfig
    [run.lora]        LoraConfig (node/model_config.py)
    [swarm]           dht.SwarmConfig
    [serve]           ServeConfig (``zen-node serve``)
    [node]            NodeConfig's own fields (data, identity, workdir, ...)

A check that spans sections lives in the dataclass that holds them all (``RunConfig``,
``NodeConfig``); ``check_join`` and ``check_serve`` add what one command needs, before it creates
any folder. This module imports neither torch nor hivemind, so a CLI validates its input first.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dht.config import SwarmConfig
from node.run_config import (
    MAX_PATTERNS,
    AggregationConfig,
    AggregationMode,
    CohortConfig,
    CompressionBits,
    CompressionConfig,
    ConfigError,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    ShardingConfig,
    TrainConfig,
    build_section,
    run_config_from_dict,
)

__all__ = [
    "MAX_PATTERNS",
    "AggregationConfig",
    "AggregationMode",
    "CohortConfig",
    "CompressionBits",
    "CompressionConfig",
    "ConfigError",
    "ModelConfig",
    "NodeConfig",
    "PrivacyConfig",
    "RunConfig",
    "ServeConfig",
    "ShardingConfig",
    "SwarmConfig",
    "TrainConfig",
    "check_join",
    "check_serve",
    "describe_difference",
    "load_node_config",
    "parse_memory",
    "parse_metrics_address",
    "run_config_from_dict",
]

DEFAULT_HYSTERESIS = 0.2  # a stage move must raise the weakest stage's throughput by more than 20%
DEFAULT_METRICS_HOST = "127.0.0.1"  # where --metrics-port PORT serves (HOST:PORT names another address)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def parse_metrics_address(value: str) -> tuple[str, int]:
    """``"9100"`` -> ``("127.0.0.1", 9100)``; ``"0.0.0.0:9100"`` -> ``("0.0.0.0", 9100)`` (node/metrics.py).

    Raises:
        ValueError: not a port in 0..65535, optionally after a host and a colon.
    """
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or DEFAULT_METRICS_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-port must be PORT or HOST:PORT with a port in 0..65535, got {value!r}")
    return host, int(port)


def parse_memory(text: str, name: str = "--max-memory") -> int:
    """``20GB``, ``512MiB``, ``1.5G`` -> bytes (``name``: the flag or field, for the message).

    Raises:
        ConfigError: a one-line explanation with an example.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{name} {text!r} is not a memory size; use e.g. 20GB or 512MB")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


@dataclass
class ServeConfig:
    """A stage server's own settings (``zen-node serve``, the ``[serve]`` section)."""

    max_memory: int = 0  # bytes of device memory the stages may use (TOML also takes "20GB"); 0 = all of it
    stages: tuple[int, ...] = ()  # host exactly these stages; () = choose by block selection
    max_stages: int = 1  # at most this many stages when choosing (memory may allow fewer)
    max_batch: int = 256  # sequences one batched forward may hold
    batch_wait: float = 0.002  # seconds a forward waits for others to batch with
    busy_poll: float = 1.0  # seconds between GPU-busy readings
    rebalance_period: float = 30.0  # seconds between rebalancing checks; 0 = never move
    hysteresis: float = DEFAULT_HYSTERESIS  # relative gain in the weakest stage a move must bring

    def __post_init__(self) -> None:
        if isinstance(self.max_memory, str):  # a TOML file may say "20GB"
            self.max_memory = parse_memory(self.max_memory, "serve.max_memory")
        self.stages = tuple(self.stages)  # TOML gives a list
        _require(self.max_memory >= 0, f"serve.max_memory must be >= 0 bytes, got {self.max_memory}")
        _require(
            all(isinstance(s, int) and 0 <= s < 64 for s in self.stages),
            f"serve.stages must be stage numbers in [0, 64), got {list(self.stages)}",
        )
        _require(1 <= self.max_stages <= 64, f"serve.max_stages must be in [1, 64], got {self.max_stages}")
        _require(1 <= self.max_batch <= 4096, f"serve.max_batch must be in [1, 4096], got {self.max_batch}")
        _require(
            0 <= self.batch_wait <= 1 and self.busy_poll > 0 and self.rebalance_period >= 0 and self.hysteresis >= 0,
            "serve.batch_wait must be in [0, 1] s; busy_poll > 0; rebalance_period, hysteresis >= 0",
        )


CLIENT_MODE_SECURE = (
    "swarm.client_mode cannot aggregate securely (every peer reduces a part, so it must be "
    "reachable); drop --client-mode or set aggregation.mode = 'plain'"
)


@dataclass
class NodeConfig:
    """This node's own settings (not shared with the run)."""

    run: RunConfig = field(default_factory=RunConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)  # used by ``zen-node serve`` only
    data: str | None = None  # text file or folder of .txt/.jsonl files
    identity: str = "~/.zen/identity"  # folder holding this node's keys
    workdir: str = "~/.zen/work"  # checkpoints and the per-round report
    rounds: int = 0  # outer rounds to run before exiting; 0 = until stopped
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    allow_low_memory: bool = False  # run even below run.min_memory_gb
    resume: bool = False  # continue from the checkpoint in workdir
    min_peers: int = 1  # wait until this many trainers (self included) are listed before training
    save_round_params: bool = False  # keep the global parameters of every round in workdir/rounds/
    epsilon_budget: float = 0.0  # this node's privacy budget if lower than run.privacy.target_epsilon; 0 = the run's
    heartbeat_period: float = 5.0  # seconds between record refreshes
    record_ttl: float = 20.0  # seconds a record lives; a dead node leaves the listing within this
    display_name: str = ""  # a name this node opts into for the ledger and model cards ("": its PeerID)
    metrics_port: str | None = None  # serve Prometheus metrics at [HOST:]PORT, e.g. "9100"; None: off

    def __post_init__(self) -> None:
        if isinstance(self.metrics_port, int) and not isinstance(self.metrics_port, bool):
            self.metrics_port = str(self.metrics_port)  # a TOML file may say metrics_port = 9100
        if self.metrics_port is not None:
            try:
                parse_metrics_address(str(self.metrics_port))
            except (ValueError, TypeError):
                raise ValueError(
                    f"node.metrics_port must be PORT or HOST:PORT with a port in 0..65535, got {self.metrics_port!r}"
                ) from None
        _require(self.rounds >= 0, f"node.rounds must be >= 0, got {self.rounds}")
        _require(
            math.isfinite(self.epsilon_budget) and self.epsilon_budget >= 0,
            f"node.epsilon_budget must be >= 0, got {self.epsilon_budget}",
        )
        _require(1 <= self.min_peers <= 1024, f"node.min_peers must be in [1, 1024], got {self.min_peers}")
        _require(
            len(self.display_name) <= 64 and self.display_name.isprintable(),
            f"node.display_name must be at most 64 printable characters, got {self.display_name!r}",
        )
        _require(
            0 < self.heartbeat_period < self.record_ttl <= 60,
            "node.heartbeat_period must be > 0 and < node.record_ttl <= 60",
        )
        # A trainer of an unsharded run aggregates; a sharded run's trainers only call stage servers.
        if self.swarm.client_mode and self.run.aggregation.mode == "secure" and not self.run.sharding.stages:
            raise ConfigError(CLIENT_MODE_SECURE)

    @property
    def identity_path(self) -> Path:
        return Path(self.identity).expanduser()

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser()


def load_node_config(path: str | None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Load a TOML file (if given) and apply flag overrides, given as dotted keys (``run.train.inner_steps``).

    Raises:
        ConfigError: unreadable file, bad TOML, unknown keys or out-of-range values.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    unknown = sorted(set(tree) - {"run", "swarm", "serve", "node"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in config; use [run], [swarm], [serve] and [node]")
    sections = {
        "run": run_config_from_dict(tree.get("run", {})),
        "swarm": build_section(SwarmConfig, dict(tree.get("swarm", {})), "swarm"),
        "serve": build_section(ServeConfig, dict(tree.get("serve", {})), "serve"),
    }
    return build_section(NodeConfig, {**tree.get("node", {}), **sections}, "node")


def check_join(config: NodeConfig) -> None:
    """What ``zen-node join`` needs beyond a valid config; checked before any folder is created.

    Raises:
        ConfigError: no ``--data``, a data path that does not exist, or a cosine schedule of unknown length.
    """
    config.run.train.schedule_steps(config.rounds)
    if config.data is None:
        raise ConfigError("no data: pass --data with a text file or a folder of .txt/.jsonl files")
    data = Path(config.data).expanduser()
    if not data.exists():
        raise ConfigError(f"data path {data} does not exist; pass --data with a text file or a folder of .txt/.jsonl")


def check_serve(config: NodeConfig) -> None:
    """What ``zen-node serve`` needs beyond a valid config; checked before any folder is created.

    Raises:
        ConfigError: the run is not sharded, or ``serve.stages`` names a stage the run does not have.
    """
    stages = config.run.sharding.stages
    if stages < 1:
        raise ConfigError("the run is not sharded: set [run.sharding] stages >= 1 in the run's config")
    for stage in config.serve.stages:
        if stage >= stages:
            raise ConfigError(f"stage {stage} does not exist: the run has stages 0..{stages - 1}")


def describe_difference(mine: RunConfig, theirs: dict[str, Any]) -> str:
    """Name the fields where another peer's run config differs from ours, e.g. ``model.d_model: 64 != 128``."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            diffs.append(f"{prefix}: ours {a!r}, theirs {b!r}")

    walk(mine.shared_dict(), theirs, "")
    return "; ".join(diffs[:8]) if diffs else "the encodings differ (software version?)"
