"""Each cleaning step and quality filter, on small literal inputs."""

import pytest

from lmforge.cleaning import STEPS, make_cleaner, quality
from lmforge.params import CleanParams, FilterParams, LmforgeError

P = CleanParams()


def step(name: str, text: str, **kw) -> str:
    return STEPS[name](text, CleanParams(**kw) if kw else P)


def test_fix_mojibake():
    assert step("fix_mojibake", "cafÃ© crÃ¨me") == "café crème"
    assert step("fix_mojibake", "already fine: café") == "already fine: café"


def test_normalize_unicode():
    assert step("normalize_unicode", "cafe\u0301") == "café"
    assert step("normalize_unicode", "ﬁle", unicode_form="NFKC") == "file"


def test_strip_markup_removes_tags_comments_and_decodes_entities():
    text = step("strip_markup", "a <b>bold</b> <!-- hidden --> move &amp; 3 &lt; 4 <br/> &lt;div&gt;x&lt;/div&gt;")
    assert text.split() == ["a", "bold", "move", "&", "3", "<", "4", "x"]
    assert step("strip_markup", "repr: <code object <lambda> at 0x7f>!").split() == ["repr:", "!"]


def test_remove_control_chars_keeps_newlines_and_tabs():
    assert step("remove_control_chars", "a\x00b\x1bc\td\ne\u200bf\u00ad") == "abc\td\nef"


def test_normalize_whitespace():
    assert step("normalize_whitespace", "  a \t b\u00a0c  \r\n\n\n\nd  ") == "a b c\n\nd"


def test_scrub_pii():
    text = step("scrub_pii", "Mail jane.doe@example.com or call +1 415-555-0132 from 192.168.10.1 today")
    assert text == "Mail [EMAIL] or call [PHONE] from [IP] today"
    assert step("scrub_pii", "version 1.2.3 released in 2024") == "version 1.2.3 released in 2024"


def test_optional_steps():
    assert step("lowercase", "Hello World") == "hello world"
    assert step("remove_special_chars", "a © b ™ c, d!") == "a  b  c, d!"
    assert step("remove_stopwords", "the cat sat on the mat").split() == ["cat", "sat", "mat"]
    assert step("lemmatize", "the cats were running").split() == ["the", "cat", "be", "run"]


def test_steps_run_in_the_configured_order():
    text = "<b>CAFÃ‰</b>"
    assert make_cleaner(CleanParams(steps=["fix_mojibake", "strip_markup", "lowercase"]))(text).strip() == "café"
    # lowercasing before repair breaks the mojibake: order matters and is the user's to choose
    assert make_cleaner(CleanParams(steps=["lowercase", "fix_mojibake"]))(text) != "<b>café</b>"


def test_unknown_step_is_a_config_error():
    with pytest.raises(LmforgeError, match="unknown step.*'strip_html'.*available: fix_mojibake"):
        make_cleaner(CleanParams(steps=["strip_html"]))


def test_unknown_stopword_language():
    with pytest.raises(LmforgeError, match="no stopword list for 'xx'"):
        step("remove_stopwords", "text", language="xx")


F = FilterParams(min_words=5)
GOOD = "Language models learn from clean text written by people.\nAnother line follows here."


@pytest.mark.parametrize(
    "text, reason",
    [
        (GOOD, None),
        ("   ", "empty_after_cleaning"),
        ("too short text", "too_few_words"),
        ("a b c d e f g h i j", "mean_word_length"),
        ("#tag #tag2 #tag3 #tag4 #tag5 words words", "symbol_ratio"),
        ("123 456 789 1011 1213 1415 some words", "too_few_alpha_words"),
        ("same line of words here\n" * 5 + "different line of words", "repeated_lines"),
    ],
)
def test_quality_filters(text, reason):
    result = quality(text, F)
    assert (result[0] if result else None) == reason
    if result:
        assert result[1]  # every rejection says why


def test_max_words():
    assert quality(" ".join(["word"] * 30), FilterParams(min_words=1, max_words=20))[0] == "too_many_words"
