"""fastclip.get_tokenizer: CLIP's BPE on `tokenizers`, id-for-id equal to open_clip's SimpleTokenizer."""
import hashlib
import random

import pytest
import torch

import fastclip
import fastclip.tokenizer as tokmod
from fastclip.tokenizer import ClipTokenizer, clean_text, get_tokenizer
from tests.models.open_clip_ref import open_clip_tokenizer_module

OCT, OCT_WHY = open_clip_tokenizer_module()
needs_open_clip = pytest.mark.skipif(OCT is None, reason=f"open_clip's SimpleTokenizer unavailable: {OCT_WHY}")

SOT, EOT = 49406, 49407
MERGES_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def simple():
    return OCT.SimpleTokenizer() if OCT is not None else None


# Hand-picked cases: unicode scripts, emoji (with modifiers and ZWJ), HTML entities (nested, without
# semicolon, all-caps), mojibake, ligatures, full-width forms, curly quotes, control and zero-width
# characters, contractions (CLIP's regex is case-insensitive: 'S, '\u017f), literal special tokens
# (alone, glued to punctuation, upper-case), digits, empty and whitespace-only strings, long texts.
CASES = [
    "", " ", "\t\n\r ", "a", "A photo of a CAT.", "a photo of a cat", "  many    spaces\tand\nlines  ",
    "Hello, World! It's 2024 &amp; I'm here", "&amp;amp; &lt;b&gt;bold&lt;/b&gt; &eacute;t&eacute; &EACUTE; &copy",
    "<b>not unescaped when '<' is in the segment</b> &amp;", "Tom &amp Jerry", "5 &lt; 6 &gt; 4",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe", "cafe\u0301 (decomposed e + acute)",
    "\u6771\u4eac\u30bf\u30ef\u30fc\u306e\u5199\u771f", "\ud55c\uad6d\uc5b4 \ud14c\uc2a4\ud2b8", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u043a\u0438\u0440\u0438\u043b\u043b\u0438\u0446\u0430",
    "\u05e2\u05d1\u05e8\u05d9\u05ea \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f\u0928\u094d\u0926\u0940 \u0e44\u0e17\u0e22",
    "\U0001F600\U0001F44D\U0001F3FD \U0001F1FA\U0001F1F8 \u2764\ufe0f\u200d\U0001F525 \U0001F468\u200d\U0001F469\u200d\U0001F467",
    "\u00c3\u00a9t\u00c3\u00a9 mojibake \u00e2\u20ac\u2122s", "\ufb01ne \ufb02ow \uff2c\uff2f\uff35\uff24 \u3000wide",
    "\u201cquoted\u201d \u2018single\u2019 it\u2019s", "zero\u200bwidth non\u00a0breaking\u2028line\u2029para",
    "ctrl\x00chars\x07here\x1b[31mred\x1b[0m\x7f", "\x1c\x1d\x1e\x1f separators", "\x0bvt\x0cff",
    "don't won't 'S 'LL 'Re '\u017ft \u212a kelvin", "<start_of_text>", "x<end_of_text>y", "!<start_of_text>",
    "<START_OF_TEXT> upper", "a <end_of_text> <start_of_text> b", "3.14159 1,000,000 2nd 42nd \u0663\u0664 \u00bd",
    "snake_case kebab-case CamelCase dot.case", "http://example.com/a?b=c&d=e#f", "@user #hashtag $5 100%",
    "a" * 300, "word " * 120, "\U0001F600" * 50, "\u00e9" * 200,
]


def _fuzz(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,!?'\"-&;#<>/\\()[]{}@$%^*_+=~`|:",
             "\u00e9\u00e8\u00fc\u00f6\u00df\u00f1\u00e7\u00e5\u00f8\u00e6\u0153\u00c9\u00dc ",
             "\u4e1c\u4eac\u30bf\u30ef\u5199\u771f\ud55c\uad6d\uc5b4 ", "\U0001F600\U0001F44D\U0001F3FD\u2764\ufe0f\u200d ",
             "\u0301\u0308\u200b\u00a0\u2028\u3000\t\n\r\x0b\x0c\x1c\x00\x7f\x1b ", "\ufb01\ufb02\uff2c\uff2f\u201c\u201d\u2018\u2019\u2014\u2026\u017f\u212a ",
             "\u00c3\u0192\u00c2\u00a9\u00e2\u20ac\u2122", "\u03b1\u03b2\u03b3 \u043a\u0438\u0440 \u05e2\u05d1 \u0639\u0631 \u0939\u093f \u0e44\u0e17"]
    snippets = ["&amp;", "&#39;", "&#x2019;", "&nbsp;", " <end_of_text> ", "<start_of_text>", "\u00c3\u00a9", "\u2019s",
                "don't", "I'M", "&quot;", "1234"]
    out = []
    for _ in range(n):
        chars = "".join(rng.sample(pools, rng.randint(1, 3)))
        parts = [rng.choice(snippets) if rng.random() < 0.15 else rng.choice(chars) for _ in range(rng.randint(0, 80))]
        out.append("".join(parts))
    return out


# ----------------------------------------------------------------------------------------------
# Without open_clip
# ----------------------------------------------------------------------------------------------
def test_merges_file_is_clips():
    with open(tokmod.default_bpe_path(), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == MERGES_SHA256


def test_known_ids(tok):
    # ids from open_clip's SimpleTokenizer (open-clip-torch 3.3.0)
    out = tok(["a photo of a cat.", "Hello, World! It's 2024 &amp; caf\u00e9 \U0001F600"])
    assert out.dtype == torch.long and out.shape == (2, 77)
    assert out[0, :9].tolist() == [SOT, 320, 1125, 539, 320, 2368, 269, EOT, 0]
    assert out[1, :16].tolist() == [SOT, 3306, 267, 1002, 256, 585, 568, 273, 271, 273, 275, 261, 15304, 7334, EOT, 0]
    assert not out[0, 8:].any() and not out[1, 15:].any()


def test_attributes(tok):
    assert tok.vocab_size == 49408 and tok.context_length == 77
    assert (tok.sot_token_id, tok.eot_token_id) == (SOT, EOT) and tok.all_special_ids == [SOT, EOT]
    assert len(tok.encoder) == 49408 and tok.encoder["<start_of_text>"] == SOT and tok.decoder[320] == "a</w>"


def test_single_string_empty_and_empty_batch(tok):
    assert tok("").tolist() == [[SOT, EOT] + [0] * 75]
    assert tok("   ").tolist() == [[SOT, EOT] + [0] * 75]
    assert tok([]).shape == (0, 77)
    assert torch.equal(tok("a cat"), tok(["a cat"]))
    assert torch.equal(tok(("a cat", "b")), tok(["a cat", "b"]))


def test_truncation_keeps_end_token(tok):
    long = "a photo of a cat " * 40
    out = tok([long, "x"])
    assert out[0, 0] == SOT and out[0, -1] == EOT and (out[0] != 0).all()
    assert out[0, 1:76].tolist() == tok.encode(long)[:75]
    short = tok([long], context_length=8)
    assert short.shape == (1, 8) and short[0].tolist() == [SOT] + tok.encode(long)[:6] + [EOT]
    assert tok(["a b c d e f"], context_length=2).tolist() == [[SOT, EOT]]


def test_context_length_from_model_and_cache():
    t = get_tokenizer("ViT-B-32")
    assert t.context_length == 77 and get_tokenizer("ViT-B-32") is t and get_tokenizer() is t
    assert get_tokenizer(context_length=32)("a cat").shape == (1, 32)
    assert get_tokenizer("RN50-quickgelu").context_length == 77


def test_bad_arguments(tok):
    with pytest.raises(TypeError, match="texts"):
        tok(123)
    with pytest.raises(TypeError, match="texts.*index 1"):
        tok(["ok", None])
    with pytest.raises(TypeError, match="bytes"):
        tok(b"raw bytes")
    for bad in (1, 0, -5, 2.5, "77", True):
        with pytest.raises(ValueError, match="context_length"):
            tok("a", context_length=bad)
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(context_length=1)
    with pytest.raises(ValueError, match="unknown model name"):
        get_tokenizer("ViT-X-99")
    with pytest.raises(TypeError, match="text"):
        tok.encode(None)


def test_decode_round_trip(tok):
    assert tok.decode(tok("A photo of a CAT, on the mat!")[0]) == "a photo of a cat , on the mat !"
    assert tok.decode(tok("caf\u00e9 \U0001F600 \u6771\u4eac")[0]) == "caf\u00e9 \U0001F600 \u6771\u4eac"
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match="ids"):
        tok.decode([49408])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(tok(["a", "b"]))


def test_ftfy_runs_only_where_it_can_change_something(tok, monkeypatch):
    def boom(text):
        raise AssertionError(f"ftfy called on {text!r}")

    monkeypatch.setattr(tokmod, "_ftfy", lambda: boom)
    # Printable ASCII without '&' never reaches ftfy, nor does text that ftfy's own tables and
    # badness test show it would leave alone...
    assert clean_text("  A Photo\tof a CAT!  ") == "a photo of a cat!"
    assert clean_text("Caf\u00e9 in Z\u00fcrich, \u6771\u4eac \U0001F642") == "caf\u00e9 in z\u00fcrich, \u6771\u4eac \U0001F642"
    tok(["a plain caption, with punctuation: 1, 2; 3?", "na\u00efve fa\u00e7ade"])
    # ...everything else does: entities, control characters, ANSI escapes, mojibake, ligatures,
    # full-width forms, curly quotes, line breaks, text that is not NFC.
    for text in ("a &amp; b", "ctrl\x00", "esc\x1b[0m", "\u00c3\u00a9t\u00c3\u00a9", "\ufb01ne", "\uff2c\uff2f",
                 "it\u2019s", "two\u2028lines", "cafe\u0301", "\x85", "\u0080"):
        with pytest.raises(AssertionError, match="ftfy called"):
            clean_text(text)


@pytest.mark.skipif(tokmod._ftfy() is None, reason="ftfy is not installed")
def test_clean_text_equals_ftfy_everywhere():
    """The no-op shortcut never changes the result: clean_text == CLIP's clean-up with ftfy always run."""
    import html

    import ftfy

    def reference(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).strip().lower()

    mojibake = ["s\u00c3\u00b3", "voil\u00c3 le travail", "\u00c3\u00a9", "\u00e2\u20ac\u2122", "\u00c3\u00bcber",
                "\u0413\u045e\u0412\u0402\u0412\u0459x", "\u0432\u0402", "\u221a\u00b1", "\u00c3\u00a0 la",
                "\u00c2\u00a0", "\u00d8\u00b3\u00d9\u201e", "caf\u00e9 \u00c3", "x \u00c3 y", "\u0153 x",
                "\u00c9\u00b0", "\u00e0\u00b2", "\u0101\u20ac", "P&EACUTE;REZ", "\u00e9\u00c0", "a\u00a6b"]
    texts = CASES + mojibake + _fuzz(3000, seed=5)
    bad = [t for t in texts if clean_text(t) != reference(t)]
    assert not bad, f"{len(bad)} differ, e.g. {bad[:3]!r}"


def test_without_ftfy_warns_and_keeps_plain_text(monkeypatch):
    real = tokmod.optional_module
    monkeypatch.setattr(tokmod, "_FTFY_WARNED", False)
    monkeypatch.setattr(tokmod, "optional_module",
                        lambda name: (None, "cannot import ftfy: ImportError: no ftfy here") if name == "ftfy"
                        else real(name))
    with pytest.warns(RuntimeWarning, match="ftfy"):
        assert clean_text("Caf\u00e9 &amp; cr\u00e8me") == "caf\u00e9 & cr\u00e8me"
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC still applied


def test_fastclip_exports():
    assert fastclip.get_tokenizer is get_tokenizer


# ----------------------------------------------------------------------------------------------
# Against open_clip's SimpleTokenizer
# ----------------------------------------------------------------------------------------------
def _assert_same(a: torch.Tensor, b: torch.Tensor, texts: list):
    assert a.shape == b.shape and a.dtype == b.dtype
    bad = (a != b).any(dim=1).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise AssertionError(f"{len(bad)}/{len(texts)} rows differ; first {texts[i]!r}:\n"
                             f"  open_clip {a[i][:24].tolist()}\n  fastclip  {b[i][:24].tolist()}")


@needs_open_clip
def test_same_ids_as_simple_tokenizer_hand_picked(tok, simple):
    _assert_same(simple(CASES), tok(CASES), CASES)
    for text in CASES:
        assert tok.encode(text) == simple.encode(text), text


@needs_open_clip
def test_same_ids_as_simple_tokenizer_fuzz(tok, simple):
    texts = _fuzz(3000)
    _assert_same(simple(texts), tok(texts), texts)


@needs_open_clip
@pytest.mark.parametrize("context_length", [2, 5, 16, 77, 100])
def test_same_truncation_as_simple_tokenizer(tok, simple, context_length):
    texts = CASES[-6:] + ["a photo of a cat", "", "<start_of_text> " * 30]
    _assert_same(simple(texts, context_length=context_length), tok(texts, context_length=context_length), texts)


@needs_open_clip
def test_same_ids_without_regex_package(simple, monkeypatch):
    """Without `regex`, non-ASCII text goes through the Rust pipeline (Oniguruma's classes)."""
    monkeypatch.setattr(tokmod, "_unicode_word_regex", lambda: None)
    t = ClipTokenizer()
    texts = CASES + _fuzz(500, seed=1)
    _assert_same(simple(texts), t(texts), texts)


@needs_open_clip
def test_cache_clear_keeps_ids(simple, monkeypatch):
    monkeypatch.setattr(ClipTokenizer, "_CACHE_MAX", 8)
    t = ClipTokenizer()
    texts = _fuzz(200, seed=2)
    _assert_same(simple(texts), t(texts), texts)
    assert len(t._words) <= 8 and len(t._chunks) <= 8


def test_pickles_small_and_equal(tok):
    import pickle
    tok(["warm the caches", "caf\u00e9"])
    blob = pickle.dumps(tok)
    again = pickle.loads(blob)
    assert len(blob) < 1000 and again.context_length == tok.context_length
    texts = ["a caf\u00e9 dog", "x <end_of_text> y", ""]
    assert torch.equal(again(texts), tok(texts))
