"""The `sinks` config section: the ledger's path, the spool, and InfluxDB."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from checkpoints import ConfigError, StrictModel, split_url_credentials


class InfluxConfig(StrictModel):
    url: str | None = None
    protocol: Literal["auto", "v1", "v2"] = "auto"
    org: str | None = None
    bucket: str | None = None
    database: str | None = "training"
    retention_policy: str | None = None
    token_env: str | None = "INFLUX_TOKEN"
    token_file: Path | None = None
    timestamps: Literal["iteration", "wallclock"] = "iteration"
    batch_size: int = Field(500, ge=1)
    flush_interval_ms: int = Field(1000, ge=10)
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(10, gt=0)
    # Backoff between retries of one batch (doubling, with jitter, capped), and between probes of a
    # server that stopped answering (points wait in the spool meanwhile).
    retry_interval_ms: int = Field(1000, ge=1)
    max_retry_delay_ms: int = Field(30000, ge=1)

    @field_validator("url")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def endpoint(self) -> str:
        """`url` without the credentials it may embed (`http://user:pass@host`): the address every
        request goes to and every message shows. The credentials go as basic auth (`token()`)."""
        return split_url_credentials(self.url)[0].rstrip("/") if self.url else ""

    def token(self) -> SecretStr | None:
        """The token, from the env var or the file, else the URL's `user:password`; never logged
        (SecretStr)."""
        if self.token_env and os.environ.get(self.token_env):
            return SecretStr(os.environ[self.token_env].strip())
        if self.token_file:
            try:
                return SecretStr(self.token_file.expanduser().read_text().strip())
            except OSError as e:
                raise ConfigError(f"sinks.influx.token_file: cannot read {self.token_file}: {e.strerror}") from None
        _, user, password = split_url_credentials(self.url or "")
        if user:  # user:password as the token: the transport sends it as basic auth
            return SecretStr(f"{user}:{password}")
        return None


class SinksConfig(StrictModel):
    ledger: Path = Path(".evalcluster/ledger.sqlite")
    # Every point goes to this fsync'd spool first and leaves it when InfluxDB acknowledges it.
    spool_dir: Path = Path(".evalcluster/spool")
    # At the limit a write raises SpoolFull (nothing is dropped silently); a warning comes at 80 %.
    spool_max_bytes: int = Field(512 * 2**20, ge=1024)
    influx: InfluxConfig = Field(default_factory=InfluxConfig)
