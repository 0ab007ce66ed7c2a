"""Passkey retrieval with a plain completion prompt (Mohtashami & Jaggi 2023 style; the embedded
SmolLM2's chat template hurts retrieval, so no template is applied)."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .text import filler_text

HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n\n")
TAIL = "\n\nWhat is the pass key? The pass key is"


@dataclass
class PasskeySample:
    prompt: str
    answer: str
    depth: float
    n_tokens: int


def make_passkey(tokenizer, n_tokens: int, depth: float = 0.5, seed: int = 0) -> PasskeySample:
    """A prompt of about ``n_tokens`` tokens with a 5-digit key at relative ``depth``."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tokenizer(HEAD + needle + TAIL, add_special_tokens=False)["input_ids"])
    per_sentence = len(tokenizer(filler_text(50), add_special_tokens=False)["input_ids"]) / 50
    n_fill = max(1, int((n_tokens - fixed) / per_sentence))
    sents = filler_text(n_fill).split(". ")
    cut = int(len(sents) * depth)
    before = ". ".join(sents[:cut]) + ("." if cut else "")
    after = ". ".join(sents[cut:])
    prompt = HEAD + before + needle + after + TAIL
    n = len(tokenizer(prompt)["input_ids"])
    return PasskeySample(prompt=prompt, answer=key, depth=depth, n_tokens=n)


def passkey_correct(completion: str, answer: str) -> bool:
    digits = "".join(ch for ch in completion.strip().split("\n")[0] if ch.isdigit())
    return digits.startswith(answer)
