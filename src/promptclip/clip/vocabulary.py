"""Which words of a set of names the backbone never learned, and which names it cannot tell apart.

A text tower sees a name only through the token embeddings of its words. A word whose every token has an
all-zero embedding row was never learned (the bundled tiny CLIP knows only its synthetic world's few hundred
words; every other row is zero). Two names whose token embedding sequences are equal, row for row, are the same
input to the text tower: every prompt built around them, learned or hand-written, gives them identical text
features, and a classifier ties them (the arg-max then picks the first). This is exact and needs no text
encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from promptclip.classnames import prompt_names
from promptclip.clip.model import CLIP
from promptclip.clip.tokenizer import SimpleTokenizer, get_tokenizer

__all__ = ["NameVocabulary", "name_vocabulary"]


@dataclass(frozen=True)
class NameVocabulary:
    """What the backbone's token embedding makes of a set of names."""

    identical: list[list[str]] = field(default_factory=list)
    """Groups of two or more different names with equal token embedding sequences (in the given order)."""
    unknown_words: dict[str, list[str]] = field(default_factory=dict)
    """Each name holding words the backbone never learned (all-zero rows), with those words."""

    @property
    def tied(self) -> list[str]:
        """Every name of an `identical` group."""
        return [name for group in self.identical for name in group]

    def __bool__(self) -> bool:
        return bool(self.identical or self.unknown_words)


def name_vocabulary(clip: CLIP, names: Sequence[str]) -> NameVocabulary:
    """The names (as prompts write them: `_` -> space) of `names` that the backbone's token embedding cannot
    tell apart, and the words of each that it never learned."""
    written = prompt_names(names)
    tokenizer = get_tokenizer()
    token_ids = [tokenizer.encode(name) for name in written]
    used = sorted({i for ids in token_ids for i in ids})
    if not used:
        return NameVocabulary()
    weight = clip.token_embedding.weight
    with torch.no_grad():
        rows = weight[torch.tensor(used, device=weight.device)].detach().float().cpu()
    zero = (rows == 0).all(dim=1)
    # Tokens with equal rows (all-zero ones among them) are one and the same input to the text tower.
    _, row_class = torch.unique(rows, dim=0, return_inverse=True)
    token_class = dict(zip(used, row_class.tolist(), strict=True))
    unlearned = {token for token, is_zero in zip(used, zero.tolist(), strict=True) if is_zero}
    return NameVocabulary(
        identical=_identical_groups(names, written, [[token_class[i] for i in ids] for ids in token_ids]),
        unknown_words={
            name: _words(tokenizer, [i for i in ids if i in unlearned])
            for name, ids in zip(names, token_ids, strict=True)
            if any(i in unlearned for i in ids)
        },
    )


def _identical_groups(names: Sequence[str], written: Sequence[str], keys: Sequence[list[int]]) -> list[list[str]]:
    by_key: dict[tuple[int, ...], list[int]] = {}
    for index, key in enumerate(keys):
        by_key.setdefault(tuple(key), []).append(index)
    groups = []
    for members in by_key.values():
        if len({written[i] for i in members}) > 1:  # the same name twice is a duplicate, not a vocabulary gap
            groups.append([names[i] for i in members])
    return sorted(groups, key=lambda group: names.index(group[0]))


def _words(tokenizer: SimpleTokenizer, ids: Sequence[int]) -> list[str]:
    """The tokens `ids` as text, each once, in order (BPE pieces such as `shirt` or `trou`)."""
    seen: list[str] = []
    for token in ids:
        word = tokenizer.decode([token]).strip()
        if word not in seen:
            seen.append(word)
    return seen
