"""Where the words of a prompt sit among its tokens, found from the text itself (never typed by hand).

Byte-pair tokenizers split some words into several tokens ("zigzag" -> "zig", "zag</w>") and
every tokenizer here splits at word boundaries first, so a cut of the text at a word boundary is a
cut of its token sequence: the tokens of `prompt[:start]` are the first tokens of `prompt`. A
phrase's positions are then the tokens between the cut before it and the cut after it, checked
against the whole prompt's tokens (a tokenizer that breaks this raises instead of guessing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)  # letters and digits; "don't" is one word

# Words whose cross-attention is spread over the whole picture: a map of one of them says nothing
# about where an attribute acts, so SPF's control map does not subtract them (METHODS.md 2).
FUNCTION_WORDS = ("a", "an", "the", "of", "on", "in", "at", "to", "and", "there", "is", "are", "with", "near",
                  "against", "front", "photo", "picture", "style")


@dataclass(frozen=True)
class PromptWord:
    text: str
    positions: tuple[int, ...]  # token positions in the encoded prompt (start token included)


def phrase_spans(prompt: str, phrase: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the phrase as whole words, case-insensitive, every occurrence."""
    words = phrase.split()
    if not words:
        return []
    pattern = r"(?<![^\W_])" + r"\s+".join(re.escape(w) for w in words) + r"(?![^\W_])"
    return [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def remove_phrase(prompt: str, phrase: str) -> str:
    """The prompt without the phrase: 'a big red zigzag star, on grass' -> 'a big red star, on grass'."""
    text = prompt
    for start, end in reversed(phrase_spans(prompt, phrase)):
        text = text[:start] + " " + text[end:]
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"\b(a)\s+(?=[aeiou])", "an ", text)  # 'a zigzag object' -> 'an object'
    text = re.sub(r"\b(an)\s+(?=[^\Waeiou])", "a ", text)  # 'an ombre star' -> 'a star'
    return text.strip(" ,")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def token_positions(tokenizer, prompt: str, spans: list[tuple[int, int]], offset: int = 1,
                    limit: int | None = None) -> list[int]:
    """Token positions of character spans of the prompt; `offset` counts the start token, `limit` the
    encoder's length (positions past it were truncated away)."""
    full = _ids(tokenizer, prompt)
    positions = []
    for start, end in spans:
        before, through = _ids(tokenizer, prompt[:start].rstrip()), _ids(tokenizer, prompt[:end])
        if full[:len(through)] != through or through[:len(before)] != before:
            raise ValueError(f"the tokenizer does not split {prompt!r} at word boundaries; cannot place "
                             f"{prompt[start:end]!r} among its tokens")
        positions.extend(range(offset + len(before), offset + len(through)))
    limit = limit if limit is not None else offset + len(full)
    return [p for p in positions if p < limit]


def phrase_positions(tokenizer, prompt: str, phrase: str, offset: int = 1, limit: int | None = None) -> list[int]:
    """Token positions of every occurrence of the phrase in the prompt (empty when it is absent)."""
    return token_positions(tokenizer, prompt, phrase_spans(prompt, phrase), offset, limit)


def prompt_words(tokenizer, prompt: str, offset: int = 1, limit: int | None = None) -> list[PromptWord]:
    """Every word of the prompt with its token positions, in order (punctuation is no word)."""
    out = []
    for m in WORD.finditer(prompt):
        positions = token_positions(tokenizer, prompt, [m.span()], offset, limit)
        if positions:
            out.append(PromptWord(m.group(0).lower(), tuple(positions)))
    return out


def end_positions(tokenizer, prompt: str, length: int, offset: int = 1) -> list[int]:
    """The end token and the padding after it: every position past the prompt's own tokens."""
    return list(range(min(offset + len(_ids(tokenizer, prompt)), length), length))
