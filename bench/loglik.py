"""Loglikelihood: what a multiple-choice pass costs, and whether lm-eval agrees with it.

Time: a multiple-choice pass by loglikelihood against the same items answered by generating 32
tokens: same engine (llama.cpp, SmolLM2 Q4_1, in this process), same concurrency (the engine's 2
slots: both sides pass the engine's gate of `parallel` requests; the slots' occupancy is sampled
during each side and shown), rounds in rotated order after a warm-up.

Agreement: lm-eval (0.4.x, bench/.venv-peers) with its `local-completions` model and
bench/peers_tasks/mc_lmeval.yaml against the OpenAI endpoint `evalcluster serve` runs (a private
loopback Ray cluster owned by this process, Serve, one llama.cpp replica with a GGUF LoRA adapter),
and evalcluster's own scorer (`evaluators.score_multiple_choice`) through the same deployment's
Serve client, on the built-in set (evaluators/probesets/mc-basic.jsonl), for the base model and
for `model:adapter`: acc, acc_norm, and item for item from lm-eval's `--log_samples`. lm-eval
counts context tokens with the model's HF tokenizer (models/SmolLM2-135M-Instruct), which needs
transformers in bench/.venv-peers (the Makefile's peers rule installs it). A pass the engine gives up on
(llama.cpp dropped one request on each of its tries) is run again and the row says so.

`python -m bench.loglik [--quick]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from bench._common import Row, drop_work_dir, smollm2_llamacpp

GROUP = "loglik"
ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"  # the tokenizer lm-eval counts context tokens with
TASK_YAML = ROOT / "bench" / "peers_tasks" / "mc_lmeval.yaml"
TASK = "evalcluster_mc"

ITEMS = 100
GEN_TOKENS = 32
SLOTS = 2
MODEL = "smollm2"
ADAPTER = "ck1"
CHANCE = 0.25  # every item of mc-basic has 4 choices
# lm-eval is asked for at most as many requests in flight as the replica has slots.
LMEVAL_CONCURRENCY = SLOTS
# lm-eval's tokenizer: it counts the context's tokens (ctxlen) with it and slices the endpoint's
# token_logprobs there. Its default requests, unchanged: token ids, echo, max_tokens 1.
LMEVAL_MODEL_ARGS = ("base_url={url}/v1/completions,model={model},num_concurrent={conc},max_retries=3,timeout=600,"
                     "tokenizer_backend=huggingface,tokenizer={hf}")


# --------------------------------------------------------------------------- time: MC pass vs generation


class SlotWatch:
    """Samples, while a side runs, the llama.cpp server's busy slots (its /slots) and the engine's
    requests for it (`in_flight`: at the server or waiting at the engine's gate)."""

    def __init__(self, engine, interval: float = 0.1) -> None:
        self.server, self.interval = engine.server, interval
        self.samples: list[int] = []
        self.in_flight: list[int] = []
        self._task: asyncio.Task | None = None

    async def _loop(self) -> None:
        while True:
            self.in_flight.append(self.server.in_flight)
            with contextlib.suppress(Exception):
                slots = await self.server.slots()
                self.samples.append(sum(1 for s in slots if s.get("is_processing")))
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> "SlotWatch":
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else math.nan


class ResendCount(logging.Handler):
    """Counts the llama.cpp engine's "dropped a scoring request; sending it again" lines (in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "sending it again" in record.getMessage():
            self.n += 1

    def __enter__(self) -> "ResendCount":
        lg = logging.getLogger("deployments._llamacpp")
        self._level = lg.level
        lg.addHandler(self)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
        lg.propagate, self._propagate = False, lg.propagate  # counted here, not printed
        return self

    def __exit__(self, *exc: object) -> None:
        lg = logging.getLogger("deployments._llamacpp")
        lg.removeHandler(self)
        lg.setLevel(self._level)
        lg.propagate = self._propagate


async def _timing(quick: bool) -> list[Row]:
    from deployments import GenOpts, complete
    from evaluators import builtin_mc_set, score_multiple_choice

    base = builtin_mc_set()
    n = 20 if quick else ITEMS
    rounds = 1 if quick else 2
    items = (base * (n // len(base) + 1))[:n]
    opts = GenOpts(temperature=0.0, max_tokens=GEN_TOKENS)
    async with smollm2_llamacpp("bench-ll", SLOTS) as engine:
        gate = asyncio.Semaphore(SLOTS)

        async def one(prompt: str) -> None:
            async with gate:  # the engine's own gate holds it to SLOTS too; this only mirrors it
                await complete(engine, prompt, opts)

        async def mc() -> object:
            # One batch, as evalcluster scores a set: every pair is sent at once and the engine's
            # gate lets `parallel` (= SLOTS) of them reach the server, the others wait in order.
            return await score_multiple_choice(engine, items)

        async def gen() -> None:
            await asyncio.gather(*(one(it.context) for it in items))

        # Warm-up (not timed): the model's pages, the slots, both request kinds.
        await score_multiple_choice(engine, items[:4])
        await asyncio.gather(*(one(it.context) for it in items[:4]))

        sides = {"mc": mc, "gen": gen}
        times: dict[str, list[float]] = {"mc": [], "gen": []}
        watches: dict[str, list[SlotWatch]] = {"mc": [], "gen": []}
        resends: dict[str, int] = {"mc": 0, "gen": 0}
        result = None
        for r in range(rounds):
            for name in (["mc", "gen"] if r % 2 == 0 else ["gen", "mc"]):
                print(f"[loglik] round {r + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
                with ResendCount() as resent:
                    async with SlotWatch(engine) as watch:
                        t0 = time.perf_counter()
                        got = await sides[name]()
                        times[name].append(time.perf_counter() - t0)
                resends[name] += resent.n
                watches[name].append(watch)
                if name == "mc":
                    result = got
    ratios = [m / g for m, g in zip(times["mc"], times["gen"])]
    t_mc, t_gen = statistics.median(times["mc"]), statistics.median(times["gen"])

    def occupancy(name: str) -> str:
        ws = watches[name]
        return (f"busy slots peak {max(w.peak for w in ws)}, mean {statistics.fmean(w.mean for w in ws):.2f} of "
                f"{SLOTS}, engine requests in flight or waiting at its gate peak {max(max(w.in_flight) for w in ws)}")

    choices = sum(len(it.choices) for it in items)
    per_round = ", ".join(f"{x:.2f}" for x in ratios)
    return [
        Row(GROUP, f"{n}-item multiple-choice pass ({choices} choices scored)", t_mc, "s", statistics.median(ratios),
            f"the same {n} contexts generating {GEN_TOKENS} tokens (same round)",
            f"llama.cpp forced decoding, {SLOTS} slots, one batch through the engine's gate of {SLOTS}; "
            f"{occupancy('mc')}; acc {result.acc:.2f}; {rounds} rounds, rotated order, ratios {per_round}; "
            f"scoring requests llama.cpp dropped and the engine resent: {resends['mc']} in {rounds * choices}"),
        Row(GROUP, f"{n} contexts generating {GEN_TOKENS} tokens", t_gen, "s", None, "",
            f"{SLOTS} in flight, greedy; {occupancy('gen')}"),
    ]


# --------------------------------------------------------------------------- agreement: lm-eval vs evalcluster


def write_task_files(work: Path, items: list) -> Path:
    """lm-eval's task dir: the task YAML and mc.jsonl, the items as evalcluster reads them."""
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"id": it.id, "context": it.context, "choices": list(it.choices), "answer": it.answer} for it in items]
    (work / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(TASK_YAML, work / TASK_YAML.name)
    return work


def ensure_tokenizer_lib() -> None:
    """lm-eval's huggingface tokenizer backend imports transformers (the Makefile's peers rule
    installs it beside lm-eval[api], which does not bring it)."""
    import subprocess

    from bench.peers import PEERS_BIN, check_peers

    check_peers()
    if subprocess.run([str(PEERS_BIN / "python"), "-c", "import transformers"], capture_output=True).returncode:
        raise RuntimeError("bench/.venv-peers has no transformers (lm-eval's tokenizer needs it): "
                           "rm bench/.venv-peers/.installed and run `make bench` again")


def lmeval_cmd(task_dir: Path, url: str, model: str, out: Path, limit: int | None) -> list[str]:
    from bench.peers import PEERS_BIN

    args = LMEVAL_MODEL_ARGS.format(url=url, model=model, conc=LMEVAL_CONCURRENCY, hf=HF_DIR)
    cmd = [str(PEERS_BIN / "lm_eval"), "--model", "local-completions", "--model_args", args, "--tasks", TASK,
           "--include_path", str(task_dir), "--output_path", str(out), "--log_samples"]
    return cmd + (["--limit", str(limit)] if limit else [])


def lmeval_samples(out: Path) -> dict[str, dict]:
    """lm-eval's per-sample records (`--log_samples`) by item id."""
    files = sorted(out.rglob(f"samples_{TASK}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"lm-eval wrote no samples file under {out}")
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return {r["doc"]["id"]: r for r in rows}


def lmeval_metrics(out: Path) -> dict[str, float]:
    files = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"lm-eval wrote no results file under {out}")
    res = json.loads(files[-1].read_text())["results"][TASK]
    return {k.split(",")[0]: float(v) for k, v in res.items() if k.split(",")[0] in ("acc", "acc_norm", "acc_bytes")}


def compare(ours, samples: dict[str, dict]) -> dict[str, object]:
    """Item for item: the same choice picked by acc and by acc_norm, and the choices' logprobs."""
    acc_same = norm_same = 0
    max_diff = 0.0
    differ: list[str] = []
    for r in ours.items:
        s = samples.get(r.id)
        if s is None:
            differ.append(f"{r.id} (missing)")
            continue
        lls = [float(x[0]) for x in s["filtered_resps"]]
        max_diff = max([max_diff, *(abs(a - b) for a, b in zip(lls, r.logprobs))])
        same_acc = bool(s["acc"]) == r.correct
        same_norm = bool(s["acc_bytes"]) == r.correct_norm
        acc_same += same_acc
        norm_same += same_norm
        if not (same_acc and same_norm):
            differ.append(r.id)
    return {"n": len(ours.items), "acc_same": acc_same, "norm_same": norm_same, "max_diff": max_diff, "differ": differ}


@contextlib.contextmanager
def served(work: Path) -> Iterator[str]:
    """The endpoint `evalcluster serve` runs, deployed from this process on a private loopback Ray
    cluster it owns (so the replicas' gRPC binds 127.0.0.1 too); one llama.cpp replica, SLOTS slots,
    1 thread, the GGUF LoRA `ADAPTER` from adapter_dirs. Yields the endpoint's URL. The cluster is
    shut down and anything of it left is stopped by PID (processes naming its temp dir)."""
    import ray

    from bench.peers import RayHead, _free_port, _stop
    from cluster.config import ClusterConfig, NodeKind, parse_config
    from cluster.runtime import deploy_app, start_or_connect

    if ray.is_initialized():  # never deploy on, nor tear down, a cluster this process did not start here
        raise RuntimeError("bench.loglik starts a Ray cluster of its own; this process is already connected to one")
    sys.path.insert(0, str(ROOT / "tests"))
    from _adapters import SMOLLM2_DIMS, gguf_lora_for

    adapters = work / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    # Small random B (the tests' std_b is 0.1 on these modules): the adapter moves every logprob
    # but leaves the model able to answer, so its accuracy is not at chance by construction.
    gguf_lora_for(SMOLLM2_DIMS, adapters / ADAPTER, seed=41, std_b=0.02, modules=("q_proj", "v_proj", "o_proj"))
    temp_dir = tempfile.mkdtemp(prefix="rayll-", dir="/tmp")  # short: socket paths must fit 107 bytes
    cfg = parse_config({
        "cluster": {"address": "local", "dashboard": False, "serve": {"host": "127.0.0.1", "port": _free_port()}},
        "models": [{"name": MODEL, "engine": "llamacpp", "path": str(GGUF), "resources": {"llamacpp": 1},
                    "max_adapters_per_replica": 1, "adapter_dirs": [str(adapters)],
                    "max_ongoing_requests": 64, "max_queued_requests": -1,
                    "options": {"parallel": SLOTS, "ctx_size": 1024, "threads": 1,
                                "log_dir": str(work / "llama-logs")}}],
        "staging": {"cache_dir": str(work / "cache")},
    }, "bench")
    rt = None
    try:
        rt = start_or_connect(ClusterConfig(address="local", dashboard=False, num_cpus=4, temp_dir=temp_dir,
                                            node_kinds={"b": NodeKind(resources={"llamacpp": 2})},
                                            local_node_kind="b"), address="local", log_to_driver=False)
        url, n_adapters = deploy_app(cfg)
        if n_adapters != 1:
            raise RuntimeError(f"expected 1 adapter registered from {adapters}, got {n_adapters}")
        yield url
    finally:
        if rt is not None and rt.owned:
            with contextlib.suppress(Exception):
                from ray import serve

                # The apps one by one (their replicas close their engines and llama.cpp servers); the
                # controller goes with the cluster (serve.shutdown() kills it while its long polls are
                # pending, and Ray prints a "(raylet) Task ServeController... failed" line per poll).
                for app in list(serve.status().applications):
                    serve.delete(app)
            with contextlib.suppress(Exception):
                rt.shutdown()
        if ray.is_initialized():
            ray.shutdown()
        _stop(RayHead("", temp_dir).pids())  # anything of it still running, by PID
        shutil.rmtree(temp_dir, ignore_errors=True)


async def _resent(fn, attempts: int = 3):
    """`await fn()`, again when the engine gave up on a request (EngineUnavailable: llama.cpp
    dropped one scoring request on each of the engine's own tries). Scoring is deterministic and
    changes nothing, so a repeated pass gives the same figures. Returns (result, passes repeated)."""
    from deployments import EngineUnavailable

    for k in range(attempts):
        try:
            return await fn(), k
        except EngineUnavailable as e:
            if k == attempts - 1:
                raise
            print(f"[loglik] a pass failed ({str(e).splitlines()[0][:160]}); running it again", file=sys.stderr,
                  flush=True)
    raise AssertionError("unreachable")


def agreement(quick: bool) -> list[Row]:
    """lm-eval local-completions vs evalcluster's scorer on the same endpoint, base and adapter."""
    from bench.peers import LMEVAL_ENV, run_tool
    from cluster.runtime import prepare_env
    from evaluators import builtin_mc_set, score_multiple_choice

    ensure_tokenizer_lib()  # the peers' venv, lm-eval and its tokenizer's library
    items = builtin_mc_set()
    limit = 20 if quick else None
    if limit:
        items = items[:limit]
    prepare_env(owned=True)
    work = Path(tempfile.mkdtemp(prefix="bench-loglik-"))
    rows: list[Row] = []
    try:
        task_dir = write_task_files(work / "lmeval", items)
        with served(work) as url:
            from deployments import ServeTextModel

            client = ServeTextModel(MODEL)

            async def ours(adapter: str | None):
                t0 = time.perf_counter()
                res, again = await _resent(lambda: score_multiple_choice(client, items, adapter=adapter))
                return res, again, time.perf_counter() - t0

            for adapter in (None, ADAPTER):
                target = f"{MODEL}:{adapter}" if adapter else MODEL
                print(f"[loglik] agreement: {target}: evalcluster score_multiple_choice ...", file=sys.stderr, flush=True)
                mine, again, t_mine = asyncio.run(ours(adapter))
                print(f"[loglik] agreement: {target}: lm-eval local-completions ...", file=sys.stderr, flush=True)
                tag = target.replace(":", "_")
                out, log = work / f"out-{tag}", work / f"lmeval-{tag}.log"
                try:
                    t_lm = run_tool("lm-eval", lmeval_cmd(task_dir, url, target, out, limit), log, LMEVAL_ENV,
                                    cwd=task_dir)
                    metrics, samples = lmeval_metrics(out), lmeval_samples(out)
                except RuntimeError as e:  # one failed target must not lose the other's row
                    rows.append(Row(GROUP, f"lm-eval local-completions acc, {target} ({len(items)} mc-basic items)",
                                    math.nan, "acc", None, f"evalcluster score_multiple_choice acc {mine.acc:.3f}",
                                    f"FAILED: {str(e).splitlines()[0][:300]}"))
                    continue
                retried = len(re.findall(r"API request failed! Status code: (?:5\d\d)", log.read_text(errors="replace")))
                c = compare(mine, samples)
                item_note = (f"equal item for item ({c['n']}/{c['n']}: same acc and acc_norm outcome)"
                             if not c["differ"] else
                             f"NOT equal item for item: acc same on {c['acc_same']}/{c['n']}, acc_norm on "
                             f"{c['norm_same']}/{c['n']}; differ: {', '.join(c['differ'][:8])}")
                chance = "" if min(mine.acc, metrics["acc"]) > CHANCE else " AT OR BELOW CHANCE"
                notes = [
                    f"acc_norm: lm-eval {metrics['acc_norm']:.3f} (per char), acc_bytes {metrics['acc_bytes']:.3f} "
                    f"(per byte), evalcluster acc_norm {mine.acc_norm:.3f} (per byte)",
                    item_note,
                    f"choices' logprobs max |diff| {c['max_diff']:.2g}",
                    f"chance {CHANCE}{chance}",
                    f"lm-eval: its default token-id requests, HF tokenizer, {LMEVAL_CONCURRENCY} in flight, whole process "
                    f"{t_lm:.0f} s" + (f", {retried} requests resent after a 5xx" if retried else ""),
                    f"evalcluster: Serve client, one batch, {t_mine:.1f} s"
                    + (f" (pass run {again + 1} times: the engine gave up on a dropped request)" if again else ""),
                    f"one llama.cpp replica, {SLOTS} slots, 1 thread",
                ]
                rows.append(Row(GROUP, f"lm-eval local-completions acc, {target} ({len(items)} mc-basic items)",
                                metrics["acc"], "acc", metrics["acc"] / mine.acc if mine.acc else None,
                                f"evalcluster score_multiple_choice acc {mine.acc:.3f}, same Serve deployment",
                                "; ".join(notes)))
    finally:
        drop_work_dir(work, GROUP)
    return rows


# --------------------------------------------------------------------------- run


def run(quick: bool = False) -> list[Row]:
    rows = asyncio.run(_timing(quick))
    return rows + agreement(quick)


if __name__ == "__main__":
    from bench._common import table

    print(table(run("--quick" in sys.argv)))
