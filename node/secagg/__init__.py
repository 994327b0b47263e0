"""Secure aggregation: a masked, dropout-tolerant butterfly all-reduce (Bonawitz et al. 2017).

class MaskedAllReduce (protocol.py): the protocol, one method per phase
class RoundState, SecAggResult, SecAggError (state.py): what a round carries from phase to phase, and its outcome
class ContributorAgreement (consistency.py): survivors sign U and the decode's digest before any reveal
class GroupTransport (transport.py): one peer's signed messages in one group, over hivemind P2P streams
class SecureAverager (averager.py): hivemind matchmaking around it
class KeptGroup (kept_group.py): a matched group that runs further rounds unmatched, re-keyed every round
class SecAggEndpoint (endpoint.py): the receiving side of protocol streams
class WaitingRoom (waiting_room.py): bounded, per-sender queues for messages of groups not started here
check_group_sum (bounds.py): every member refuses a sum whose weight or values no honest group can reach
class Message (messages.py): the signed, schema-checked wire format
class RingVector (ring.py): a peer's update in the ring: selected values, encoded part by part, the decoded mean
class PartLayout, Workspace (parts.py): how the ring vector is cut into parts and travels; reused buffers
box_shares, open_shares, rebuild_secret (sharing.py): a round's secrets, shared t-of-n and boxed per peer
class FixedPointCodec (fixed_point.py): weighted updates in the ring Z_2^W
pack_bits, select_coordinates (compression.py): low-bit words and group-seeded random-k in the ring
apply_mask, add_masks (masking.py): ChaCha20 masks; split_secret, combine_secret (shamir.py): t-of-n shares
class NoiseShare, PrivacyAccountant (privacy.py): differential-privacy noise and the per-node budget
"""
