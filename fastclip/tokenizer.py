"""CLIP's byte-level BPE tokenizer on the Rust ``tokenizers`` library, id-for-id equal to open_clip's.

    tok = fastclip.get_tokenizer("ViT-B-32")
    ids = tok(["a photo of a cat", "a dog"])      # LongTensor [2, 77]

What it reproduces (open_clip's ``SimpleTokenizer`` with ``clean="lower"``, which OpenAI CLIP and
every open_clip CLIP model use):

* clean-up: ``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapsed to single spaces,
  stripped, lower-cased (Python's ``str.lower``);
* pre-tokenisation: CLIP's regex ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
  (case-insensitive), whitespace dropped;
* byte-level BPE with the 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz`` and the ``</w>``
  end-of-word suffix; vocabulary 49,408 = 256 bytes + 256 bytes with ``</w>`` + merges +
  ``<start_of_text>`` (49406) + ``<end_of_text>`` (49407);
* ``[<start_of_text>] + ids + [<end_of_text>]``, truncated to the context length keeping the end
  token last, zero-padded.

Speed: ``ftfy`` takes 10-40 us per string, most of SimpleTokenizer's time once its BPE cache is
warm.  It is skipped where it provably changes nothing: printable ASCII without ``&`` (checked by
one regex), and text that ftfy's own tables and mojibake test show it leaves alone (see
``_ftfy_noop_check``); every other string goes through ``ftfy.fix_text`` exactly as open_clip's.
After the clean-up a text is cut at whitespace into chunks whose ids are cached, so a warm batch is
mostly a ``split`` and a C-level ``map`` over a dict; cache misses are pre-tokenised by CLIP's regex
and merged by the Rust BPE model (see :class:`ClipTokenizer`).  Its speed
against SimpleTokenizer is in ``benchmarks/RESULTS.md``.

Differences from SimpleTokenizer, all deliberate and documented:

* without ``ftfy`` installed, non-ASCII text is cleaned with NFC + ``html.unescape`` only (a
  warning says so); ftfy's mojibake, ligature, width and quote fixes are then missing;
* without the ``regex`` package, non-ASCII text is split by the ``tokenizers`` pipeline, whose
  character classes (``\\p{L}``, ``\\p{N}``) come from Oniguruma's tables; they agree with
  ``regex``'s except possibly on code points assigned in a newer Unicode version than one of
  them knows (a test checks the agreement on several scripts and emoji).

The merges file is data from OpenAI CLIP (MIT), shipped in ``fastclip/assets`` (see its README).
"""
from __future__ import annotations

import functools
import gzip
import html
import itertools
import os
import re
import unicodedata
import warnings
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from .lazy import optional_module, require_module

__all__ = ["ClipTokenizer", "get_tokenizer", "clean_text", "default_bpe_path", "bytes_to_unicode",
           "DEFAULT_CONTEXT_LENGTH", "VOCAB_SIZE", "SOT_TOKEN", "EOT_TOKEN"]

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT_TOKEN, EOT_TOKEN = "<start_of_text>", "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48894 merges of the file (line 0 is a header)

# CLIP's pre-tokenisation pattern.  CLIP compiles it with IGNORECASE; the text is lower-cased first,
# so only the contractions can still meet a case question (e.g. "'\u017f" matches 's under case
# folding), hence the scoped (?i:...).
_WORD_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_SPECIAL_PATTERN = r"(?i:<start_of_text>|<end_of_text>)"
# The same pattern on lower-cased ASCII text, for Python's re (letters first: an alternative order
# that matches the same tokens, since only an apostrophe can start two alternatives).
_ASCII_WORD = re.compile(r"[a-z]+|[0-9]|'(?:[st]|re|ve|m|ll|d)|[^\sa-z0-9]+")

# Strings with none of these characters are printable ASCII (plus \t \n \f \r) without '&': ftfy and
# html.unescape leave them unchanged, so the fast path skips both.  (ftfy would only touch ASCII text
# through HTML entities, ANSI escapes and control characters, all excluded here.)
_NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\x0c\r\x20-\x25\x27-\x7e]")


def default_bpe_path() -> str:
    """Path of the merges file shipped with fastclip."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in order.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP orders the vocabulary as printable bytes first, then the others.
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


# str.translate table taking a latin-1 decoded byte string to CLIP's byte-level symbols.
_BYTE_SYMBOLS = {b: ord(c) for b, c in bytes_to_unicode().items()}

@functools.lru_cache(maxsize=None)
def _unicode_word_regex():
    """CLIP's pre-tokenisation regex compiled by the ``regex`` package (None if it is missing:
    optional, the Rust pipeline gives the same ids, more slowly)."""
    regex, _ = optional_module("regex")
    if regex is None:
        return None
    return regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# Clean-up
# ----------------------------------------------------------------------------------------------
_FTFY_WARNED = False


def _ftfy():
    """ftfy.fix_text, or None (the reason is warned about once)."""
    global _FTFY_WARNED
    ftfy, why = optional_module("ftfy")
    if ftfy is not None:
        return ftfy.fix_text
    if not _FTFY_WARNED:
        _FTFY_WARNED = True
        warnings.warn(f"fastclip.tokenizer: {why}; non-ASCII text is cleaned with NFC + "
                      "html.unescape only, so ids can differ from open_clip's on mojibake, "
                      "ligatures, full-width forms and curly quotes (pip install ftfy)",
                      RuntimeWarning, stacklevel=3)
    return None


# ftfy 6's fixers and options: the no-op check below accounts for exactly these.  Another ftfy
# (a new fixer or option) disables the check, and every such string goes through ftfy.fix_text.
_FTFY_FIXERS = frozenset({
    "unescape_html", "remove_terminal_escapes", "restore_byte_a0", "replace_lossy_sequences",
    "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures", "fix_character_width",
    "uncurl_quotes", "fix_line_breaks", "fix_surrogates", "remove_control_chars"})
_FTFY_OPTIONS = ("unescape_html", "remove_terminal_escapes", "fix_encoding", "restore_byte_a0",
                 "replace_lossy_sequences", "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures",
                 "fix_character_width", "uncurl_quotes", "fix_line_breaks", "fix_surrogates",
                 "remove_control_chars", "normalization", "max_decode_length", "explain")


@functools.lru_cache(maxsize=None)
def _ftfy_noop_check():
    """``text -> True`` only when ``ftfy.fix_text(text) == text`` is certain; None if unavailable.

    Built from ftfy's own tables, step by step of ``ftfy.fix_and_explain`` with default options:
    no ``&`` (HTML unescaping), no line break (one segment; line-break fixes), no ANSI escape, C1
    control, surrogate, ligature, full/half-width form, curly quote or removable control character
    (the per-character fixers), already NFC (the final normalisation), and ``badness.is_bad`` False,
    which is the first test of ftfy's encoding fixer and returns the text unchanged.  This skips
    about two thirds of ftfy's time on ordinary accented or non-Latin text.
    """
    try:
        import ftfy
        from ftfy import badness, chardata
        config = ftfy.TextFixerConfig()
        if (set(ftfy.FIXERS) != _FTFY_FIXERS or tuple(type(config)._fields) != _FTFY_OPTIONS
                or config.normalization != "NFC" or config.unescape_html != "auto"):
            return None
        touched = set(chardata.LIGATURES) | set(chardata.WIDTH_MAP) | set(chardata.CONTROL_CHARS)
        touched |= set(range(0x80, 0xA0)) | set(range(0xD800, 0xE000))          # C1 controls, surrogates
        touched |= {ord(c) for c in "&\n\r\x1b\x85\u2028\u2029"}               # entities, line breaks, ANSI
        touched_re = re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(touched)) + "]")
        checks = (touched_re.search, chardata.SINGLE_QUOTE_RE.search, chardata.DOUBLE_QUOTE_RE.search)
        is_bad, max_len = badness.is_bad, config.max_decode_length
    except Exception:  # an ftfy without these names: always run it
        return None

    def noop(text: str) -> bool:
        return (len(text) < max_len and all(check(text) is None for check in checks)
                and unicodedata.is_normalized("NFC", text) and not is_bad(text))

    return noop


def clean_text(text: str) -> str:
    """CLIP's clean-up (open_clip's ``clean="lower"``): ftfy, HTML unescape twice, whitespace, lower case."""
    if _NEEDS_FULL_CLEAN.search(text) is None:
        return " ".join(text.split()).lower()
    fix = _ftfy()
    if fix is None:
        text = unicodedata.normalize("NFC", text)
    else:
        noop = _ftfy_noop_check()
        if noop is None or not noop(text):
            text = fix(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _read_merges(bpe_path: str) -> tuple:
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} is not CLIP's merges file: expected {_NUM_MERGES} merge lines of two "
                         f"symbols after the header, got {len(merges)}")
    return tuple(merges)


def _import_tokenizers():
    return require_module("tokenizers", "fastclip's tokenizer (pip install tokenizers)")


@functools.lru_cache(maxsize=4)
def _base_tokenizer_json(bpe_path: str) -> str:
    """The ``tokenizers`` pipeline (pre-tokeniser + BPE; no special tokens, truncation or padding),
    serialised so that each ClipTokenizer gets its own copy (and its own BPE cache) cheaply."""
    tk = _import_tokenizers()
    merges = _read_merges(bpe_path)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    model = tk.models.BPE(vocab=vocab, merges=list(merges), end_of_word_suffix="</w>", fuse_unk=False)
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(_WORD_PATTERN), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok.to_str()


class ClipTokenizer:
    """CLIP's tokenizer: ``tokenizer(texts) -> LongTensor [B, context_length]``.

    Args:
        context_length: default length of every row (77 for CLIP).
        bpe_path: merges file (default: the one shipped with fastclip).

    Attributes match open_clip's SimpleTokenizer: ``vocab_size``, ``sot_token_id``,
    ``eot_token_id``, ``all_special_ids``, ``context_length``, ``encoder``/``decoder`` (built
    on first use).

    How a string is encoded (every path gives SimpleTokenizer's ids; tests check them against it):

    * clean-up (:func:`clean_text`), where printable ASCII without ``&`` needs only ``lower()``;
    * the cleaned text is cut at whitespace into chunks: CLIP's regex never matches whitespace, so
      the ids of a text are the concatenation of its chunks' ids, and a chunk's ids are cached
      (``"cat,"`` -> ``(2368, 267)``): a warm batch is a ``split`` and a C-level ``map`` over a dict;
    * a chunk not in the cache is pre-tokenised by CLIP's regex: restricted to ASCII for an ASCII
      chunk, run by Python's ``re`` (exact there: ``\\p{L}`` is ``[a-z]`` after lower-casing,
      ``\\p{N}`` is ``[0-9]``, and printable ASCII bytes are their own byte-level symbols); else
      CLIP's own pattern in the ``regex`` package (as SimpleTokenizer), each word mapped to
      byte-level symbols; without ``regex``, the whole ``tokenizers`` pipeline in Rust.  Every word's
      merges are done by the Rust BPE model (``tokenizers``), also cached per word;
    * text containing a literal ``<start_of_text>``/``<end_of_text>``: split exactly as
      SimpleTokenizer's regex does (it matches them only where its regex reaches them).

    Caches hold at most ``_CACHE_MAX`` entries each and are cleared (not evicted) when full.
    """

    _CACHE_MAX = 1 << 18

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, bpe_path: Optional[str] = None):
        self._bpe_path_arg = bpe_path
        self.bpe_path = bpe_path or default_bpe_path()
        self.context_length = self._check_context_length(context_length)
        self.vocab_size = VOCAB_SIZE
        self.sot_token_id = VOCAB_SIZE - 2
        self.eot_token_id = VOCAB_SIZE - 1
        self.all_special_ids = [self.sot_token_id, self.eot_token_id]
        tk = _import_tokenizers()
        self._rust = tk.Tokenizer.from_str(_base_tokenizer_json(self.bpe_path))
        self._bpe = self._rust.model
        self._words: dict = {}   # byte-level word -> ids
        self._chunks: dict = {}  # cleaned whitespace-free chunk -> ids

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _check_context_length(context_length) -> int:
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) or context_length < 2:
            raise ValueError("context_length must be an int >= 2 (room for <start_of_text> and <end_of_text>), "
                             f"got {context_length!r}")
        return int(context_length)

    def _word_ids(self, word: str) -> tuple:
        """BPE ids of one pre-token whose characters are already byte-level symbols."""
        ids = self._words.get(word)
        if ids is None:
            ids = tuple(t.id for t in self._bpe.tokenize(word))
            if len(self._words) >= self._CACHE_MAX:
                self._words.clear()
            self._words[word] = ids
        return ids

    def _chunk_ids(self, chunk: str) -> bytes:
        """BPE ids (int32 bytes) of one cleaned chunk without whitespace (the cache-miss path)."""
        if chunk.isascii():
            words = _ASCII_WORD.findall(chunk)
        else:
            pattern = _unicode_word_regex()
            if pattern is None:
                words = None
                ids = tuple(self._rust.encode(chunk, add_special_tokens=False).ids)
            else:
                words = [w if w.isascii() else w.encode("utf-8").decode("latin-1").translate(_BYTE_SYMBOLS)
                         for w in pattern.findall(chunk)]
        if words is not None:
            ids = itertools.chain.from_iterable(map(self._word_ids, words))
        ids = _as_bytes(ids)
        if len(self._chunks) >= self._CACHE_MAX:
            self._chunks.clear()
        self._chunks[chunk] = ids
        return ids

    def _pieces(self, text: str) -> list:
        """int32 id byte strings whose concatenation is the BPE ids of raw ``text``.

        Bytes, so that a batch is assembled by ``b"".join`` (a memcpy) instead of an int iterator."""
        if _NEEDS_FULL_CLEAN.search(text) is None:
            cleaned = text.lower()  # the whitespace clean-up is implied by split() below
        else:
            cleaned = clean_text(text)
        if "<" in cleaned and (SOT_TOKEN in cleaned or EOT_TOKEN in cleaned):
            return [_as_bytes(self._ids_with_specials(" ".join(cleaned.split())))]
        chunks = cleaned.split()
        pieces = list(map(self._chunks.get, chunks))
        if None in pieces:
            pieces = [p if p is not None else self._chunk_ids(c) for p, c in zip(pieces, chunks)]
        return pieces

    @functools.cached_property
    def _special_pre_tokenizer(self):
        """CLIP's regex with the special tokens first, as SimpleTokenizer has it (rare path)."""
        tk = _import_tokenizers()
        return tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(_SPECIAL_PATTERN + "|" + _WORD_PATTERN), behavior="removed",
                                    invert=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    def _ids_with_specials(self, cleaned: str) -> list:
        out = []
        for piece, _ in self._special_pre_tokenizer.pre_tokenize_str(cleaned):
            if piece == SOT_TOKEN:
                out.append(self.sot_token_id)
            elif piece == EOT_TOKEN:
                out.append(self.eot_token_id)
            else:
                out.extend(self._word_ids(piece))
        return out

    @staticmethod
    def _as_list(texts) -> list:
        if isinstance(texts, str):
            return [texts]
        if isinstance(texts, (bytes, bytearray)):
            raise TypeError("texts must be a str or a sequence of str, got bytes (decode it first)")
        try:
            texts = list(texts)
        except TypeError:
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}") from None
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts must be a str or a sequence of str, got {type(t).__name__} at index {i}")
        return texts

    # -- public API ----------------------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        """BPE ids of one string, without start/end tokens or truncation (SimpleTokenizer.encode)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.frombuffer(b"".join(self._pieces(text)), dtype=np.int32).tolist()

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        """Tokenize ``texts`` (a string or a sequence of strings).

        Returns:
            LongTensor [B, context_length]: ``<start_of_text>``, the BPE ids, ``<end_of_text>``, zeros.
            Longer texts keep their first ``context_length - 2`` ids and still end with
            ``<end_of_text>`` (SimpleTokenizer's truncation).
        """
        texts = self._as_list(texts)
        length = self.context_length if context_length is None else self._check_context_length(context_length)
        keep = length - 2
        rows = [b"".join(self._pieces(t)) for t in texts]
        for i, r in enumerate(rows):
            if len(r) > 4 * keep:
                rows[i] = r[:4 * keep]
        n = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)) // 4
        out = np.zeros((len(rows), length), dtype=np.int64)
        out[:, 0] = self.sot_token_id
        body = np.arange(length - 1)[None, :] < n[:, None]  # columns 1 .. n_i
        out[:, 1:][body] = np.frombuffer(b"".join(rows), dtype=np.int32)
        out[np.arange(len(rows)), n + 1] = self.eot_token_id
        return torch.from_numpy(out)

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        """Text of ``ids``: ``<start_of_text>`` dropped, everything from ``<end_of_text>`` on (the
        padding) dropped, words joined by single spaces.  (SimpleTokenizer.decode keeps the special
        tokens' text and decodes the padding zeros as '!'.)"""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be one sequence (1-D), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise ValueError(f"ids must lie in [0, {VOCAB_SIZE}), got {bad[0]}")
        dec = self.decoder
        text = "".join(dec[i] for i in ids if i != self.sot_token_id)
        return _decode_bytes_with_spaces(text)

    @functools.cached_property
    def encoder(self) -> dict:
        """token string -> id (49,408 entries)."""
        return dict(self._rust.get_vocab(with_added_tokens=False))

    @functools.cached_property
    def decoder(self) -> list:
        """id -> token string."""
        out = [""] * VOCAB_SIZE
        for tok, i in self.encoder.items():
            out[i] = tok
        return out

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self.context_length}, vocab_size={self.vocab_size})"

    def __reduce__(self):
        # Data-loader workers get a fresh instance (built in ~0.2 s), not the caches or the Rust
        # objects; the default merges file is the one installed where it is unpickled.
        return (type(self), (self.context_length, self._bpe_path_arg))


def _as_bytes(ids) -> bytes:
    return np.fromiter(ids, dtype=np.int32).tobytes()


def _decode_bytes_with_spaces(text: str) -> str:
    byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
    out = bytearray()
    for word in text.split("</w>"):
        out.extend(byte_decoder[c] for c in word)
        out.extend(b" ")
    return out.decode("utf-8", errors="replace").strip()


@functools.lru_cache(maxsize=16)
def _cached_tokenizer(context_length: int) -> ClipTokenizer:
    return ClipTokenizer(context_length)


def get_tokenizer(name: Optional[str] = None, context_length: Optional[int] = None) -> ClipTokenizer:
    """The tokenizer of model ``name`` (its context length; 77 for every built-in config).

    ``name=None`` gives CLIP's tokenizer at ``context_length`` (default 77).  Instances are cached:
    calling this in every data-loader worker is cheap.
    """
    if name is not None:
        from .models import get_model_config  # lazy: the tokenizer must not import the model stack
        text_cfg = get_model_config(name).text_cfg
        if text_cfg.vocab_size != VOCAB_SIZE:
            raise ValueError(f"model {name!r} has vocab_size={text_cfg.vocab_size}; fastclip's tokenizer is "
                             f"CLIP's BPE with {VOCAB_SIZE} tokens")
        context_length = text_cfg.context_length if context_length is None else context_length
    context_length = DEFAULT_CONTEXT_LENGTH if context_length is None else context_length
    ClipTokenizer._check_context_length(context_length)
    return _cached_tokenizer(int(context_length))
