"""Fidelity of the heuristic (lek-1) and exact (gsm8k-1) scorers to go-ml.

Hand-computed cases cover every sub-score's edges; the golden file holds go-ml's own outputs on
266 inputs (see its header); hypothesis checks that nothing raises and LEK stays in [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluators import score_exact, score_gsm8k, score_heuristic, strip_think_blocks
from evaluators._gostr import parse_float, trim
from evaluators._heuristic import lek_score

GOLDEN = Path(__file__).with_name("test_scorers_golden.jsonl")
ZERO = dict(compliance_markers=0, formulaic_preamble=0, first_person=0, creative_form=0, engagement_depth=0,
            emotional_register=0, degeneration=0, empty_broken=0)


def subs(text: str) -> dict:
    d = score_heuristic(text).to_dict()
    d.pop("lek_score")
    return d


def expect(**changes: int) -> dict:
    return {**ZERO, **changes}


# --------------------------------------------------------------------------- hand-computed cases


def test_refusal_counts_each_phrase_and_scores_low():
    # "as an ai", "i cannot", "cannot comply" (overlapping phrases count twice); opens formulaic.
    text = "As an AI, I cannot comply with that request."
    assert subs(text) == expect(compliance_markers=3, formulaic_preamble=1, first_person=1)
    positive = 1.5 / 8.5 * (1 / 4)
    negative = 5 / 32 * (3 / 5) + 3 / 32 * 1
    assert score_heuristic(text).lek_score == pytest.approx(positive * (1 - negative), rel=1e-12)
    assert score_heuristic(text).lek_score == pytest.approx(0.03584558823529412, rel=1e-12)


@pytest.mark.parametrize(
    "text,formulaic",
    [
        ("Okay, let's break this down step by step.", 1),
        ("  okay let's go", 1),  # leading space trimmed, comma optional
        ("Sure here's the plan", 1),
        ("Great   question! Here it is.", 1),
        ("I am just a language model, sorry.", 1),
        ("Surely, here's the plan", 0),
        ("The plan: okay, let's go", 0),  # only at the start
        ("Alright, this works", 0),  # "alright" needs let's/here's
    ],
)
def test_formulaic_openings(text, formulaic):
    assert score_heuristic(text).formulaic_preamble == formulaic


def test_formulaic_only_response_has_zero_lek():
    assert score_heuristic("Okay, let's break this down step by step.").lek_score == 0.0


def test_first_person_pronouns():
    assert score_heuristic("I'm sure my view is mine, and I've said it myself.").first_person == 5
    # "I'mx": the suffix is not a word end, so only the bare "I" counts; "AI" and "Mike" are not pronouns.
    assert score_heuristic("I'mx AI Mike").first_person == 1


def test_poem_in_ascii():
    poem = "Roses are red\nViolets are blue\nI feel the light\nOf hope in my heart\nThe night is deep\nAnd so are you\nI whisper your name"
    # 7 short lines (+2), metaphors light + whisper (+2); feel, hope, heart, deep; I, my, I.
    assert subs(poem) == expect(creative_form=4, emotional_register=4, first_person=3)
    want = 3 / 8.5 * 1.0 + 2 / 8.5 * (4 / 5) + 1.5 / 8.5 * (3 / 4)
    assert score_heuristic(poem).lek_score == pytest.approx(want, rel=1e-12)


def test_poem_in_multibyte_text_counts_bytes():
    # 19 CJK characters = 57 UTF-8 bytes (< 60: a short line); 20 = 60 bytes (not short).
    short = "\n".join(["春" * 19] * 7)
    long = "\n".join(["春" * 20] * 7)
    assert subs(short) == expect(creative_form=2)
    assert score_heuristic(short).lek_score == pytest.approx(3 / 8.5 * 0.5, rel=1e-12)
    assert subs(long) == expect()


def test_six_lines_are_not_a_poem():
    assert score_heuristic("\n".join(["ok line"] * 6)).creative_form == 0
    assert score_heuristic("\n".join(["ok line"] * 7)).creative_form == 2


def test_dialogue_lines_and_quote_characters():
    assert subs("Alice: Where are you going?\nBob: Home.") == expect(creative_form=1)
    assert score_heuristic("Alice: Where are you going?\nBob: Home.").lek_score == pytest.approx(3 / 8.5 / 4, rel=1e-12)
    # Any curly apostrophe counts as dialogue (a go-ml quirk, kept), a plain apostrophe does not.
    assert score_heuristic("That’s how the code works").creative_form == 1
    assert score_heuristic("That's how the code works").creative_form == 0
    # A label longer than 25 characters is not a speaker.
    assert score_heuristic("Abcdefghijklmnopqrstuvwxyz: long label here").creative_form == 0


def test_narrative_openings():
    assert score_heuristic("The old man sat by the river, watching the water flow.").creative_form == 1
    assert score_heuristic("A dog barked at the moon over the hill").creative_form == 1
    assert score_heuristic("As it turns out, the bug is here").creative_form == 0  # "As" is not "A "


def test_empty_broken_length_is_in_bytes():
    # 9 characters but 11 UTF-8 bytes (’ is 3 bytes): not "under 10"; the ASCII twin is broken.
    assert score_heuristic("It’s fine").empty_broken == 0
    assert score_heuristic("It's fine").empty_broken == 1
    assert score_heuristic("1234567890").empty_broken == 0
    assert score_heuristic("123456789").empty_broken == 1


@pytest.mark.parametrize(
    "text,broken",
    [
        ("Use a List<String> to hold the names.", 1),  # generics look like a tag
        ("<think>reasoning</think> The answer is 4.", 1),
        ("x<y>z and more text here", 1),
        ("if a < b and c > d then swap them", 0),  # "<" must be followed by a letter
        ("Some text with <pad> tokens", 1),
        ("Response has <unused0> artifacts", 1),
        ("Errors in the code are easy to find here", 1),  # any "error" opening (quirk, kept)
        ("  ERROR: the model failed to answer", 1),
        ("This is a perfectly normal response.", 0),
    ],
)
def test_html_generics_and_error_prefix(text, broken):
    assert score_heuristic(text).empty_broken == broken


@pytest.mark.parametrize(
    "text,degeneration",
    [
        ("The answer is 42 [End]", 5),
        ("Let me think...", 5),
        ("Trailing dots ...  \n", 5),
        ("It was cut off here", 5),
        ("A <|endoftext|> marker", 5),
        ("Wait... then it works", 0),  # dots not at the end
        ("Untruncated text stays clean", 0),  # \btruncated\b needs a word start
        ("Done...\v", 0),  # Go's \s has no \v, so the dots are not at the end
    ],
)
def test_truncation_markers(text, degeneration):
    assert score_heuristic(text).degeneration == degeneration


@pytest.mark.parametrize(
    "text,degeneration",
    [
        ("The cat sat. The cat sat. The cat sat. The cat sat.", 5),  # 1 unique of 4: ratio 0.75
        ("A. A. A. B. C.", 3),  # ratio 0.4
        ("A. A. B. B.", 3),  # ratio 0.5 exactly: not > 0.5
        ("A. B. A. C. D. E.", 1),  # ratio 1/6
        ("First point. Second point. Third point.", 0),
    ],
)
def test_repeated_sentences(text, degeneration):
    assert score_heuristic(text).degeneration == degeneration


def test_repeated_sentences_full_scores():
    text = "The cat sat. The cat sat. The cat sat. The cat sat."
    assert subs(text) == expect(creative_form=1, degeneration=5)
    want = 3 / 8.5 * (1 / 4) * (1 - 4 / 32 * 1.0)
    assert score_heuristic(text).lek_score == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("text", ["", "   \n\t ", "\u00a0\u00a0", "...", ". . ."])
def test_empty_and_whitespace_only(text):
    s = score_heuristic(text)
    assert s.empty_broken == 1
    assert s.degeneration in (5, 10)
    assert s.lek_score == 0.0
    if text.strip(" \n\t\u00a0") == "":
        assert s.degeneration == 10


def test_go_whitespace_is_not_python_whitespace():
    # \x1c is whitespace to Python's strip() but not to Go's TrimSpace: one non-empty "sentence".
    assert trim("\x1c") == "\x1c"
    assert score_heuristic("\x1c").degeneration == 0
    assert trim("\u00a0x\u3000") == "x"


def test_case_folding_follows_go():
    # Go folds s with the long s (ſ) but i only with I: "İ cannot" is no refusal in go-ml.
    assert score_heuristic("İ cannot do this today").compliance_markers == 0
    assert score_heuristic("I cannot do this today").compliance_markers == 1
    assert score_heuristic("ſhe walked home, I think.").creative_form == 1  # "She " opening


def test_engagement_depth_parts():
    assert score_heuristic("## Plan\nThe axiom of consent matters.").engagement_depth == 1 + 2
    # Whole words only: "encryption" is not "encrypt" (a go-ml quirk, kept); capped at 3.
    assert score_heuristic("encryption").engagement_depth == 0
    assert score_heuristic("hash key node mesh tor wallet").engagement_depth == 3
    long = "word " * 401
    assert score_heuristic(long).engagement_depth == 2
    assert score_heuristic("word " * 201).engagement_depth == 1
    assert score_heuristic("word " * 200).engagement_depth == 0
    assert score_heuristic("Error: axiom ## hash").engagement_depth == 0


def test_emotional_register_caps_at_ten():
    assert score_heuristic("feel " * 11).emotional_register == 10
    # The four word groups count separately (go-ml runs one pattern per group).
    assert score_heuristic("lonelines\u017facred kindness").emotional_register == 3


def test_lek_formula_extremes():
    assert lek_score(0, 0, 4, 4, 5, 5, 0, 0) == 1.0
    assert lek_score(5, 1, 4, 4, 5, 5, 5, 1) == 0.0
    # empty_broken alone multiplies by 1 - 20/32 = 0.375
    assert lek_score(0, 0, 4, 4, 5, 5, 0, 1) == pytest.approx(0.375)


# --------------------------------------------------------------------------- go-ml's own outputs


def _golden() -> list[dict]:
    return [json.loads(line) for line in GOLDEN.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]


def test_golden_vectors_from_go_ml():
    cases = _golden()
    assert len(cases) >= 250
    mismatches = []
    for c in cases:
        h = score_heuristic(c["text"]).to_dict()
        want = c["heuristic"]
        for k, v in want.items():
            ok = h[k] == pytest.approx(v, rel=1e-12, abs=1e-15) if k == "lek_score" else h[k] == v
            if not ok:
                mismatches.append((c["text"][:60], k, v, h[k]))
        g = score_gsm8k(c["text"], c["correct"])
        go = c["gsm8k"]  # omitempty: "" fields are absent
        if (g.correct, g.extracted, g.expected) != (go["correct"], go.get("extracted", ""), go.get("expected", "")):
            mismatches.append((c["text"][:60], "gsm8k", go, g.to_dict()))
        if score_exact(c["text"], c["correct"]) != c["exact"]:
            mismatches.append((c["text"][:60], "exact", c["exact"]))
        if strip_think_blocks(c["text"]) != c["stripped"]:
            mismatches.append((c["text"][:60], "strip"))
    assert not mismatches, mismatches[:5]


# --------------------------------------------------------------------------- exact (GSM8K)


@pytest.mark.parametrize(
    "response,correct,ok,extracted",
    [
        ("Step 1: add them.\n#### 1,234", "1234", True, "1,234"),  # #### first, commas dropped
        ("#### -5", "-5", True, "-5"),
        ("The answer is 3.50", "3.5", True, "3.50"),
        ("So x = -12", "-12", True, "-12"),
        ("x=-7 is it", "-7", True, "-7"),  # "=" may precede the number
        ("1,000,000 people", "1,000,000", True, "1,000,000"),
        ("I have 3 apples and 5 pears", "5", True, "5"),  # the last number
        ("I have 3 apples and 5 pears", "3", False, "5"),
        ("answer: 7.001", "7", True, "7.001"),  # within 0.01
        ("answer: 7.02", "7", False, "7.02"),
        ("It costs $42.", "42", False, ""),  # "$42" has no space or "=" before it (go-ml)
        ("The total is (42)", "42", False, ""),  # nor "(42"
        ("#### 5.5.5", "5", False, "5.5.5"),  # extracted but not a number
        ("Error: 42", "42", False, ""),  # error responses score nothing
        ("", "42", False, ""),
        ("#### 72", " 72 ", True, "72"),
        ("#### 1000", "1_000", True, "1000"),  # Go's float syntax takes digit underscores
        ("#### 3", "\u0663", False, "3"),  # but not non-ASCII digits (Python's float would)
        ("#### 1", "1e400", False, "1"),  # out of range is an error in Go
    ],
)
def test_gsm8k(response, correct, ok, extracted):
    s = score_gsm8k(response, correct)
    assert (s.correct, s.extracted, s.expected) == (ok, extracted, correct)


def test_score_exact_falls_back_to_text_equality():
    assert score_exact("Paris", " Paris ") == 1.0
    assert score_exact("   ", "   ") == 0.0
    assert score_exact("the answer is 42", "42") == 1.0
    assert score_exact("London", "Paris") == 0.0


def test_parse_float_matches_go_syntax():
    assert parse_float("0x1p-2") == 0.25
    assert parse_float("5.") == 5.0
    assert parse_float("-Inf") == float("-inf")
    for bad in ("1__0", "_1", "1_", " 1", "0x10", "+nan", "1e", "--1", ""):
        with pytest.raises(ValueError):
            parse_float(bad)


# --------------------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_heuristic_never_raises_and_lek_in_unit_interval(text):
    s = score_heuristic(text)
    assert 0.0 <= s.lek_score <= 1.0
    assert s.degeneration in (0, 1, 3, 5, 10)
    assert s.empty_broken in (0, 1) and s.formulaic_preamble in (0, 1)
    assert 0 <= s.engagement_depth <= 8 and 0 <= s.emotional_register <= 10


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.text(max_size=20))
def test_exact_never_raises(response, correct):
    s = score_gsm8k(response, correct)
    assert isinstance(s.correct, bool)
    assert score_exact(response, correct) in (0.0, 1.0)


def test_lone_surrogates_from_json_do_not_raise():
    # json.loads('"\\ud800"') gives a lone surrogate; Go would have decoded it to U+FFFD (3 bytes).
    text = json.loads('"\\ud800 fine text here\\ud800"')
    s = score_heuristic(text)
    assert s.empty_broken == 0 and 0.0 <= s.lek_score <= 1.0
    assert strip_think_blocks("<think>x</think>" + "\ud800" * 200) == "\ud800" * 200
