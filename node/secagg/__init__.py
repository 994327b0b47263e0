"""Secure aggregation: a masked, dropout-tolerant butterfly all-reduce (Bonawitz et al. 2017).

class MaskedAllReduce (protocol.py): the protocol, one method per phase
class SecureAverager (averager.py): hivemind matchmaking around it
class SecAggEndpoint (endpoint.py): the receiving side of protocol streams
class Message (messages.py): the signed, schema-checked wire format
class FixedPointCodec (fixed_point.py): weighted updates in the ring Z_2^W
pack_bits, select_coordinates (compression.py): low-bit words and group-seeded random-k in the ring
apply_mask, pair_mask_key (masking.py): ChaCha20 masks; split_secret, combine_secret (shamir.py): t-of-n shares
class NoiseShare, PrivacyAccountant (privacy.py): differential-privacy noise and the per-node budget
"""
