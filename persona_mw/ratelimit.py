"""Per-tenant request rate limits of the HTTP server (``server.rate_limit``, ``server.tenant_rate_limits``).

One token bucket per tenant (the API key's tenant; ``"default"`` on an open server): it holds up
to ``burst`` tokens and refills at ``requests_per_s``. A request takes one token plus one for each
full ``bytes_per_token`` of its ``Content-Length`` (default 64 KiB: an ordinary request costs 1, an
84 KB body 2, a 165 KB body 3; ``bytes_per_token: null`` = every request costs 1), capped at
``burst`` so any single request can eventually pass.
The check runs before the body is read or parsed: a refused request costs the server almost
nothing and gets a 429 with ``Retry-After`` (whole seconds, at least 1). One tenant's bucket never
touches another's, so a tenant sending flat out only uses up its own share.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

__all__ = ["DEFAULT_TENANT", "RateLimiter", "TokenBucket"]

DEFAULT_TENANT = "default"


class TokenBucket:
    """``burst`` tokens at most, ``rate`` tokens a second; starts full."""

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: 0.0 if granted, else the seconds until they would be there."""
        cost = min(float(cost), self.burst)
        with self._lock:
            now = self._clock()
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
            self._at = now
            if self.tokens >= cost:
                self.tokens -= cost
                return 0.0
            return (cost - self.tokens) / self.rate


class RateLimiter:
    """The buckets of all tenants, from a ``ServerConfig`` (``rate_limit`` + ``tenant_rate_limits``)."""

    def __init__(self, default: Any, overrides: dict[str, Any] | None = None) -> None:
        self.default = default
        self.overrides = dict(overrides or {})
        self._buckets: dict[str, TokenBucket | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, server_cfg: Any) -> RateLimiter | None:
        default = getattr(server_cfg, "rate_limit", None)
        overrides = getattr(server_cfg, "tenant_rate_limits", None) or {}
        if default is None and not any(v is not None for v in overrides.values()):
            return None
        return cls(default, overrides)

    def limit_of(self, tenant: str) -> Any:
        return self.overrides[tenant] if tenant in self.overrides else self.default

    def _bucket(self, tenant: str) -> TokenBucket | None:
        with self._lock:
            if tenant not in self._buckets:
                lim = self.limit_of(tenant)
                self._buckets[tenant] = None if lim is None else TokenBucket(lim.requests_per_s, lim.burst)
            return self._buckets[tenant]

    def cost(self, tenant: str, content_length: int) -> float:
        lim = self.limit_of(tenant)
        per = getattr(lim, "bytes_per_token", None)
        return 1.0 + (max(0, content_length) // per if per else 0)

    def check(self, tenant: str, content_length: int = 0) -> int | None:
        """None if ``tenant`` may go on; else the whole seconds (>= 1) to put in ``Retry-After``."""
        bucket = self._bucket(tenant)
        if bucket is None:
            return None
        wait = bucket.take(self.cost(tenant, content_length))
        return None if wait <= 0 else max(1, math.ceil(wait))
