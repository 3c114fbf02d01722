"""A tiny CLIP BPE tokenizer generated in code: single characters plus the prompt words as whole tokens.

The vocabulary holds every printable lowercase ASCII character, plain and word-final ("x</w>"), so any
lowercase ASCII prompt tokenizes (unknown words fall back to characters). Each known word is made
reachable by merges that grow it left to right ('t','h') -> ('th','r') -> ... -> 'three</w>'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zoo.attributes import VOCABULARY

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"
# Printable ASCII minus space and upper case (CLIP lower-cases its input).
CHARS = [chr(c) for c in range(33, 127) if not chr(c).isupper()]


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one pre-tokenized word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = [*word[:-1], word[-1] + END]
    while len(parts) > 1:
        pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_vocab(words: tuple[str, ...] = VOCABULARY) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, ranked merges) with every word in `words` a single token."""
    merges: list[tuple[str, str]] = []
    for word in words:  # left-to-right merges of each word
        parts = [*word[:-1], word[-1] + END]
        for nxt in parts[1:]:
            pair = (parts[0], nxt)
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + nxt, *parts[2:]]
    # A word's merges can be pre-empted by a lower-ranked pair of another word; bridge what is left.
    while broken := [w for w in words if len(bpe(w, {p: i for i, p in enumerate(merges)})) > 1]:
        parts = bpe(broken[0], {p: i for i, p in enumerate(merges)})
        merges.append((parts[0], parts[1]))
    tokens = [*CHARS, *(c + END for c in CHARS)]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def build_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> tuple:
    """(input_ids, attention_mask) exactly as the diffusers pipelines tokenize: padded to the max length."""
    out = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return out.input_ids, out.attention_mask
