"""The error every adapter check raises: a file that is missing, corrupt or does not fit the base."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter is missing, corrupt or does not fit the base model. Names the file.

    Defined here, below the engines, because reading, converting and validating adapters is
    checkpoints' work; `deployments` re-exports it, and its engines raise it for an adapter they
    refuse. It is a ValueError (bad input), not an EngineError: callers that tell the two apart
    (the HTTP ingress answers 404 for it) test for it first.

    Args:
        path: the file or directory at fault.
        why: what is wrong with it.
    """

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"adapter {path}: {why}")
        self.path, self.why = path, why

    def __reduce__(self) -> tuple:  # errors cross process boundaries (Ray): keep them picklable
        return (type(self), (self.path, self.why))


class StagingDeferred(RuntimeError):
    """A staged checkpoint could not be made ready for a reason that is not its own (the adapter
    registry restarting, a Ray call timing out). `stage_pending` counts it as a failure and retries
    it after a backoff, like an unreachable source; it never quarantines the checkpoint at once."""
