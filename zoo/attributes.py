"""Prompts that carry more than the class: the digit plus stroke thickness and slant measured from the image.

Each attribute's value is binned into terciles of the digits data set, per digit class (a '1' is thinner
and a '7' leans further right than an '8'), and each tercile has a word. The prompt grammar is
"a thick right-slanted seven", with either attribute left out, or "" (the unconditional prompt).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# attribute -> the words of its terciles, low to high
ATTRIBUTES: dict[str, tuple[str, str, str]] = {
    "thickness": ("thin", "regular", "thick"),
    "slant": ("left", "upright", "right"),
}
FILLER = ("a", "an", "slanted", "the", "of", "digit", "number", "handwritten")
VOCABULARY = tuple(dict.fromkeys((*DIGIT_WORDS, *(w for ws in ATTRIBUTES.values() for w in ws), *FILLER)))
_WORD_TO_ATTRIBUTE = {w: (a, i) for a, ws in ATTRIBUTES.items() for i, w in enumerate(ws)}


def measure(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image attribute values of [N,1,16,16] images in [-1, 1].

    thickness: the inked fraction of the image (ink mass / pixels).
    slant: horizontal shear of the ink from its second moments, -cov(x, y) / var(y) with y pointing down:
    > 0 when the top of the digit sits right of its bottom ("/"), < 0 for "\\".
    """
    ink = ((images.float().clamp(-1, 1) + 1) / 2)[:, 0]
    h, w = ink.shape[-2:]
    ys = torch.arange(h, dtype=ink.dtype)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=ink.dtype)[None, :].expand(h, w)
    mass = ink.sum((1, 2))
    p = ink / mass.clamp_min(1e-6)[:, None, None]
    mx, my = (p * xs).sum((1, 2)), (p * ys).sum((1, 2))
    dx, dy = xs - mx[:, None, None], ys - my[:, None, None]
    cov_xy, var_y = (p * dx * dy).sum((1, 2)), (p * dy * dy).sum((1, 2))
    return {"thickness": mass / (h * w), "slant": -cov_xy / var_y.clamp_min(1e-6)}


@functools.cache
def tercile_edges() -> dict[str, torch.Tensor]:
    """attribute -> [10, 2] tercile edges per digit class over the whole digits data set (deterministic)."""
    from zoo.data import NUM_CLASSES, load_digits16

    images, labels = load_digits16()
    values = measure(images)
    q = torch.tensor([1 / 3, 2 / 3])
    return {a: torch.stack([torch.quantile(v[labels == c], q) for c in range(NUM_CLASSES)]) for a, v in values.items()}


def bins(values: dict[str, torch.Tensor], digits: torch.Tensor) -> dict[str, torch.Tensor]:
    """attribute -> tercile index (0, 1, 2) of each value within its digit class."""
    edges = tercile_edges()
    return {a: (v[:, None] > edges[a][digits]).sum(1) for a, v in values.items()}


def make_prompt(digit: int | None, attributes: dict[str, str] | None = None) -> str:
    """ "a thick right-slanted seven", "an upright eight", "a seven"; "" for no digit and no attribute."""
    attributes = attributes or {}
    words = []
    if "thickness" in attributes:
        words.append(attributes["thickness"])
    if "slant" in attributes:
        slant = attributes["slant"]
        words.append(slant if slant == "upright" else f"{slant}-slanted")
    if digit is not None:
        words.append(DIGIT_WORDS[digit])
    if not words:
        return ""
    article = "an" if words[0] in ("eight", "upright") else "a"
    return " ".join([article, *words])


def parse_prompt(prompt: str) -> tuple[int | None, dict[str, str]]:
    """(digit or None, {attribute: word}) named by a prompt of our grammar; other words are ignored."""
    digit, attributes = None, {}
    for word in re.findall(r"[a-z]+|[0-9]", prompt.lower()):
        if word in DIGIT_WORDS:
            digit = DIGIT_WORDS.index(word)
        elif word.isdigit():
            digit = int(word)
        elif word in _WORD_TO_ATTRIBUTE:
            attributes[_WORD_TO_ATTRIBUTE[word][0]] = word
    return digit, attributes


def training_prompts() -> list[str]:
    """Every prompt the trainer can draw, indexed by prompt_index; the last one is ""."""
    prompts = []
    for digit in range(len(DIGIT_WORDS)):
        for t in (None, *ATTRIBUTES["thickness"]):
            for s in (None, *ATTRIBUTES["slant"]):
                named = {k: v for k, v in (("thickness", t), ("slant", s)) if v is not None}
                prompts.append(make_prompt(digit, named))
    return [*prompts, ""]


def prompt_index(digits: torch.Tensor, thickness: torch.Tensor, slant: torch.Tensor) -> torch.Tensor:
    """Index into training_prompts(); thickness and slant are 0 (omitted) or 1 + tercile index."""
    return digits * 16 + thickness * 4 + slant


def evaluation_prompts() -> list[str]:
    """40 prompts: per digit one bare, one with thickness, one with slant, one with both; the words rotate."""
    thick, slant = ATTRIBUTES["thickness"], ATTRIBUTES["slant"]
    prompts = []
    for d in range(len(DIGIT_WORDS)):
        prompts += [
            make_prompt(d),
            make_prompt(d, {"thickness": thick[d % 3]}),
            make_prompt(d, {"slant": slant[(d + 1) % 3]}),
            make_prompt(d, {"thickness": thick[(d + 2) % 3], "slant": slant[(d + 2) % 3]}),
        ]
    return prompts


def adherence(
    images: torch.Tensor, prompts: Sequence[str], classifier: Any = None
) -> dict[str, dict[str, float | None]]:
    """How well [N,1,16,16] images in [-1, 1] follow their prompts.

    digit: the digits classifier's agreement with the prompted digit (over prompts that name one).
    Each attribute: the fraction of images whose measured tercile (within the prompted digit's class, or the
    classified one if none is named) is the prompted word's (over prompts that name it; chance is 1/3).
    """
    if classifier is None:
        from zoo import load_classifier

        classifier = load_classifier()
    images = torch.nan_to_num(images.float(), nan=0.0).clamp(-1, 1)
    with torch.inference_mode():
        predicted = classifier(images).argmax(1)
    parsed = [parse_prompt(p) for p in prompts]
    named = torch.tensor([d is not None for d, _ in parsed], dtype=torch.bool)
    digits = torch.tensor([predicted[i] if d is None else d for i, (d, _) in enumerate(parsed)], dtype=torch.long)
    report = {"digit": _rate(predicted == digits, named)}
    measured = bins(measure(images), digits)
    for attribute, words in ATTRIBUTES.items():
        want = [words.index(a[attribute]) if attribute in a else -1 for _, a in parsed]
        want_t = torch.tensor(want)
        report[attribute] = _rate(measured[attribute] == want_t, want_t >= 0)
    return report


def _rate(hits: torch.Tensor, mask: torch.Tensor) -> dict[str, float | None]:
    count = int(mask.sum())
    return {"rate": int(hits[mask].sum()) / count if count else None, "count": count}  # exact k/n, not float32
