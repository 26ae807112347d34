"""Character vocabularies for CTC on any transcript, as a transformers tokenizer + processor.

The tokenizer is transformers' own ``Wav2Vec2CTCTokenizer`` (character tokens, ``|`` between
words, ``batch_decode`` merges repeats and drops the blank), built from the training transcripts.
:class:`SpeechRNNProcessor` pairs it with the :class:`SpeechRNNFeatureExtractor`; it is registered
with ``AutoProcessor`` for the speech RNN's config, so a CTC checkpoint gives
``AutoProcessor.from_pretrained(ckpt)``: raw audio -> ``input_features``, and
``processor.batch_decode(logits.argmax(-1))`` -> text.

Normalisation (:func:`normalize_transcript`), applied to training and evaluation transcripts alike:
Unicode NFKC, lower case, every character that is not a letter, a digit or an apostrophe becomes
a space (so ``"Well-known, isn't it?"`` -> ``"well known isn't it"``), runs of spaces collapse to
one. The vocabulary is ``<pad>`` (id 0: the CTC blank, the model's ``pad_token_id``), ``<unk>``
(id 1: characters seen only outside the training transcripts), ``|`` (id 2: the word delimiter, as
in wav2vec2), then the training transcripts' characters in sorted order.
"""

from __future__ import annotations

import json
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

BLANK, UNK, DELIMITER = "<pad>", "<unk>", "|"
SPECIAL_TOKENS = [BLANK, UNK, DELIMITER]


def normalize_transcript(text: str) -> str:
    """Lower-cased letters, digits and apostrophes, words separated by single spaces."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    kept = "".join(c if (c.isalnum() or c == "'") else " " for c in text)
    return " ".join(kept.split())


def build_vocab(transcripts: Iterable[str]) -> list[str]:
    """The special tokens, then every character of the (already normalised) transcripts, sorted."""
    chars = sorted({c for t in transcripts for c in t if c != " "} - set(SPECIAL_TOKENS))
    return [*SPECIAL_TOKENS, *chars]


def ctc_tokenizer(vocab: list[str]) -> Wav2Vec2CTCTokenizer:
    """A ``Wav2Vec2CTCTokenizer`` over ``vocab`` (token i is id i; token 0 is the blank). A vocabulary
    from :func:`build_vocab` has ``<unk>`` and ``|``; a fixed one such as fsdd_digits' (``<blank>``,
    ``0``-``9``) may have neither, and its ids stay as they are."""
    if len(set(vocab)) != len(vocab):
        raise ValueError("a CTC vocabulary must not repeat a token")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.json"
        path.write_text(json.dumps({c: i for i, c in enumerate(vocab)}, ensure_ascii=False))
        return Wav2Vec2CTCTokenizer(str(path), bos_token=None, eos_token=None,
                                    unk_token=UNK if UNK in vocab else None, pad_token=vocab[0],
                                    word_delimiter_token=DELIMITER if DELIMITER in vocab else None)


class SpeechRNNProcessor(Wav2Vec2Processor):
    """Feature extractor + character CTC tokenizer: ``processor(audio, sampling_rate=...)`` gives
    the model's inputs, ``processor(text=...)`` label ids, ``processor.batch_decode(ids)`` text."""


__all__ = ["SpeechRNNProcessor", "build_vocab", "ctc_tokenizer", "normalize_transcript"]
