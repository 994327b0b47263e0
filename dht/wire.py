"""Bounded msgpack decoding: the one way anything a peer sent is unpacked.

msgpack's own limits cap every string, binary, array and map length before memory is
allocated, so a hostile message cannot make a reader allocate more than its caller allows.
Extension types are refused (nothing on our wire uses them) and nothing is ever unpickled.
"""

from __future__ import annotations

from typing import Any

import msgpack

# Everything msgpack.unpackb raises for input it cannot decode within the limits.
DECODE_ERRORS = (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError)


class WireError(ValueError):
    """Bytes from a peer are not msgpack within the caller's limits."""


def unpack_bounded(
    data: bytes,
    *,
    max_bytes: int | None = None,
    max_str: int = 1024,
    max_bin: int = 0,
    max_array: int = 0,
    max_map: int = 0,
    strict_map_key: bool = True,
) -> Any:
    """Decode ``data`` with every length capped; raise :class:`WireError` naming what is wrong.

    Args:
        data: the bytes received.
        max_bytes: refuse input longer than this before decoding (None: no cap beyond the others).
        max_str, max_bin, max_array, max_map: the longest string, binary (bytes), array (items)
            and map (pairs) allowed anywhere in the value.
        strict_map_key: only str and bytes map keys.
    """
    if not isinstance(data, bytes):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"{len(data)} bytes exceed the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=strict_map_key,
            max_str_len=max_str,
            max_bin_len=max_bin,
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
        )
    except DECODE_ERRORS as e:
        raise WireError(f"malformed msgpack: {e}") from None
