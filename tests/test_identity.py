"""Every score names everything it depends on (issue 17).

- Change each input of a sample's identity in turn (system prompt, sampling, probe file, the base
  weights behind the same model name, an engine setting that changes output, an adapter's config
  with the same weights): nothing is reused, the reason is named, and what did not change is reused.
- A real llama.cpp engine reports its identity read back from the server (/props, /lora-adapters).
- An adapter the engine silently does not apply (lora_scale 0: it serves the base for it) is flagged.
- `eval` and `watch` build the same plan from the same config: the same sample keys.
- The report calls a checkpoint best only when it beats the base significantly, with its interval.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from _adapters import SMOLLM2_DIMS, gguf_lora_for
from _doubles import EchoEngine
from checkpoints import Checkpoint, Ledger, sha256_file
from evaluators import (
    NO_EFFECT,
    EvalTarget,
    JsonlSampleStore,
    adapter_effect,
    load_probe_set,
    min_detectable_difference,
    run_eval,
)

CAP3 = replace(load_probe_set("capability"), probes=load_probe_set("capability").probes[:3])

ENGINE = {"engine": "llamacpp", "engine_version": "xllamacpp 1", "weights_sha256": "w" * 64,
          "settings": {"n_ctx": 512, "chat_template_sha256": "t" * 64, "lora_scale": 1.0}}


def _ck(sha: str = "a" * 64) -> Checkpoint:
    return Checkpoint(source="local", run="adapters-a", iteration=100, path="/runs/a/100.safetensors",
                      dirname="adapters-a", label="A @0000100", run_id="run-a", model_tag="smol", layout="mlx",
                      size=1, mtime=1.0, sha256=sha)


def _targets(engine: dict, files_sha: str = "f" * 64) -> list[EvalTarget]:
    return [EvalTarget.base("m").identified(engine),
            EvalTarget.of_checkpoint(_ck(), "m", files_sha).identified(engine)]


async def _run(store: JsonlSampleStore, targets: list[EvalTarget], probe_sets=(CAP3,), **kw):
    defaults = {"system_prompt": None, "temperature": 0.0, "max_tokens": 32, "seed": 0}
    return await run_eval(EchoEngine(), targets, list(probe_sets), scorers=["heuristic"], store=store,
                          **{**defaults, **kw})


def _changed_probe_file(tmp_path: Path) -> Path:
    """The capability set as a file, one probe's prompt changed."""
    import evaluators

    data = yaml.safe_load((Path(evaluators.__file__).parent / "probesets" / "capability.yaml").read_text())
    data["probes"] = data["probes"][:3]
    data["probes"][1]["prompt"] += " Answer in one line."
    out = tmp_path / "capability-edited.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.mark.parametrize("change, expect", [
    ("system prompt", "prompt"),
    ("sampling", "sampling"),
    ("probe file", "probe set"),
    ("base weights", "target identity (base weights)"),
    ("engine setting", "target identity (setting n_ctx)"),
    ("adapter config", "target identity (adapter files)"),
])
async def test_changing_one_input_reuses_nothing_it_touches(tmp_path, change, expect):
    first = tmp_path / "first.jsonl"
    base_report = await _run(JsonlSampleStore(first), _targets(ENGINE))
    assert base_report.skipped == 0 and len(base_report.results) == 6
    again = await _run(JsonlSampleStore(first), _targets(ENGINE))
    assert again.skipped == 6 and not again.results and not again.set_aside  # nothing changed: all reused

    store_path = tmp_path / "changed.jsonl"
    shutil.copy(first, store_path)
    store = JsonlSampleStore(store_path)
    engine = {**ENGINE, "settings": dict(ENGINE["settings"])}
    kw: dict = {}
    probe_sets = [CAP3]
    files_sha = "f" * 64
    if change == "system prompt":
        kw["system_prompt"] = "Be brief."
    elif change == "sampling":
        kw["max_tokens"] = 64
    elif change == "probe file":
        probe_sets = [load_probe_set(str(_changed_probe_file(tmp_path)))]
    elif change == "base weights":
        engine["weights_sha256"] = "x" * 64  # another file behind the same model name
    elif change == "engine setting":
        engine["settings"]["n_ctx"] = 1024
    elif change == "adapter config":
        files_sha = "g" * 64  # same adapter weights (ck.sha256), another adapter_config.json
    targets = _targets(engine, files_sha)
    if change == "adapter config":
        targets[0] = _targets(ENGINE)[0]  # the base is untouched by its checkpoint's config
    report = await _run(store, targets, probe_sets, **kw)

    changed = [t for t in targets if change != "adapter config" or t.adapter is not None]
    n_changed = 3 * len(changed)
    assert len(report.results) == n_changed, "a changed input reused an earlier answer"
    assert report.skipped == 6 - n_changed, "what did not change must be reused"
    assert sum(report.set_aside.values()) == n_changed
    assert any(expect in why for why in report.set_aside), report.set_aside
    # Recorded under new keys: the earlier samples are still there, set aside, not overwritten.
    assert len(store.samples()) == 6 + n_changed


def test_old_samples_are_set_aside_as_from_before_identity(tmp_path):
    from evaluators import set_aside

    old = {"key": "p#0@old", "probe_set": "capability", "probe_id": "p", "repeat": 0, "complete": True,
           "provenance": {"probe_set_hash": "h", "sampling": {}}}
    assert set_aside([old], {("capability", "p", 0): {"prompt": "x"}}, set()) == {"recorded before content identity": 1}


def test_identity_is_a_digest_of_everything_that_produces_answers():
    base = EvalTarget.base("m").identified(ENGINE)
    assert base.identity and EvalTarget.base("m").identified(ENGINE).identity == base.identity
    for other in ({**ENGINE, "engine_version": "xllamacpp 2"},
                  {**ENGINE, "settings": {**ENGINE["settings"], "chat_template_sha256": "u" * 64}},
                  {**ENGINE, "settings": {**ENGINE["settings"], "lora_scale": 0.5}}):
        assert EvalTarget.base("m").identified(other).identity != base.identity
    ck = EvalTarget.of_checkpoint(_ck(), "m", "f" * 64).identified(ENGINE)
    assert ck.identity != EvalTarget.of_checkpoint(_ck("b" * 64), "m", "f" * 64).identified(ENGINE).identity


# --------------------------------------------------------------------------- a real engine


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smol_unapplied(smollm2_gguf, tmp_path_factory):
    """One llama.cpp engine shared by the module, configured to serve the base for every adapter
    (lora_scale 0), and a GGUF LoRA that fits it."""
    from deployments import LlamaCppEngine

    lora = gguf_lora_for(SMOLLM2_DIMS, tmp_path_factory.mktemp("lora") / "strong.gguf", std_b=0.5)
    engine = LlamaCppEngine("smol", smollm2_gguf, parallel=2, ctx_size=512, max_adapters=1, lora_scale=0.0)
    await engine.start()
    try:
        yield engine, lora
    finally:
        await engine.close()


@pytest.mark.engines
@pytest.mark.asyncio(loop_scope="module")
async def test_llamacpp_reports_its_identity_read_back(smol_unapplied, smollm2_gguf):
    engine, lora = smol_unapplied
    ident = (await engine.info()).identity
    assert ident["engine"] == "llamacpp" and ident["engine_version"].startswith("xllamacpp")
    assert ident["weights_sha256"] == sha256_file(smollm2_gguf)  # the file's content, not its name
    s = ident["settings"]
    assert s["n_ctx"] == 512 and s["model_ftype"] == "Q4_1" and len(s["chat_template_sha256"]) == 64
    await engine.load_adapter(lora)
    assert (await engine.identity())["settings"]["lora_scale"] == 0.0  # read from the adapter's server


@pytest.mark.engines
@pytest.mark.asyncio(loop_scope="module")
async def test_an_adapter_the_engine_does_not_apply_is_flagged(smol_unapplied, tmp_path):
    from evaluators.results import ResultRecorder
    from evaluators.sinks import SinksConfig

    engine, lora = smol_unapplied
    ident = (await engine.info()).identity
    base = EvalTarget.base("smol").identified(ident)
    adapter = EvalTarget.of_adapter_path("smol", lora).identified(ident)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    recorder = ResultRecorder(ledger, SinksConfig(spool_dir=tmp_path / "spool"))
    try:
        for t in (base, adapter):
            await run_eval(engine, [t], [CAP3], scorers=["heuristic"], store=recorder.store(t), temperature=0.0,
                           max_tokens=16, seed=0, concurrency=2)
            recorder.finish_target(t, None)
        flags = ledger.target_flags()
        assert flags[adapter.id]["flag"] == NO_EFFECT and flags[adapter.id]["detail"]["compared"] == 3
        assert base.id not in flags

        # The control: the same adapter applied (lora_scale 1) changes answers, and is not flagged.
        from deployments import LlamaCppEngine

        applied = LlamaCppEngine("smol", engine.model_path, parallel=2, ctx_size=512, max_adapters=1)
        async with applied:
            ident1 = (await applied.info()).identity
            assert ident1["settings"]["lora_scale"] == 1.0 and ident1 != ident
            base1 = EvalTarget.base("smol").identified(ident1)
            adapter1 = EvalTarget.of_adapter_path("smol", lora).identified(ident1)
            assert adapter1.identity != adapter.identity  # the scale is part of the identity
            for t in (base1, adapter1):
                await run_eval(applied, [t], [CAP3], scorers=["heuristic"], store=recorder.store(t),
                               temperature=0.0, max_tokens=16, seed=0, concurrency=2)
                recorder.finish_target(t, None)
        flags = ledger.target_flags()
        assert adapter.id not in flags, flags  # the same id, now compared with the base it ran beside
    finally:
        recorder.close(timeout=0)
        ledger.close()


def test_an_adapter_that_changes_one_answer_is_not_flagged():
    def rec(answer: str, probe: str = "p") -> dict:
        return {"probe_set": "s", "probe_id": probe, "repeat": 0, "answer": answer,
                "provenance": {"components": {"prompt": probe}, "sampling": {"temperature": 0.0}}}

    base = [rec("a", "p"), rec("b", "q")]
    assert adapter_effect([rec("a", "p"), rec("b", "q")], base)["no_effect"] is True
    assert adapter_effect([rec("a", "p"), rec("c", "q")], base) == {"compared": 2, "identical": 1, "no_effect": False}
    sampled = [{**r, "provenance": {**r["provenance"], "sampling": {"temperature": 0.7}}} for r in base]
    assert adapter_effect(sampled, base) is None  # unseeded sampled answers prove nothing either way
    seeded = [{**r, "provenance": {**r["provenance"], "sampling": {"temperature": 0.7, "seed": 0}}} for r in base]
    assert adapter_effect(seeded, seeded)["no_effect"] is True  # seeded sampling repeats: it counts


# --------------------------------------------------------------------------- one plan


async def test_eval_and_watch_make_the_same_sample_keys(tmp_path, monkeypatch):
    """The config in one directory with a relative probe file, the commands run from another: eval
    (its default arguments) and the watch job's coordinator build one plan and one set of keys."""
    from cluster._plan import build_plan
    from cluster.config import load_config

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    shutil.copy(_changed_probe_file(tmp_path), cfg_dir / "mine.yaml")
    cfg_path = cfg_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "models": [{"name": "smol", "engine": "llamacpp", "path": "model.gguf"}],
        "probes": {"sets": ["mine.yaml"], "system_prompt": "Be brief.", "seed": 3, "repeats": 2},
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(cfg_path)
    eval_plan = build_plan(cfg, probes=None, repeats=None, judge_model=None, no_judge=False, max_tokens=None,
                           limit=None)  # what `evalcluster eval --model smol` passes
    watch_plan = build_plan(cfg)  # what the coordinator builds
    assert eval_plan.fingerprint() == watch_plan.fingerprint()
    target = EvalTarget.base("smol").identified(ENGINE)
    keys = [(await run_eval(EchoEngine(), [target], **p.run_args())).keys for p in (eval_plan, watch_plan)]
    assert keys[0] == keys[1] and len(keys[0]) == 6
    assert eval_plan.probe_sets[0].probes[1].prompt.endswith("Answer in one line.")


async def test_a_limited_plan_asks_a_head_of_each_set_with_the_whole_sets_keys(tmp_path):
    """`probes.limit` (or `--limit`) asks the first N probes: their keys are the whole plan's (a later
    full run answers only the rest), the plan's fingerprint is its own (its summaries are not the
    full run's), and the whole sets stay known for placing points."""
    from cluster._plan import build_plan
    from cluster.config import parse_config

    def cfg(**probes: object):
        return parse_config({"models": [{"name": "smol", "engine": "llamacpp", "path": "model.gguf"}],
                             "probes": {"sets": ["capability"], **probes}}, "limit")

    whole, limited = build_plan(cfg()), build_plan(cfg(limit=5))
    assert build_plan(cfg(), limit=5).fingerprint() == limited.fingerprint() != whole.fingerprint()
    assert build_plan(cfg(limit=5), limit=7).limit == 7  # the command line wins
    assert [len(ps.probes) for ps in limited.asked_sets] == [5]
    assert limited.probe_sets == whole.probe_sets and len(limited.probe_sets[0].probes) > 5
    target = EvalTarget.base("smol").identified(ENGINE)
    k_whole, k_limited = [set((await run_eval(EchoEngine(), [target], **p.run_args())).keys) for p in (whole, limited)]
    assert len(k_limited) == 5 and k_limited < k_whole
    with pytest.raises(ValueError, match="probes.limit: Input should be greater than or equal to 1"):
        cfg(limit=0)


# --------------------------------------------------------------------------- honest best


def _samples(target: str, passes: int, weights: str = "w1", n: int = 23, at: float = 1.0,
             prompt: str = "p") -> list[dict]:
    return [{
        "key": f"p{i}#0@{target}{weights}", "target": target, "probe_id": f"p{i}", "probe_set": "capability",
        "repeat": 0, "answer": "x", "complete": True, "created_at": at,
        "scores": {"capability": {"passed": i < passes}},
        "provenance": {"model": "m", "identity": target + weights,
                       "components": {"prompt": f"{prompt}{i}", "target identity": target + weights},
                       "identity_parts": [["base weights", weights]]},
    } for i in range(n)]


def _ledger_with_run(tmp_path: Path, base_passes: int, ck_passes: int, n: int = 23) -> Ledger:
    """A ledger with a base and one scored checkpoint, each answering n probes (the first k pass)."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ck = _ck()
    ledger.upsert(ck)
    ledger.mark_staged(ck.id, "/staged")
    ledger.mark_evaluating(ck.id)
    ledger.mark_scored(ck.id)
    ledger.record_samples(_samples("base:m", base_passes, n=n) + _samples(ck.id, ck_passes, n=n))
    return ledger


def test_a_checkpoint_is_compared_with_the_base_on_its_own_engine(tmp_path):
    """The base was evaluated again on other weights (behind the same name) after the checkpoint:
    the report shows the base as it is now, and compares the checkpoint only with the base samples
    made on the weights it ran on."""
    from cluster._report import learning_curves

    ledger = _ledger_with_run(tmp_path, 4, 20)
    ledger.record_samples(_samples("base:m", 23, weights="w2", at=2.0))  # newer weights: all pass
    try:
        (curve,) = learning_curves(ledger)
    finally:
        ledger.close()
    assert curve.base.fields["capability.passed"].mean == 1.0  # the base as it is now
    assert curve.set_aside["base:m"] == {"target identity (base weights)": 23}
    assert curve.best is not None and "+70%" in curve.verdict  # against w1's 4/23, never w2's 23/23
    assert [d.stats.n_pairs for d in curve.deltas if d.versus == "base"] == [23]


def test_report_names_no_best_when_no_checkpoint_beats_the_base_significantly(tmp_path):
    from cluster._report import learning_curves, write_html

    ledger = _ledger_with_run(tmp_path, 4, 6)  # 17% and 26%: the demo's numbers, not distinguishable
    try:
        (curve,) = learning_curves(ledger)
    finally:
        ledger.close()
    assert curve.best is None
    assert curve.verdict.startswith("No checkpoint is distinguishable from the base yet")
    assert "+9%" in curve.verdict and "95% interval [" in curve.verdict and "p = 0.5" in curve.verdict
    assert f"smallest difference detectable at the 5% level is {min_detectable_difference(23):.0%}" in curve.verdict
    page = write_html([curve], tmp_path / "r.html").read_text()
    assert "No checkpoint is distinguishable from the base yet" in page and "★" not in page


def test_report_names_a_best_checkpoint_with_its_interval(tmp_path):
    from cluster._report import learning_curves, write_html

    ledger = _ledger_with_run(tmp_path, 4, 20)
    try:
        (curve,) = learning_curves(ledger)
    finally:
        ledger.close()
    assert curve.best is not None and curve.best.label == "A @0000100"
    assert curve.verdict.startswith("Best checkpoint: A @0000100") and "+70%" in curve.verdict
    assert "95% interval [" in curve.verdict and "significant at the 5% level" in curve.verdict
    assert "Best checkpoint: A @0000100" in write_html([curve], tmp_path / "r.html").read_text()


def test_a_checkpoint_evaluated_under_an_earlier_plan_is_kept_off_the_curve(tmp_path):
    """The system prompt changed between two checkpoints of a run: the earlier one (and the base's
    earlier answers) stay in the table, marked, but neither its point joins the newer one's curve
    nor does it take part in the verdict."""
    from cluster._report import curve_table, learning_curves, write_html

    ledger = _ledger_with_run(tmp_path, 4, 20)  # A @0000100 under the first plan: +70% over the base
    later = replace(_ck("b" * 64), iteration=200, label="A @0000200", path="/runs/a/200.safetensors")
    ledger.upsert(later)
    ledger.mark_staged(later.id, "/staged")
    ledger.mark_evaluating(later.id)
    ledger.mark_scored(later.id)
    ledger.record_samples(_samples("base:m", 5, at=2.0, prompt="q") + _samples(later.id, 6, at=2.0, prompt="q"))
    try:
        (curve,) = learning_curves(ledger)
    finally:
        ledger.close()
    first, second = curve.checkpoints
    assert first.earlier_plan and not second.earlier_plan
    assert curve.best is None and "A @0000200" in curve.verdict  # A @0000100's +70% is another plan's
    page = write_html([curve], tmp_path / "r.html").read_text()
    assert "A @0000100 (earlier plan)" in page and "evaluated under an earlier plan" in page
    assert "capability accuracy @ 200:" in page and "capability accuracy @ 100:" not in page  # its chart's points
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(curve_table(curve, 120))
    assert "(earlier plan)" in console.export_text()


def test_the_writer_keeps_a_scored_checkpoints_figures_in_a_thread_of_its_own(tmp_path):
    """finish_target leaves the report's figures to the writer's warmer thread (on its own read-only
    connection): once it is done, a report reads no sample."""
    from cluster._report import learning_curves
    from cluster._writer import ResultWriter
    from cluster.config import load_config

    class CountingLedger(Ledger):
        reads = 0

        def samples(self, target: str) -> list[dict]:
            CountingLedger.reads += 1
            return super().samples(target)

    ledger = _ledger_with_run(tmp_path, 4, 20)
    ledger.close()
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({
        "models": [{"name": "m", "engine": "openai", "options": {"base_url": "http://127.0.0.1:9/v1"}}],
        "sources": [{"name": "local", "kind": "local", "path": str(tmp_path / "runs"), "model": "m"}],
        "probes": {"sets": ["capability"]},
        "sinks": {"ledger": str(tmp_path / "ledger.sqlite"), "spool_dir": str(tmp_path / "spool")},
    }))
    writer = ResultWriter(load_config(f), recover=False)
    try:
        writer.finish_target(EvalTarget.of_checkpoint(_ck(), "m"), _ck().id)
        assert writer.report.wait(120) and writer.report.done == 1
    finally:
        writer.close()
    reader = CountingLedger(tmp_path / "ledger.sqlite", readonly=True)
    try:
        (curve,) = learning_curves(reader)
    finally:
        reader.close()
    assert CountingLedger.reads == 0 and curve.checkpoints[0].mean("capability.passed") == pytest.approx(20 / 23)


def test_min_detectable_difference():
    assert min_detectable_difference(23) == pytest.approx(6 / 23)  # 2 * 0.5**6 < 0.05 <= 2 * 0.5**5
    assert min_detectable_difference(5) is None


def test_the_report_keeps_its_figures_and_never_shows_stale_ones(tmp_path):
    """A second report reads the figures the first one kept (beside the ledger) and no sample; once
    a checkpoint's samples are replaced, the next report shows what a report computing everything
    anew shows."""
    from cluster._report import ReportCache, learning_curves

    class CountingLedger(Ledger):
        reads = 0

        def samples(self, target: str) -> list[dict]:
            CountingLedger.reads += 1
            return super().samples(target)

    _ledger_with_run(tmp_path, 4, 20).close()
    ledger = CountingLedger(tmp_path / "ledger.sqlite")
    try:
        (first,) = learning_curves(ledger)
        assert CountingLedger.reads >= 2
        CountingLedger.reads = 0
        (again,) = learning_curves(ledger)
        assert CountingLedger.reads == 0  # every figure and comparison kept
        assert (tmp_path / "ledger.sqlite.report-cache").exists()
        assert again.verdict == first.verdict and again.best.label == first.best.label
        assert [(d.label, d.versus, d.field, d.stats) for d in again.deltas] == \
            [(d.label, d.versus, d.field, d.stats) for d in first.deltas]
        assert again.checkpoints[0].fields == first.checkpoints[0].fields

        ck = _ck()
        ledger.record_samples(_samples(ck.id, 6))  # answered again: 6 of 23 pass now, not 20
        (changed,) = learning_curves(ledger)
        with ReportCache(tmp_path / "empty-cache") as nothing_kept:
            (anew,) = learning_curves(ledger, cache=nothing_kept)
        assert changed.checkpoints[0].mean("capability.passed") == pytest.approx(6 / 23)
        assert changed.verdict == anew.verdict != first.verdict
        assert [(d.label, d.field, d.stats) for d in changed.deltas] == [(d.label, d.field, d.stats) for d in anew.deltas]

        # The figures made from the checkpoint's old samples can never be read again: pruned (its
        # figures and its comparisons); the base's own figures stay, and the report still reads nothing.
        with ReportCache.beside(ledger) as cache:
            n_before = cache._db.execute("SELECT count(*) FROM entries").fetchone()[0]
            gone = cache.prune(ledger.target_versions())
            assert gone >= 2 and cache.prune(ledger.target_versions()) == 0
            assert cache._db.execute("SELECT count(*) FROM entries").fetchone()[0] == n_before - gone
        CountingLedger.reads = 0
        (after,) = learning_curves(ledger)
        assert CountingLedger.reads == 0 and after.verdict == changed.verdict
    finally:
        ledger.close()
