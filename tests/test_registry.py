"""Many jobs on one cluster, the shared state: the registry's model table (claims, conflicts,
refcounts, jobs that are gone), the budgets (limits owned by the served definition, kept across a
restart), and a ledger held by one job at a time. On the session Ray cluster, with a second real
driver (another Ray job) started and killed by PID."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _servers import wait_until

pytestmark = pytest.mark.ray

DRIVER = """
import sys
import ray
ray.init(address=sys.argv[1], namespace="evalcluster", logging_level="ERROR")
print(ray.get_runtime_context().get_job_id(), flush=True)
sys.stdin.read()
"""


class OtherJob:
    """A second Ray job: a driver process connected to the session cluster until `end()`."""

    def __init__(self, address: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, address], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.id = self.proc.stdout.readline().strip()
        assert len(self.id) == 8, f"the second driver did not start: {self.id!r}"

    def end(self) -> None:
        from deployments import running_job_ids

        self.proc.kill()
        self.proc.wait(30)
        wait_until(lambda: self.id not in running_job_ids(), 60, f"job {self.id} seen as ended")


@pytest.fixture
def other_job(ray_cluster):
    job = OtherJob(ray_cluster.address)
    yield job
    if job.proc.poll() is None:
        job.end()


def restart(actor) -> None:
    """Kill an actor's process as a crash would and wait for Ray to bring up its next life."""
    import ray

    def pid() -> int:
        return ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()), timeout=60)

    before = pid()
    ray.kill(actor, no_restart=False)
    wait_until(lambda: pid() != before, 60, "the actor restarted")


def _model(path: Path, **over):
    from cluster.config import parse_config

    m = {"name": "smollm2", "engine": "llamacpp", "path": str(path), "max_ongoing_requests": 6, "replicas": 2,
         "options": {"parallel": 2, "ctx_size": 2048}, **over}
    return parse_config({"models": [m]}, "registry-test").models[0]


def _registry(tmp_path: Path):
    """A registry actor of its own (its own disk root), restartable like the cluster's."""
    import ray

    from deployments._registry import AdapterRegistry

    return ray.remote(AdapterRegistry).options(max_restarts=-1, max_task_retries=3, num_cpus=0).remote(
        str(tmp_path / "registry"))


def test_identical_definitions_share_a_model_and_a_different_one_is_refused(ray_cluster, other_job, tmp_path,
                                                                             smollm2_gguf):
    import ray

    from cluster.runtime import current_job_id
    from deployments import ModelClaimError, model_definition

    me = current_job_id()
    reg = _registry(tmp_path)
    m = _model(smollm2_gguf)
    claim, first = ray.get(reg.claim_model.remote(me, "smollm2", model_definition(m), m.model_dump(mode="json")))
    assert first and claim.jobs == [me]
    assert claim.generation_limit == 12  # max_ongoing_requests x replicas of the definition served
    # The other job defines it identically (the same weights and options, another replica count): shared.
    same = _model(smollm2_gguf, replicas=5)
    claim, first = ray.get(reg.claim_model.remote(other_job.id, "smollm2", model_definition(same),
                                                  same.model_dump(mode="json")))
    assert not first and claim.jobs == [me, other_job.id]
    assert claim.generation_limit == 12, "the served definition's limit, not the later job's ask"

    # Other weights under the same name: refused in one line naming the model, the job and the fields.
    copy = tmp_path / "other.gguf"
    shutil.copyfile(smollm2_gguf, copy)
    other = _model(copy)
    with pytest.raises(ModelClaimError) as err:
        ray.get(reg.claim_model.remote("0badf00d", "smollm2", model_definition(other), {}))
    msg = str(err.value.cause if hasattr(err.value, "cause") else err.value)
    line = msg.strip().splitlines()[-1]
    assert "'smollm2'" in line and me in line and "path" in line and "mtime" in line, line
    tweaked = _model(smollm2_gguf, options={"parallel": 2, "ctx_size": 4096})
    with pytest.raises(ModelClaimError, match="differs in: options"):
        ray.get(reg.claim_model.remote("0badf00d", "smollm2", model_definition(tweaked), {}))
    assert [c.jobs for c in ray.get(reg.models.remote())] == [[me, other_job.id]], "the refusal changed nothing"

    # Refcounted by job: the model is unused only when the last job gives it back.
    assert ray.get(reg.release_models.remote(me)) == []
    assert ray.get(reg.release_models.remote(other_job.id)) == ["smollm2"]
    # Unused, it may be defined anew.
    claim, first = ray.get(reg.claim_model.remote(me, "smollm2", model_definition(other), {}))
    assert first and claim.definition["path"] == str(copy)


def test_a_job_that_is_gone_is_dropped_and_the_table_survives_a_restart(ray_cluster, other_job, tmp_path,
                                                                        smollm2_gguf):
    import ray

    from cluster.runtime import current_job_id
    from deployments import DETACHED, model_definition

    me = current_job_id()
    reg = _registry(tmp_path)
    m = _model(smollm2_gguf)
    d = model_definition(m)
    ray.get(reg.claim_model.remote(other_job.id, "smollm2", d, m.model_dump(mode="json")))
    ray.get(reg.claim_model.remote(DETACHED, "smollm2", d, {}))
    restart(reg)  # a crash: Ray brings the registry back, and its table with it
    assert [c.jobs for c in ray.get(reg.models.remote())] == [[other_job.id, DETACHED]]

    other_job.end()  # ended without giving its claims back (a crash, `ray job stop`)
    claim, first = ray.get(reg.claim_model.remote(me, "smollm2", d, {}))
    assert claim.jobs == [DETACHED, me], "the ended job is dropped; `serve --detach` never is"
    assert not first
    assert ray.get(reg.release_models.remote(me)) == [], "still claimed by serve --detach"


def test_budget_limits_belong_to_the_served_definition_and_survive_a_restart(ray_cluster, tmp_path):
    import ray

    from cluster._budgets import AllOf, Budgets, BudgetLimiter

    actor = ray.remote(Budgets).options(max_restarts=-1, max_task_retries=3, max_concurrency=100).remote(
        str(tmp_path / "budgets.json"))
    assert ray.get(actor.set_limits.remote({"gen:smollm2": 3})) == {"gen:smollm2": 3}
    # A job asking for more (or less) through configure changes nothing it did not set first.
    assert ray.get(actor.configure.remote({"gen:smollm2": 50, "checkpoints": 2})) == {"gen:smollm2": 3,
                                                                                        "checkpoints": 2}
    assert ray.get(actor.configure.remote({"checkpoints": 9}))["checkpoints"] == 2
    with pytest.raises(ValueError, match="'gen:x' must be >= 1"):
        ray.get(actor.set_limits.remote({"gen:x": 0}))

    restart(actor)  # restarted, it has its limits: acquire works without a configure
    lease = ray.get(actor.acquire.remote("gen:smollm2", "h"), timeout=60)
    assert ray.get(actor.snapshot.remote())["gen:smollm2"] == {"limit": 3, "held": 1, "waiting": 0}
    ray.get(actor.release.remote(lease))

    import asyncio

    async def many() -> int:
        """Five tasks of a job whose share is 2, under a cluster limit of 3: at most 2 at once."""
        share = asyncio.Semaphore(2)
        limiter = BudgetLimiter(actor, "gen:smollm2", "h")
        now = peak = 0

        async def one() -> None:
            nonlocal now, peak
            async with AllOf(share, limiter):
                now += 1
                peak = max(peak, now)
                assert (await actor.snapshot.remote())["gen:smollm2"]["held"] <= 2  # the cluster's count
                await asyncio.sleep(0.2)
                now -= 1

        await asyncio.gather(*(one() for _ in range(5)))
        return peak

    assert asyncio.run(many()) == 2
    assert ray.get(actor.snapshot.remote())["gen:smollm2"]["held"] == 0


def test_a_ledger_is_held_by_one_running_job(ray_cluster, other_job, tmp_path):
    from checkpoints import Ledger, LedgerLocked
    from cluster.runtime import current_job_id, ray_job_running

    me = current_job_id()
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.lock_for_job(other_job.id, ray_job_running)
        ledger.lock_for_job(other_job.id, ray_job_running)  # the same job again (a restarted writer): kept
        with pytest.raises(LedgerLocked) as err:
            ledger.lock_for_job(me, ray_job_running)
        msg = str(err.value)
        assert str(path) in msg and other_job.id in msg and "\n" not in msg, msg
        assert ledger.job_holding() == other_job.id
        other_job.end()  # a holder that is gone without letting go is taken over
        ledger.lock_for_job(me, ray_job_running)
        assert ledger.job_holding() == me
        ledger.unlock_job("not-me")
        assert ledger.job_holding() == me
        ledger.unlock_job(me)
        assert ledger.job_holding() is None
