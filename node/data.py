"""Local data: a text file or a folder of .txt/.jsonl files, cut into windows of token ids.

Nothing is downloaded. Every trainer (TrainingNode, ShardedTrainer) cuts its bytes the same
way (``split_corpus``: 90% train, the rest held out) and orders its batches by ``batch_seed``;
``TokenBatches`` draws windows of token ids (bytes, ``ByteBatches``, or a tokenizer's: node/tokens.py).
The data sketch published in a PeerRecord is computed by node/sketch.py (hashed byte n-gram
frequencies); ``byte_histogram`` is the older, coarser one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_CORPUS_BYTES = 2 * 1024**3  # refuse to load more than this into memory
TRAIN_FRACTION = 0.9  # 90% of a node's bytes train, the rest is held out for evaluation
HOLDOUT_SEGMENTS = 10  # the held-out bytes are the tail of each of this many equal segments (at most)
MAX_HELD_OUT_BYTES = 1 << 20  # evaluation reads a few dozen windows: a large corpus trains on the rest


class DataError(Exception):
    """The data path is missing, empty or unreadable; the message names it and the fix."""


def load_corpus(path: str | Path | None) -> bytes:
    """Read a text file, or every ``.txt`` / ``.jsonl`` file under a folder, as one byte string.

    In ``.jsonl`` files each line's ``"text"`` field is used (a line that is not JSON is used as is).

    Raises:
        DataError: no path was given, or it does not exist, has no usable file, is empty or cannot be read.
    """
    if path is None:
        raise DataError("no data: pass --data with a text file or a folder of .txt/.jsonl files")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist; pass --data with a text file or a folder of .txt/.jsonl")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise DataError(f"data folder {root} holds no .txt or .jsonl files")
    chunks, total = [], 0
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read data file {file}: {e.strerror}; check its permissions") from None
        if file.suffix == ".jsonl":
            raw = _jsonl_text(raw)
        total += len(raw)
        if total > MAX_CORPUS_BYTES:
            raise DataError(f"data under {root} exceeds {MAX_CORPUS_BYTES >> 30} GiB; pass a smaller folder")
        chunks.append(raw)
    corpus = b"\n".join(chunks)
    if len(corpus.strip()) == 0:
        raise DataError(f"data under {root} is empty")
    return corpus


def _jsonl_text(raw: bytes) -> bytes:
    lines = []
    for line in raw.splitlines():
        try:
            item = json.loads(line)
            text = item.get("text") if isinstance(item, dict) else None
            lines.append(text.encode() if isinstance(text, str) else line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            lines.append(line)
    return b"\n".join(lines)


class TokenBatches:
    """Random windows of ``context + 1`` token ids from a 1-D tensor of ids, from a seeded generator.

    Args:
        tokens: the token ids to sample from (more than ``context + 1`` of them): bytes as ids 0-255,
            or a tokenizer's ids (node/tokens.py).
        context: tokens per sequence.
        batch_size: sequences per batch.
        seed: seeds the window positions, so a restarted node can replay its stream.
    """

    def __init__(self, tokens: torch.Tensor, context: int, batch_size: int, seed: int):
        if len(tokens) <= context + 1:
            raise DataError(f"data has {len(tokens)} tokens; a run with context {context} needs over {context + 1}")
        self.data = tokens
        self.context, self.batch_size = context, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.context - 1, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.context + 1)
        window = self.data[starts[:, None] + offsets].long()
        return window[:, :-1], window[:, 1:]

    def take(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next ``count`` batches (a fixed held-out set)."""
        return [self.next() for _ in range(count)]

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


class ByteBatches(TokenBatches):
    """``TokenBatches`` over a corpus's bytes (token id = byte value): the built-in GPT's tokens.

    Args:
        corpus: the bytes to sample from (must be longer than ``context + 1``).
        context, batch_size, seed: as for ``TokenBatches``.
    """

    def __init__(self, corpus: bytes, context: int, batch_size: int, seed: int):
        if len(corpus) <= context + 1:
            raise DataError(f"data has {len(corpus)} bytes; a run with context {context} needs more than {context + 1}")
        super().__init__(torch.frombuffer(bytearray(corpus), dtype=torch.uint8), context, batch_size, seed)


def split_corpus(corpus: bytes, context: int) -> tuple[bytes, bytes]:
    """Cut ``corpus`` into (train, held-out) bytes: ``TRAIN_FRACTION`` trains, the rest (at most
    ``MAX_HELD_OUT_BYTES``) is held out.

    The corpus is cut into up to ``HOLDOUT_SEGMENTS`` equal segments and the tail of each is held out,
    so the held-out set samples the whole of the node's data and training sees every part of it (a
    corpus ordered by time does not leave its newest tenth untrained). Each held-out piece keeps at
    least 8 windows of ``context + 1`` bytes, so short corpora use fewer segments, down to one (the
    last 10%). When the held-out part is too short for one window, the training bytes are returned in
    its place (a tiny corpus is evaluated on what it trains on).
    """
    held_bytes = min(MAX_HELD_OUT_BYTES, max(0, len(corpus) - max(context + 2, int(len(corpus) * TRAIN_FRACTION))))
    segments = max(1, min(HOLDOUT_SEGMENTS, held_bytes // (8 * (context + 1))))
    bounds = [len(corpus) * i // segments for i in range(segments + 1)]
    train, held_out = bytearray(), bytearray()
    for start, end in itertools.pairwise(bounds):
        split = end - (held_bytes * (end - start) // len(corpus) if segments > 1 else held_bytes)
        train += corpus[start:split]
        held_out += corpus[split:end]
    return bytes(train), bytes(held_out) if len(held_out) > context + 1 else bytes(train)


def batch_seed(run_seed: int, data: bytes) -> int:
    """The batch order: fixed by the run's seed and the local data, so a rerun on the same data repeats it."""
    digest = hashlib.blake2b(data, digest_size=4, key=run_seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little")


def byte_histogram(corpus: bytes) -> list[float]:
    """The data sketch: byte frequencies normalized to sum to 1."""
    counts = torch.bincount(torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long(), minlength=256)
    return (counts.double() / max(1, len(corpus))).tolist()


_WORDS = (
    "the swarm trains a model together while every peer keeps its data at home and sends only masked updates "
    "gradients flow between nodes through the hash table and no server decides anything for the group "
    "a river runs past the old mill where the baker sells bread to the farmers every morning before dawn"
).split()


CORPUS_STYLES = ("prose", "digits", "cyrillic", "dna")  # generate_corpus's clearly different kinds of text
_ALPHABETS = {
    "digits": "0123456789,.;:-+",
    "cyrillic": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "dna": "ACGT",
}


def _vocabulary(style: str, rng: random.Random) -> list[str]:
    if style == "prose":
        return list(_WORDS)
    alphabet = _ALPHABETS[style]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))) for _ in range(40)]


def generate_corpus(num_bytes: int, seed: int = 0, style: str = "prose") -> bytes:
    """A deterministic synthetic text (a word-level Markov chain) for the demo and tests.

    Args:
        num_bytes: length of the text.
        seed: seeds the chain (and, except for "prose", its vocabulary).
        style: one of CORPUS_STYLES; each draws its words from another alphabet (English words,
            digits and punctuation, Cyrillic letters in UTF-8, DNA bases), so their byte statistics
            differ clearly.
    """
    if style not in CORPUS_STYLES:
        raise ValueError(f"corpus style must be one of {CORPUS_STYLES}, got {style!r}")
    rng = random.Random(seed)
    vocabulary = _vocabulary(style, rng)
    successors = {word: rng.sample(vocabulary, 4) for word in vocabulary}
    words, word, size = [], rng.choice(vocabulary), 0
    while size < num_bytes:
        words.append(word)
        size += len(word.encode()) + 1
        word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.choice(vocabulary)
    return " ".join(words).encode()[:num_bytes]
