"""Text cleaning steps and Gopher-style quality filters, as plain functions over strings.

``make_cleaner(params)`` composes the steps named in ``clean.steps`` in the order given; ``quality``
returns the reason a cleaned document should be rejected, or None.  The per-document work here is what
runs in worker processes; deduplication (which needs the whole corpus) lives in ``lmforge.dedup``.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from functools import lru_cache

from lmforge.params import CleanParams, FilterParams, LmforgeError

# Leftover HTML/XML tags and comments.  The same pattern is the "no markup" expectation of the
# great-expectations suite, so what the cleaner removes is exactly what validation forbids.
MARKUP_PATTERN = r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]{0,500})?/?>"
# C0/C1 control characters other than tab and newline: the "no control chars" expectation.
CONTROL_PATTERN = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"

_MARKUP = re.compile(MARKUP_PATTERN, re.DOTALL)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# Invisible format characters that break tokenisation: soft hyphen, zero-width space, word joiner,
# BOM, bidirectional overrides.  Zero-width (non-)joiners are kept: scripts such as Persian need them.
_INVISIBLE = dict.fromkeys(
    [0xAD, 0x200B, 0x2060, 0xFEFF, *range(0x202A, 0x202F), *range(0x2066, 0x206A)], None
)
_CONTROL = re.compile(CONTROL_PATTERN)
_HSPACE = re.compile(r"[^\S\n]+")  # whitespace other than newline (tabs, NBSP, other Unicode spaces)
_BLANKS = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")
_SPECIAL = re.compile(r"[^\w\s.,;:!?'\"()\[\]-]")

# PII: deliberately simple, high-precision patterns; the placeholders use brackets, not angle
# brackets, so that they are not mistaken for markup.
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
_PHONE = re.compile(r"(?<![\w.])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{3,4}(?![\w.])")


def fix_mojibake(text: str, _: CleanParams) -> str:
    """Repair text decoded with the wrong codec (``Ã©`` → ``é``); ftfy only touches what is broken."""
    import ftfy

    return ftfy.fix_encoding(text)


def normalize_unicode(text: str, p: CleanParams) -> str:
    return unicodedata.normalize(p.unicode_form, text)


def strip_markup(text: str, _: CleanParams) -> str:
    """Decode HTML entities, then remove the tags and comments left over after format conversion.

    Decoding first means escaped tags (``&lt;div&gt;``, common in documentation about HTML) are
    removed too: the cleaned corpus then never contains markup, which validation enforces.
    """
    text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    while True:  # nested brackets (``<code object <lambda> at 0x…>``) reveal a tag once the inner one goes
        stripped = _MARKUP.sub(" ", text)
        if stripped == text:
            return text
        text = stripped


def remove_control_chars(text: str, _: CleanParams) -> str:
    return _CONTROL.sub("", text.translate(_INVISIBLE))


def normalize_whitespace(text: str, _: CleanParams) -> str:
    """One space between words, no trailing spaces, at most one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(_HSPACE.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def scrub_pii(text: str, _: CleanParams) -> str:
    text = _EMAIL.sub("[EMAIL]", text)
    text = _IPV6.sub("[IP]", _IPV4.sub("[IP]", text))
    return _PHONE.sub("[PHONE]", text)


def remove_special_chars(text: str, _: CleanParams) -> str:
    return _SPECIAL.sub("", text)


def lowercase(text: str, _: CleanParams) -> str:
    return text.lower()


@lru_cache(maxsize=8)
def _stopwords(language: str) -> frozenset[str]:
    import stopwordsiso

    if not stopwordsiso.has_lang(language):
        raise LmforgeError(f"clean.language: no stopword list for '{language}'")
    return frozenset(stopwordsiso.stopwords(language))


def remove_stopwords(text: str, p: CleanParams) -> str:
    words = _stopwords(p.language)
    return _WORD.sub(lambda m: "" if m.group(0).lower() in words else m.group(0), text)


def lemmatize(text: str, p: CleanParams) -> str:
    """Dictionary lemmatisation with simplemma, which ships its data (no download at run time)."""
    import simplemma

    return _WORD.sub(lambda m: simplemma.lemmatize(m.group(0), lang=p.language), text)


STEPS: dict[str, Callable[[str, CleanParams], str]] = {
    f.__name__: f
    for f in (
        fix_mojibake,
        normalize_unicode,
        strip_markup,
        remove_control_chars,
        normalize_whitespace,
        scrub_pii,
        remove_special_chars,
        lowercase,
        remove_stopwords,
        lemmatize,
    )
}


def make_cleaner(params: CleanParams) -> Callable[[str], str]:
    """Compose the configured steps, in order; an unknown step name is a config error."""
    unknown = [s for s in params.steps if s not in STEPS]
    if unknown:
        raise LmforgeError(f"clean.steps: unknown step(s) {unknown}; available: {', '.join(STEPS)}")
    steps = [STEPS[name] for name in params.steps]

    def clean(text: str) -> str:
        for step in steps:
            text = step(text, params)
        return text

    return clean


def quality(text: str, f: FilterParams) -> tuple[str, str] | None:
    """Gopher-style heuristics.  Returns (reason, detail) for a rejected document, else None."""
    if not text.strip():
        return "empty_after_cleaning", "no text left after cleaning"
    words = text.split()
    n = len(words)
    if n < f.min_words:
        return "too_few_words", f"{n} words < min_words {f.min_words}"
    if n > f.max_words:
        return "too_many_words", f"{n} words > max_words {f.max_words}"
    mean_len = sum(map(len, words)) / n
    if not f.min_mean_word_length <= mean_len <= f.max_mean_word_length:
        return "mean_word_length", (
            f"mean word length {mean_len:.2f} outside [{f.min_mean_word_length}, {f.max_mean_word_length}]"
        )
    symbols = (text.count("#") + text.count("...") + text.count("\u2026")) / n
    if symbols > f.max_symbol_ratio:
        return "symbol_ratio", f"{symbols:.3f} symbols per word > {f.max_symbol_ratio}"
    alpha = sum(1 for w in words if any(c.isalpha() for c in w)) / n
    if alpha < f.min_alpha_word_fraction:
        return "too_few_alpha_words", f"{alpha:.2f} of words contain a letter < {f.min_alpha_word_fraction}"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines:
        repeated = sum(c - 1 for c in Counter(lines).values()) / len(lines)
        if repeated > f.max_duplicate_line_fraction:
            return "repeated_lines", f"{repeated:.2f} of lines are repeats > {f.max_duplicate_line_fraction}"
    return None
