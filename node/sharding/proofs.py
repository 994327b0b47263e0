"""Step proofs: a trainer's signature over the gradients a stage applies for one of its steps.

Why. A committed step is copied to the stage's other replicas (``replicate``), which apply it and
remember ``(trainer, step)`` as done, so that the trainer's own commit there is answered ``ok``
and not applied twice. Without a proof, any server listed for the stage could send
``replicate(trainer=victim, step=s)`` with gradients of its choice: they would be applied, and the
victim's real step ``s`` dropped as a duplicate (up to the 4096 pairs a replica remembers, so
future steps too, since step ids are predictable within a session).

The proof. At a commit, the server sums the step's gradients and answers with their digest
(:func:`step_digest`, BLAKE2b-32 over shapes and float32 bytes, then the trainer's ``share`` of the
step, which sets the step's learning rate, node/sharding/messages.py); the trainer signs
``PROOF_CONTEXT || msgpack([run hash, stage, step, digest, timestamp])`` with its record-signing
key and commits again with the proof; the server checks it, applies, and replicates the gradients
with the same proof. Every replica recomputes the digest from the gradients it received and checks
the signature before applying or marking anything done. A server therefore cannot invent a
trainer's step, change its gradients, or move it to another stage or run; the timestamp bounds a
replay (``MAX_PROOF_AGE``) to well inside the window in which replicas remember applied pairs.

Wire form (``PROOF_BYTES``, fixed): signing key (32) || its binding to the trainer's PeerID (64,
the same key and binding the trainer's signed PeerRecord carries, dht/identity.py) || timestamp
(big-endian float64) || Ed25519 signature (64). It verifies from its own bytes and the trainer's
PeerID, without a DHT lookup, so a replica can check it while the trainer's record is in flux.

What it does not stop: the trainer signs the digest its chosen server reports, so a server that
computes wrong gradients for a step it was given still gets them signed; that is a wrong
computation, which spot-checks and ban records address (node/sharding/client.py).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import msgpack
import nacl.exceptions
import nacl.signing
import torch
from hivemind.utils import get_dht_time

from dht import NodeIdentity
from dht.identity import verify_binding
from node.sharding.messages import PROOF_BYTES, StageMessageError

PROOF_CONTEXT = b"zen-federation/step-proof/v1"
DIGEST_BYTES = 32
MAX_PROOF_AGE = 120.0  # seconds a proof is accepted after signing (a trainer re-signs a retried commit)
MAX_PROOF_SKEW = 30.0  # seconds a signer's clock may run ahead of ours


def gradients_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """BLAKE2b-32 of the tensors' shapes and float32 bytes: what a step proof signs."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for tensor in tensors:
        data = tensor.detach().float().cpu().contiguous()
        digest.update(repr(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    return digest.digest()


def step_digest(grads: Sequence[torch.Tensor], share: float) -> bytes:
    """What a step proof signs: the gradients' digest, then the share of the stage's step they are applied with."""
    digest = hashlib.blake2b(gradients_digest(grads) + struct.pack(">d", share), digest_size=DIGEST_BYTES)
    return digest.digest()


def _signed_message(run_hash: str, stage: int, step: int, digest: bytes, timestamp: float) -> bytes:
    return PROOF_CONTEXT + msgpack.packb([run_hash, stage, step, digest, timestamp], use_bin_type=True)


def sign_step(
    identity: NodeIdentity, run_hash: str, stage: int, step: int, digest: bytes, timestamp: float | None = None
) -> bytes:
    """The trainer's proof that ``stage`` may apply the gradients of digest ``digest`` as its step ``step``."""
    if len(digest) != DIGEST_BYTES:
        raise StageMessageError(f"a gradients digest has {DIGEST_BYTES} bytes, got {len(digest)}")
    timestamp = get_dht_time() if timestamp is None else timestamp
    signature = identity.sign(_signed_message(run_hash, stage, step, digest, timestamp))
    return identity.signing_public_key + identity.binding + struct.pack(">d", timestamp) + signature


def check_step_proof(
    proof: bytes,
    trainer: str,
    run_hash: str,
    stage: int,
    step: int,
    digest: bytes,
    now: float | None = None,
    max_age: float = MAX_PROOF_AGE,
) -> None:
    """Check that ``trainer`` signed (run, stage, step, digest) within ``max_age`` seconds.

    Raises:
        StageMessageError: the proof is missing, malformed, stale, from the future, not bound to
            ``trainer``'s PeerID, or signed over something else.
    """
    if len(proof) != PROOF_BYTES:
        raise StageMessageError(f"no step proof of {trainer[:16]}'s step (need {PROOF_BYTES} bytes, got {len(proof)})")
    signing_key, binding = proof[:32], proof[32:96]
    (timestamp,) = struct.unpack(">d", proof[96:104])
    now = get_dht_time() if now is None else now
    if not math.isfinite(timestamp) or not now - max_age <= timestamp <= now + MAX_PROOF_SKEW:
        raise StageMessageError(f"step proof signed at {timestamp!r} is stale or from the future (now {now:.0f})")
    if not verify_binding(trainer, signing_key, binding):
        raise StageMessageError(f"step proof's key is not bound to trainer {trainer[:16]}")
    try:
        nacl.signing.VerifyKey(signing_key).verify(
            _signed_message(run_hash, stage, step, digest, timestamp), proof[104:]
        )
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as e:
        raise StageMessageError(
            f"step proof does not verify: {trainer[:16]} did not sign these gradients as step {step}"
        ) from e


AppliedPair = tuple[str, int, bytes, bytes]  # a step a replica applied: trainer, step, gradients digest, its proof


def vouched_pairs(pairs: Sequence[AppliedPair], run_hash: str, stage: int) -> tuple[list[AppliedPair], int]:
    """The pairs of a donor's state whose trainer's proof checks (of any age), and how many do not.

    A donor's applied pairs are marked done on the replica that copies its state, so a commit of one
    is answered ``ok`` and not applied. A pair its trainer never signed (a step it has not taken yet)
    would pre-empt it there; a pair it signed is a step it committed, which a lying donor could drop
    anyway. Age is no matter here: marking an old step done can only stop it being applied twice.
    """
    kept = []
    for pair in pairs:
        trainer, step, digest, proof = pair
        try:
            check_step_proof(proof, trainer, run_hash, stage, step, digest, max_age=math.inf)
        except (StageMessageError, ValueError):
            continue
        kept.append(pair)
    return kept, len(pairs) - len(kept)
