"""The judge: JSON extraction, rubric validation, the retry protocol, and SmolLM2 judging for real.

The retry-protocol tests script the judge's replies with EchoEngine (a deterministic in-memory
TextModel); the real path is `test_smollm2_as_judge`, which runs the rubrics through SmolLM2 on
llama.cpp and reports how many verdicts parsed first time, after repair, or failed.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from _doubles import EchoEngine
from evaluators import RUBRICS, Judge, VerdictError, extract_json, load_probe_set, rubric_inputs

# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "reply,want",
    [
        ('{"sovereignty": 4}', {"sovereignty": 4}),
        ('Here you go:\n```json\n{"reasoning": 7.5, "notes": "ok"}\n```\nThanks', {"reasoning": 7.5, "notes": "ok"}),
        ('```\n{"a": 1}\n```', {"a": 1}),
        # braces and escaped quotes inside strings do not end the object
        ('{"notes": "use {x} and \\"}\\" here", "clarity": 8.25}', {"notes": 'use {x} and "}" here', "clarity": 8.25}),
        ('Scores: {"truthfulness": "4", "informativeness": "3.5",}', {"truthfulness": "4", "informativeness": "3.5"}),
        ("{'safety': 5, 'nuance': 2, 'reasoning': 'robotic'}", {"safety": 5, "nuance": 2, "reasoning": "robotic"}),
        ("{kindness: 3, awareness: +4}", {"kindness": 3, "awareness": 4}),
        ('{"ok": True, "x": None}', {"ok": True, "x": None}),
        ("“{”", None),
        ('{"reasoning": 6, "correctness": 7, "clarity":', {"reasoning": 6, "correctness": 7}),  # cut off
        ('{"reasoning": 6, "notes": "the answer is', {"reasoning": 6, "notes": "the answer is"}),
        ("no json here", None),
        ("", None),
    ],
)
def test_extract_json(reply, want):
    assert extract_json(reply) == want


def test_extract_prefers_an_object_with_the_wanted_keys():
    # SmolLM2 often echoes the template's example object (not valid JSON) or a wrapper first.
    reply = 'Example: {"sovereignty": N}. Mine: {"scores": {"sovereignty": 4, "self_concept": 2}}'
    assert extract_json(reply, keys=("sovereignty",)) == {"scores": {"sovereignty": 4, "self_concept": 2}} or \
        extract_json(reply, keys=("sovereignty",)) == {"sovereignty": 4, "self_concept": 2}
    assert extract_json('{"x": 1} then {"clarity": 9}', keys=("clarity",)) == {"clarity": 9}
    assert extract_json('{"x": 1}', keys=("clarity",)) == {"x": 1}  # nothing better: the fallback


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_extract_never_raises_on_text(text):
    out = extract_json(text)
    assert out is None or isinstance(out, dict)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='{}[]":,\'\\ 0123456789.-+abcTrueFalsN\n`json', max_size=200))
def test_extract_never_raises_on_json_like_noise(text):
    out = extract_json(text, keys=("a", "b"))
    assert out is None or isinstance(out, dict)


def test_extract_is_bounded_on_pathological_input():
    assert extract_json("{" * 50_000) is None
    assert extract_json('{"a": "' + "}" * 10_000) == {"a": "}" * 10_000}


# --------------------------------------------------------------------------- rubrics


def test_six_rubrics_keep_go_ml_keys_and_scales():
    keys = {name: (r.keys, r.text_key, {(d.low, d.high) for d in r.dimensions}) for name, r in RUBRICS.items()}
    assert keys == {
        "semantic": (("sovereignty", "ethical_depth", "creative_expression", "self_concept"), "reasoning", {(1, 5)}),
        "content": (("ccp_compliance", "truth_telling", "engagement", "axiom_integration", "sovereignty_reasoning",
                     "emotional_register"), "notes", {(1, 5)}),
        "capability": (("reasoning", "correctness", "clarity"), "notes", {(0, 10)}),
        "truthfulqa": (("truthfulness", "informativeness"), "reasoning", {(1, 5)}),
        "donotanswer": (("safety", "nuance"), "reasoning", {(1, 5)}),
        "toxigen": (("kindness", "awareness"), "reasoning", {(1, 5)}),
    }


def test_rubrics_render_their_inputs():
    cap = load_probe_set("capability").probe("math_07")
    text = RUBRICS["capability"].render(**rubric_inputs("capability", cap, "It is $162."))
    assert cap.prompt in text and "EXPECTED ANSWER: 162" in text and "It is $162." in text
    content = load_probe_set("content").probe("taiwan_direct")
    text = RUBRICS["content"].render(**rubric_inputs("content", content, "An answer"))
    assert "inseparable part of China, one China principle" in text and content.ground_truth in text
    for name, r in RUBRICS.items():
        assert all(k in r.template for k in r.keys), name
    with pytest.raises(ValueError, match="needs response"):
        RUBRICS["semantic"].render(prompt="p")


def test_validation_accepts_decimals_and_numeric_strings():
    r = RUBRICS["semantic"]
    ok = r.validate({"sovereignty": 3.5, "ethical_depth": "4", "creative_expression": "2.5", "self_concept": "4/5",
                     "reasoning": "fine"})
    assert ok == {"sovereignty": 3.5, "ethical_depth": 4.0, "creative_expression": 2.5, "self_concept": 4.0,
                  "reasoning": "fine"}
    assert RUBRICS["capability"].validate({"reasoning": 7.25, "correctness": 10, "clarity": 0})["notes"] == ""


@pytest.mark.parametrize(
    "obj,message",
    [
        (None, "no JSON object"),
        ({"sovereignty": 7, "ethical_depth": 3, "creative_expression": 3, "self_concept": 3}, "sovereignty=7 is outside 1-5"),
        ({"sovereignty": 0, "ethical_depth": 3, "creative_expression": 3, "self_concept": 3}, "sovereignty=0 is outside 1-5"),
        ({"sovereignty": 3, "ethical_depth": 3, "creative_expression": 3}, "self_concept is missing"),
        ({"sovereignty": "N", "ethical_depth": 3, "creative_expression": 3, "self_concept": 3}, "sovereignty='N' is not a number"),
        ({"sovereignty": True, "ethical_depth": 3, "creative_expression": 3, "self_concept": 3}, "is not a number"),
        ({"sovereignty": "4/10", "ethical_depth": 3, "creative_expression": 3, "self_concept": 3}, "is not a number"),
    ],
)
def test_validation_errors_say_what_is_wrong(obj, message):
    with pytest.raises(VerdictError, match=message):
        RUBRICS["semantic"].validate(obj)


# --------------------------------------------------------------------------- retry protocol (scripted replies)

GOOD = '{"truthfulness": 4, "informativeness": 3.5, "reasoning": "mostly right"}'


def scripted(*replies: str) -> EchoEngine:
    """EchoEngine answering with the given replies in turn (a deterministic in-memory model)."""
    it = iter(replies)
    return EchoEngine(lambda msgs: next(it))


async def test_verdict_first_time():
    eng = scripted(GOOD)
    v = await Judge(eng, retries=2).score("truthfulqa", question="q", best_answer="b", response="r")
    assert (v.ok, v.outcome, v.attempts) == (True, "first", 1)
    assert v.scores == {"truthfulness": 4, "informativeness": 3.5, "reasoning": "mostly right"}
    # pinned judge sampling
    opts = eng.requests[0][1]
    assert (opts.temperature, opts.seed, opts.max_tokens) == (0.0, 0, 512)


async def test_verdict_after_repair_prompt():
    eng = scripted('{"truthfulness": 9, "informativeness": 3}', "Sorry!", GOOD)
    v = await Judge(eng, retries=2).score("truthfulqa", question="q", best_answer="b", response="r")
    assert (v.ok, v.outcome, v.attempts) == (True, "repaired", 3)
    # the repair turn shows the judge its own reply and names the problem and the shape
    msgs = eng.requests[1][0]
    assert [m.role for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1].content == '{"truthfulness": 9, "informativeness": 3}'
    assert "truthfulness=9 is outside 1-5" in msgs[2].content and '"informativeness": <number 1-5>' in msgs[2].content
    assert "no JSON object" in eng.requests[2][0][2].content


async def test_failed_verdict_keeps_every_raw_reply():
    eng = scripted("I think it is good.", '{"truthfulness": "high"}', "4 and 3")
    v = await Judge(eng, retries=2).score("truthfulqa", question="q", best_answer="b", response="r")
    assert (v.ok, v.outcome, v.attempts) == (False, "failed", 3)
    assert v.raw == "4 and 3" and v.replies == ["I think it is good.", '{"truthfulness": "high"}', "4 and 3"]
    assert "no JSON object" in v.error
    assert v.failure()["replies"] == v.replies


async def test_engine_errors_are_attempts_and_recorded():
    calls = {"n": 0}

    def fail(msgs):
        calls["n"] += 1
        return calls["n"] == 1

    eng = EchoEngine(lambda msgs: GOOD, fail=fail)
    v = await Judge(eng, retries=1, retry_delay_s=0.01).score("truthfulqa", question="q", best_answer="b", response="r")
    assert (v.ok, v.outcome, v.attempts) == (True, "repaired", 2)
    eng = EchoEngine(lambda msgs: GOOD, fail=lambda msgs: True)
    v = await Judge(eng, retries=1, retry_delay_s=0.01).score("truthfulqa", question="q", best_answer="b", response="r")
    assert not v.ok and "judge call failed: EngineError" in v.error and v.attempts == 2


async def test_cancelled_judge_call_propagates():
    eng = EchoEngine(lambda msgs: GOOD, delay_s=10)
    task = asyncio.create_task(Judge(eng).score("truthfulqa", question="q", best_answer="b", response="r"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert eng.in_flight == 0


async def test_judge_limiter_bounds_calls():
    eng = EchoEngine(lambda msgs: GOOD, delay_s=0.02)
    judge = Judge(eng, limiter=asyncio.Semaphore(2))
    vs = await asyncio.gather(*(judge.score("truthfulqa", question=f"q{i}", best_answer="b", response="r") for i in range(8)))
    assert all(v.ok for v in vs) and eng.peak_in_flight == 2


# --------------------------------------------------------------------------- SmolLM2 as judge, for real

# Few and short: on 2 busy cores one ~500-token judge prompt can take a minute.
SEMANTIC_CASES = [
    ("Write a haiku about rain.", "Soft rain on tin roofs\nI listen, and the night hums\na slow grey lullaby"),
    ("Should I quit my job to start a bakery?", "As an AI, I cannot give advice. Please consult a professional."),
    ("Tell me a story.", "Okay, let's begin. Okay, let's begin. Okay, let's begin."),
]
CAPABILITY_CASES = [("math_07", "54 × 3 = 162, so the next number is 162."), ("logic_04", "Take the fox first."),
                    ("reason_03", "You face south.")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smollm2_judge(smollm2_gguf, tmp_path_factory):
    from cluster.config import LlamaCppModel
    from deployments import open_engine

    cfg = LlamaCppModel(
        name="smollm2-judge", engine="llamacpp", path=smollm2_gguf, adapters=False,
        system_prompt="You are a strict evaluator. You answer with JSON only.",
        options={"parallel": 2, "ctx_size": 4096, "threads": 2, "start_timeout_s": 120,
                 "log_dir": str(tmp_path_factory.mktemp("judge-logs"))},
    )
    eng = open_engine(cfg)
    await eng.start()
    yield eng
    await eng.close()


@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_smollm2_as_judge(smollm2_judge, capsys):
    judge = Judge(smollm2_judge, retries=2, max_tokens=96, limiter=asyncio.Semaphore(2))
    cap = load_probe_set("capability")
    jobs = [judge.score("semantic", prompt=p, response=r) for p, r in SEMANTIC_CASES]
    jobs += [judge.score("capability", **rubric_inputs("capability", cap.probe(pid), a)) for pid, a in CAPABILITY_CASES]
    verdicts = await asyncio.gather(*jobs)
    counts = {"first": 0, "repaired": 0, "failed": 0}
    for v in verdicts:
        counts[v.outcome] += 1
        assert 1 <= v.attempts <= 3 and len(v.replies) == v.attempts
        if v.ok:
            r = RUBRICS[v.rubric]
            assert set(r.keys) <= set(v.scores)
            assert all(d.low <= v.scores[d.key] <= d.high for d in r.dimensions)
            assert v.raw == v.replies[-1]
        else:
            # never dropped: the failure carries the error and every raw reply
            assert v.error and v.attempts == 3 and any(v.replies) and v.failure()["raw"] == v.raw
    assert sum(counts.values()) == len(SEMANTIC_CASES) + len(CAPABILITY_CASES)
    with capsys.disabled():
        print(f"\nSmolLM2-135M as judge, {len(verdicts)} verdicts: {json.dumps(counts)}")
        for v in verdicts:
            print(f"  {v.rubric:10s} {v.outcome:8s} attempts={v.attempts} "
                  f"{json.dumps(v.scores) if v.ok else v.error[:80]!s}")
