"""The DHT requests a bootstrap peer serves and sends, counted by kind, for ``/metrics``.

hivemind's ``DHTProtocol`` passes every request it serves (``rpc_ping``, ``rpc_store``, ``rpc_find``) and
every one it sends through its ``authorizer`` (hivemind/utils/auth.py, ``AuthRPCWrapper``): a public
extension point of ``DHTNode.create``, so counting needs no monkeypatching. :class:`DHTRequestCounter` is
such an authorizer that lets every request through and counts it: served requests in ``validate_request``
(the servicer's side), sent ones in ``sign_request`` (the client's side). It lives in the DHT process
(handed to ``hivemind.DHT`` at start, before the fork); :func:`request_counts` reads it from there
(``hivemind.DHT.run_coroutine``), as bootstrap/discovery.py reads the validator's refusals.

Kinds are the request's protobuf type, lower-cased without ``Request`` (``ping``, ``store``, ``find``);
any other type counts as ``other``, so a peer cannot grow the label set.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase

KINDS = ("ping", "store", "find")  # the DHT's RPCs; anything else is "other"


def request_kind(request: object) -> str:
    """``StoreRequest`` -> ``store``; a type that is not one of the DHT's RPCs -> ``other``."""
    kind = type(request).__name__.removesuffix("Request").lower()
    return kind if kind in KINDS else "other"


class DHTRequestCounter(AuthorizerBase):
    """An authorizer that admits every DHT request and counts them by kind and direction."""

    def __init__(self) -> None:
        self.served: Counter[str] = Counter()  # kind -> requests other peers made to us
        self.sent: Counter[str] = Counter()  # kind -> requests we made to other peers

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key: Any) -> None:
        self.sent[request_kind(request)] += 1

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        self.served[request_kind(request)] += 1
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        return None

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        return True


async def request_counts(_dht: Any, node: Any) -> dict[str, dict[str, int]]:
    """Runs inside the DHT process: ``{"served": {kind: n}, "sent": {kind: n}}`` (empty without a counter)."""
    counter = getattr(node.protocol, "authorizer", None)
    if not isinstance(counter, DHTRequestCounter):
        return {"served": {}, "sent": {}}
    return {"served": dict(counter.served), "sent": dict(counter.sent)}
