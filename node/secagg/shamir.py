"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

Secure aggregation shares two secrets per peer and round (its ephemeral mask-agreement key and
its self-mask seed) so that any ``t`` survivors can rebuild what a dropout leaves behind, while
fewer than ``t`` learn nothing. A share is ``(x, f(x))`` for a random polynomial ``f`` of degree
``t - 1`` with ``f(0) = secret``; ``x`` is the holder's 1-based index in the group. The field is
the Mersenne prime 2**521 - 1, larger than any 32-byte secret; a share value is 66 bytes.

This is the textbook scheme in a few lines (tested against the worked example in Shamir's
Wikipedia article and by reconstruction from every subset); the coefficients come from
``secrets``, the OS's CSPRNG.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
SECRET_BYTES = 32


class ShareError(ValueError):
    """Shares that cannot rebuild a secret: too few, duplicated, or out of range."""


def split_int(secret: int, threshold: int, count: int, prime: int = PRIME) -> list[tuple[int, int]]:
    """Split ``secret`` (in [0, prime)) into ``count`` shares, any ``threshold`` of which rebuild it."""
    if not 1 <= threshold <= count:
        raise ValueError(f"need 1 <= threshold <= count, got threshold={threshold}, count={count}")
    if not 0 <= secret < prime:
        raise ValueError("the secret must lie in [0, prime)")
    coefficients = [secret] + [secrets.randbelow(prime) for _ in range(threshold - 1)]
    return [(x, evaluate(coefficients, x, prime)) for x in range(1, count + 1)]


def evaluate(coefficients: Sequence[int], x: int, prime: int = PRIME) -> int:
    """f(x) mod prime for f given by its coefficients, constant term first (Horner)."""
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % prime
    return result


def combine_int(shares: Sequence[tuple[int, int]], prime: int = PRIME) -> int:
    """Lagrange interpolation at 0 of the given shares (pass exactly ``threshold`` or more)."""
    return interpolate_at(shares, 0, prime)


def interpolate_at(shares: Sequence[tuple[int, int]], at: int, prime: int = PRIME) -> int:
    """f(at) for the polynomial of degree ``len(shares) - 1`` through the given shares (Lagrange)."""
    xs = [x for x, _ in shares]
    if not shares:
        raise ShareError("no shares to combine")
    if len(set(xs)) != len(xs):
        raise ShareError(f"duplicate share indices {sorted(xs)}")
    if any(not 0 < x < prime for x in xs) or any(not 0 <= y < prime for _, y in shares):
        raise ShareError("a share lies outside the field")
    value = 0
    for i, (x_i, y_i) in enumerate(shares):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(xs):
            if i != j:
                numerator = numerator * (at - x_j) % prime
                denominator = denominator * (x_i - x_j) % prime
        value = (value + y_i * numerator * pow(denominator, -1, prime)) % prime
    return value


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shares of a 32-byte secret; share ``k`` (0-based) belongs to the holder with x = k + 1."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    shares = split_int(int.from_bytes(secret, "big"), threshold, count)
    return [y.to_bytes(SHARE_BYTES, "big") for _, y in shares]


def combine_secret(shares: dict[int, bytes]) -> bytes:
    """Rebuild a 32-byte secret from ``{x: share}`` (x is the holder's 1-based index)."""
    value = combine_int(_points(shares))
    if value >= 1 << (8 * SECRET_BYTES):
        raise ShareError("the shares do not rebuild a 32-byte secret (wrong or mixed shares)")
    return value.to_bytes(SECRET_BYTES, "big")


def misfit_shares(shares: dict[int, bytes], others: dict[int, bytes]) -> list[int]:
    """The x of each share in ``others`` that does not lie on the polynomial through ``shares``."""
    points = _points(shares)
    return [x for x, y in sorted(others.items()) if interpolate_at(points, x) != int.from_bytes(y, "big")]


def _points(shares: dict[int, bytes]) -> list[tuple[int, int]]:
    if any(len(value) != SHARE_BYTES for value in shares.values()):
        raise ShareError(f"a share is {SHARE_BYTES} bytes")
    return [(x, int.from_bytes(y, "big")) for x, y in sorted(shares.items())]
