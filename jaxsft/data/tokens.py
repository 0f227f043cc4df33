"""Tokenizing rendered text, and finding how many of a conversation's tokens a rendered prefix covers.

`render.py` needs, for each trained turn, the number of tokens of a rendered prefix of the
conversation, and must check that those tokens are exactly the first tokens of the whole
conversation. Tokenizing every prefix whole would tokenize most of the text twice (the prompt is
usually most of it). Tokenizers split text at their added tokens (such as `<|im_start|>`) and
tokenize the pieces between them independently; when every added token splits plainly (no
stripping of its neighbours, no normalization) and the pieces are tokenized the same wherever they
stand (byte-level BPE, as in Llama 3, Qwen, GPT), a prefix's tokens are the whole's tokens up to the
prefix's last added token plus the tokens of the short text after it. Then only that tail is
tokenized and compared. Other tokenizers (SentencePiece-style ones that mark the start of a text,
for example) tokenize the prefix whole. Either way the check is exact; a test compares both ways at
every cut of several conversations.
"""

from __future__ import annotations

import json
import re

# Normalizers and pre-tokenizers that treat a piece of text the same wherever it stands.
_CONTEXT_FREE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Replace"}
_CONTEXT_FREE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit"}


def _context_free(spec: dict | None, allowed: set[str]) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        parts = spec.get("normalizers", spec.get("pretokenizers", []))
        return all(_context_free(p, allowed) for p in parts)
    if spec.get("type") == "ByteLevel" and spec.get("add_prefix_space"):
        return False  # a space added at the start of a text: position-dependent
    return spec.get("type") in allowed


class Tokens:
    """Token ids of rendered text (no special tokens added) and prefix lengths, with one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # The Rust tokenizer directly: the same ids as `tokenizer(...)`, without its per-call overhead.
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.added_re = None  # set when prefixes can be checked from their tail
        if self.backend is None:
            return
        spec = json.loads(self.backend.to_str())
        added = self.backend.get_added_tokens_decoder()
        plain = all(not (t.lstrip or t.rstrip or t.single_word or t.normalized) for t in added.values())
        if (added and plain and _context_free(spec.get("normalizer"), _CONTEXT_FREE_NORMALIZERS)
                and _context_free(spec.get("pre_tokenizer"), _CONTEXT_FREE_PRE_TOKENIZERS)):
            # Longest first: at each position the longest added token wins, as in the tokenizer.
            contents = sorted({t.content for t in added.values()}, key=len, reverse=True)
            self.added_re = re.compile("|".join(re.escape(c) for c in contents))
            self.added_ids = {t.content: i for i, t in added.items()}
            self.added_id_set = set(added)

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`; with `special`, the tokenizer's own additions (such as bos) too."""
        return self.encode_many([text], special)[0]

    def encode_many(self, texts: list[str], special: bool = False) -> list[list[int]]:
        """Token ids of each text. One call for many texts: the Rust tokenizer spreads them over the
        CPU cores, and skips computing character offsets, which nothing here needs."""
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=special)]
        return [self.tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]

    def split(self, prefix: str) -> tuple[int, str, str] | None:
        """`(added tokens in prefix, the last of them, the text after it)`: what `prefix_len` checks a
        prefix by; None when prefixes must be tokenized whole (see the module docstring)."""
        if self.added_re is None:
            return None
        last, count = None, 0
        for last in self.added_re.finditer(prefix):
            count += 1
        return (count, last.group(), prefix[last.end():]) if count else None

    def prefix_len(self, whole: "Whole", prefix: str, split: tuple[int, str, str] | None = None,
                   tail_ids: list[int] | None = None) -> int | None:
        """How many tokens of `whole` are the tokens of `prefix` (a string prefix of its text), or None
        when the tokens of `prefix` are not a prefix of the whole's tokens. `split` is `split(prefix)`
        and `tail_ids` its tail's tokens, when the caller tokenized those already (in a batch)."""
        ids = whole.ids
        split = self.split(prefix) if split is None else split
        if split is not None:  # the c-th added token of the prefix is the c-th added token among the whole's ids
            count, last, tail = split
            positions = whole.added_positions(self.added_id_set)
            if count <= len(positions) and ids[positions[count - 1]] == self.added_ids[last]:
                start = positions[count - 1] + 1
                tail_ids = self.encode(tail) if tail_ids is None else tail_ids
                if ids[start:start + len(tail_ids)] == tail_ids:
                    return start + len(tail_ids)
        prefix_ids = self.encode(prefix)  # the whole prefix: tokenizers of any kind, and a mismatched tail
        return len(prefix_ids) if ids[:len(prefix_ids)] == prefix_ids else None


class Whole:
    """A tokenized text, with where its added tokens are once a prefix check needs it."""

    def __init__(self, text: str, ids: list[int]):
        self.text, self.ids = text, ids
        self._added: list[int] | None = None

    def added_positions(self, added_ids: set[int]) -> list[int]:
        """Indices of the added tokens among the ids."""
        if self._added is None:
            self._added = [i for i, t in enumerate(self.ids) if t in added_ids]
        return self._added
