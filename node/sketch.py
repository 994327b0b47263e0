"""The data sketch: a fixed-size summary of a node's local data, published in its PeerRecord.

Peers place themselves in cohorts by comparing sketches (dht/cohorts.py), so a sketch must say
what the data *looks like* while saying as little as possible about what it *holds*.

What it is: the frequencies of the corpus's byte 1-, 2- and 3-grams, hashed into ``SKETCH_DIM``
(256) buckets, each order normalized to sum to 1 (so each order weighs the same), square-rooted
(the cosine of two such vectors is the Bhattacharyya coefficient of the bucket distributions,
less dominated by the few most common bytes) and L2-normalized. Above ``SAMPLE_BYTES`` the
corpus is read in ``SAMPLE_CHUNKS`` evenly spaced chunks, so the sketch is deterministic given the
data and costs milliseconds at any corpus size.

What it reveals: the alphabet, language and style of the corpus as a whole (which bytes and
short byte sequences are common), collided 3-grams at a time. It never holds a position, an
ordering beyond three bytes, a record boundary or a count: a record of r bytes in a sampled
corpus of L bytes moves each coordinate by about r / L at most. A node whose corpus is a
handful of records therefore publishes the n-gram profile of those records: such a node should
set ``cohorts.sketch_noise`` (Gaussian noise of that standard deviation per coordinate before the
final normalization; the noise is fresh randomness, so it is not a formal differential-privacy
guarantee, only a blur), or not rely on the sketch hiding anything.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import TYPE_CHECKING

import numpy as np

from dht import SKETCH_DIM
from node.data import DataError, load_corpus

if TYPE_CHECKING:
    from node.run_config import CohortConfig

logger = logging.getLogger(__name__)

NGRAM_ORDERS = (1, 2, 3)  # byte n-gram lengths in the sketch
SAMPLE_BYTES = 1 << 20  # a larger corpus is sketched from this many bytes
SAMPLE_CHUNKS = 64  # ... read in this many evenly spaced chunks
_MIX = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))


def _sample(corpus: bytes) -> np.ndarray:
    data = np.frombuffer(corpus, dtype=np.uint8)
    if len(data) <= SAMPLE_BYTES:
        return data
    chunk = SAMPLE_BYTES // SAMPLE_CHUNKS
    starts = np.linspace(0, len(data) - chunk, SAMPLE_CHUNKS).astype(np.int64)
    return np.concatenate([data[s : s + chunk] for s in starts])


def _ngram_buckets(data: np.ndarray, order: int, dim: int) -> np.ndarray:
    """The bucket of every n-gram of ``order`` bytes (a multiplicative hash, murmur3's finalizer)."""
    count = len(data) - order + 1
    codes: np.ndarray = np.full(count, order, dtype=np.uint32)
    for offset in range(order):
        codes = (codes * _MIX[0]) ^ data[offset : offset + count].astype(np.uint32)
    codes ^= codes >> np.uint32(16)
    codes *= _MIX[1]
    codes ^= codes >> np.uint32(13)
    codes *= _MIX[2]
    codes ^= codes >> np.uint32(16)
    return (codes % np.uint32(dim)).astype(np.int64)


def data_sketch(corpus: bytes, noise: float = 0.0, dim: int = SKETCH_DIM) -> list[float]:
    """The sketch of ``corpus`` (module docstring): ``dim`` floats with L2 norm 1.

    Args:
        corpus: the node's local data.
        noise: standard deviation of Gaussian noise added to each coordinate (0: none).
        dim: the sketch's size (a PeerRecord holds SKETCH_DIM).

    Raises:
        ValueError: the corpus is shorter than the longest n-gram, or ``noise`` is negative.
    """
    if len(corpus) < max(NGRAM_ORDERS):
        raise ValueError(f"a sketch needs at least {max(NGRAM_ORDERS)} bytes of data, got {len(corpus)}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"sketch noise must be >= 0, got {noise}")
    data = _sample(corpus)
    vector: np.ndarray = np.zeros(dim)
    for order in NGRAM_ORDERS:
        counts = np.bincount(_ngram_buckets(data, order, dim), minlength=dim)
        vector += counts / counts.sum()
    vector = np.sqrt(vector / len(NGRAM_ORDERS))
    if noise > 0:
        rng = np.random.default_rng(secrets.randbits(64))  # fresh, not derived from the data
        vector = vector / np.linalg.norm(vector) + rng.normal(0.0, noise, dim)
    norm = np.linalg.norm(vector)
    return (vector / norm).tolist() if norm > 0 else vector.tolist()


def refreshed_sketch(sketch: list[float], data: str | None, cohorts: CohortConfig, round_no: int) -> list[float]:
    """Every ``cohorts.sketch_every`` rounds (the data folder may change), the data's sketch again; else ``sketch``
    (also when the data cannot be read now: it may be mid-update)."""
    every = cohorts.sketch_every
    if not (every and round_no and round_no % every == 0 and data):
        return sketch
    try:
        return data_sketch(load_corpus(data), noise=cohorts.sketch_noise)
    except (DataError, ValueError) as e:
        logger.warning(f"could not refresh the data sketch: {e}")
        return sketch
