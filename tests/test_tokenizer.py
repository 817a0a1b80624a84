"""CLIP tokenizer: the known ids, parity with Hugging Face's CLIPTokenizer, truncation and errors.

The parity reference is built from the same vocabulary file but by Hugging Face's own BPE code (in
transformers 5.x the Rust ``tokenizers`` backend, the only CLIPTokenizer left; in 4.x the slow Python one),
so it checks our byte alphabet, pre-tokenisation pattern, merge order and whitespace handling against an
independent implementation.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import json
import os
from pathlib import Path

import ftfy
import pytest
import torch

from promptclip.clip.tokenizer import (
    EOT_TOKEN,
    SOT_TOKEN,
    SimpleTokenizer,
    clean_text,
    get_tokenizer,
    tokenize,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB_GZ = importlib.resources.files("promptclip.clip").joinpath("bpe_simple_vocab_16e6.txt.gz")

# Texts that ftfy and HTML unescaping leave unchanged (asserted below), so both tokenizers see the same input.
PLAIN_TEXTS = [
    "a photo of a cat.",
    "A PHOTO OF A DOG",
    "Hello, world!!! ... ???",
    "(parentheses) [brackets] {braces} <angle> @#$%^&*_+=|\\/~`",
    "3.14159 and 1,000,000 and 2nd place, 42kg, 007",
    "café naïve façade über Ærø",
    "日本語のテキスト and Привет мир and ελληνικά",
    "emoji 🐱🐶🎉 👩\u200d👩\u200d👧 ❤️",
    "CamelCaseWord iPhone XMLHttpRequest snake_case_name",
    "it's we're they've I'm you'll he'd don't O'Neil's IT'S",
    "multiple    spaces\tand\n\nnewlines \n end \u00a0\u2003 nbsp  ",
    "   leading and trailing   ",
    "Fish & Chips, x&y",
    "hello <|endoftext|> world",
    "a photo of a " + "very " * 120 + "long caption about a dog",
]

# Texts that CLIP's cleaning changes: ftfy (mojibake, curly quotes, decomposed accents) and HTML entities,
# which CLIP unescapes twice. Hugging Face's CLIPTokenizer does neither (5.x only applies NFC, whitespace
# folding and lower-casing; 4.x's slow one runs ftfy but not html.unescape). We follow OpenAI's CLIP, because
# the pretrained weights were trained on ids made by its cleaning; so these are compared against Hugging Face
# fed with the text after the two steps it lacks.
CLEANED_TEXTS = [
    "fish &amp; chips",
    "&amp;amp; escaped twice",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39;",
    "it’s “curly” quotes",
    "cafÃ© mojibake",
    "cafe\u0301 decomposed accent",
    "windows\r\nline ends",
]


def _byte_symbols_in_vocab_order() -> list[str]:
    """The byte alphabet of byte-level BPE as the vocabulary lists it.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves and come first; the 68 others
    follow in byte order, spelled with the code points 256, 257, ...
    """
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _write_hf_vocab_files(folder: Path) -> None:
    """Convert the gzipped merge file into the vocab.json + merges.txt that Hugging Face reads.

    The file's line 0 is a ``#version`` header and every later line one merge ``left right``, best first.
    CLIP uses lines 1..48894 only (49408 ids = 256 bytes + 256 word-final bytes + 48894 merges + 2 specials).
    Ids: the 256 byte symbols, the same each followed by ``</w>``, the result of each merge in rank order,
    then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    lines = gzip.decompress(VOCAB_GZ.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 48894 + 1]
    byte_symbols = _byte_symbols_in_vocab_order()
    tokens = [
        *byte_symbols,
        *(s + "</w>" for s in byte_symbols),
        *(m.replace(" ", "") for m in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    assert len(tokens) == 49408
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_clip_tokenizer")
    _write_hf_vocab_files(folder)
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def _hf_ids(hf_tokenizer, text: str) -> list[int]:
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def test_known_ids_of_a_photo_of_a_cat():
    row = tokenize(["a photo of a cat."])[0]
    assert row.dtype == torch.long
    assert row.shape == (77,)
    assert row[:8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert row[8:].eq(0).all()


def test_vocabulary_constants():
    tokenizer = get_tokenizer()
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token, tokenizer.eot_token) == (SOT_TOKEN, EOT_TOKEN) == (49406, 49407)
    assert get_tokenizer() is tokenizer


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_ids_match_hugging_face(hf_tokenizer, text):
    assert html.unescape(html.unescape(ftfy.fix_text(text))) == text, "not a plain text: move to CLEANED_TEXTS"
    assert get_tokenizer().encode(text) == _hf_ids(hf_tokenizer, text)


@pytest.mark.parametrize("text", CLEANED_TEXTS)
def test_ids_match_hugging_face_after_clip_cleaning(hf_tokenizer, text):
    precleaned = html.unescape(html.unescape(ftfy.fix_text(text)))
    assert get_tokenizer().encode(text) == _hf_ids(hf_tokenizer, precleaned)


def test_clip_cleaning_is_applied():
    encode = get_tokenizer().encode
    assert encode("fish &amp;amp; chips") == encode("fish & chips")
    assert encode("it’s") == encode("it's") == [585, 568]
    assert encode("cafÃ©") == encode("café")
    assert encode("  Two\n\nLINES\t") == encode("two lines")


@pytest.mark.parametrize("text", PLAIN_TEXTS + CLEANED_TEXTS)
def test_decode_matches_hugging_face(hf_tokenizer, text):
    ids = get_tokenizer().encode(text)
    assert get_tokenizer().decode(ids) == hf_tokenizer.decode(ids)


@pytest.mark.parametrize(
    "text", ["a photo of a cat", "a photo of a big dog , with 2 0 stripes !", "café 🐱 日本語", "x"]
)
def test_decode_round_trips_normalised_text(text):
    tokenizer = get_tokenizer()
    assert clean_text(text) == text
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_rejects_unknown_id():
    with pytest.raises(ValueError, match="49408"):
        get_tokenizer().decode([320, 49408])


def test_truncation_keeps_end_token():
    text = "a photo of a " + "very " * 100 + "big cat"
    ids = get_tokenizer().encode(text)
    assert len(ids) > 75
    row = tokenize(text, truncate=True)[0]
    assert row.shape == (77,)
    assert row[0].item() == SOT_TOKEN
    assert row[-1].item() == EOT_TOKEN
    assert row[1:76].tolist() == ids[:75]
    short = tokenize(text, context_length=10, truncate=True)[0]
    assert short.tolist() == [SOT_TOKEN, *ids[:8], EOT_TOKEN]


def test_text_that_exactly_fits_is_not_an_error():
    text = "a " * 75
    row = tokenize(text)[0]
    assert row[0].item() == SOT_TOKEN
    assert row[1:76].eq(320).all()
    assert row[76].item() == EOT_TOKEN


def test_too_long_text_raises_with_a_helpful_message():
    text = "a " * 76
    with pytest.raises(ValueError) as info:
        tokenize(["short one", text])
    message = str(info.value)
    assert "a a a a" in message
    assert "78 tokens" in message
    assert "77" in message
    assert "truncate=True" in message


def test_string_input_equals_one_element_list():
    assert torch.equal(tokenize("a photo of a dog."), tokenize(["a photo of a dog."]))
    batch = tokenize(["a photo of a dog.", "x"], context_length=16)
    assert batch.shape == (2, 16)
    assert batch[1, :3].tolist() == [SOT_TOKEN, 343, EOT_TOKEN]
    assert batch[1, 3:].eq(0).all()


def test_empty_text_is_start_and_end_only():
    assert tokenize("")[0, :3].tolist() == [SOT_TOKEN, EOT_TOKEN, 0]


def test_explicit_vocab_path_and_bad_files(tmp_path):
    path = tmp_path / "vocab.txt.gz"
    path.write_bytes(VOCAB_GZ.read_bytes())
    assert SimpleTokenizer(path).encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    with pytest.raises(FileNotFoundError, match=r"missing\.txt\.gz"):
        SimpleTokenizer(tmp_path / "missing.txt.gz")
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\n"))
    with pytest.raises(ValueError, match=r"short\.txt\.gz"):
        SimpleTokenizer(short)
