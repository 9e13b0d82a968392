"""Tokenizers for the project's small models, built deterministically from a word list.

They are the real classes with the real pipelines — `CLIPTokenizer` (byte-level BPE, lower-casing, `</w>` word
ends) and `T5Tokenizer` (Unigram, `▁` word starts) — but their vocabularies are built here rather than by
`train_new_from_iterator`: the `tokenizers` trainers break ties between equally frequent merges differently from
one run to the next (measured: 70 of 600 CLIP ids changed between two builds in one process), so models built
from a seed would not be reproducible. BPE merges are learned by the textbook loop with ties broken by the pair's
text; the Unigram vocabulary scores whole words by frequency and keeps every printable character as a fallback.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import cache
from itertools import pairwise

from transformers import CLIPTokenizer, T5Tokenizer

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
WORD_END = "</w>"
WORD_START = "▁"
PRINTABLE = [chr(code) for code in range(33, 127)]
CHARACTER_SCORE = -20.0  # Unigram: a word in the vocabulary always beats spelling it out


@cache
def _byte_alphabet() -> tuple[str, ...]:
    """The 256 characters byte-level BPE maps bytes to (GPT-2's bytes_to_unicode, as CLIP uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    mapping = dict(zip(printable, codes, strict=True))
    return tuple(chr(mapping[byte]) for byte in range(256))


def _clip_words(text: str) -> list[str]:
    """What CLIPTokenizer's normaliser and pre-tokeniser make of ASCII text: lower-cased letter runs, single digits,
    runs of other symbols."""
    return re.findall(r"[^\W\d_]+|\d|(?:[^\s\w]|_)+", text.lower())


def _learn_merges(words: Counter, vocabulary: dict[str, int], size: int) -> list[tuple[str, str]]:
    symbols = {word: (*word[:-1], word[-1] + WORD_END) for word in words}
    merges: list[tuple[str, str]] = []
    while len(vocabulary) < size:
        pairs: Counter = Counter()
        for word, count in words.items():
            parts = symbols[word]
            for pair in pairwise(parts):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = best[0] + best[1]
        merges.append(best)
        vocabulary.setdefault(merged, len(vocabulary))
        for word, parts in symbols.items():
            out, index = [], 0
            while index < len(parts):
                if index + 1 < len(parts) and (parts[index], parts[index + 1]) == best:
                    out.append(merged)
                    index += 2
                else:
                    out.append(parts[index])
                    index += 1
            symbols[word] = tuple(out)
    return merges


def clip_tokenizer(corpus: list[str], vocab_size: int) -> CLIPTokenizer:
    """Byte-level BPE of `vocab_size` entries (at least the 256 bytes, each also as a word end) learned on `corpus`."""
    vocabulary = {token: index for index, token in enumerate(CLIP_SPECIALS)}
    for character in _byte_alphabet():
        vocabulary.setdefault(character, len(vocabulary))
    for character in _byte_alphabet():
        vocabulary.setdefault(character + WORD_END, len(vocabulary))
    words = Counter(word for line in corpus for word in _clip_words(line))
    merges = _learn_merges(words, vocabulary, vocab_size)
    tokenizer = CLIPTokenizer(vocab=vocabulary, merges=merges)
    tokenizer.model_max_length = 77
    return tokenizer


def t5_tokenizer(corpus: list[str], max_length: int) -> T5Tokenizer:
    """Unigram vocabulary: every corpus word (log-frequency scores), then every printable character."""
    words = Counter(word for line in corpus for word in line.split())
    total = sum(words.values())
    vocab = [(token, 0.0) for token in T5_SPECIALS] + [(WORD_START, CHARACTER_SCORE / 2)]
    vocab += [(WORD_START + word, math.log(count / total)) for word, count in sorted(words.items())]
    vocab += [(character, CHARACTER_SCORE) for character in PRINTABLE]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = max_length
    return tokenizer
