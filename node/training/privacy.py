"""A trainer's differential privacy: the noise share it adds to each round and the accountant of its budget.

With ``[run.privacy]`` each contribution is clipped to ``clip_norm`` and noised inside the masked ring
(node/secagg/privacy.py). The accountant's effective noise multiplier accounts for the ring's
fixed-point scale, so the ring bound (and the compression bound it depends on) is computed here too.
The node stops sending updates once ``can_contribute()`` is False (TrainingNode's ``local`` rounds).
"""

from __future__ import annotations

import logging
import math

from node.aggregation.secure import MAX_SECURE_GROUP, ring_bound
from node.config import RunConfig
from node.secagg.fixed_point import FixedPointCodec
from node.secagg.privacy import NoiseShare, PrivacyAccountant, calibrate_noise_multiplier, effective_multiplier

logger = logging.getLogger(__name__)


def compression_bound(run: RunConfig) -> float:
    """The low-bit code's clip bound (a cap: each group agrees on a tighter one from its members'
    update sizes, node/secagg/protocol.py); 0 when values keep the full ring."""
    compression = run.compression
    if compression.bits == 32:
        return 0.0
    return compression.bound or run.aggregation.clip_bound


def setup_privacy(run: RunConfig, dimension: int, epsilon_budget: float) -> tuple[NoiseShare, PrivacyAccountant]:
    """The noise share each round adds and the accountant of this node's budget.

    Args:
        run: the run's configuration (``run.privacy`` enabled).
        dimension: the number of values in one update (all model parameters).
        epsilon_budget: this node's own cap on epsilon (``--epsilon-budget``; 0: the run's target only).
    """
    privacy = run.privacy
    sigma = privacy.noise_multiplier or calibrate_noise_multiplier(
        privacy.target_epsilon, privacy.delta, privacy.planned_rounds
    )
    noise = NoiseShare(noise_multiplier=sigma, clip_norm=privacy.clip_norm, max_dropouts=privacy.max_dropouts)
    bound = ring_bound(run.aggregation, noise, compression_bound(run))
    scale = FixedPointCodec(MAX_SECURE_GROUP, bound, bits=run.compression.bits).scale
    budgets = [b for b in (privacy.target_epsilon, epsilon_budget) if b > 0]
    budget = min(budgets, default=math.inf)
    accountant = PrivacyAccountant(
        effective_multiplier(sigma, privacy.clip_norm, scale, dimension), privacy.delta, budget
    )
    logger.info(
        f"differential privacy: clip {privacy.clip_norm}, noise multiplier {sigma:.4f}, "
        f"delta {privacy.delta}, budget epsilon {budget}"
    )
    return noise, accountant
