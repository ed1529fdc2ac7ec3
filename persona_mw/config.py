"""YAML -> strict pydantic configuration, with errors that name the file, line and field.

Secrets are written ``{$env: NAME}`` and resolved from the environment at load time. Each
``pipeline:`` entry is validated later by its plugin's own ``Config`` model (see
``persona_mw.manager``), through ``ConfigSource.error`` so those errors carry lines as well.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from persona_mw.errors import ConfigError
from persona_mw.types import ID_PATTERN, Polarity

DEFAULT_MODEL = "smollm2-135m-instruct"


def default_data_dir() -> Path:
    """Where the embedded store lives unless the config says otherwise."""
    if os.environ.get("PERSONA_MW_HOME"):
        return Path(os.environ["PERSONA_MW_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(base).expanduser() / "persona-mw"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendConfig(BaseModel):
    """``type`` picks a registered backend; the other keys go to its factory."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(default="transformers",
                      description="a registered backend type: transformers (local) or litellm (any provider)")

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PoolConfig(_Strict):
    """The Postgres connection pool of each process (one pool per store; a tenant's store has its own)."""

    min: int = Field(default=1, ge=1, le=1000, description="connections opened at start and kept")
    max: int = Field(default=10, ge=1, le=1000, description="connections at most")
    timeout_s: float = Field(default=30.0, gt=0, le=3600,
                             description="seconds to wait for a free connection (and to connect) before an error")

    @model_validator(mode="after")
    def _order(self) -> PoolConfig:
        if self.max < self.min:
            raise ValueError(f"pool.max ({self.max}) is below pool.min ({self.min})")
        return self


class StoreConfig(_Strict):
    type: Literal["sqlite", "postgres"] = Field(
        default="sqlite", description="sqlite (embedded, one file) or postgres (many processes, pgvector)")
    path: str = Field(default_factory=lambda: str(default_data_dir() / "persona.db"),
                      description="the SQLite file; default $PERSONA_MW_HOME/persona.db, else "
                                  "$XDG_DATA_HOME/persona-mw/persona.db, else ~/.local/share/persona-mw/persona.db. "
                                  "A postgresql:// URL here opens Postgres too")
    dsn: str | None = Field(default=None, description="postgres: the connection string, postgresql://user@host/db "
                                                      "(better {$env: PERSONA_MW_DSN})")
    schema_name: str = Field(default="persona_mw", alias="schema", pattern=r"^[A-Za-z0-9_]{1,40}$",
                             description="postgres: the schema holding the tables (tenants get NAME.tenant-<id>)")
    pool: PoolConfig | None = Field(default=None, description="postgres: the connection pool (min, max, timeout_s)")
    migrate: bool = Field(default=True, description="postgres: apply pending schema migrations when a process "
                                                    "opens the store; false: refuse and ask for `persona-mw db migrate`")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _postgres_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") == "postgres" and "path" in data:
            raise ValueError("store.path is the SQLite file; with type: postgres give store.dsn")
        return data

    @model_validator(mode="after")
    def _check(self) -> StoreConfig:
        if self.type == "postgres":
            if not self.dsn:
                raise ValueError("type: postgres needs store.dsn (postgresql://user@host/db, e.g. {$env: PERSONA_MW_DSN})")
            if not re.match(r"^postgres(ql)?://", self.dsn):
                raise ValueError("store.dsn must start with postgresql:// (got "
                                 f"{self.dsn.split('://', 1)[0] if '://' in self.dsn else 'no scheme'})")
            if "#" in self.dsn:
                raise ValueError("store.dsn: no '#' options; use store.schema and store.pool")
            pool = self.pool or PoolConfig()
            # The Middleware opens the store from ``path``: the URL form ``open_store`` reads.
            self.path = (f"{self.dsn}#schema={self.schema_name}&pool_min={pool.min}&pool_max={pool.max}"
                         f"&pool_timeout={pool.timeout_s}" + ("" if self.migrate else "&migrate=0"))
        else:
            for name in ("dsn", "pool"):
                if getattr(self, name) is not None:
                    raise ValueError(f"store.{name} is for type: postgres (this store is sqlite)")
        return self


class StatedItem(_Strict):
    text: str = Field(min_length=1, description="the preference in words")
    polarity: Polarity = Field(default="like", description="like, or avoid what the text names")


class GroupConfig(_Strict):
    """A declared group (an org, team or cohort) with preferences every member inherits."""

    stated: list[StatedItem | str] = Field(default_factory=list,
                                          description="preferences of the node (a string is a like)")
    members: list[str] = Field(default_factory=list, description="user ids that belong to the group")


class GraphConfig(_Strict):
    prior_strength: float = Field(
        default=5.0, gt=0, description="k in (n*own + k*parent)/(n+k): evidence a node needs to outweigh its parents"
    )
    groups: dict[str, GroupConfig] = Field(default_factory=dict, description="declared groups by id")
    contexts: dict[str, GroupConfig] = Field(default_factory=dict,
                                             description="contexts by id (a request's context), with their preferences")
    global_: GroupConfig = Field(default_factory=GroupConfig, alias="global",
                                 description="preferences every user inherits")
    request_groups: Literal["ephemeral", "permanent"] = Field(
        default="ephemeral",
        description="a chat request's 'groups': scope of that request only (ephemeral), or also joined for good")

    @field_validator("groups", "contexts")
    @classmethod
    def _ids(cls, v: dict[str, GroupConfig]) -> dict[str, GroupConfig]:
        import re

        for key in v:
            if not re.match(ID_PATTERN, key):
                raise ValueError(f"invalid id {key!r}: use letters, digits and _.:@-+")
        return v

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PluginEntry(BaseModel):
    """One ``pipeline:`` entry: ``use`` names the plugin type; other keys are its settings."""

    model_config = ConfigDict(extra="allow")
    use: str = Field(description="the plugin type (a built-in or a registered third-party plugin)")
    name: str | None = Field(default=None, description="instance name, for a plugin used twice (default: use)")
    on_error: Literal["fail", "skip"] = Field(
        default="fail", description="fail: the turn fails naming the plugin; skip: the error goes to the trace")

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def instance_name(self) -> str:
        return self.name or self.use


class TraceConfig(_Strict):
    store: bool = Field(default=True, description="keep each turn's trace in the store")
    timing_resolution_ms: float | None = Field(
        default=None, gt=0,
        description="round the step timings a caller gets (and the stored ones) to this many ms; null = exact")


class RateLimit(_Strict):
    """One tenant's request rate: a token bucket of ``burst`` tokens refilled at ``requests_per_s``."""

    requests_per_s: float = Field(gt=0, le=1_000_000, description="tokens added to the bucket per second (the sustained rate)")
    burst: int = Field(ge=1, le=1_000_000, description="bucket size: requests that may arrive at once after a quiet spell")
    bytes_per_token: int | None = Field(
        default=65536, ge=1024,
        description="a request costs 1 token plus 1 per full this many bytes of its body (a size bomb costs more); "
        "null = 1 each")
    hold_s: float = Field(
        default=0.0, ge=0, le=10,
        description="wait this long (no CPU: the request just sleeps) before answering a 429, so a client that "
        "ignores Retry-After cannot spin the server on refusals")


class ServerConfig(_Strict):
    """``persona-mw serve`` settings. ``api_keys`` maps a tenant to its keys; none configured = open.

    A key is the secret itself (better ``{$env: NAME}``) or ``sha256:<hex>`` of it, so the file need
    not hold it; either way only the SHA-256 is kept once the config is loaded.
    """

    api_keys: dict[str, list[str]] = Field(default_factory=dict,
                                           description="tenant -> its keys (secret or sha256:<hex>); none = open server")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30, description="larger request bodies get a 413")
    run_jobs: bool = Field(
        default=True, description="false: record each turn's after-turn job in the store and leave it (and its "
        "tenants' jobs) to `persona-mw worker`, as `serve --no-jobs` does; for many serve processes on one store")
    rate_limit: RateLimit | None = Field(
        default=None, description="per-tenant request rate (each tenant its own bucket; 'default' when open); "
        "over it: 429 with Retry-After, before the body is read; null = no limit")
    tenant_rate_limits: dict[str, RateLimit | None] = Field(
        default_factory=dict, description="tenant -> its own rate limit instead of rate_limit (null = unlimited)")
    otel: bool = Field(default=False, description="OpenTelemetry spans per turn and per plugin (also on when an "
                       "OTEL_*_EXPORTER / OTEL_EXPORTER_OTLP_* variable is set); needs the [otel] extra")
    metrics_tenant_label: bool = Field(default=False, description="label /metrics request series with the tenant "
                                       "id (never user ids or text)")

    @field_validator("tenant_rate_limits")
    @classmethod
    def _tenant_names(cls, v: dict[str, RateLimit | None]) -> dict[str, RateLimit | None]:
        import re

        for tenant in v:
            if not re.match(ID_PATTERN, tenant):
                raise ValueError(f"invalid tenant name {tenant!r}: use letters, digits and _.@-+")
        return v

    @field_validator("api_keys")
    @classmethod
    def _hash_keys(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        import hashlib
        import re

        out: dict[str, list[str]] = {}
        for tenant, keys in v.items():
            if not re.match(ID_PATTERN, tenant):
                raise ValueError(f"invalid tenant name {tenant!r}: use letters, digits and _.@-+")
            hashed = []
            for key in keys:
                if key.startswith("sha256:"):
                    digest = key[len("sha256:"):].lower()
                    if not re.fullmatch(r"[0-9a-f]{64}", digest):
                        raise ValueError(f"tenant {tenant!r}: 'sha256:' must be followed by 64 hex digits")
                elif len(key) < 8:
                    raise ValueError(f"tenant {tenant!r}: an API key must have at least 8 characters")
                else:
                    digest = hashlib.sha256(key.encode()).hexdigest()
                hashed.append("sha256:" + digest)
            out[tenant] = hashed
        return out


class PrivacyRules(_Strict):
    redact: list[str] = Field(
        default_factory=list,
        description="PII kinds replaced by [KIND] before anything is stored: email, phone, card, address, iban "
                    "(or a detector a plugin registers)")


class PrivacyConfig(PrivacyRules):
    """``privacy:`` redaction before storage; ``tenants:`` overrides the list per server tenant."""

    tenants: dict[str, PrivacyRules] = Field(default_factory=dict, description="per server tenant: its own redact list")
    patterns: dict[str, str] = Field(default_factory=dict,
                                     description="extra PII kinds as regular expressions, usable in redact lists")
    regions: list[str] | None = Field(
        default=None,
        description="ISO 3166 regions whose national phone formats (no leading +) are recognized, e.g. "
                    "[DE, FR, ES, IT, PT, US, GB, JP, CN] (the default); international +numbers always are")

    @field_validator("regions")
    @classmethod
    def _regions(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        out = [str(r).strip().upper() for r in v]
        try:
            import phonenumbers
        except ImportError:
            known = None
        else:
            known = phonenumbers.SUPPORTED_REGIONS
        for r in out:
            if len(r) != 2 or not r.isalpha() or (known is not None and r not in known):
                raise ValueError(f"region {r!r} is not an ISO 3166 alpha-2 region with a phone numbering plan "
                                 "(e.g. DE, FR, US)")
        if not out:
            raise ValueError("regions must list at least one region (omit it for the default list)")
        return out

    @field_validator("patterns")
    @classmethod
    def _compile(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for kind, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {kind!r} is not a valid regular expression: {exc}") from None
        return v

    def for_tenant(self, tenant: str) -> PrivacyConfig:
        rules = self.tenants.get(tenant)
        if rules is None:
            return self
        return PrivacyConfig(redact=list(rules.redact), tenants=self.tenants, patterns=self.patterns,
                             regions=self.regions)


class LimitsConfig(_Strict):
    """``limits:`` bounds on what one request or one user may make persona-mw hold or send."""

    max_messages: int = Field(default=256, ge=1, description="messages in one chat request (more: 400)")
    max_message_chars: int = Field(default=100_000, ge=1, description="characters in one message (more: 400)")
    max_request_chars: int = Field(default=400_000, ge=1, description="characters in all messages (more: 400)")
    max_prompt_tokens: int | None = Field(
        default=None, ge=16,
        description="personalized prompt bound: oldest turns are dropped (trace flag 'trimmed'); null = off")
    max_stated_per_user: int = Field(default=200, ge=1, description="stated preferences a profile keeps (newest)")
    max_memories_per_user: int = Field(default=1000, ge=1, description="memories a user node may hold")
    max_groups_per_request: int = Field(default=16, ge=0, le=1024,
                                        description="groups one chat request may name (more: 400 naming 'groups')")
    max_groups_per_user: int = Field(default=64, ge=0, description="permanent group memberships of one user (join)")
    max_contexts_per_user: int = Field(default=64, ge=1,
                                       description="distinct contexts one user may give feedback in (more: 400)")
    max_stated_per_group: int = Field(default=200, ge=1, description="stated preferences a group profile keeps (newest)")
    max_trace_items: int = Field(default=64, ge=1, description="items_used / flags a returned or stored trace keeps")
    max_trace_text_chars: int = Field(default=2000, ge=16,
                                      description="characters of one trace text (item, summary, flag) kept")
    max_json_depth: int = Field(
        default=64, ge=4, le=200,
        description="nesting of JSON in a request (metadata, tools, message fields, content parts); deeper: 400")
    # Accepted here for configs written before ``budget:`` existed; ``budget:`` is their one home
    # (``Config`` moves them there and refuses both places at once).
    aux_calls_per_request: int = Field(default=4, ge=0, le=64, description="alias of budget.aux_calls_per_request")
    aux_seconds_per_request: float | None = Field(default=20.0, gt=0,
                                                  description="alias of budget.aux_seconds_per_request")
    job_attempts: int = Field(default=3, ge=1, le=20, description="tries of a background after-turn job")


class BackendPolicy(_Strict):
    """What happens when a role's backend fails (``resilience: {<role>: ...}``; ``backend`` = the main one)."""

    timeout_s: float = Field(default=120.0, gt=0, description="hard bound on one call, whatever the backend")
    retries: int = Field(default=2, ge=0, le=10, description="extra tries after a timeout, 5xx or 429")
    backoff_s: float = Field(default=0.5, ge=0, description="first wait; doubles each retry")
    max_backoff_s: float = Field(default=8.0, ge=0, description="cap on one wait (Retry-After included)")
    fallback: list[str] = Field(default_factory=list, description="roles tried in order when this one fails")
    on_failure: Literal["error", "unpersonalized"] = Field(
        default="error",
        description="after retries and fallbacks: fail (502/503/504), or send the request unpersonalized once")


class BudgetConfig(_Strict):
    """``budget:`` auxiliary LLM calls (optimizer, rewriter, corrector, judge) a request or a job may make."""

    aux_calls_per_request: int = Field(default=4, ge=0, le=64, description="auxiliary calls one request may make")
    aux_seconds_per_request: float | None = Field(
        default=20.0, gt=0, description="wall-clock seconds of auxiliary calls per request (null = no limit)")
    aux_calls_per_job: int = Field(default=16, ge=0, le=1024,
                                   description="auxiliary calls one background job (ingestion, optimization) may make")


class LoggingConfig(_Strict):
    """``logging:`` the server's logs: one access-log line per request (method, route, status, ms)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="WARNING", description="log level of persona_mw")
    json_lines: bool = Field(default=False, alias="json", description="structured JSON lines instead of plain text")
    access_log: bool = Field(default=True, description="log each request (persona_mw.access, at INFO)")


class Config(_Strict):
    backend: BackendConfig = Field(default_factory=lambda: BackendConfig.model_validate({"type": "transformers", "model": DEFAULT_MODEL}))
    roles: dict[str, BackendConfig] = Field(default_factory=dict)
    store: StoreConfig = Field(default_factory=StoreConfig)
    pipeline: list[PluginEntry] = Field(default_factory=list)
    graph: GraphConfig = Field(default_factory=GraphConfig)
    trace: TraceConfig = Field(default_factory=TraceConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    resilience: dict[str, BackendPolicy] = Field(default_factory=dict)
    autoload_plugins: bool = True

    # Where this config came from, for error messages about plugin sections.
    _source: ConfigSource | None = None

    @model_validator(mode="after")
    def _one_home_for_aux_limits(self) -> Config:
        """``budget:`` holds the auxiliary-call limits; ``limits.aux_*`` (older configs) move there."""
        old = {f for f in ("aux_calls_per_request", "aux_seconds_per_request") if f in self.limits.model_fields_set}
        if not old:
            return self
        clash = old & self.budget.model_fields_set
        if clash:
            raise ValueError(f"{', '.join(sorted(clash))} is set in both budget: and limits:; keep it in budget:")
        for f in old:
            setattr(self.budget, f, getattr(self.limits, f))
        return self

    @property
    def source(self) -> ConfigSource:
        return self._source or ConfigSource("<config>", None)


class ConfigSource:
    """The YAML file and its node tree, to turn a field path into ``file:line``."""

    def __init__(self, filename: str, root: yaml.Node | None) -> None:
        self.filename = filename
        self.root = root

    def line_of(self, loc: tuple[Any, ...]) -> int | None:
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for key in loc:
            if isinstance(node, yaml.MappingNode):
                nxt = next((v for k, v in node.value if getattr(k, "value", None) == str(key)), None)
                if nxt is None:
                    # An unknown key: point at the key itself.
                    knode = next((k for k, _ in node.value if getattr(k, "value", None) == str(key)), None)
                    return knode.start_mark.line + 1 if knode is not None else line
                node = nxt
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
            else:
                break
            line = node.start_mark.line + 1
        return line

    def where(self, loc: tuple[Any, ...]) -> str:
        line = self.line_of(loc)
        return f"{self.filename}:{line}" if line else self.filename

    def error(self, exc: ValidationError, prefix: tuple[Any, ...] = (), model: type[BaseModel] | None = None) -> ConfigError:
        """A ConfigError listing every problem in ``exc`` as ``file:line: field: message``."""
        lines = []
        hint = None
        for err in exc.errors():
            loc = prefix + tuple(err["loc"])
            field = ".".join(str(p) for p in loc) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden" and model is not None:
                owner = _model_at(model, tuple(err["loc"])[:-1])
                if owner is not None:
                    allowed = sorted(owner.model_fields)
                    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                    suggestion = f"did you mean {close[0]!r}?" if close else f"allowed fields: {', '.join(allowed)}"
                    msg = f"unknown field ({suggestion})"  # said once, in the line (not again as a hint)
            lines.append(f"{self.where(loc)}: {field}: {msg}")
        return ConfigError("invalid configuration:\n  " + "\n  ".join(lines), hint=hint)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The nested model class at ``loc`` (best effort, for 'did you mean' suggestions)."""
    current: Any = model
    for key in loc:
        if isinstance(key, int):
            continue
        field = getattr(current, "model_fields", {}).get(key)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            for a in args:
                inner = getattr(a, "__args__", ())
                nxt = next((c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)), None)
                if nxt:
                    break
        if nxt is None:
            return None
        current = nxt
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def resolve_env(value: Any, source: ConfigSource, loc: tuple[Any, ...] = ()) -> Any:
    """Replace ``{$env: NAME}`` mappings with the environment variable's value."""
    if isinstance(value, dict):
        if set(value) == {"$env"}:
            name = value["$env"]
            if name not in os.environ:
                raise ConfigError(
                    f"{source.where(loc)}: {'.'.join(map(str, loc))}: environment variable {name!r} is not set",
                    hint=f"export {name}=... before starting",
                )
            return os.environ[name]
        return {k: resolve_env(v, source, loc + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, source, loc + (i,)) for i, v in enumerate(value)]
    return value


def parse_config(text: str, filename: str = "<string>") -> Config:
    """Parse YAML text into a validated ``Config``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: malformed YAML: {problem}", hint="check indentation and quoting") from None
    source = ConfigSource(filename, root)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{filename}:1: the top level must be a mapping, got {type(data).__name__}")
    data = resolve_env(data, source)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise source.error(exc, model=Config) from None
    config._source = source
    return config


DEFAULT_CONFIG_NAME = "<embedded default>"


def default_config_text() -> str:
    """The embedded default pipeline (``persona_mw/default.yaml``) as YAML text."""
    from importlib import resources

    return resources.files("persona_mw").joinpath("default.yaml").read_text(encoding="utf-8")


def default_config() -> Config:
    """The embedded default: what ``Middleware()`` and the CLI (without ``--config``) run."""
    return parse_config(default_config_text(), DEFAULT_CONFIG_NAME)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    return parse_config(text, str(p))
