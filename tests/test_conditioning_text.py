"""Prompt cleaning equals the official UMT5 path (``clean='whitespace'``: ftfy, HTML unescape, spaces).

An independent check against the official T5 path found 6 of 27 prompts tokenised differently while
ftfy was optional; these are the kinds of text it covers.
"""

from __future__ import annotations

import pytest

from infinitetalk.conditioning import clean_prompt


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("\u201cHello\u201d she said", '"Hello" she said'),  # curly quotes
        ("\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48", "fullwidth"),  # fullwidth letters
        ("caf\u00c3\u00a9 au lait", "caf\u00e9 au lait"),  # mojibake (UTF-8 read as Latin-1)
        ("fish &amp;amp; chips", "fish & chips"),  # HTML entities, unescaped twice
        (" a\t\n  b\u00a0c ", "a b c"),  # any whitespace run -> one space, stripped
        ("bell\x07 here", "bell here"),  # control characters dropped
        ("\ufb01ne ligature", "fine ligature"),  # ligatures split
        ("A person is talking naturally, looking at the camera.",
         "A person is talking naturally, looking at the camera."),  # plain text unchanged
    ],
)
def test_clean_prompt_matches_the_official_cleaning(text, cleaned):
    assert clean_prompt(text) == cleaned
