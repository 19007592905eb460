"""Process-wide settings, read once from the environment and validated at start.

Every setting has an environment variable named ``RAYREC_<FIELD>`` (upper case). Secrets have no
default: the admin token must be given, or the routes that need it refuse every call.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

_NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,31}$")
_ENV_PREFIX = "RAYREC_"

MIN_RATE_LIMIT_BURST = 1_000
"""Smallest allowed burst: the largest event batch (``POST /api/events/batch``) must fit in it."""


class SettingsError(ValueError):
    """Raised when the environment holds an invalid setting; the message names the variable."""


class Settings(BaseModel):
    """Validated runtime settings shared by every process of one deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: Annotated[str, Field(min_length=1)] = "redis://127.0.0.1:6379/0"
    """Where the online store lives (``redis://`` or ``rediss://`` URL)."""

    home: Annotated[str, Field(min_length=1)] = "./var"
    """Data home: a local path or a pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://…``).

    Holds the lake (``lake/``) and the model registry (``artifacts/``)."""

    namespace: str = "rayrec"
    """Prefix of every Redis key, so several deployments (or test runs) can share one server."""

    admin_token: SecretStr | None = None
    """Bearer token for admin and catalog-write routes. Unset means those routes answer 503."""

    client_api_keys: tuple[str, ...] = ()
    """Optional per-client API keys for client routes; empty means client routes are open."""

    redis_pool_size: Annotated[int, Field(ge=1, le=1024)] = 64
    """Maximum connections in each process's Redis pool."""

    redis_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    """Socket timeout for Redis calls; a hung server must not hang the request path."""

    stream_max_len: Annotated[int, Field(ge=1000)] = 2_000_000
    """Event stream capacity: beyond this many un-trimmed entries the event API answers 503."""

    processed_ttl_s: Annotated[int, Field(ge=60, le=30 * 86_400)] = 3_600
    """Lifetime of a processed-event marker: an event id seen again within it is not folded again.

    It must exceed the longest time an applied entry can wait to be acknowledged (a processor
    restarts and rereads its own pending entries at once; a dead one's are claimed after 60 s)
    and the window in which clients retry an event. Markers live in one set per feature
    partition and minute of event time, and each write to a set starts its TTL again, so a
    marker lives at least this long. They cost Redis memory: about 72 bytes each (ids of about
    20 characters), one per event per feature partition, so ``events/s x 2 x TTL x 72`` bytes
    (0.5 GB at 1,000 events/s for the default hour)."""

    rate_limit_events_per_s: Annotated[float, Field(ge=0, le=1_000_000)] = 0.0
    """Events per second each client may send to the event routes, sustained; 0 disables the limit.

    A client is its ``X-API-Key`` when client keys are configured, else its address. The buckets
    live in Redis, so the limit holds across every ingress replica together."""

    rate_limit_events_burst: Annotated[int, Field(ge=MIN_RATE_LIMIT_BURST, le=10_000_000)] = 2_000
    """Events a client may send at once before the sustained rate applies (the bucket's size).

    At least 1,000, the largest batch the API accepts, so that every valid batch can pass."""

    rate_limit_trusted_proxies: Annotated[int, Field(ge=0, le=8)] = 0
    """Proxies in front of the ingress that append to ``X-Forwarded-For``; the client's address is
    read that many entries from the right. 0 uses the connection's address and ignores the header,
    which a client could otherwise forge to get a fresh bucket per request."""

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not _NAMESPACE_RE.match(value):
            raise ValueError(
                "must be 1-32 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
            )
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``RAYREC_*`` variables, then explicit overrides.

        Args:
            environ: Environment to read; ``os.environ`` when omitted.
            **overrides: Field values that win over the environment.

        Returns:
            The validated settings.

        Raises:
            SettingsError: A variable is unknown or holds an invalid value; the message names it.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        known = set(cls.model_fields)
        for key, raw in env.items():
            if not key.startswith(_ENV_PREFIX):
                continue
            field = key[len(_ENV_PREFIX) :].lower()
            if field not in known:
                # RAYREC_* variables that are not settings (e.g. RAYREC_SMOKE) are other tools' business.
                continue
            if field == "client_api_keys":
                values[field] = tuple(k.strip() for k in raw.split(",") if k.strip())
            else:
                values[field] = raw
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_ENV_PREFIX}{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                for err in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from exc

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed, validated like the original (``model_copy`` is not).

        Raises:
            SettingsError: A changed value is invalid.
        """
        values: dict[str, object] = {name: getattr(self, name) for name in type(self).model_fields}
        values.update(changes)
        try:
            return type(self).model_validate(values)
        except ValidationError as exc:
            raise SettingsError(f"invalid settings: {exc}") from exc

    def admin_token_value(self) -> str | None:
        """The admin token in clear, for comparison at the boundary only."""
        return None if self.admin_token is None else self.admin_token.get_secret_value()
