"""A hivemind record validator that admits only well-formed, signed, fresh peer records.

hivemind calls ``validate`` when a peer asks us to store a record and when a peer returns one
to our query, so a forged record is dropped at every hop. ``record.key`` there is the DHTID of
the key (a hash), so the validator precomputes the IDs of the runs it knows and is strict for
them: anything stored under a run's peers key must be a valid :class:`PeerRecord` whose PeerID
is its subkey. A value that carries our record tag under any other key (a bootstrap peer does
not know every run) is checked the same way; other hivemind records pass untouched.

Expiry is capped because hivemind's ``TimedStorage`` keeps whichever record expires later: a
record that claimed to live for a year would pin stale data and shadow every refresh.

Ban records (dht/bans.py) are checked the same way: strictly under a known run's bans key, and
wherever a value carries the ban tag. A ban may not be stored to live past its own signed ttl
(at most ``MAX_BAN_TTL``), so no reporter can ban a server for longer than that.

Ledger summaries (dht/ledger.py) likewise: strictly under a known run's ledger key, and wherever a
value carries the ledger tag; their subkey is a PeerID string, so they are told apart from peer
records before the peer-record rules apply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from dht.bans import BAN_TAG, BanError, bans_key, check_stored_ban
from dht.ledger import LEDGER_TAG, LedgerError, check_stored_summary, ledger_key
from dht.records import MAX_RECORD_BYTES, RECORD_TAG, PeerRecord, RecordError
from dht.wire import WireError, unpack_bounded

logger = logging.getLogger(__name__)

MAX_TTL = 60.0  # seconds a record may live past its signing time
MAX_CLOCK_SKEW = 30.0  # seconds a peer's clock may run ahead of ours


def peers_key(run_id: str) -> str:
    """The DHT key under which the peers of ``run_id`` publish their records."""
    return f"zen.{run_id}.peers"


class PeerRecordValidator(RecordValidatorBase):
    """Reject unsigned, forged, oversized, stale, far-future and malformed peer records.

    Args:
        run_ids: runs whose peers key is strictly checked (every value must be a peer record).
        max_ttl: longest lifetime a record may claim, in seconds past its signing time.
    """

    def __init__(self, run_ids: Iterable[str] = (), max_ttl: float = MAX_TTL):
        self.max_ttl = max_ttl
        run_ids = list(run_ids)
        self._strict_keys = {DHTID.generate(source=peers_key(run_id)).to_bytes() for run_id in run_ids}
        self._ban_keys = {DHTID.generate(source=bans_key(run_id)).to_bytes() for run_id in run_ids}
        self._ledger_keys = {DHTID.generate(source=ledger_key(run_id)).to_bytes() for run_id in run_ids}
        self.rejected = 0  # records rejected so far, for monitoring
        self.rejected_by_reason: dict[str, int] = dict.fromkeys(REJECTION_REASONS, 0)  # the same, by reason

    def validate(self, record: DHTRecord) -> bool:
        if record.key in self._ban_keys or BAN_TAG.encode() in record.value[:64]:
            try:
                check_stored_ban(_loads_bounded(record.subkey), _loads_bounded(record.value), record.expiration_time)
                return True
            except (BanError, RecordError) as e:
                self._count("ban")
                logger.warning(f"rejected a ban record: {e}")
                return False
        if record.key in self._ledger_keys or LEDGER_TAG.encode() in record.value[:64]:
            return self._check_summary(record)
        strict = record.key in self._strict_keys or _names_a_peer(record.subkey)
        if not strict and RECORD_TAG.encode() not in record.value[:64]:
            return True  # not ours: hivemind's own records (matchmaking, state sharing)
        try:
            self.check(record)
            return True
        except RecordError as e:
            self._count(rejection_reason(str(e)))
            logger.warning(f"rejected a peer record: {e}")
            return False

    def _count(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_by_reason[reason] += 1

    def check(self, record: DHTRecord, now: float | None = None) -> PeerRecord:
        """Return the peer record inside a DHT record, or raise :class:`RecordError` saying why not."""
        now = get_dht_time() if now is None else now
        if len(record.value) > MAX_RECORD_BYTES + 16:
            raise RecordError(f"record is {len(record.value)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
        envelope = _loads_bounded(record.value)
        if not isinstance(envelope, bytes):
            raise RecordError("value under a peers key is not a signed peer record")
        peer_record = PeerRecord.verify(envelope)
        if _loads_bounded(record.subkey) != peer_record.peer_id:
            raise RecordError(f"subkey does not match the record's PeerID {peer_record.peer_id[:16]}")
        if record.expiration_time <= now:
            raise RecordError(f"record expired {now - record.expiration_time:.0f}s ago")
        if peer_record.timestamp > now + MAX_CLOCK_SKEW:
            raise RecordError(f"record signed {peer_record.timestamp - now:.0f}s in the future")
        if record.expiration_time > peer_record.timestamp + min(self.max_ttl, peer_record.ttl) + 1e-3:
            raise RecordError(
                f"expiration is {record.expiration_time - peer_record.timestamp:.0f}s after signing, "
                f"over the {self.max_ttl:.0f}s cap"
            )
        if record.expiration_time > now + self.max_ttl + MAX_CLOCK_SKEW:
            raise RecordError(f"expiration is {record.expiration_time - now:.0f}s in the future")
        return peer_record

    def _check_summary(self, record: DHTRecord) -> bool:
        try:
            value = _loads_bounded(record.value)
            check_stored_summary(record.key, _loads_bounded(record.subkey), value, record.expiration_time)
            return True
        except (LedgerError, RecordError) as e:
            self._count(rejection_reason(str(e)))
            logger.warning(f"rejected a ledger summary: {e}")
            return False

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, PeerRecordValidator):
            return False
        self._strict_keys |= other._strict_keys
        self._ban_keys |= other._ban_keys
        self._ledger_keys |= other._ledger_keys
        return True


def rejection_reason(message: str) -> str:
    """The bounded label (one of ``REJECTION_REASONS``) of a :class:`RecordError` message, for metrics."""
    for reason, words in _REASON_WORDS:
        if any(word in message for word in words):
            return reason
    return "malformed"


REJECTION_REASONS = ("signature", "binding", "subkey", "expired", "future", "expiration", "size", "ban", "malformed")
_REASON_WORDS = (
    ("signature", ("signature does not verify", "signed by the identity")),
    ("binding", ("not bound to the PeerID",)),
    ("subkey", ("subkey does not match",)),
    ("expired", ("expired",)),
    ("expiration", ("expiration is",)),
    ("future", ("in the future",)),
    ("size", ("-byte limit", "too long", "over ")),
)


def _names_a_peer(subkey: bytes) -> bool:
    """Whether a subkey is a PeerID *string*: ours are; hivemind's own subkeys are PeerID bytes.

    This lets a peer that does not know a run (a bootstrap) refuse junk under a run's key:
    hivemind rejects a whole dictionary when one entry fails, so one junk entry accepted there
    would hide every peer of the run from strict readers.
    """
    try:
        value = unpack_bounded(subkey, max_str=128)
    except WireError:
        return False
    return isinstance(value, str) and value.startswith("12D3KooW")


def _loads_bounded(data: bytes) -> object:
    try:
        return unpack_bounded(data, max_bin=MAX_RECORD_BYTES, max_str=4096)
    except WireError as e:
        raise RecordError(f"malformed DHT value: {e}") from None
