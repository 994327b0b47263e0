"""The run's tokenizer: bytes (token id = byte value), or a local Hugging Face ``tokenizer.json``.

A node's ``.txt`` / ``.jsonl`` data is read as bytes (node/data.py) and cut into training and
held-out bytes before it is tokenized, so both families hold out the same text; the data sketch in
the PeerRecord stays over bytes (node/sketch.py). With a tokenizer, the bytes are decoded as UTF-8
(invalid sequences become U+FFFD) and encoded in line-aligned chunks without special tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from node.config import ModelConfig

logger = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 16  # text is encoded in chunks of about this many characters, cut after a newline


class RunTokenizer:
    """Turns a node's bytes into the run's token ids.

    Args:
        path: a ``tokenizer.json``; None = bytes.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path).expanduser()
        self._tokenizer = None
        if self.path is not None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.path))

    @classmethod
    def for_model(cls, model: ModelConfig) -> RunTokenizer:
        """The tokenizer ``model`` names (bytes when it names none)."""
        return cls(model.tokenizer or None)

    @property
    def vocab_size(self) -> int:
        """Distinct ids this tokenizer gives (256 for bytes)."""
        return 256 if self._tokenizer is None else self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, data: bytes) -> torch.Tensor:
        """``data``'s token ids, a 1-D tensor (uint8 for bytes, int64 otherwise)."""
        if self._tokenizer is None:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        text = data.decode("utf-8", errors="replace")
        encodings = self._tokenizer.encode_batch(list(_chunks(text)), add_special_tokens=False)
        ids = [token for encoding in encodings for token in encoding.ids]
        return torch.tensor(ids, dtype=torch.long)

    def split(self, train: bytes, held_out: bytes, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The token ids of ``train`` and ``held_out`` (``split_corpus``'s two parts).

        The held-out ids are the training ids when the held-out text is too short for one window of
        ``context + 1`` tokens once tokenized (as ``split_corpus`` does for bytes).
        """
        train_ids = self.encode(train)
        held_ids = train_ids if held_out is train else self.encode(held_out)
        if len(held_ids) <= context + 1:
            logger.info(f"the held-out text has {len(held_ids)} tokens, under one window: evaluating on training text")
            held_ids = train_ids
        return train_ids, held_ids


def _chunks(text: str) -> list[str]:
    """``text`` cut after a newline about every ``CHUNK_CHARS`` characters (joined, the chunks are ``text``)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces
