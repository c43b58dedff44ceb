"""Concurrency budgets shared by every job on the cluster: one named actor, leases by key.

Keys are "gen:<model>" (generation requests per endpoint), "judge:<model>" (judge calls, a
budget apart) and "checkpoints" (checkpoints evaluated at once). One place owns each limit: a
model endpoint's is its served definition's `max_ongoing_requests x replicas` (the registry's
model table: `configure_budgets`), so no job can raise it by asking; "checkpoints" is set by the
first job and kept. A job's own `budgets.*` are its share within them (`job_shares`, held with
the cluster's lease: `AllOf`). A holder that dies without releasing (a killed coordinator) is
retired by its next life (`retire`): its leases come back, and the acquires it left waiting are
dropped rather than granted to nobody later.

The actor runs on the state node and keeps its limits in a file there: restarted by Ray, it comes
back with them (the leases of its earlier life are gone with it; lease ids never repeat, so a
release of an old lease cannot free a new one).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from checkpoints import replacing

if TYPE_CHECKING:
    from cluster.config import AppConfig

BUDGETS_NAME = "evalcluster-budgets"


class Budgets:
    """The actor's state. Async methods: a waiting `acquire` never blocks the others.

    Args:
        state_file: where the limits are kept (None: not kept; the actor keeps them in its node's
            Ray session directory, see `budgets_actor`).
    """

    def __init__(self, state_file: str | None = None) -> None:
        self._state_file = Path(state_file) if state_file else None
        self._limits: dict[str, int] = {}
        if self._state_file is not None and self._state_file.exists():
            self._limits = {k: int(v) for k, v in json.loads(self._state_file.read_text()).items()}
        self._held: dict[str, dict[int, str]] = {}
        self._waiting: dict[str, deque[asyncio.Future]] = {}
        self._lease_key: dict[int, str] = {}
        self._ids = itertools.count(time.time_ns())  # unique across the actor's lives
        self._waiter_holder: dict[asyncio.Future, str] = {}
        self._holders: set[str] = set()   # every holder that asked
        self._retired: set[str] = set()   # holders that are gone: nothing is granted to them

    async def configure(self, limits: dict[str, int]) -> dict[str, int]:
        """Set the limits of keys that have none yet (the first job decides; a later job's ask
        changes nothing). Returns every limit in force."""
        return self._set({k: v for k, v in limits.items() if k not in self._limits})

    async def set_limits(self, limits: dict[str, int]) -> dict[str, int]:
        """Set limits as their owner (a model endpoint's from its served definition). Returns every
        limit in force."""
        return self._set(limits)

    def _set(self, limits: dict[str, int]) -> dict[str, int]:
        for key, limit in limits.items():
            if limit < 1:
                raise ValueError(f"budget {key!r} must be >= 1, got {limit}")
        for key, limit in limits.items():
            self._limits[key] = limit
            self._wake(key)
        if limits and self._state_file is not None:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            with replacing(self._state_file) as tmp:
                tmp.write_text(json.dumps(self._limits))
        return dict(self._limits)

    async def acquire(self, key: str, holder: str) -> int:
        """Wait for a free place under `key`'s limit; returns a lease id."""
        if key not in self._limits:
            raise KeyError(f"no budget configured for {key!r}")
        if holder in self._retired:
            raise HolderRetired(f"budget holder {holder!r} was retired (a later life of it took over)")
        self._holders.add(holder)
        held = self._held.setdefault(key, {})
        if len(held) >= self._limits[key] or self._waiting.get(key):
            fut = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(key, deque()).append(fut)
            self._waiter_holder[fut] = holder
            try:
                await fut
            except asyncio.CancelledError:
                if fut in self._waiting.get(key, ()):
                    self._waiting[key].remove(fut)
                raise
            finally:
                self._waiter_holder.pop(fut, None)
        lease = next(self._ids)
        held[lease] = holder
        self._lease_key[lease] = key
        self._wake(key)
        return lease

    async def release(self, lease: int) -> None:
        key = self._lease_key.pop(lease, None)
        if key is not None:
            self._held[key].pop(lease, None)
            self._wake(key)

    async def release_holder(self, holder: str) -> int:
        """Return every lease of a holder (e.g. a restarted actor's previous life)."""
        n = 0
        for key, held in self._held.items():
            for lease in [lease for lease, h in held.items() if h == holder]:
                del held[lease]
                self._lease_key.pop(lease, None)
                n += 1
            self._wake(key)
        return n

    async def retire(self, prefix: str, keep: str) -> int:
        """Retire every holder named `prefix...` but `keep`: the earlier lives of a restarted actor.

        Their leases are returned and their waiting acquires cancelled. Returning the leases alone
        is not enough: a dead life's acquire still waiting here would be granted later, to a
        holder that never releases, and that place would be lost for good.

        Args:
            prefix: the actor's name (its lives are "<name>:<life>").
            keep: the current life, which keeps its leases.

        Returns:
            how many leases were returned.
        """
        gone = {h for h in self._holders if h.startswith(prefix) and h != keep}
        self._retired |= gone
        self._holders -= gone
        for fut, h in list(self._waiter_holder.items()):
            if h in gone and not fut.done():
                fut.cancel()  # its acquire removes it from the queue and ends
        n = 0
        for h in gone:
            n += await self.release_holder(h)
        return n

    async def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: {"limit": v, "held": len(self._held.get(k, {})), "waiting": len(self._waiting.get(k, ()))}
                for k, v in self._limits.items()}

    def _wake(self, key: str) -> None:
        waiting = self._waiting.get(key)
        free = self._limits.get(key, 0) - len(self._held.get(key, {}))
        while waiting and free > 0:
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1


class HolderRetired(RuntimeError):
    """An acquire by a holder that a later life of the same actor has retired."""


def budgets_actor(cfg: AppConfig) -> Any:
    """The cluster's budgets actor, on the state node (created on first use, outlives the job).

    Args:
        cfg: the app config (its cluster section places the actor).
    """
    from cluster.runtime import job_actor, state_placement

    # A call a crash cut off is made again on the next life: a retried acquire is granted by it,
    # a retried release of a lease it never knew does nothing.
    return job_actor(_ClusterBudgets, BUDGETS_NAME, state_placement(cfg.cluster), lifetime="detached",
                     max_concurrency=10_000, max_task_retries=3)


class _ClusterBudgets(Budgets):
    """The actor: its limits in its own node's Ray session directory (which lives as long as the
    cluster, as the detached actor does), so a restart on the state node finds them."""

    def __init__(self) -> None:
        from deployments import ray_session_dir

        super().__init__(str(ray_session_dir() / "evalcluster" / "budgets.json"))


def job_shares(cfg: AppConfig) -> dict[str, int]:
    """A job's own share of each budget (its `budgets` section): what it may hold at once."""
    limits = {f"gen:{m.name}": cfg.budgets.per_endpoint for m in cfg.models}
    if cfg.judge.model:
        limits[f"judge:{cfg.judge.model}"] = cfg.budgets.judge
    limits["checkpoints"] = cfg.budgets.checkpoints
    return limits


def configure_budgets(cfg: AppConfig) -> dict[str, int]:
    """Set the cluster's limits for the config's models from the definitions being served (the
    registry's model table), and "checkpoints" if no job set it yet. Returns the limits in force.

    Args:
        cfg: the app config (its models must be deployed: `deploy_app`).
    """
    import ray

    from cluster.runtime import state_placement
    from deployments import registry

    claims = {c.name: c for c in ray.get(registry(state_placement(cfg.cluster)).models.remote())}
    owned = {f"gen:{m.name}": claims[m.name].generation_limit for m in cfg.models if m.name in claims}
    if cfg.judge.model and cfg.judge.model in claims:
        owned[f"judge:{cfg.judge.model}"] = claims[cfg.judge.model].generation_limit
    actor = budgets_actor(cfg)
    ray.get(actor.set_limits.remote(owned))
    return ray.get(actor.configure.remote({"checkpoints": cfg.budgets.checkpoints}))


class AllOf:
    """`async with` every limiter in order (released in reverse): a job's share and the cluster's.

    Args:
        limiters: async context managers (asyncio.Semaphore, BudgetLimiter ...).
    """

    def __init__(self, *limiters: Any) -> None:
        self.limiters = limiters

    async def __aenter__(self) -> "AllOf":
        entered = []
        try:
            for limiter in self.limiters:
                await limiter.__aenter__()
                entered.append(limiter)
        except BaseException:
            for limiter in reversed(entered):
                await limiter.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for limiter in reversed(self.limiters):
            await limiter.__aexit__(*exc)

    def observe(self, latency_s: float, tokens: int, ok: bool = True) -> None:
        """Pass a request's outcome to the limiters that learn from it (`AdaptiveLimit`)."""
        for limiter in self.limiters:
            observe = getattr(limiter, "observe", None)
            if observe is not None:
                observe(latency_s, tokens, ok)


class BudgetLimiter:
    """`async with limiter:` holds one place of a budget; usable wherever the runner takes a limiter.

    Args:
        actor: the budgets actor.
        key: e.g. "gen:smollm2".
        holder: who holds it (released all at once if the holder restarts).
    """

    def __init__(self, actor: Any, key: str, holder: str) -> None:
        self.actor, self.key, self.holder = actor, key, holder
        self._leases: list[int] = []

    async def __aenter__(self) -> "BudgetLimiter":
        ref = self.actor.acquire.remote(self.key, self.holder)
        try:
            lease = await asyncio.shield(ref)
        except asyncio.CancelledError:
            # The grant may still arrive after we gave up waiting: hand it straight back.
            async def give_back() -> None:
                try:
                    await self.actor.release.remote(await ref)
                except Exception:  # noqa: BLE001 - nothing left to release
                    pass

            asyncio.ensure_future(give_back())
            raise
        self._leases.append(lease)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        lease = self._leases.pop()
        await self.actor.release.remote(lease)
