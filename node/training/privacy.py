"""A trainer's differential privacy at its run's level: what it adds, when it may send, what it spent.

``[run.privacy] level`` picks the unit of privacy:

- ``"record"`` (the default): every inner step is DP-SGD on Poisson samples of the node's records
  (node/training/dpsgd.py); the accountant counts steps. Each phase takes at most the steps the
  budget still allows. Once none is left the node stops sending (``local`` rounds) and its steps
  are no longer counted: nothing they produce leaves the node.
- ``"user"``: the node's whole pseudo-gradient is clipped to ``clip_norm`` and noised inside the
  masked ring (node/secagg/privacy.py); the accountant counts releases through a ``ReleaseLedger``
  shared with the averager processes (a permit per round, each release counted, no retry after one).
  With ``[run.cohorts]`` a round runs two rings, the cohort ring and every ``global_every`` rounds the
  cross-cohort one, and each ring's release is its own accounting event: the ledger has a slot per
  ring, and the noise is planned for ``planned_releases`` (the rounds plus their cross-cohort rings).
  The accountant's effective noise multiplier accounts for the ring's fixed-point scale, so the ring
  bound (and the compression bound it depends on) is computed here too (``accounted_multiplier``), and a
  sigma derived from ``target_epsilon`` is calibrated for that multiplier: the planned releases fit the
  target exactly, as the accountant counts them (``user_noise_multiplier``). Before anything starts
  (``check_privacy``, which ``zen-node join`` calls before it creates any folder or identity, and
  again at set-up), ``check_user_population`` refuses a run whose smallest group would get a mean
  with more noise than signal (a floor of about ``sigma * sqrt(d)`` peers a group), unless ``allow_noisy``.

What a round that formed no group may publish (``publishes``): the global parameters are what
``StateSharer`` serves to anyone, so under DP they may only move by released, noised updates.
At user level a ``solo`` or ``local`` round's update is clipped but not noised (its noise lives in
the ring, which did not run): it does not touch the global parameters and stays in the local
model, sent with the next group round. Adding the full noise ``sigma * C`` locally instead would
spend a release on a single update and put noise of norm ``sigma * C * sqrt(d)`` (hundreds of times
the update) into the shared model. At record level the update is already DP-SGD output whose
steps are counted, so a ``solo`` round applies it; a ``local`` round (budget spent) does not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from node.aggregation.secure import MAX_SECURE_GROUP, ring_bound
from node.config import ConfigError, NodeConfig, RunConfig
from node.model import build_run_model
from node.secagg.fixed_point import FixedPointCodec
from node.secagg.privacy import (
    NoiseShare,
    PrivacyAccountant,
    ReleaseLedger,
    calibrate_noise_multiplier,
    clip_update,
    effective_multiplier,
    group_size_floor,
    mean_noise_ratio,
    pld_epsilon,
)
from node.tokens import RunTokenizer
from node.training.dpsgd import DPSGDStep, RecordAccountant, RecordSampler, calibrate_record_noise
from node.training.report import RoundOutcome

StepMaker = Callable[..., DPSGDStep]  # (model, optimizer, sampler, sigma, clip_norm, device, lr_scale) -> the step

if TYPE_CHECKING:
    from node.config import PrivacyConfig

logger = logging.getLogger(__name__)

MAX_NOISE_MULTIPLIER = 1e3  # the largest privacy.noise_multiplier a run may set (node/run_config.py)


def compression_bound(run: RunConfig) -> float:
    """The low-bit code's clip bound (a cap: each group agrees on a tighter one from its members'
    update sizes, node/secagg/protocol.py); 0 when values keep the full ring."""
    compression = run.compression
    if compression.bits == 32:
        return 0.0
    return compression.bound or run.aggregation.clip_bound


def node_budget(privacy: PrivacyConfig, epsilon_budget: float) -> float:
    """The epsilon this node may spend: the lower of the run's target and its own cap (inf: none)."""
    return min([b for b in (privacy.target_epsilon, epsilon_budget) if b > 0], default=math.inf)


def check_user_population(run: RunConfig, dimension: int, noise_multiplier: float) -> float:
    """User level: refuse a run whose smallest group's mean carries more noise than signal; returns that ratio.

    The ratio is ``mean_noise_ratio`` (node/secagg/privacy.py) for a group of
    ``aggregation.min_group_size``, the smallest group that may release: about ``sigma * sqrt(d) / n``.
    Above 1 the run is refused with a ConfigError naming the floor (``group_size_floor``, about
    ``sigma * sqrt(d)``), unless ``privacy.allow_noisy``, which logs a warning with the ratio.
    """
    privacy, size = run.privacy, run.aggregation.min_group_size
    ratio = mean_noise_ratio(noise_multiplier, dimension, size, privacy.max_dropouts)
    floor = group_size_floor(noise_multiplier, dimension, privacy.max_dropouts)
    facts = (
        f"privacy.level = 'user' with aggregation.min_group_size = {size}: the DP noise on a group's mean is "
        f"{ratio:.3g}x the clipped update (noise multiplier {noise_multiplier:.4g}, {dimension} parameters; "
        f"it stays below 1x from {floor} peers a group, and groups hold at most {MAX_SECURE_GROUP})"
    )
    if ratio <= 1:
        logger.info(facts)
    elif privacy.allow_noisy:
        logger.warning(f"{facts}; starting anyway (privacy.allow_noisy = true): expect the model to be mostly noise")
    else:
        grow = f"raise aggregation.min_group_size to >= {floor}, " if floor <= MAX_SECURE_GROUP else ""
        less = (
            "lower privacy.noise_multiplier"
            if privacy.noise_multiplier > 0
            else "raise privacy.target_epsilon (or lower privacy.planned_rounds)"
        )
        raise ConfigError(
            f"{facts}; {grow}use privacy.level = 'record', {less} to a noise multiplier <= "
            f"{noise_multiplier / ratio:.3g}, or set privacy.allow_noisy = true to train anyway"
        )
    return ratio


def release_rings(run: RunConfig) -> int:
    """User level: the secure all-reduces a round may run, each one release: 2 with cohorts (cohort and
    cross-cohort rings, node/aggregation/hierarchy.py), else 1."""
    return 2 if run.cohorts.enabled else 1


def planned_releases(run: RunConfig) -> int:
    """User level: the releases ``planned_rounds`` rounds make, the events sigma is calibrated over.

    One a round, and with cohorts one more on every round that is a multiple of ``global_every`` (its
    cross-cohort ring): ``R + R // global_every``, e.g. 150 for 100 rounds with ``global_every = 2``.
    """
    rounds = run.privacy.planned_rounds
    return rounds + rounds // run.cohorts.global_every if run.cohorts.enabled else rounds


def run_dimension(run: RunConfig) -> int:
    """The values in one update of the run's model: built once on the CPU to count its parameters (the meta
    device would save the memory, but its seeded init takes seconds)."""
    return sum(p.numel() for p in build_run_model(run.model, run.train.seed, False, run.lora).parameters())


def accounted_multiplier(run: RunConfig, dimension: int, noise_multiplier: float) -> float:
    """User level: the multiplier the accountant charges each release of a ring noised with ``noise_multiplier``.

    ``effective_multiplier`` (node/secagg/privacy.py): sigma shrunk by stochastic rounding's worst-case L2 growth
    at the fixed-point scale of the largest group (``MAX_SECURE_GROUP``: the most headroom bits, the coarsest
    scale), whose ring bound widens with sigma (``ring_bound``). Slightly below sigma with the full 32-bit ring
    (about 1e-4 relative for the default model), far below it with a low-bit code.
    """
    privacy = run.privacy
    noise = NoiseShare(noise_multiplier, privacy.clip_norm, privacy.max_dropouts)
    bound = ring_bound(run.aggregation, noise, compression_bound(run))
    scale = FixedPointCodec(MAX_SECURE_GROUP, bound, bits=run.compression.bits).scale
    return effective_multiplier(noise_multiplier, privacy.clip_norm, scale, dimension)


def user_noise_multiplier(run: RunConfig, dimension: int | None = None) -> float:
    """User level: sigma, the run's ``noise_multiplier`` or derived from ``target_epsilon`` over the planned
    releases (``planned_releases``) for an update of ``dimension`` values (None: the run's model, built to count).

    A derived sigma is the smallest whose *accounted* multiplier (``accounted_multiplier``, what the accountant
    charges each release) spends at most the target over the planned releases: calibrating sigma itself to the
    target left the accountant's slightly smaller multiplier a hair above it at the last planned release, which
    the budget then refused (epsilon 8 over 10 rounds stopped after 9). The accounted multiplier grows with sigma
    (the ring bound's growth only shrinks the sensitivity's rounding share), so the smallest sigma reaching the
    calibrated one is found by bisection; the result is checked with the accountant's own computation
    (``pld_epsilon``), so a run can make exactly its planned releases and never spends above its target.

    Raises:
        ConfigError: no sigma up to the config's 1000 is accounted at the calibrated multiplier (a low-bit
            ``compression.bits``, whose rounding dominates the sensitivity).
    """
    privacy = run.privacy
    if privacy.noise_multiplier:
        return privacy.noise_multiplier
    dimension = run_dimension(run) if dimension is None else dimension
    releases = planned_releases(run)
    needed = calibrate_noise_multiplier(privacy.target_epsilon, privacy.delta, releases)

    def accounted(sigma: float) -> float:
        return accounted_multiplier(run, dimension, sigma)

    low, high = needed, MAX_NOISE_MULTIPLIER  # accounted(low) < needed (rounding only shrinks it) <= accounted(high)
    if accounted(high) < needed:
        raise ConfigError(
            f"privacy.target_epsilon = {privacy.target_epsilon} over {releases} planned release(s) needs an "
            f"accounted noise multiplier of {needed:.4g}, but with compression.bits = {run.compression.bits} the "
            f"ring's rounding caps it at {accounted(high):.4g} for {dimension} parameters (any "
            f"privacy.noise_multiplier <= {MAX_NOISE_MULTIPLIER:g}); raise compression.bits, raise "
            "privacy.target_epsilon or lower privacy.planned_rounds"
        )
    for _ in range(200):  # to float resolution: about 60 halvings
        middle = (low + high) / 2
        if not low < middle < high:
            break
        low, high = (low, middle) if accounted(middle) >= needed else (middle, high)
    # The PLD grid need not make epsilon exactly monotone in the multiplier: check with the accountant's own sum,
    # stepping up from the calibration's tolerance (1e-6) if it is above (never needed in the cases tested).
    sigma = high
    for step in range(40):
        if pld_epsilon(accounted(sigma), releases, privacy.delta) <= privacy.target_epsilon:
            return sigma
        sigma = high * (1 + 1e-6 * 2**step)
    raise ConfigError(f"privacy.target_epsilon = {privacy.target_epsilon}: no noise multiplier found that meets it")


def check_privacy(run: RunConfig) -> None:
    """What a run's DP needs beyond a valid config, checked before any folder or identity is created.

    At user level: the population floor (``check_user_population``) for the run's model, built once here
    on the CPU to count its parameters (the node builds it again; the meta device would save the memory but
    its seeded init takes seconds). Record level needs nothing more.

    Raises:
        ConfigError: the run's groups are below the population floor.
    """
    privacy = run.privacy
    if not privacy.enabled or privacy.level != "user":
        return
    dimension = run_dimension(run)
    check_user_population(run, dimension, user_noise_multiplier(run, dimension))


def setup_privacy(run: RunConfig, dimension: int, epsilon_budget: float) -> tuple[NoiseShare, PrivacyAccountant]:
    """User level: the noise share each round adds (with its release ledger) and the accountant of this node.

    Args:
        run: the run's configuration (``run.privacy`` enabled).
        dimension: the number of values in one update (all model parameters).
        epsilon_budget: this node's own cap on epsilon (``--epsilon-budget``; 0: the run's target only).

    Raises:
        ConfigError: the run's groups are below the population floor (``check_user_population``).
    """
    privacy = run.privacy
    sigma = user_noise_multiplier(run, dimension)
    check_user_population(run, dimension, sigma)
    ledger = ReleaseLedger(rings=release_rings(run))
    noise = NoiseShare(sigma, privacy.clip_norm, privacy.max_dropouts, ledger=ledger)
    budget = node_budget(privacy, epsilon_budget)
    multiplier = accounted_multiplier(run, dimension, sigma)
    accountant = PrivacyAccountant(multiplier, privacy.delta, budget, ledger=ledger)
    # Now, before the node joins: dp-accounting's first PLD takes about a second (more on a loaded machine).
    # Paid at the first round's permit, it made a node with a budget reach matchmaking after the others had
    # formed their group (kept for the next rounds): a fresh-clone CI run saw it solo in every round.
    accountant.epsilon(accountant.rounds + 1)
    logger.info(
        f"user-level differential privacy: clip {privacy.clip_norm}, noise multiplier {sigma:.4f}, "
        f"delta {privacy.delta}, budget epsilon {budget}, up to {ledger.rings} release(s) a round "
        f"({planned_releases(run)} planned)"
    )
    return noise, accountant


def setup_record_privacy(
    run: RunConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    corpus: bytes | torch.Tensor,
    batch_size: int,
    device: torch.device,
    epsilon_budget: float,
    make_step: StepMaker | None = None,
) -> tuple[DPSGDStep, RecordAccountant]:
    """Record level: the DP-SGD step over this node's records and the accountant of its steps.

    The records are windows of ``context + 1`` of the training text's tokens (node/training/dpsgd.py): ``corpus``
    is that text's bytes, tokenized here with the run's tokenizer (bytes for the built-in GPT), or its token ids.
    DP-SGD expects ``privacy.batch_scale`` x ``batch_size`` records a step and steps at ``privacy.lr_scale``
    x the inner lr (node/training/dpsgd.py says why). ``make_step`` builds the step from DPSGDStep's arguments
    (default: DPSGDStep itself; a sharded trainer's takes its per-example gradients through the stages).

    Raises:
        ConfigError: an "hf" model whose per-example gradients cannot be taken (``check_per_example_gradients``).
    """
    privacy = run.privacy
    tokens = RunTokenizer.for_model(run.model).encode(corpus) if isinstance(corpus, bytes) else corpus
    sampler = RecordSampler(tokens, run.model.context, batch_size * privacy.batch_scale)
    planned = privacy.planned_rounds * run.train.inner_steps
    sigma = privacy.noise_multiplier or calibrate_record_noise(
        privacy.target_epsilon, privacy.delta, sampler.sample_rate, planned
    )
    budget = node_budget(privacy, epsilon_budget)
    step = (make_step or DPSGDStep)(model, optimizer, sampler, sigma, privacy.clip_norm, device, privacy.lr_scale)
    check_per_example_gradients(run, step)
    accountant = RecordAccountant(sigma, sampler.sample_rate, privacy.delta, budget)
    logger.info(
        f"record-level differential privacy (DP-SGD): {sampler.count} records of {run.model.context + 1} tokens, "
        f"sample rate {sampler.sample_rate:.4f} (expected batch {batch_size * privacy.batch_scale}), "
        f"lr x {privacy.lr_scale}, clip {privacy.clip_norm}, noise multiplier {sigma:.4f}, delta {privacy.delta}, "
        f"budget epsilon {budget} ({accountant.max_steps()} steps)"
    )
    return step, accountant


def check_per_example_gradients(run: RunConfig, step: DPSGDStep) -> None:
    """An "hf" model: take the per-example gradients of one record now, so a model ``vmap`` cannot run (data-dependent
    control flow in its forward, an op without a batching rule that raises) is refused before the node joins,
    not at its first inner step. Every shape tested runs (Llama, Qwen2, Mistral, GPT-2, with and without LoRA).

    Raises:
        ConfigError: naming the model's ``model_type`` and the fix.
    """
    if run.model.family != "hf":
        return
    window = step.sampler.records[:1]
    try:
        step.per_example_gradients(window[:, :-1], window[:, 1:])
    except (RuntimeError, NotImplementedError, ValueError) as e:
        kind = getattr(getattr(step.model, "config", None), "model_type", "?")
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(
            f'record-level DP (DP-SGD) cannot take per-example gradients of model_type "{kind}" ({reason}); '
            'use privacy.level = "user" or another model.hf_config'
        ) from None


class TrainerPrivacy:
    """What a TrainingNode asks of its DP, at either level (the module docstring says what each does).

    Build it with ``TrainerPrivacy.create``. Args as for ``setup_privacy`` and ``setup_record_privacy``.
    """

    def __init__(
        self,
        level: str,
        target_epsilon: float,
        clip_norm: float,
        user: tuple[NoiseShare, PrivacyAccountant] | None = None,
        record: tuple[DPSGDStep, RecordAccountant] | None = None,
    ):
        self.level, self.target_epsilon, self.clip_norm = level, target_epsilon, clip_norm
        self.noise: NoiseShare | None = user[0] if user else None  # the ring's noise share (user level only)
        self.accountant: PrivacyAccountant | None = user[1] if user else None
        self.dpsgd: DPSGDStep | None = record[0] if record else None
        self.steps: RecordAccountant | None = record[1] if record else None
        self.budget_spent = False
        self._counting = True  # record level: whether the current phase's steps are counted

    @classmethod
    def create(
        cls,
        config: NodeConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        corpus: bytes | torch.Tensor,
        batch_size: int,
        make_step: StepMaker | None = None,
    ) -> TrainerPrivacy:
        """A node's DP: ``model`` (its device), ``optimizer`` and training ``corpus`` (its bytes or token ids)
        serve the record level (``make_step``: as for ``setup_record_privacy``)."""
        run, epsilon_budget, privacy = config.run, config.epsilon_budget, config.run.privacy
        device = next(model.parameters()).device
        if privacy.level == "user":
            dimension = sum(p.numel() for p in model.parameters())
            user = setup_privacy(run, dimension, epsilon_budget)
            return cls("user", privacy.target_epsilon, privacy.clip_norm, user=user)
        record = setup_record_privacy(run, model, optimizer, corpus, batch_size, device, epsilon_budget, make_step)
        return cls("record", privacy.target_epsilon, privacy.clip_norm, record=record)

    # ---- the inner phase (record level) --------------------------------------------------------
    def phase_steps(self, inner_steps: int) -> int:
        """Steps the next inner phase may take: at record level capped by the budget (then uncounted)."""
        if self.steps is None:
            return inner_steps
        left = self.steps.steps_left()
        self._counting = left is None or left > 0
        return inner_steps if left is None or left == 0 else min(inner_steps, left)

    @property
    def inner_step(self) -> Callable[[], float] | None:
        """The DP-SGD step that replaces the plain one (record level; each counted while the budget allows), or None."""
        return self._counted_step if self.dpsgd is not None else None

    def _counted_step(self) -> float:
        assert self.dpsgd is not None and self.steps is not None
        loss = self.dpsgd()
        if self._counting:
            self.steps.record(1)
        return loss

    def step_samples(self, batch_size: int) -> int:
        """Records an inner step trains on: the run's ``batch_size``, or DP-SGD's expected Poisson batch."""
        if self.dpsgd is None:
            return batch_size
        sampler = self.dpsgd.sampler
        return max(1, round(sampler.sample_rate * sampler.count))

    # ---- a round ------------------------------------------------------------------------------
    def launch(self, sent: list[torch.Tensor]) -> bool:
        """Before a round is sent: clip it (user level) and say whether the budget lets it leave."""
        if self.accountant is not None:
            clip_update(sent, self.clip_norm)  # the clipped-off excess stays unsent, for later
            allowed = self.accountant.permit_round()  # a release per ring that the budget still fits
        else:
            allowed = self._counting
        if not allowed and not self.budget_spent:
            logger.warning(
                f"privacy budget spent (epsilon {self.epsilon():.3f} of {self.target_epsilon}): "
                "no longer sending updates; training locally"
            )
            self.budget_spent = True
        return allowed

    def landed(self) -> None:
        """After a round, whatever its outcome: count the releases the averagers made (user level)."""
        if self.accountant is not None and (new := self.accountant.sync()):
            logger.info(
                f"{new} DP release(s) counted this round, {self.accountant.rounds} in all: "
                f"epsilon {self.accountant.epsilon():.4f}"
            )

    def publishes(self, mode: RoundOutcome) -> bool:
        """Whether a round that formed no group (or whose mean the gate rejected) may apply its update to the
        served global parameters."""
        return self.level == "record" and mode in (RoundOutcome.SOLO, RoundOutcome.REJECTED)

    # ---- what was spent ------------------------------------------------------------------------
    def epsilon(self) -> float:
        """Epsilon spent so far (PLD, at the run's delta)."""
        if self.accountant is not None:
            return self.accountant.epsilon()
        assert self.steps is not None
        return self.steps.epsilon()

    @property
    def spent(self) -> int:
        """What the accountant counted: releases (user level) or DP-SGD steps (record level)."""
        if self.accountant is not None:
            return self.accountant.rounds
        assert self.steps is not None
        return self.steps.steps

    def restore(self, spent: int) -> None:
        """Resume the count from a checkpoint."""
        if self.accountant is not None:
            self.accountant.rounds = spent
        elif self.steps is not None:
            self.steps.steps = spent
