"""Groups that stay together for several rounds: one matchmaking, then a fresh masked all-reduce per round.

hivemind's matchmaking costs a few seconds a round (a leader gathers followers for
``min_matchmaking_time``), many times the masked all-reduce of a small model, and it is what
stops a run from averaging every few inner steps. A group that matchmaking formed therefore runs
the following rounds without it, until the next round that is a multiple of
``aggregation.group_rounds`` (every group of the run matches again at the same rounds, so a peer
that joins meanwhile knows when it can enter one, and groups mix):

- round ``r`` of a kept group runs under the group id ``sha256(tag | origin id | r)``, so every
  member derives it alone, messages of one round can never be taken for another's, and random-k
  picks fresh coordinates;
- every round is a whole new ``MaskedAllReduce``: new X25519 keys (share boxes and mask
  agreement), a new self-mask seed and new pairwise masks. Nothing secret is carried over;
- a member's round number is bound into every message it signs, so a member at another round
  cannot take part; the group ends (everyone matches again) after a failed round, a round whose
  contributors are not the whole group (a member left), before a round that is not the next one,
  and before every round that is a multiple of ``group_rounds``; a member that rejected the group's
  last mean leaves it (its gate, node/training/gate.py; suspicion.py).

Membership is what matchmaking chose for the first round; keeping it longer gives a leader that
chose a victim's group no more than it had (the issue of who forms groups is matchmaking's).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from hivemind.averaging.group_info import GroupInfo

KEPT_GROUP_TAG = b"zen-kept-group/v1"


def round_group_id(origin_id: bytes, round_no: int) -> bytes:
    """The group id of round ``round_no`` of the kept group that matchmaking formed as ``origin_id``."""
    digest = hashlib.sha256(KEPT_GROUP_TAG + origin_id + round_no.to_bytes(8, "big")).digest()
    return digest[: len(origin_id)] if 0 < len(origin_id) <= len(digest) else digest


def key_fingerprint(advert: dict[str, Any]) -> str:
    """A short hex digest of one member's round keys as received (c_pk, s_pk and the seed commitment)."""
    return hashlib.sha256(advert["c_pk"] + advert["s_pk"] + advert["b_commit"]).hexdigest()[:32]


@dataclass(frozen=True)
class KeptGroup:
    """A group that averaged ``round_no`` and may run the next round without matchmaking."""

    origin: GroupInfo  # the group as matchmaking formed it (its id, order and gathered metadata)
    round_no: int  # the last round it averaged
    uses: int  # rounds it has averaged, the first (matched) one included (reported as ``group_round``)

    def next_round(self, round_no: int, limit: int, serializer: Any, split: bool = False) -> GroupInfo | None:
        """The group for ``round_no``, or None when the group may not run it (see the module docstring; ``split``:
        this member rejected the group's last mean and asks for small groups, suspicion.py)."""
        if split or round_no != self.round_no + 1 or round_no % limit == 0:
            return None
        gathered = []
        for blob in self.origin.gathered:
            bandwidth, mode, _ = serializer.loads(blob)
            gathered.append(serializer.dumps([bandwidth, mode, serializer.dumps({"round": round_no})]))
        return GroupInfo(round_group_id(self.origin.group_id, round_no), self.origin.peer_ids, tuple(gathered))


def gathered_data(data_for_gather: bytes, serializer: Any) -> dict[Any, Any]:
    """The user data a step gathers (``AveragerAggregator``'s dict), or {} if it is something else."""
    try:
        _, _, user_bytes = serializer.loads(data_for_gather)
        data = serializer.loads(user_bytes)
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def gathered_round(data_for_gather: bytes, serializer: Any) -> int | None:
    """The round a step gathers (``{"round": r}``, as ``AveragerAggregator`` sends it), or None."""
    round_no = gathered_data(data_for_gather, serializer).get("round")
    return round_no if isinstance(round_no, int) else None


def gathered_cohort(data_for_gather: bytes, serializer: Any) -> tuple[str, int] | None:
    """The (cohort id, cohorts in the run) a cross-cohort step declares (``{"cohort": id, "cohorts": n}``), or None
    if it declares none or something malformed."""
    data = gathered_data(data_for_gather, serializer)
    cohort, count = data.get("cohort"), data.get("cohorts")
    if isinstance(cohort, str) and 0 < len(cohort) <= 64 and isinstance(count, int) and 1 <= count <= 1 << 16:
        return cohort, count
    return None
