"""CLIP's byte-level byte-pair-encoding tokenizer.

Text is cleaned (ftfy, HTML entities, whitespace, lower case), split into pieces by CLIP's pre-tokenisation
pattern, each piece is spelled as one printable character per UTF-8 byte, and the pieces are merged with the
ranked merge rules of the shipped vocabulary file (``bpe_simple_vocab_16e6.txt.gz``, OpenAI, MIT). The ids
are those of the pretrained CLIP models, so the text tower sees exactly what it was trained on.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import itertools
import re
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
END_OF_WORD = "</w>"
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"

# CLIP keeps only the first merges of the file: 256 byte symbols, the same 256 closing a word, one symbol per
# merge and the two special tokens must total 49408 ids.
CLIP_VOCAB_SIZE = 49408
NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
SOT_TOKEN = 49406
EOT_TOKEN = 49407
DEFAULT_CONTEXT_LENGTH = 77

# Contractions, runs of letters, single digits and runs of other non-space symbols; the special tokens stay
# whole. Matched case-insensitively, as CLIP does, although the text is already lower case by then.
_PRETOKENIZE_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# The standard library's notion of whitespace (str.isspace), which is what CLIP's cleaning used.
_WHITESPACE_RUN = re.compile(r"\s+")


def _byte_alphabet() -> dict[int, str]:
    """Map every byte value to a printable character, so that BPE symbols never hold control characters.

    Bytes that are already printable Latin-1 characters stand for themselves; the others (controls, space,
    soft hyphen, ...) take the code points from 256 upwards, in byte order. The dict lists the printable
    bytes first and the remapped ones after them: that is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {byte: chr(byte) for byte in printable}
    remapped = [byte for byte in range(256) if byte not in alphabet]
    alphabet.update({byte: chr(256 + offset) for offset, byte in enumerate(remapped)})
    return alphabet


BYTE_TO_CHAR: dict[int, str] = _byte_alphabet()
CHAR_TO_BYTE: dict[str, int] = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def clean_text(text: str) -> str:
    """Normalise text the way CLIP did before tokenising it.

    ftfy repairs mojibake and unifies quotes; HTML entities are unescaped twice because web captions are often
    escaped twice (``&amp;amp;``); whitespace runs become one space; everything is lower-cased.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def _read_vocab_lines(bpe_path: str | Path | None) -> tuple[list[str], str]:
    """Return the lines of the gzipped merge file and a name for it to use in error messages."""
    if bpe_path is None:
        resource = importlib.resources.files("promptclip.clip").joinpath(VOCAB_FILENAME)
        source = f"package data promptclip.clip/{VOCAB_FILENAME}"
        raw = resource.read_bytes()
    else:
        path = Path(bpe_path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"BPE vocabulary file {path} does not exist; pass the path of CLIP's "
                f"{VOCAB_FILENAME}, or None to use the copy shipped with promptclip"
            )
        raw = path.read_bytes()
    try:
        text = gzip.decompress(raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(f"BPE vocabulary file {source} is not a gzipped UTF-8 text file: {error}") from error
    return text.split("\n"), source


def _parse_merges(lines: list[str], source: str) -> list[tuple[str, str]]:
    """Read the ranked merges: line 0 is a version header, lines 1..NUM_MERGES are ``left right`` pairs."""
    if len(lines) < NUM_MERGES + 1:
        raise ValueError(
            f"BPE vocabulary file {source} has {len(lines)} lines but CLIP needs a header and at least "
            f"{NUM_MERGES} merge lines; use CLIP's {VOCAB_FILENAME}"
        )
    merges = []
    for line_number in range(1, NUM_MERGES + 1):
        parts = lines[line_number].split()
        if len(parts) != 2:
            raise ValueError(
                f"BPE vocabulary file {source}, line {line_number + 1}: expected two symbols separated by a "
                f"space, got {lines[line_number]!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _build_vocab(merges: list[tuple[str, str]]) -> list[str]:
    """Token strings in id order: bytes, bytes ending a word, one per merge, then the two special tokens.

    The byte symbols come in the alphabet's order (printable bytes first), not in byte-value order.
    """
    byte_symbols = list(BYTE_TO_CHAR.values())
    return [
        *byte_symbols,
        *(symbol + END_OF_WORD for symbol in byte_symbols),
        *(left + right for left, right in merges),
        START_OF_TEXT,
        END_OF_TEXT,
    ]


def _merge_pair(symbols: list[str], left: str, right: str) -> list[str]:
    """Replace every non-overlapping occurrence of (left, right), scanning from the left, by one symbol."""
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and symbols[index] == left and symbols[index + 1] == right:
            merged.append(left + right)
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


class SimpleTokenizer:
    """CLIP's tokenizer: ``encode`` gives the ids of a text without the start and end tokens."""

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        lines, source = _read_vocab_lines(bpe_path)
        merges = _parse_merges(lines, source)
        vocab = _build_vocab(merges)
        self._encoder: dict[str, int] = {token: index for index, token in enumerate(vocab)}
        if len(self._encoder) != CLIP_VOCAB_SIZE:
            raise ValueError(
                f"BPE vocabulary file {source} yields {len(self._encoder)} distinct tokens, "
                f"expected {CLIP_VOCAB_SIZE}; use CLIP's {VOCAB_FILENAME}"
            )
        self._decoder: dict[int, str] = dict(enumerate(vocab))
        self._merge_ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self.vocab_size: int = len(vocab)
        self.sot_token: int = self._encoder[START_OF_TEXT]
        self.eot_token: int = self._encoder[END_OF_TEXT]
        if (self.sot_token, self.eot_token) != (SOT_TOKEN, EOT_TOKEN):
            raise ValueError(
                f"BPE vocabulary file {source} puts the special tokens at ids "
                f"{(self.sot_token, self.eot_token)}, expected {(SOT_TOKEN, EOT_TOKEN)}"
            )
        # Special tokens written in the text are kept whole, as in CLIP.
        self._bpe_cache: dict[str, tuple[str, ...]] = {
            START_OF_TEXT: (START_OF_TEXT,),
            END_OF_TEXT: (END_OF_TEXT,),
        }

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """Split one byte-spelled piece into vocabulary tokens by applying merges, lowest rank first."""
        cached = self._bpe_cache.get(piece)
        if cached is not None:
            return cached
        symbols = [*piece[:-1], piece[-1] + END_OF_WORD]
        while len(symbols) > 1:
            ranked_pairs = ((self._merge_ranks.get(pair), pair) for pair in itertools.pairwise(symbols))
            known = [(rank, pair) for rank, pair in ranked_pairs if rank is not None]
            if not known:
                break
            _, (left, right) = min(known)
            symbols = _merge_pair(symbols, left, right)
        result = tuple(symbols)
        self._bpe_cache[piece] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` after CLIP's cleaning, without the start and end tokens."""
        ids: list[int] = []
        for piece in _PRETOKENIZE_PATTERN.findall(clean_text(text)):
            spelled = "".join(BYTE_TO_CHAR[byte] for byte in piece.encode("utf-8"))
            ids.extend(self._encoder[token] for token in self._bpe(spelled))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids: each end-of-word marker becomes a space, the trailing one is dropped.

        Invalid UTF-8 (a multi-byte character cut between ids) is shown as U+FFFD. Unlike CLIP's own decoder,
        a literal ``</w>`` typed in the text is not turned into a space.
        """
        pieces: list[bytes] = []
        for token_id in ids:
            token = self._decoder.get(int(token_id))
            if token is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
            if token in (START_OF_TEXT, END_OF_TEXT):
                pieces.append(token.encode("utf-8"))
                continue
            ends_word = token.endswith(END_OF_WORD)
            symbols = token[: -len(END_OF_WORD)] if ends_word else token
            pieces.append(bytes(CHAR_TO_BYTE[char] for char in symbols) + (b" " if ends_word else b""))
        return b"".join(pieces).decode("utf-8", errors="replace").rstrip(" ")


@functools.cache
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer built from the shipped vocabulary (built once, on first use)."""
    return SimpleTokenizer()


class TextTooLongError(ValueError):
    """A text (a prompt holding a class name) longer than the text encoder's context."""


def _shown(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _too_long_error(text: str, num_tokens: int, context_length: int, name: str | None) -> TextTooLongError:
    if name is None:
        return TextTooLongError(
            f"text {_shown(text)!r} encodes to {num_tokens} tokens (with start and end tokens), more than the "
            f"context length {context_length}; pass truncate=True or shorten the text"
        )
    return TextTooLongError(
        f"class name {_shown(name, 80)!r} is too long for CLIP's text encoder: its prompt {_shown(text)!r} "
        f"encodes to {num_tokens} tokens, more than the context length {context_length}. Give the class a "
        "shorter name: in --classes, or map it to a short name in a class-name file (a JSON "
        '{"folder or label": "short name"}, given with --classnames FILE or data.options.classnames)'
    )


def tokenize(
    texts: str | Sequence[str],
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    truncate: bool = False,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Token ids of one or more texts as a LongTensor ``[N, context_length]``.

    Each row is ``SOT, ids..., EOT`` followed by zeros. A text that does not fit raises ``TextTooLongError``
    (a ``ValueError``) unless ``truncate`` is set, in which case it is cut to ``context_length`` ids and the
    last one is set to EOT, so the end-of-text position the text tower pools at is always present. ``names``
    (one per text, e.g. the class name each prompt holds) makes the error name the class and the fix.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    batch = [texts] if isinstance(texts, str) else list(texts)
    for position, text in enumerate(batch):
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects strings, got {type(text).__name__} at position {position}")
    tokenizer = get_tokenizer()
    result = torch.zeros(len(batch), context_length, dtype=torch.long)
    for row, text in enumerate(batch):
        ids = [tokenizer.sot_token, *tokenizer.encode(text), tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise _too_long_error(text, len(ids), context_length, names[row] if names is not None else None)
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_token
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result
