"""MAGI-1's caption cleaning: the exact string the tokenizer receives.

MAGI-1 cleans every prompt as its training data was cleaned (a recipe from the DeepFloyd
IF / PixArt lineage), applying the whole pass twice: escaped HTML becomes markup in the
first pass and is stripped in the second, and punctuation uncovered by the first pass is
handled by the second.

A pass is a sequence of named steps, each a regular-expression substitution or a small
function. The order matters and the patterns are kept exactly: later steps rely on what
earlier ones removed (e.g. text is lower-cased first, so nothing later sees capitals).
`steps_changed(text)` reports which steps changed a text, for debugging a mismatch.
"""

from __future__ import annotations

import html
import re
import urllib.parse
import warnings
from collections.abc import Callable

import ftfy
from bs4 import BeautifulSoup

# a run of letters/digits/dots/hyphens ending in one of these TLDs (with a path) is a URL
_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
_URL = r"\b((?:{scheme}:(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _TLDS + r"[\w/-]*\b\/?(?!@)))"
_DASHES = (
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
    r"\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}"
_MEDIA = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"


def _sub(pattern: str, repl: str) -> Callable[[str], str]:
    rx = re.compile(pattern)
    return lambda text: rx.sub(repl, text)


def _strip_lower(text: str) -> str:
    return text.strip().lower()


def _html_text(text: str) -> str:
    with warnings.catch_warnings():  # captions that look like file names or URLs are still text
        warnings.simplefilter("ignore")
        return BeautifulSoup(text, features="html.parser").text


_SEPARATORS = re.compile(r"(?:\-|\_)")


def _many_separators_to_space(text: str) -> str:
    # slugs like this-is-my-cute-cat: only when there are more than three separators
    return _SEPARATORS.sub(" ", text) if len(_SEPARATORS.findall(text)) > 3 else text


# (name, step) in order; names follow the parity fixtures' step labels, and steps whose
# name starts with "_" (strips, lower-casing) are bookkeeping the labels do not track
PASS: list[tuple[str, Callable[[str], str]]] = [
    ("unquote_plus", urllib.parse.unquote_plus),
    ("_strip_lower", _strip_lower),
    ("person_tag_to_word", _sub(r"<person>", "person")),
    ("url_scheme_or_domain", _sub(_URL.format(scheme="https?"), "")),
    ("url_www_or_domain", _sub(_URL.format(scheme="www"), "")),
    ("beautifulsoup_text", _html_text),
    ("at_mention", _sub(r"@[\w\d]+\b", "")),
    ("cjk_strokes", _sub(r"[\u31c0-\u31ef]+", "")),
    ("katakana_phonetic_ext", _sub(r"[\u31f0-\u31ff]+", "")),
    ("enclosed_cjk", _sub(r"[\u3200-\u32ff]+", "")),
    ("cjk_compatibility", _sub(r"[\u3300-\u33ff]+", "")),
    ("cjk_ext_a", _sub(r"[\u3400-\u4dbf]+", "")),
    ("yijing_hexagrams", _sub(r"[\u4dc0-\u4dff]+", "")),
    ("cjk_unified", _sub(r"[\u4e00-\u9fff]+", "")),
    ("dashes_to_hyphen", _sub(_DASHES, "-")),
    ("double_quote_variants", _sub(r"[`´«»“”¨]", '"')),
    ("single_quote_variants", _sub(r"[‘’]", "'")),
    ("entity_quot", _sub(r"&quot;?", "")),
    ("entity_amp", _sub(r"&amp", "")),
    ("ip_address", _sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ")),
    ("trailing_time_like_id", _sub(r"\d:\d\d\s+$", "")),
    ("literal_backslash_n", _sub(r"\\n", " ")),
    ("hash_1_to_3_digits", _sub(r"#\d{1,3}\b", "")),
    ("hash_5plus_digits", _sub(r"#\d{5,}\b", "")),
    ("bare_6plus_digits", _sub(r"\b\d{6,}\b", "")),
    ("filename_with_media_ext", _sub(r"[\S]+\." + _MEDIA, "")),
    ("repeated_quotes", _sub(r"[\"\']{2,}", '"')),
    ("repeated_dots", _sub(r"[\.]{2,}", " ")),
    ("bad_punctuation_run", _sub(_BAD_PUNCT, " ")),
    ("isolated_dot", _sub(r"\s+\.\s+", " ")),
    ("many_dashes_underscores_to_space", _many_separators_to_space),
    ("ftfy_fix_text", ftfy.fix_text),
    ("html_unescape", html.unescape),  # twice: entities escaped twice come out in one pass
    ("html_unescape", html.unescape),
    ("_strip", str.strip),
    ("letters1to3_then_3to15_digits", _sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "")),
    ("letters_digits_letters", _sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "")),
    ("digits_letters_digits", _sub(r"\b\d+[a-zA-Z]+\d+\b", "")),
    ("shipping_spam", _sub(r"(worldwide\s+)?(free\s+)?shipping", "")),
    ("download_spam", _sub(r"(free\s)?download(\sfree)?", "")),
    ("click_for_on", _sub(r"\bclick\b\s(?:for|on)\s\w+", "")),
    ("media_ext_words", _sub(r"\b" + _MEDIA + r"(\simage[s]?)?", "")),
    ("page_number", _sub(r"\bpage\s+\d+\b", "")),
    ("interleaved_alnum_id", _sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " ")),
    ("dimensions_nxm", _sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "")),
    ("spaced_colon", _sub(r"\b\s+\:\s+", ": ")),
    ("space_after_punct", _sub(r"(\D[,\./])\b", r"\1 ")),
    ("collapse_whitespace", _sub(r"\s+", " ")),
    ("strip_wrapping_quotes", _sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1")),
    ("leading_punct", _sub(r"^[\'\_,\-\:;]", "")),
    ("trailing_punct", _sub(r"[\'\_,\-\:\-\+]$", "")),
    ("dot_word_only", _sub(r"^\.\S+$", "")),
    ("_final_strip", str.strip),
]

PASSES = 2


def clean_once(text: str) -> str:
    text = str(text)
    for _, step in PASS:
        text = step(text)
    return text


def clean_caption(text: str) -> str:
    """The string MAGI-1 tokenizes for a prompt (the pass applied twice)."""
    for _ in range(PASSES):
        text = clean_once(text)
    return text


def steps_changed(text: str) -> list[str]:
    """Labels of the steps that changed `text` in one pass, in order."""
    changed = []
    for name, step in PASS:
        new = step(text)
        if new != text and not name.startswith("_"):
            changed.append(name)
        text = new
    return changed
