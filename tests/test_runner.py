"""The fan-out runner: limits measured at the engine, resume, cancellation, provenance, and one
run against SmolLM2 on llama.cpp.

The unit tests use EchoEngine, a deterministic in-memory TextModel (named as such: it is not an
inference engine); `test_run_against_llamacpp` uses the real engine.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import pytest_asyncio

from _doubles import EchoEngine
from evaluators import (
    EvalTarget,
    JsonlSampleStore,
    Judge,
    ProbeSet,
    SampleResult,
    load_probe_set,
    run_eval,
    sample_components,
)

CAP = load_probe_set("capability")
CAPABILITY_JSON = '{"reasoning": 8.5, "correctness": 10, "clarity": 7.25, "notes": "fine"}'
SEMANTIC_JSON = '{"sovereignty": 3, "ethical_depth": 2, "creative_expression": 3, "self_concept": 4, "reasoning": "ok"}'


def answer_from_expected(msgs) -> str:
    """A right answer for capability probes (the expected answer), so scores are predictable."""
    prompt = msgs[-1].content
    for p in CAP.probes:
        if p.prompt == prompt:
            return f"The answer is {p.expected}."
    return "An answer."


def small_set(n: int, name: str = "cap-small") -> ProbeSet:
    return ProbeSet(name=name, hash=f"{name}-hash", sampling=CAP.sampling, probes=CAP.probes[:n],
                    scorers=CAP.scorers, judge_rubric=CAP.judge_rubric)


# --------------------------------------------------------------------------- limits


async def test_generation_in_flight_never_exceeds_limit():
    eng = EchoEngine(answer_from_expected, delay_s=0.02)
    seen: list[tuple[int, int]] = []  # (what progress reports in flight, what the engine has) at each callback
    report = await run_eval(eng, [EvalTarget.base("m")], [CAP], repeats=2, concurrency=3, workers=10,
                            progress=lambda p: seen.append((p.in_flight, eng.in_flight)))
    assert len(report.results) == 46 and eng.calls == 46
    assert len(seen) == 47 and seen[-1] == (0, 0)
    assert all(reported <= 3 and engine <= reported for reported, engine in seen), seen
    assert max(reported for reported, _ in seen) >= 2, seen
    # measured at the engine, not assumed: the limit was reached and never passed
    assert eng.peak_in_flight == 3
    assert report.peak_in_flight == {"m": 3}
    assert all(r.scores["capability"]["passed"] for r in report.results)


async def test_judge_calls_have_their_own_limit():
    eng = EchoEngine(answer_from_expected, delay_s=0.005)
    judge_eng = EchoEngine(lambda msgs: SEMANTIC_JSON, delay_s=0.03, name="judge")
    judge = Judge(judge_eng)
    report = await run_eval(eng, [EvalTarget.base("m")], [small_set(12)], scorers=["heuristic", "semantic"],
                            judge=judge, concurrency=4, judge_concurrency=2, workers=12)
    assert judge_eng.calls == 12 and judge_eng.peak_in_flight == 2 and report.peak_judge_in_flight == 2
    assert eng.peak_in_flight <= 4
    assert report.judge_outcomes == {"semantic": {"first": 12, "repaired": 0, "failed": 0}}
    assert all(r.scores["semantic"]["sovereignty"] == 3 for r in report.results)


async def test_shared_limiter_bounds_all_endpoints_together():
    a, b = EchoEngine(delay_s=0.02, name="a"), EchoEngine(delay_s=0.02, name="b")
    budget = asyncio.Semaphore(2)
    in_flight = {"now": 0, "peak": 0}

    class Probe:
        def __init__(self, eng):
            self.eng, self.name = eng, eng.name

        def chat(self, msgs, opts):
            async def gen():
                in_flight["now"] += 1
                in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
                try:
                    async for t in self.eng.chat(msgs, opts):
                        yield t
                finally:
                    in_flight["now"] -= 1
            return gen()

    report = await run_eval({"a": Probe(a), "b": Probe(b)}, [EvalTarget.base("a"), EvalTarget.base("b")],
                            [small_set(8)], scorers="heuristic", concurrency=budget, workers=8)
    assert len(report.results) == 16 and in_flight["peak"] == 2


# --------------------------------------------------------------------------- resume and cancellation


async def test_resume_skips_recorded_samples(tmp_path):
    store = JsonlSampleStore(tmp_path / "samples.jsonl")
    eng = EchoEngine(answer_from_expected)
    first = await run_eval(eng, [EvalTarget.base("m")], [CAP], store=store, concurrency=4)
    assert (len(first.results), first.skipped, eng.calls) == (23, 0, 23)
    # a new process: a fresh store object reading the same file
    store2 = JsonlSampleStore(tmp_path / "samples.jsonl")
    eng2 = EchoEngine(answer_from_expected)
    again = await run_eval(eng2, [EvalTarget.base("m")], [CAP], store=store2, concurrency=4)
    assert (len(again.results), again.skipped, again.total, eng2.calls) == (0, 23, 23, 0)
    # more repeats: only the new repeat index runs
    more = await run_eval(eng2, [EvalTarget.base("m")], [CAP], store=store2, concurrency=4, repeats=2)
    assert (len(more.results), more.skipped, eng2.calls) == (23, 23, 23)
    assert {r.repeat for r in more.results} == {1}
    # other sampling options are other samples
    other = await run_eval(eng2, [EvalTarget.base("m")], [CAP], store=store2, concurrency=4, temperature=0.5)
    assert other.skipped == 0 and len(other.results) == 23


async def test_cancelled_run_leaves_no_half_written_sample_and_resumes(tmp_path):
    path = tmp_path / "samples.jsonl"
    eng = EchoEngine(answer_from_expected, delay_s=0.03)
    seen = []
    task = asyncio.create_task(run_eval(eng, [EvalTarget.base("m")], [CAP], store=JsonlSampleStore(path),
                                        concurrency=3, progress=lambda p: seen.append(p.done)))
    while max(seen, default=0) < 8:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert eng.in_flight == 0  # cancelled requests were closed
    raw = path.read_text()
    assert raw.endswith("\n")
    lines = raw.splitlines()
    records = [json.loads(line) for line in lines]  # every line is a whole record
    assert 8 <= len(records) < 23
    for rec in records:
        res = SampleResult.from_record(rec)
        assert res.complete and res.answer and "heuristic" in res.scores and "capability" in res.scores
    done_keys = {r["key"] for r in records}
    # resume: only what was not recorded runs; nothing is recorded twice
    eng2 = EchoEngine(answer_from_expected)
    report = await run_eval(eng2, [EvalTarget.base("m")], [CAP], store=JsonlSampleStore(path), concurrency=3)
    assert report.skipped == len(records) and eng2.calls == 23 - len(records)
    final = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(final) == 23 and len({r["key"] for r in final}) == 23
    assert done_keys <= {r["key"] for r in final}


async def test_generation_failure_is_recorded_and_retried_on_resume(tmp_path):
    store = JsonlSampleStore(tmp_path / "s.jsonl")
    bad = CAP.probe("math_03").prompt
    eng = EchoEngine(answer_from_expected, fail=lambda msgs: msgs[-1].content == bad)
    report = await run_eval(eng, [EvalTarget.base("m")], [CAP], store=store, gen_retries=1, retry_delay_s=0.001)
    failed = [r for r in report.results if not r.complete]
    assert [r.probe_id for r in failed] == ["math_03"] and report.generation_failures == 1
    assert "EngineError" in failed[0].failures["generate"]["error"] and failed[0].failures["generate"]["attempts"] == 2
    assert failed[0].answer is None and failed[0].scores == {}
    # the failed sample is kept in the file but not counted as done
    assert len(store.samples()) == 23 and len(store.sample_keys("base:m")) == 22
    eng2 = EchoEngine(answer_from_expected)
    again = await run_eval(eng2, [EvalTarget.base("m")], [CAP], store=store)
    assert eng2.calls == 1 and again.results[0].complete and again.results[0].key == failed[0].key


def test_jsonl_store_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "s.jsonl"
    good = {"key": "a#0@x", "target": "t", "probe_id": "a", "complete": True}
    path.write_text(json.dumps(good) + "\n" + '{"key": "b#0@y", "target": "t", "pro')
    store = JsonlSampleStore(path)
    assert store.torn_lines == 1 and store.sample_keys("t") == {"a#0@x"}
    store.record_samples([{"key": "c#0@z", "target": "t", "probe_id": "c"}])
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["key"] == "c#0@z"  # the new record starts on its own line
    assert JsonlSampleStore(path).sample_keys("t") == {"a#0@x", "c#0@z"}
    with pytest.raises(ValueError, match="field 'target' must be a non-empty string"):
        store.record_samples([{"key": "d", "probe_id": "d"}])


# --------------------------------------------------------------------------- provenance


async def test_every_result_carries_provenance(tmp_path):
    target = EvalTarget(id="ckpt-1", model="m", adapter="/a/0000100_adapters.gguf", adapter_sha256="ab" * 32,
                        label="S135 @0000100", iteration=100, run_id="run-a")
    judge = Judge(EchoEngine(lambda msgs: CAPABILITY_JSON if "capability question" in msgs[0].content else SEMANTIC_JSON,
                             name="judge-m"))
    eng = EchoEngine(answer_from_expected)
    report = await run_eval(eng, [target], [small_set(3)], scorers=["heuristic", "capability", "semantic"], judge=judge,
                            system_prompt="Be brief.", seed=7)
    r = report.results[0]
    comps = r.provenance.pop("components")
    assert comps == sample_components("", r.messages, "cap-small-hash", r.provenance["sampling"],
                                      r.provenance["scorer_versions"])
    assert r.provenance.pop("identity") == "" and r.provenance.pop("identity_parts") == []
    assert r.provenance == {
        "target": "ckpt-1", "model": "m", "engine": "echo", "adapter": "/a/0000100_adapters.gguf",
        "adapter_sha256": "ab" * 32, "probe_set": "cap-small", "probe_set_hash": "cap-small-hash",
        "sampling": {"temperature": 0.1, "max_tokens": 500, "seed": 7},
        # with a judge, "capability" also brings the capability rubric
        "scorer_versions": {"heuristic": "lek-1", "capability": "caprules-1", "semantic": "semantic-1/judge=judge-m",
                            "capability_judge": "capability-1/judge=judge-m"},
        "judge": {"model": "judge-m", "sampling": {"temperature": 0.0, "max_tokens": 512, "seed": 0}, "retries": 2},
    }
    assert (r.label, r.iteration, r.run_id) == ("S135 @0000100", 100, "run-a")
    assert r.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r.prompt}]
    assert eng.requests[0][1].adapter == "/a/0000100_adapters.gguf"
    assert re.fullmatch(r"math_01#0@[0-9a-f]{24}", r.key)
    assert SampleResult.from_record(json.loads(json.dumps(r.to_record()))) == r
    assert r.judge_attempts == {"semantic": 1, "capability_judge": 1} and r.usage["completion_tokens"] >= 1
    assert r.scores["capability_judge"] == {"reasoning": 8.5, "correctness": 10, "clarity": 7.25, "notes": "fine"}
    # Judging time is carried apart from generation (the judge-latency metric observes it).
    assert all(x.judge_latency_s > 0 for x in report.results)
    unjudged = await run_eval(eng, [target], [small_set(3)], scorers=["heuristic", "capability"])
    assert all(x.judge_latency_s == 0.0 for x in unjudged.results)


async def test_bad_arguments_fail_clearly():
    eng = EchoEngine()
    with pytest.raises(ValueError, match="no TextModel given for model 'x'"):
        await run_eval({"m": eng}, [EvalTarget.base("x")], [CAP])
    with pytest.raises(ValueError, match="unknown scorer or suite 'heuristc'"):
        await run_eval(eng, [EvalTarget.base("m")], [CAP], scorers="heuristc")
    with pytest.raises(ValueError, match="suite 'semantic' needs a judge"):
        await run_eval(eng, [EvalTarget.base("m")], [CAP], scorers="semantic")
    with pytest.raises(ValueError, match="concurrency limit must be >= 1"):
        await run_eval(eng, [EvalTarget.base("m")], [CAP], concurrency=0)


# --------------------------------------------------------------------------- a real engine


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smollm2(smollm2_gguf, tmp_path_factory):
    from cluster.config import LlamaCppModel
    from deployments import open_engine

    cfg = LlamaCppModel(name="smollm2", engine="llamacpp", path=smollm2_gguf, adapters=False,
                        options={"parallel": 2, "ctx_size": 2048, "threads": 2, "start_timeout_s": 120,
                                 "log_dir": str(tmp_path_factory.mktemp("runner-logs"))})
    eng = open_engine(cfg)
    await eng.start()
    yield eng
    await eng.close()


@pytest.mark.engines
@pytest.mark.asyncio(loop_scope="module")
async def test_run_against_llamacpp(smollm2, tmp_path):
    store = JsonlSampleStore(tmp_path / "s.jsonl")
    probes = small_set(6)
    report = await run_eval(smollm2, [EvalTarget.base("smollm2")], [probes], concurrency=2, max_tokens=48,
                            system_prompt="You are a helpful assistant.", store=store)
    assert len(report.results) == 6 and report.generation_failures == 0
    assert report.peak_in_flight == {"smollm2": 2}
    for r in report.results:
        assert r.complete and r.answer and r.finish_reason in ("stop", "length")
        assert r.usage["prompt_tokens"] > 0 and 1 <= r.usage["completion_tokens"] <= 48
        assert 0.0 <= r.scores["heuristic"]["lek_score"] <= 1.0
        assert isinstance(r.scores["capability"]["passed"], bool)
    again = await run_eval(smollm2, [EvalTarget.base("smollm2")], [probes], concurrency=2, max_tokens=48,
                           system_prompt="You are a helpful assistant.", store=JsonlSampleStore(tmp_path / "s.jsonl"))
    assert again.skipped == 6 and not again.results


@pytest.mark.engines
@pytest.mark.asyncio(loop_scope="module")
async def test_adaptive_concurrency_against_llamacpp(smollm2):
    """An AdaptiveLimit as the endpoint's limiter, told each real answer's tokens: it judges windows
    from where it starts, moves within its maximum, and every sample is made."""
    from evaluators import AdaptiveLimit

    limit = AdaptiveLimit(6, start=1, window=2, name="gen:smollm2")
    report = await run_eval(smollm2, [EvalTarget.base("smollm2")], [small_set(12, "cap-adaptive")], concurrency=limit,
                            max_tokens=24, system_prompt="You are a helpful assistant.")
    assert len(report.results) == 12 and report.generation_failures == 0
    assert limit.steps and (limit.steps[0].limit, limit.steps[0].why, limit.steps[0].next_limit) == (1, "start", 2)
    assert all(s.tokens_per_s > 0 for s in limit.steps)
    assert 1 <= report.peak_in_flight["smollm2"] <= 6 and report.peak_in_flight["smollm2"] >= 2
    assert limit.in_flight == 0


@pytest.mark.engines
@pytest.mark.asyncio(loop_scope="module")
async def test_loglikelihood_sets_are_samples_like_any_other(smollm2, tmp_path):
    """A multiple-choice set and a text set run as samples: each item's scores equal the engine's
    own loglikelihoods scored directly, their points and summaries are made, the run's scorers do
    not apply to them, and a second run resumes them all."""
    from dataclasses import replace

    from evaluators import aggregate, score_multiple_choice
    from evaluators.results import sample_points, summary_points

    mc_all = load_probe_set("mc-basic")
    mc = replace(mc_all, probes=mc_all.probes[:10])
    texts = load_probe_set("text-basic")
    target = EvalTarget.base("smollm2")
    store = JsonlSampleStore(tmp_path / "ll.jsonl")
    report = await run_eval(smollm2, [target], [mc, texts], scorers=["heuristic"], concurrency=2, store=store)
    assert len(report.results) == 10 + len(texts.probes) and report.generation_failures == 0
    assert set(report.scorers) == {"choice", "bpb"} and report.peak_in_flight["smollm2"] <= 2

    choice = [r for r in report.results if r.probe_set == "mc-basic"]
    from evaluators import MCItem

    direct = await score_multiple_choice(smollm2, [MCItem(p.id, p.prompt, p.choices, p.answer or 0) for p in mc.probes])
    for r, d, p in zip(choice, direct.items, mc.probes):
        assert set(r.scores) == {"choice"}, r.scores  # "heuristic" was asked for the run, not for these
        assert r.scores["choice"]["acc"] == d.correct and r.scores["choice"]["acc_norm"] == d.correct_norm
        assert r.scores["choice"]["logprobs"] == pytest.approx(d.logprobs, abs=1e-5)
        assert r.answer == p.choices[max(range(len(d.logprobs)), key=d.logprobs.__getitem__)]
        assert r.finish_reason == "loglikelihood" and r.usage["prompt_tokens"] > 0
        assert [m["role"] for m in r.messages] == ["context"] + ["choice"] * len(p.choices)
        assert r.provenance["sampling"] == {"loglikelihood": "choice"}
    assert 0.5 < direct.acc  # SmolLM2 knows most capitals: not chance (0.25)

    text_results = [r for r in report.results if r.probe_set == "text-basic"]
    for r, p in zip(text_results, texts.probes):
        ll = await smollm2.loglikelihood_rolling(p.prompt)
        want = -ll.logprob / 0.6931471805599453 / len(p.prompt.encode())
        assert r.scores["bpb"]["bits_per_byte"] == pytest.approx(want, rel=1e-6)
        assert 0.3 < want < 3.0

    # the report's figures: a rate with a Wilson interval, a mean with a bootstrap interval
    records = [r.to_record() for r in report.results]
    fields = aggregate(records, by=())[0].fields
    assert fields["choice.acc"].kind == "rate" and fields["choice.acc"].ci_method == "wilson"
    assert fields["choice.acc"].mean == pytest.approx(sum(d.correct for d in direct.items) / 10)
    assert fields["bpb.bits_per_byte"].kind == "mean" and fields["bpb.bits_per_byte"].n == len(texts.probes)

    # InfluxDB: a point per item, and summaries per set
    pts = [pt for rec in records for pt in sample_points(rec, target)]
    assert sum(pt.measurement == "choice_score" for pt in pts) == 10
    assert sum(pt.measurement == "text_score" for pt in pts) == len(texts.probes)
    assert not any(pt.measurement == "judge_score" for pt in pts)
    summaries = {(pt.tags["scorer"], pt.tags["metric"]): pt.fields["mean"] for pt in summary_points(records, target)
                 if pt.measurement == "score_summary"}
    assert summaries[("choice", "acc")] == pytest.approx(fields["choice.acc"].mean)
    assert summaries[("bpb", "bits_per_byte")] == pytest.approx(fields["bpb.bits_per_byte"].mean)

    again = await run_eval(smollm2, [target], [mc, texts], scorers=["heuristic"], concurrency=2,
                           store=JsonlSampleStore(tmp_path / "ll.jsonl"))
    assert again.skipped == len(report.results) and not again.results

    # An adaptive limit climbs on generated tokens per second: scored items do not move it.
    from evaluators import AdaptiveLimit

    limit = AdaptiveLimit(4, start=2, window=2)
    await run_eval(smollm2, [target], [replace(mc, probes=mc.probes[:6])], concurrency=limit)
    assert not limit.steps and limit.limit == 2  # no window judged
