"""API keys -> tenants, and one store per tenant, for ``persona-mw serve``.

Isolation is structural: each tenant gets its own ``Middleware`` over its own SQLite file
(``persona.db`` -> ``persona.tenant-acme.db``) sharing the backend, so no query, trace lookup,
export or forget can reach another tenant's users: the rows are not in the file it opened.
(Prefixing user ids instead would leave isolation to every query in every plugin.)
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ApiKeys", "Tenants", "hash_key", "tenant_store_path"]


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Hashed keys (``{tenant: ["sha256:<hex>", ...]}``) checked in constant time."""

    def __init__(self, keys: dict[str, list[str]]) -> None:
        self._hashes = [(h if h.startswith("sha256:") else hash_key(h), tenant)
                        for tenant, hs in keys.items() for h in hs]

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def tenant_of(self, key: str) -> str | None:
        """The tenant owning ``key``, or None; compares against every hash so timing says nothing."""
        digest = hash_key(key)
        found = None
        for stored, tenant in self._hashes:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found


def tenant_store_path(base: str, tenant: str) -> str:
    """The tenant's SQLite file beside the base one; ``:memory:`` stays in memory (one per open). A
    Postgres URL with ``#schema=S`` (or none: the default schema) names the schema ``S.tenant-<id>``,
    as the store's ``for_tenant`` does."""
    if base == ":memory:":
        return base
    if base.startswith(("postgresql://", "postgres://")) and "/" not in base.partition("#")[2]:
        from urllib.parse import parse_qsl, urlencode

        dsn, _, frag = base.partition("#")
        opts = dict(parse_qsl(frag, keep_blank_values=True))
        opts["schema"] = f"{opts.get('schema') or 'persona_mw'}.tenant-{tenant}"
        return f"{dsn}#{urlencode(opts, safe='.-_')}"
    p = Path(base)
    return str(p.with_name(f"{p.stem}.tenant-{tenant}{p.suffix or '.db'}"))


class Tenants:
    """Builds (lazily) and owns one ``Middleware`` per tenant, all sharing ``base``'s backend."""

    def __init__(self, base: Any, keys: ApiKeys) -> None:
        self.base = base
        self.keys = keys
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def middleware(self, tenant: str) -> Any:
        with self._lock:
            mw = self._made.get(tenant)
            if mw is None:
                mw = self._made[tenant] = self._build(tenant)
            return mw

    def _build(self, tenant: str) -> Any:
        # Its own store from the base store's ``for_tenant`` (a file beside a SQLite one, a schema on
        # Postgres); privacy.tenants.<tenant> overrides the redaction list; the tenant scopes the
        # in-process caches of user content; the backends are the base's.
        return self.base.for_tenant(tenant)

    async def aclose(self) -> None:
        """Close the tenants' stores and loops (the shared backend is the base's to close)."""
        with self._lock:
            made, self._made = list(self._made.values()), {}
        for mw in made:
            await mw.aclose()  # a tenant's Middleware leaves the shared backends open


def api_key_of(headers: Mapping[str, str]) -> str | None:
    """The API key a request carries, as every surface reads it (HTTP API, console, MCP over HTTP):
    ``Authorization: Bearer KEY``, else ``X-Api-Key`` (what the Anthropic SDK sends)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    scheme, _, value = lowered.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return lowered.get("x-api-key") or None
