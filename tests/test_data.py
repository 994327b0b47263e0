"""How a node cuts its bytes into training and held-out parts (node/data.py ``split_corpus``)."""

from __future__ import annotations

import random

from node.data import HOLDOUT_SEGMENTS, MAX_HELD_OUT_BYTES, TRAIN_FRACTION, split_corpus


def _numbered_lines(count: int) -> bytes:
    """Lines that name their own position, so every byte's origin can be told apart."""
    return b"".join(b"line %06d of the corpus\n" % i for i in range(count))


def test_the_held_out_bytes_sample_the_whole_corpus_and_training_covers_every_part() -> None:
    corpus = _numbered_lines(10_000)  # 250 kB: a tinyshakespeare quarter's size
    train, held_out = split_corpus(corpus, context=64)
    assert abs(len(held_out) - len(corpus) * (1 - TRAIN_FRACTION)) <= HOLDOUT_SEGMENTS
    assert len(train) + len(held_out) == len(corpus)
    # the two parts interleave: each tenth of the corpus gives bytes to both, in order
    tenth = len(corpus) // HOLDOUT_SEGMENTS
    for i in range(HOLDOUT_SEGMENTS):
        segment = corpus[i * tenth : (i + 1) * tenth]
        first_line = segment[segment.index(b"\n") + 1 :][:25]
        last_line = segment[: segment.rindex(b"\n", 0, len(segment) - 1) + 1][-25:]
        assert first_line in train and first_line not in held_out
        assert last_line in held_out and last_line not in train
    # nothing is lost or duplicated: the lines of both parts are the corpus's lines
    lines = set(corpus.splitlines())
    assert set(train.splitlines()) | set(held_out.splitlines()) >= lines - {b""}


def test_a_short_corpus_holds_out_fewer_pieces_and_a_tiny_one_evaluates_on_its_training_bytes() -> None:
    rng = random.Random(0)
    short = bytes(rng.randrange(256) for _ in range(3_000))  # room for one held-out piece of 8 windows
    train, held_out = split_corpus(short, context=32)
    assert (train, held_out) == (short[:2_700], short[2_700:])
    tiny = short[:50]  # its 5 held-out bytes hold no window of 33
    assert split_corpus(tiny, context=32) == (tiny[:45], tiny[:45])


def test_a_large_corpus_holds_out_at_most_a_mebibyte_and_trains_on_the_rest() -> None:
    corpus = _numbered_lines(600_000)  # 15 MB: a tenth would be 1.5 MB
    train, held_out = split_corpus(corpus, context=64)
    assert MAX_HELD_OUT_BYTES - HOLDOUT_SEGMENTS <= len(held_out) <= MAX_HELD_OUT_BYTES
    assert len(train) == len(corpus) - len(held_out)
    assert corpus[-25:] in held_out and corpus[:25] in train
