"""What every peer of a run must share: ``RunConfig``, one dataclass per component of it.

Its canonical encoding goes in each PeerRecord, and its hash decides who may train together.
``node.config`` re-exports every name here and adds this machine's own settings, the TOML loader and
``describe_difference`` (the fields where another peer's config differs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from node.model_config import LoraConfig, ModelConfig
from node.model_config import require as _require
from node.model_config import require_choice as _require_choice


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the field and the fix."""


AggregationMode = Literal["secure", "plain"]  # masked all-reduce, or hivemind's float averager
GroupFormation = Literal["matchmaking", "declared"]  # who forms secure groups (node/secagg/formation.py)
CombineRule = Literal["median", "trimmed_mean", "mean"]  # how a group merges its members' lineages
CompressionBits = Literal[4, 8, 16, 32]  # bits per value in the secure ring; 32 = no quantization
LrSchedule = Literal["constant", "cosine"]  # the inner learning rate over the run's inner steps (after warmup)
InnerOptimizerKind = Literal["adamw", "muon"]  # the inner optimizer (node/training/optimizers.py)


@dataclass
class TrainConfig:
    """DiLoCo-style schedule: H inner AdamW steps, then one outer Nesterov step on the averaged delta."""

    inner_steps: int = 5  # H: inner steps per outer round (5: measured best with kept groups, BENCHMARKS.md)
    batch_size: int = 16  # sequences per inner step
    inner_lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    # Outer step: plain model averaging (lr 1, no momentum) measured best at this scale; DiLoCo's
    # 0.7 / 0.9 (tuned for 150M+ models and H = 500) is worse than a peer alone here (BENCHMARKS.md).
    outer_lr: float = 1.0  # outer learning rate (1.0 with momentum 0: the global params become the group mean)
    outer_momentum: float = 0.0  # outer Nesterov momentum; 0 = plain SGD
    seed: int = 0  # initial weights are seeded by this, so every peer starts equal
    round_seconds: float = 0.0  # T: inner steps also stop after T seconds (a slow peer sends fewer samples); 0 = off
    # false by measurement: while a round's aggregation (matchmaking included) outlasts an inner phase,
    # the overlapped mean lands a whole round late, and at H = 20 that costs all the swarm's gain.
    overlap: bool = False  # aggregate while the next round trains; the mean lands between its steps once ready
    lr_schedule: LrSchedule = "constant"  # inner lr after warmup: "constant", or "cosine" decay to 10% of inner_lr
    warmup_steps: int = 0  # the inner lr rises linearly from inner_lr / warmup_steps over this many inner steps
    total_steps: int = 0  # "cosine" decays over this many inner steps; 0 = node.rounds x inner_steps
    inner_optimizer: InnerOptimizerKind = "adamw"  # "muon": Muon on the blocks' matrices, AdamW elsewhere (MuLoCo)

    def __post_init__(self) -> None:
        _require_choice(self.lr_schedule, LrSchedule, "train.lr_schedule")
        _require_choice(self.inner_optimizer, InnerOptimizerKind, "train.inner_optimizer")
        _require(
            0 <= self.warmup_steps <= 10_000_000, f"train.warmup_steps must be in [0, 1e7], got {self.warmup_steps}"
        )
        _require(
            0 <= self.total_steps <= 1_000_000_000, f"train.total_steps must be in [0, 1e9], got {self.total_steps}"
        )
        _require(
            self.total_steps == 0 or self.lr_schedule != "cosine" or self.warmup_steps < self.total_steps,
            f"train.warmup_steps must be < train.total_steps with the cosine schedule, got {self.warmup_steps} "
            f">= {self.total_steps}",
        )
        _require(
            math.isfinite(self.round_seconds) and 0 <= self.round_seconds <= 86_400,
            f"train.round_seconds must be in [0, 86400], got {self.round_seconds}",
        )
        _require(self.inner_steps >= 1, f"train.inner_steps must be >= 1, got {self.inner_steps}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(0 < self.inner_lr < 1, f"train.inner_lr must be in (0, 1), got {self.inner_lr}")
        _require(0 <= self.weight_decay < 1, f"train.weight_decay must be in [0, 1), got {self.weight_decay}")
        _require(0 < self.outer_lr <= 2, f"train.outer_lr must be in (0, 2], got {self.outer_lr}")
        _require(0 <= self.outer_momentum < 1, f"train.outer_momentum must be in [0, 1), got {self.outer_momentum}")

    def schedule_steps(self, rounds: int) -> int:
        """The inner steps the cosine schedule decays over: ``total_steps``, else ``rounds`` x ``inner_steps``.

        Raises:
            ConfigError: "cosine" with neither ``total_steps`` nor a number of rounds to derive it from.
        """
        if self.total_steps or self.lr_schedule != "cosine":
            return self.total_steps
        if rounds <= 0:
            raise ConfigError(
                "train.lr_schedule = 'cosine' needs a length: set train.total_steps or pass --rounds, e.g. --rounds 100"
            )
        return rounds * self.inner_steps


MAX_ALLOWLIST = 10_000  # most PeerIDs in aggregation.allowlist
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,64}")  # a base58 libp2p PeerID (Qm... or 12D3KooW...)


@dataclass
class AggregationConfig:
    """How pseudo-gradients are merged with peers."""

    mode: AggregationMode = "secure"  # "secure": masked all-reduce; "plain": hivemind's float averager (no masking)
    min_group_size: int = 3  # smallest group that may average; smaller waits for more peers (secure: >= 3)
    matchmaking_time: float = 3.0  # seconds a leader gathers followers before averaging
    timeout: float = 120.0  # seconds to find a group and average before the round counts as missed
    clip_bound: float = 1.0  # secure: every update coordinate is clipped to [-clip_bound, clip_bound]
    message_timeout: float = 10.0  # secure: seconds a protocol phase waits for small messages
    # secure: groups match at rounds that are multiples of this and keep their membership in between
    # (fresh keys and masks every round; a member that leaves or a failed round ends it); 1 = match every round.
    # 32: a match costs about 1.5 x matchmaking_time, and at 8 the 4-peer benchmark spent half its time in them
    # (utilization 0.19 at 8, 0.33 at 32, 0.36 at 64, the same loss; BENCHMARKS.md). A newcomer waits for the
    # next multiple to enter a group: lower it where rounds are slow
    group_rounds: int = 32
    # secure: the PeerIDs (base58) that may share a group; [] = anyone. A closed run's defence against
    # Sybils: a leader refuses other followers, a follower asks no other leader, a group with another
    # member aborts before any message (docs/architecture.md, "Who forms groups")
    allowlist: list[str] = field(default_factory=list)
    # secure: who forms groups. "declared": every ready peer declares itself and all compute the same
    # partition from a seed nobody chose (node/secagg/formation.py; the peers' clocks must agree to well within
    # matchmaking_time / 4); "matchmaking": hivemind's (a leader gathers followers, so a leader with Sybils
    # can choose a victim's group). Plain mode always uses hivemind's matchmaking
    formation: GroupFormation = "declared"
    # the held-out loss gate (node/training/gate.py): a group's mean whose outer step would take this node's
    # held-out loss more than this fraction above its best of the recent applied steps is not applied (the round
    # is "rejected"); 0 = no gate. 0.05: honest steps measured at most +1.5% over that best (800 gated steps),
    # one poisoner of four +15% a round, of six +2.5-4% (docs/architecture.md, "The held-out loss gate")
    gate_tolerance: float = 0.05
    # nor is a mean whose L2 norm is over this many times our own update's (0 = no check; honest means measured
    # at most 1.27x over 920, a poisoner of six's 12-88x; node/training/gate.py). Off with the gate
    gate_norm_ratio: float = 4.0
    # opt-in: nor is one whose step leaves that loss more than this fraction above what our own update alone would
    # (0 = off). Against a member sending -3x its update (+4.8% median); honest non-IID means can exceed 3% (gate.py)
    gate_own_tolerance: float = 0.0
    # members of a group that arrive with different global parameters (after a solo or rejected round, or from
    # different groups) leave it with this coordinate-wise combination of their states (node/training/lineage.py):
    # "median" (stays within the honest values while fewer than half the members lie), "trimmed_mean" (drops
    # n // 4 values at each end), "mean" (one liar moves it without limit)
    combine: CombineRule = "median"

    def __post_init__(self) -> None:
        _require_choice(self.mode, AggregationMode, "aggregation.mode")
        _require_choice(self.formation, GroupFormation, "aggregation.formation")
        _require_choice(self.combine, CombineRule, "aggregation.combine")
        for name in ("gate_tolerance", "gate_own_tolerance"):
            value = getattr(self, name)
            _require(
                math.isfinite(value) and 0 <= value <= 10,
                f"aggregation.{name} must be in [0, 10] (a fraction of the held-out loss; 0 = no check), got {value}",
            )
        _require(
            isinstance(self.allowlist, list)
            and len(self.allowlist) <= MAX_ALLOWLIST
            and all(isinstance(p, str) and _PEER_ID.fullmatch(p) for p in self.allowlist),
            f"aggregation.allowlist must be a list of at most {MAX_ALLOWLIST} base58 PeerIDs "
            f"(as `zen-node status` prints them, e.g. '12D3KooW...'), got {self.allowlist!r}"[:400],
        )
        _require(
            not self.allowlist or self.mode == "secure",
            "aggregation.allowlist needs aggregation.mode = 'secure' (plain averaging has no group check)",
        )
        _require(
            math.isfinite(self.gate_norm_ratio) and (self.gate_norm_ratio == 0 or 1 <= self.gate_norm_ratio <= 1e6),
            f"aggregation.gate_norm_ratio must be 0 (no check) or in [1, 1e6], got {self.gate_norm_ratio}",
        )
        _require(
            1 <= self.group_rounds <= 10_000,
            f"aggregation.group_rounds must be in [1, 10000], got {self.group_rounds}",
        )
        _require(
            2 <= self.min_group_size <= 32,
            f"aggregation.min_group_size must be in [2, 32], got {self.min_group_size}",
        )
        _require(
            self.mode != "secure" or self.min_group_size >= 3,
            "aggregation.min_group_size must be >= 3 in secure mode (a sum of two reveals both inputs); "
            "raise it or set aggregation.mode = 'plain'",
        )
        _require(
            math.isfinite(self.clip_bound) and 0 < self.clip_bound <= 1e6,
            f"aggregation.clip_bound must be in (0, 1e6], got {self.clip_bound}",
        )
        _require(0.5 <= self.message_timeout <= 300, "aggregation.message_timeout must be in [0.5, 300] s")
        _require(0.5 <= self.matchmaking_time <= 60, "aggregation.matchmaking_time must be in [0.5, 60] s")
        _require(self.timeout > self.matchmaking_time, "aggregation.timeout must exceed matchmaking_time")


@dataclass
class CompressionConfig:
    """Compression of updates inside the secure ring (node/secagg/compression.py); off at the defaults."""

    bits: CompressionBits = 32  # bits per value before the group's headroom bits: 4, 8 or 16; 32 = no quantization
    fraction: float = 1.0  # random-k: share of coordinates each round sends (index set from a group-shared seed)
    error_feedback: bool = True  # keep what was not sent (and rounding errors) for the next round
    bound: float = 0.0  # cap on the low-bit code's bound (groups agree on 3x RMS, a power of 2); 0 = clip_bound

    def __post_init__(self) -> None:
        _require_choice(self.bits, CompressionBits, "compression.bits")
        _require(0 < self.fraction <= 1, f"compression.fraction must be in (0, 1], got {self.fraction}")
        _require(
            math.isfinite(self.bound) and 0 <= self.bound <= 1e6,
            f"compression.bound must be in [0, 1e6] (0 = automatic), got {self.bound}",
        )

    @property
    def active(self) -> bool:
        return self.bits < 32 or self.fraction < 1

    def count(self, size: int) -> int:
        """Coordinates of a ``size``-long update that one round sends (random-k)."""
        return size if self.fraction >= 1 else max(1, min(size, math.ceil(size * self.fraction)))


@dataclass
class PrivacyConfig:
    """Differential privacy of each node's records (DP-SGD) or whole contribution (ring noise); off unless enabled.

    ``level = "record"``: DP-SGD on every inner step (node/training/dpsgd.py); ``"user"``: the round's
    pseudo-gradient clipped and noised inside the masked ring (node/secagg/privacy.py).
    """

    enabled: bool = False  # clip, add noise, account the budget
    level: Literal["record", "user"] = "record"  # the unit of privacy: one record (a text window) or a whole node
    clip_norm: float = 1.0  # C: L2 bound on each record's gradient (record) or a node's pseudo-gradient (user)
    noise_multiplier: float = 0.0  # sigma; 0 = derived from target_epsilon over planned_rounds
    target_epsilon: float = 0.0  # the budget: a node stops sending updates before exceeding it; 0 = none
    delta: float = 1e-5  # the delta of every epsilon
    max_dropouts: int = 1  # t (user level): the aggregate keeps its noise when this many peers drop out or collude
    # rounds the budget is planned for, when sigma is derived (record: x inner_steps; user with cohorts: plus one
    # cross-cohort release every cohorts.global_every rounds, node/training/privacy.py planned_releases)
    planned_rounds: int = 100
    # user level: start even when the noise on a group's mean outweighs the clipped update (groups of
    # aggregation.min_group_size below the floor sigma * sqrt(d), node/training/privacy.py); a warning names the ratio
    allow_noisy: bool = False
    # Record level only; the run without DP keeps train.batch_size and train.inner_lr. DP-SGD's noise on a step's
    # mean is sigma * C / batch and, for a fixed epsilon, sigma grows slower than the batch; that noise also fills
    # AdamW's second moment, which shrinks each step. 4-peer demo swarm, BENCHMARKS.md: scale 1 and 1 lose 19%.
    batch_scale: int = 4  # DP-SGD's expected batch: this x train.batch_size records a step (Poisson sampled)
    lr_scale: float = 3.0  # DP-SGD's AdamW learning rate: this x the inner lr (its schedule's shape kept)

    def __post_init__(self) -> None:
        _require(
            self.level in ("record", "user"),
            f"privacy.level must be 'record' (DP-SGD per text window) or 'user' (noise per node), got {self.level!r}",
        )
        _require(math.isfinite(self.clip_norm) and self.clip_norm > 0, "privacy.clip_norm must be > 0")
        _require(
            math.isfinite(self.noise_multiplier) and 0 <= self.noise_multiplier <= 1e3,
            "privacy.noise_multiplier must be in [0, 1000]",
        )
        _require(math.isfinite(self.target_epsilon) and self.target_epsilon >= 0, "privacy.target_epsilon must be >= 0")
        _require(0 < self.delta < 0.1, f"privacy.delta must be in (0, 0.1), got {self.delta}")
        _require(0 <= self.max_dropouts <= 29, f"privacy.max_dropouts must be in [0, 29], got {self.max_dropouts}")
        _require(1 <= self.planned_rounds <= 100_000, "privacy.planned_rounds must be in [1, 100000]")
        _require(1 <= self.batch_scale <= 64, f"privacy.batch_scale must be in [1, 64], got {self.batch_scale}")
        _require(
            math.isfinite(self.lr_scale) and 0 < self.lr_scale <= 100,
            f"privacy.lr_scale must be in (0, 100], got {self.lr_scale}",
        )
        _require(
            not self.enabled or self.noise_multiplier > 0 or self.target_epsilon > 0,
            "privacy needs privacy.noise_multiplier > 0 or a privacy.target_epsilon to derive it from",
        )


@dataclass
class ShardingConfig:
    """Pipeline stages over the GPT's blocks (node/sharding/stages.py); off (a full replica each) unless stages > 0."""

    stages: int = 0  # remote stages the blocks after ``local_blocks`` are cut into; 0 = no sharding
    local_blocks: int = 1  # first blocks every trainer keeps (with the embedding and the head)
    micro_batches: int = 1  # a trainer's batch is sent through the stages in this many pieces
    request_timeout: float = 10.0  # seconds one stage call may take before the trainer tries another server
    spot_check_fraction: float = 0.05  # share of stage calls a trainer recomputes locally to catch a cheater
    spot_check_tolerance: float = 1e-3  # largest relative difference a recomputed activation may show
    average_period: float = 60.0  # seconds between rounds averaging a stage's params among its servers; 0 = never
    # trainers average their own parts in the background while training on (node/sharding/fronts.py); false:
    # each waits for its round's group
    overlap_averaging: bool = False
    ban_min_rounds: int = 10  # rounds a trainer's record must announce before its bans count (dht/bans.py)
    ban_quorum: int = 2  # distinct counted reporters that exclude a server; fewer only deprioritize it
    ban_ttl: float = 3600.0  # seconds a trainer's own ban lives; validators cap it at dht.bans.MAX_BAN_TTL (3600)
    # A stage's AdamW lr for one trainer's step: train.inner_lr x this / the run's trainers (each trainer's step is
    # its share of the stage's step, so N trainers move the shared blocks as far as one would; BENCHMARKS.md)
    stage_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _require(0 <= self.stages <= 64, f"sharding.stages must be in [0, 64], got {self.stages}")
        _require(0 <= self.local_blocks <= 95, f"sharding.local_blocks must be in [0, 95], got {self.local_blocks}")
        _require(1 <= self.micro_batches <= 64, f"sharding.micro_batches must be in [1, 64], got {self.micro_batches}")
        _require(0.1 <= self.request_timeout <= 600, "sharding.request_timeout must be in [0.1, 600] s")
        _require(0 <= self.spot_check_fraction <= 1, "sharding.spot_check_fraction must be in [0, 1]")
        _require(
            math.isfinite(self.spot_check_tolerance) and 0 < self.spot_check_tolerance < 1,
            "sharding.spot_check_tolerance must be in (0, 1)",
        )
        _require(
            self.average_period == 0 or 1 <= self.average_period <= 86400,
            f"sharding.average_period must be 0 (never) or in [1, 86400] s, got {self.average_period}",
        )
        _require(
            0 <= self.ban_min_rounds <= 10**9 and 1 <= self.ban_quorum <= 64,
            f"sharding.ban_min_rounds must be in [0, 1e9] and ban_quorum in [1, 64], e.g. 10 and 2, "
            f"got {self.ban_min_rounds} and {self.ban_quorum}",
        )
        _require(
            math.isfinite(self.ban_ttl) and 1 <= self.ban_ttl <= 3600,
            f"sharding.ban_ttl must be in [1, 3600] s, got {self.ban_ttl}",
        )
        _require(0 < self.stage_lr_scale <= 1, f"sharding.stage_lr_scale must be in (0, 1], got {self.stage_lr_scale}")


MAX_PATTERNS = 32  # most name patterns in each of cohorts.local_patterns and cohorts.cohort_patterns


@dataclass
class CohortConfig:
    """Cohorts of peers with similar data and hierarchical averaging (node/aggregation/hierarchy.py); off by default."""

    enabled: bool = False  # average cohort params within the cohort, global params also across cohorts
    # Unset: the adaptive rule (dht/cohorts.py). Set: the fixed override, cosine distance up to which two sketches link.
    distance_threshold: float | None = None
    min_separation: float = 2.5  # the adaptive rule cuts where groups are this many times farther apart than spread
    # fnmatch on a parameter's name or its canonical name (hierarchy.canonical_name: a Hugging Face model's final
    # norm reads as ln_f, decoder layer i as blocks.i, embeddings as wte / wpe, its output head as head)
    local_patterns: list[str] = field(default_factory=lambda: ["ln_f.*"])  # never sent: the final norm
    cohort_patterns: list[str] = field(default_factory=lambda: ["blocks.*"])  # averaged within the cohort only
    global_every: int = 4  # the global params are also averaged across cohorts every this many rounds
    alpha: float = 0.5  # a cohort's weight across cohorts is its samples * size**-alpha (0: by samples)
    sketch_noise: float = 0.0  # std of Gaussian noise on each sketch coordinate (node/sketch.py)
    sketch_every: int = 10  # recompute the sketch from the data every this many rounds; 0 = only at enrollment

    def __post_init__(self) -> None:
        _require(
            self.distance_threshold is None
            or (isinstance(self.distance_threshold, int | float) and 0 <= self.distance_threshold <= 2),
            f"cohorts.distance_threshold must be unset (adaptive) or in [0, 2] (cosine distance), "
            f"got {self.distance_threshold}",
        )
        _require(
            math.isfinite(self.min_separation) and 1 < self.min_separation <= 100,
            f"cohorts.min_separation must be in (1, 100], e.g. 2.0, got {self.min_separation}",
        )
        for name in ("local_patterns", "cohort_patterns"):
            patterns = getattr(self, name)
            _require(
                isinstance(patterns, list)
                and len(patterns) <= MAX_PATTERNS
                and all(isinstance(p, str) and 0 < len(p) <= 128 for p in patterns),
                f"cohorts.{name} must be a list of at most {MAX_PATTERNS} name patterns (1-128 characters), "
                f"e.g. ['head.*'], got {patterns!r}",
            )
        _require(
            1 <= self.global_every <= 10_000, f"cohorts.global_every must be in [1, 10000], got {self.global_every}"
        )
        _require(
            math.isfinite(self.alpha) and 0 <= self.alpha <= 4, f"cohorts.alpha must be in [0, 4], got {self.alpha}"
        )
        _require(
            math.isfinite(self.sketch_noise) and 0 <= self.sketch_noise <= 1,
            f"cohorts.sketch_noise must be in [0, 1], got {self.sketch_noise}",
        )
        _require(0 <= self.sketch_every <= 1_000_000, f"cohorts.sketch_every must be >= 0, got {self.sketch_every}")


@dataclass
class RunConfig:
    """Everything the peers of one run must agree on."""

    run_id: str = "zen-demo"  # the swarm's name for this training run
    min_memory_gb: float = 16.0  # nodes with less memory are refused unless --allow-low-memory
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    cohorts: CohortConfig = field(default_factory=CohortConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _require(
            not self.lora.active or self.model.family == "hf",
            'lora needs model.family = "hf" (adapters on a transformers base); set lora.r = 0 for the built-in GPT',
        )
        _require(
            not self.compression.active or self.aggregation.mode == "secure",
            "compression works inside the secure ring; set aggregation.mode = 'secure' or compression.bits = 32 "
            "and compression.fraction = 1",
        )
        _require(
            self.sharding.stages == 0 or self.sharding.local_blocks + self.sharding.stages <= self.model.n_layer,
            f"sharding needs local_blocks + stages <= model.n_layer ({self.sharding.local_blocks} + "
            f"{self.sharding.stages} > {self.model.n_layer}); lower sharding.stages",
        )
        _require(
            self.model.family == "zen-gpt" or self.sharding.stages == 0,
            'sharding cuts the built-in GPT\'s blocks only; set sharding.stages = 0 or model.family = "zen-gpt"',
        )
        _require(
            not self.privacy.enabled or self.aggregation.mode == "secure",
            "privacy needs aggregation.mode = 'secure' (the noise shares are added inside the masked ring)",
        )
        # A sharded trainer's DP-SGD covers its own parts; the stages train on hidden states and gradients
        # without DP, and user-level noise lives in the trainers' ring, which stage weights never cross
        # (node/sharding/private.py).
        _require(
            not self.privacy.enabled or self.sharding.stages == 0 or self.privacy.level == "record",
            "user-level privacy cannot be combined with sharding (its noise is added in the trainers' ring, "
            'which the stages\' weights never cross); set privacy.level = "record" or sharding.stages = 0',
        )
        _require(
            0 < len(self.run_id) <= 64 and all(c.isalnum() or c in "-_" for c in self.run_id),
            f"run.run_id must be 1-64 letters, digits, '-' or '_', got {self.run_id!r}",
        )
        _require(self.min_memory_gb >= 0, f"run.min_memory_gb must be >= 0, got {self.min_memory_gb}")
        _require(
            self.sharding.stages == 0 or (self.train.lr_schedule == "constant" and self.train.warmup_steps == 0),
            "a sharded run's trainers do not follow an inner learning-rate schedule yet; "
            "set train.lr_schedule = 'constant' and train.warmup_steps = 0",
        )
        _require(
            self.sharding.stages == 0 or self.train.inner_optimizer == "adamw",
            "a sharded run's trainers and stage servers step with AdamW only; set train.inner_optimizer = 'adamw'",
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field, local model paths included (a checkpoint's record of its run)."""
        return dataclasses.asdict(self)

    def shared_dict(self) -> dict[str, Any]:
        """What every peer must agree on: ``to_dict`` without this node's model paths (``ModelConfig.shared_dict``)."""
        shared = {**self.to_dict(), "model": self.model.shared_dict()}
        if not self.lora.active:
            del shared["lora"]  # a run without adapters keeps the hash it had before LoRA existed
        for (section, name), default in _LATER_FIELDS.items():  # likewise a run with these at their defaults
            if shared[section][name] == default:
                del shared[section][name]
        return shared

    def to_bytes(self) -> bytes:
        """Canonical encoding of ``shared_dict`` (sorted keys), for the PeerRecord and the hash."""
        return msgpack.packb(json.loads(json.dumps(self.shared_dict(), sort_keys=True)), use_bin_type=True)

    def digest(self) -> str:
        return hashlib.blake2b(self.to_bytes(), digest_size=16).hexdigest()


# fields added after runs existed, left out of the run hash at their defaults (those runs keep their hash)
_LATER_FIELDS: dict[tuple[str, str], Any] = {
    ("train", "inner_optimizer"): "adamw",
    ("aggregation", "combine"): "median",
    ("sharding", "stage_lr_scale"): 1.0,
    ("aggregation", "gate_norm_ratio"): 4.0,
    ("aggregation", "gate_own_tolerance"): 0.0,
}

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "aggregation": AggregationConfig,
    "privacy": PrivacyConfig,
    "compression": CompressionConfig,
    "sharding": ShardingConfig,
    "cohorts": CohortConfig,
    "lora": LoraConfig,
}


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` for the TOML section ``[where]``; any error becomes a ConfigError naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; known keys: {sorted(known)}")
    try:
        return cls(**values)
    except ConfigError:
        raise  # already names its fields (and may span sections)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}]: {e}") from None


def run_config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a (possibly nested) mapping, as found in TOML or a PeerRecord."""
    values = dict(values)
    nested = {name: build_section(cls, dict(values.pop(name, {})), f"run.{name}") for name, cls in _SECTIONS.items()}
    return build_section(RunConfig, {**values, **nested}, "run")
