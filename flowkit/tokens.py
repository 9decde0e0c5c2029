"""Words of a prompt as positions in the text-token sequence a network attends to.

Attention-based guidance (FRAP, counting guidance) works on the cross/joint-attention
columns of an object's tokens and its modifiers'. A `TokenGroup` holds those positions;
`word_span` finds a word in a prompt and `word_positions` maps it to the sub-word tokens a
tokenizer makes of it (through the tokenizer's character offsets, so any sub-word scheme
works: CLIP BPE, T5 unigram, BERT wordpiece). Model adapters build groups with their own
tokenizers (`ModelAdapter.token_groups`).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Sequence, Union

from flowkit.errors import InputError, UnsupportedError

__all__ = ["TokenGroup", "Words", "Positions", "word_span", "positions_in_span", "word_positions", "check_positions"]

# words=: groups (object word, *modifier words); a word is a string or (word, occurrence from 0)
Words = Sequence[Union[str, Sequence[Union[str, tuple[str, int]]]]]
# positions=: per prompt, per group, per word (object first): a position or a list of them
Positions = Sequence[Sequence[Sequence[Union[int, Sequence[int]]]]]


@dataclass(frozen=True)
class TokenGroup:
    """One object of a prompt and its modifiers, as positions in the text-token sequence the
    network's cross/joint attention attends to (the rows of Conditioning['encoder_hidden_states'])."""

    object: tuple[int, ...]  # positions of the object word (all its sub-word tokens)
    modifiers: tuple[tuple[int, ...], ...] = ()  # positions of each modifier word (colour, count, ...)
    words: tuple[str, ...] = ()  # (object word, *modifier words) as given, for messages
    count: int | None = None  # the asked count where the prompt says one (shapes captions), else None

    @property
    def positions(self) -> tuple[int, ...]:
        """Every position of the group, object first."""
        return self.object + tuple(p for m in self.modifiers for p in m)


def word_span(text: str, word: str, occurrence: int = 0) -> tuple[int, int]:
    """Character span [begin, end) of the `occurrence`-th (0-based) whole-word, case-insensitive
    match of `word` in `text`; InputError naming the word and the prompt."""
    if not isinstance(word, str) or not word.strip():
        raise InputError(f"a word to find must be a non-empty string, got {word!r}")
    if not isinstance(occurrence, int) or occurrence < 0:
        raise InputError(f"occurrence of {word!r} must be an integer >= 0, got {occurrence!r}")
    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, word.split())) + r"(?!\w)"
    found = list(re.finditer(pattern, text, flags=re.IGNORECASE))
    if occurrence >= len(found):
        where = f"{len(found)} time{'s' if len(found) != 1 else ''}" if found else "nowhere"
        raise InputError(f"the word {word!r} occurs {where} in the prompt {text!r}"
                         + (f" (asked for occurrence {occurrence}, counting from 0)" if found else
                            ": give words that the prompt contains"))
    return found[occurrence].span()


def positions_in_span(offsets: Sequence[tuple[int, int]], span: tuple[int, int],
                      special: Sequence[int] | None = None) -> tuple[int, ...]:
    """Token positions whose character offsets overlap `span` (a tokenizer's `offset_mapping`;
    `special`: its special-tokens mask, 1 for BOS/EOS/padding, which are never part of a word)."""
    begin, end = span
    return tuple(i for i, (a, b) in enumerate(offsets)
                 if b > a and a < end and b > begin and not (special is not None and special[i]))


def word_positions(tokenizer: Any, text: str, span: tuple[int, int], max_length: int,
                   required: bool = True) -> tuple[int, ...]:
    """Positions of the tokens of `text[span[0]:span[1]]` when `tokenizer` encodes `text` as the
    pipelines do (padding to `max_length`, truncated, special tokens added). A word cut off by
    the truncation: InputError, or () when not `required`."""
    try:
        enc = tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                        return_offsets_mapping=True, return_special_tokens_mask=True)
    except NotImplementedError as e:  # a slow (Python) tokenizer has no offsets
        raise UnsupportedError(f"finding words needs a fast tokenizer with offsets; {type(tokenizer).__name__} "
                               "has none: load the pipeline with its fast tokenizer") from e
    found = positions_in_span(enc["offset_mapping"], span, enc["special_tokens_mask"])
    if not found and required:
        word = text[span[0]:span[1]]
        raise InputError(f"the word {word!r} of the prompt {text!r} falls beyond the text encoder's "
                         f"{max_length} tokens: shorten the prompt or move the word forward")
    return found


def check_positions(positions: Positions, seq_len: int, n_prompts: int | None) -> list[list[TokenGroup]]:
    """Explicit positions -> groups per prompt, validated against the sequence length. Per prompt
    a list of groups; a group is a list of words, object first; a word is one position or a list
    of positions (its sub-word tokens): `[[[5, 2]]]` or `[[[[5, 6], [2]]]]`."""
    rows = _seq(positions, "positions")
    if n_prompts is not None and len(rows) != n_prompts:
        raise InputError(f"positions has {len(rows)} entries for {n_prompts} prompts: give one list of groups "
                         "per prompt")
    out = []
    for i, groups in enumerate(rows):
        row = []
        for j, group in enumerate(_seq(groups, f"positions[{i}]")):
            where = f"positions[{i}][{j}]"
            words = [_word(w, seq_len, where) for w in _seq(group, where)]
            if not words:
                raise InputError(f"{where} is empty: a group lists its object's positions first, then its modifiers'")
            row.append(TokenGroup(object=words[0], modifiers=tuple(words[1:])))
        out.append(row)
    return out


def _seq(value: Any, where: str) -> Sequence:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(f"{where} must be a list, got {value!r}: positions go per prompt, per group, per word "
                         "(object first), a word being a position or a list of them, e.g. [[[5, 2]]]")
    return value


def _word(value: Any, seq_len: int, where: str) -> tuple[int, ...]:
    """A word's positions: one position or a non-empty list of them, each in [0, seq_len)."""
    items = list(_seq(value, where)) if isinstance(value, Sequence) or isinstance(value, (str, bytes)) else [value]
    if not items:
        raise InputError(f"{where} has a word with no positions: give each word at least one")
    out = []
    for p in items:
        try:
            if isinstance(p, bool):
                raise TypeError
            p = operator.index(p)
        except TypeError:
            raise InputError(f"{where} holds {p!r}: positions are integers") from None
        if not 0 <= p < seq_len:
            raise InputError(f"position {p} in {where} is outside the text sequence of {seq_len} tokens "
                             f"(0..{seq_len - 1})")
        out.append(p)
    return tuple(out)
