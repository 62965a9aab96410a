"""Settings: CLI flags > ``SNAPHOOK_*`` environment > config file (YAML) > defaults.

The config file holds the same keys as the environment (lower case, no prefix) plus the
static ``bindings:`` list. It may carry ``apiVersion: snaphook.io/v1`` and ``kind: Config``
so it can sit beside blueprints (the blueprint loader skips it)::

    apiVersion: snaphook.io/v1
    kind: Config
    port: 8080
    bindings:
      - blueprint: demo
        match: {namespace: demo, kind: Deployment, name: web}
        failure_policy: fail
        timeout: 20s
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from dispatcher.durations import Duration
from dispatcher.errors import ConfigError
from dispatcher.invokers import check_remote_url
from dispatcher.kube import workload_kind
from dispatcher.principals import AuthSettings

FailurePolicy = Literal["fail", "ignore"]
# An entry of kube_secret_allow: [namespace/]name, either part a DNS name or an fnmatch glob.
SECRET_PATTERN = re.compile(r"^(?:[a-z0-9.*?-]{1,253}/)?[a-z0-9.*?-]{1,253}$")


class BindingMatch(BaseModel):
    """Which event subjects a binding applies to; omitted fields match anything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = None
    kind: str | None = None
    name: str | None = None
    # Kubernetes-style matchLabels, compared with ``data.target.labels`` of the event.
    labels: dict[str, str] = Field(default_factory=dict)


class BindingConfig(BaseModel):
    """A static binding from the config file: target → blueprint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blueprint: str = Field(min_length=1)
    match: BindingMatch = Field(default_factory=BindingMatch)
    failure_policy: FailurePolicy = "fail"
    # How long the pre phase may take to decide before failure_policy applies.
    timeout: Duration = 30.0
    params: dict[str, Any] = Field(default_factory=dict)


class Settings(BaseSettings):
    # validate_by_name: ``sink_url`` is accepted from flags and the file by its name, without
    # making an unprefixed ``SINK_URL`` environment variable an alias.
    model_config = SettingsConfigDict(env_prefix="SNAPHOOK_", extra="forbid", validate_by_name=True)

    # Set by ``load()`` before construction: the config file's settings, lowest priority.
    _file_values: ClassVar[dict[str, Any]] = {}

    host: str = "127.0.0.1"
    # PORT is what Knative and most function platforms hand a container.
    port: int = Field(
        default=8080, ge=0, le=65535, validation_alias=AliasChoices("SNAPHOOK_PORT", "PORT")
    )
    state_dir: Path = Path(".snaphook")
    hooks: Path = Path("hooks")
    config: Path | None = None
    bindings: list[BindingConfig] = Field(default_factory=list)

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_batch: int = Field(default=100, ge=1, le=10_000)
    max_wait: Duration = 300.0  # longest synchronous wait a caller may ask for
    reply_wait: Duration = 30.0  # how long ``Prefer: reply`` waits for the run to finish
    max_concurrent_runs: int = Field(default=256, ge=1)
    shutdown_grace: Duration = 10.0

    # Per-event limits (dispatcher/limits.py). Depth counts levels below ``data`` itself.
    max_data_depth: int = Field(default=32, ge=1, le=256)
    max_data_bytes: int = Field(default=256 * 1024, ge=1024)
    # A token bucket per CloudEvents source: events/s and bucket size; None = no limit.
    rate_limit_per_source: float | None = Field(default=None, gt=0)
    rate_limit_burst: int = Field(default=20, ge=1)
    # Slow and oversized clients. idle_timeout is aiohttp's keepalive_timeout: it also cuts
    # off a connection whose request headers have not all arrived by then (slowloris).
    body_timeout: Annotated[Duration, Field(gt=0)] = 10.0
    idle_timeout: Annotated[Duration, Field(gt=0)] = 75.0
    max_header_size: int = Field(default=8190, ge=1024, le=65536)  # request line, each header
    max_headers: int = Field(default=128, ge=16, le=1024)

    journal_sync: Literal["full", "normal"] = "full"
    # Where runs, steps and leases live and how accepted runs reach a runner: the embedded
    # SQLite journal (one process), or NATS JetStream (several replicas, docs/scale-out.md).
    backend: Literal["sqlite", "nats"] = "sqlite"
    nats_url: str = "nats://127.0.0.1:4222"  # comma-separated for a cluster
    nats_prefix: str = Field(default="snaphook", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    nats_replicas: int = Field(default=1, ge=1, le=5)  # stream and bucket replicas (R1/R3)
    # The run queue on NATS (dispatcher/nats_queue.py): a replica that stops heartbeating a
    # run for ack_wait loses it to another; an event redelivered within dedup_window is
    # queued once; a run is delivered at most max_deliver times; max_ack_pending caps the
    # runs in flight over all replicas (at least replicas * max_concurrent_runs).
    nats_ack_wait: Annotated[Duration, Field(ge=0.5, le=3600)] = 30.0
    nats_dedup_window: Annotated[Duration, Field(ge=1, le=7 * 86400)] = 120.0
    nats_max_deliver: int = Field(default=20, ge=2)
    nats_max_ack_pending: int = Field(default=1024, ge=1)
    lease_reap_interval: Annotated[Duration, Field(ge=0.01)] = 1.0

    sink_url: str | None = Field(
        default=None, validation_alias=AliasChoices("SNAPHOOK_SINK_URL", "K_SINK")
    )
    reply_source: str = "snaphook"
    reply_attempts: int = Field(default=5, ge=1, le=50)

    # Ingress authentication: principals, tokens, signatures (dispatcher/principals.py).
    # Absent: no authentication, everything is open.
    auth: AuthSettings = Field(default_factory=AuthSettings)
    # TLS for ``serve`` (dispatcher/tls.py). A client CA turns on mTLS; ``optional`` admits
    # clients without a certificate (probes) and leaves the decision to ``auth``.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_client_cert: Literal["required", "optional"] = "required"

    # Where s3:// URLs of dumps point; unset = AWS. Credentials: the usual AWS_* sources.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # Other AWS APIs (Route53, ELBv2, RDS, SNS); unset = AWS itself.
    aws_endpoint_url: str | None = None
    aws_region: str = "us-east-1"

    # The Kubernetes API for kube.* functions, annotation bindings and Secrets: the pod's
    # service account when unset, else this kubeconfig (and context).
    kubeconfig: Path | None = None
    kube_context: str | None = None
    # Annotation bindings (docs/kubernetes.md): ``snaphook.io/*`` annotations on the event's
    # workload, or its Namespace, select the blueprint; off: config bindings only.
    kube_bindings: bool = False
    kube_binding_kinds: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["Deployment", "StatefulSet", "DaemonSet"]
    )
    kube_watch: bool = True  # LIST+WATCH into memory; off: GET, cached for kube_cache_ttl
    kube_cache_ttl: Annotated[Duration, Field(gt=0, le=3600)] = 10.0
    # ``secret(name, key)`` from Kubernetes Secrets in the target's namespace, when the
    # environment has no SNAPHOOK_SECRET_*; only the names listed ("name", "ns/name", globs).
    kube_secrets: bool = False
    kube_secret_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Outbound HTTP of hook functions (ctx.http), see functions/httpguard.py. Link-local and
    # cloud metadata addresses are refused whatever these say.
    http_allow_private: bool = False  # 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7
    http_allow_loopback: bool = True  # 127/8, ::1
    http_timeout: Annotated[Duration, Field(gt=0)] = 30.0
    http_max_response_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)

    # Remote functions (docs/function-host.md): function name or fnmatch pattern
    # ("postgres.*") -> URL of a function host. An exact name beats a pattern, a longer
    # pattern a shorter one. A step's own ``invoke: {url}`` beats both.
    remote_functions: dict[str, str] = Field(default_factory=dict)
    remote_token: SecretStr | None = None  # sent to function hosts as a bearer token
    # Rendered params (secrets included) travel to the host: cleartext http only to
    # loopback/private addresses ("private"), never, or anywhere ("any").
    remote_plain_http: Literal["private", "never", "any"] = "private"
    remote_ca: Path | None = None  # CA bundle that signed function hosts' certificates
    # The function host (``snaphook function serve``): the bearer token callers must send,
    # and how long (and how many) finished invocations are remembered for deduplication.
    function_token: SecretStr | None = None
    function_dedup_ttl: Annotated[Duration, Field(gt=0)] = 900.0
    function_dedup_max: int = Field(default=10_000, ge=1, le=1_000_000)

    # NoDecode: the environment source hands these over as raw strings ("a,b" or JSON),
    # decoded by ``_comma_separated`` rather than by pydantic-settings' JSON-only parsing.
    function_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # names env() may read in templates; None = any
    env_allow: Annotated[list[str] | None, NoDecode] = None
    webhook_allowed_origins: Annotated[list[str] | None, NoDecode] = None  # None = any origin
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator(
        "function_modules",
        "env_allow",
        "webhook_allowed_origins",
        "kube_binding_kinds",
        "kube_secret_allow",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # Environment variables carry lists as "a,b,c" as well as JSON.
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("not a valid JSON list") from None
        return [item.strip() for item in value.split(",") if item.strip()]

    @field_validator("remote_functions")
    @classmethod
    def _remote_routes(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern, url in value.items():
            if not pattern.strip() or any(c.isspace() for c in pattern):
                raise ValueError(f"function pattern {pattern!r} must be a non-empty name")
            problem = check_remote_url(url)
            if problem is not None:
                raise ValueError(f"{pattern}: {problem}")
        return value

    @field_validator("kube_binding_kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        return [workload_kind(kind) for kind in kinds]

    @field_validator("kube_secret_allow")
    @classmethod
    def _secret_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not SECRET_PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"{pattern!r} is not 'name' or 'namespace/name' (lower-case, * and ? globs)"
                )
        return patterns

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite3"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_settings = InitSettingsSource(settings_cls, init_kwargs=dict(cls._file_values))
        return (init_settings, env_settings, file_settings)

    @classmethod
    def load(cls, config: Path | None = None, **overrides: Any) -> Settings:
        """Build settings from flags (``overrides``, ``None`` = not given), env and file."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if config is not None:
            given["config"] = config
        cls._file_values = _read_config_file(config) if config is not None else {}
        try:
            return cls(**given)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, config)) from None
        except SettingsError as exc:  # e.g. SNAPHOOK_BINDINGS that is not JSON
            raise ConfigError(f"invalid settings: {exc}") from None
        finally:
            cls._file_values = {}


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: config file must be a mapping of settings")
    api_version, kind = loaded.pop("apiVersion", None), loaded.pop("kind", None)
    if api_version not in (None, "snaphook.io/v1") or kind not in (None, "Config"):
        raise ConfigError(f"{path}: expected apiVersion snaphook.io/v1, kind Config")
    return loaded


def _describe(exc: ValidationError, config: Path | None) -> str:
    where = f" in {config}" if config is not None else ""
    lines = [f"invalid settings{where}:"]
    for error in exc.errors(include_input=False, include_url=False):
        loc = [str(part) for part in error["loc"]]
        if loc:
            loc[0] = _field_of_alias(loc[0])
        field = ".".join(loc) or "(root)"
        lines.append(f"  {field}: {error['msg']}")
    return "\n".join(lines)


def _field_of_alias(name: str) -> str:
    """``SNAPHOOK_PORT``/``PORT`` → ``port``: errors name the setting, whichever source set it."""
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and name in alias.choices:
            return field_name
    return name
