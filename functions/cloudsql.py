"""``cloudsql.*``: Google Cloud SQL databases exported to (and imported from) Cloud
Storage through the Cloud SQL Admin API v1, over the dispatcher's aiohttp session.

    export   POST .../instances/{instance}/export, then wait for the operation
    import   POST .../instances/{instance}/import, then wait for the operation

Credentials, in this order: a service-account key (the JSON file Google hands out, usually
given as ``{{ secret(...) }}``), exchanged for an access token with the OAuth 2.0 JWT-bearer
grant; or else the metadata server's default account (GCE, GKE Workload Identity). Tokens
are cached per process until shortly before they expire. All requests go through
``ctx.http``, so the dispatcher's HTTP guard applies; the one exception is the well-known
metadata token URL, fetched outside the guard (the guard refuses 169.254.169.254 for any
URL a blueprint could choose).

Errors: 401/403 and other refusals are permanent (a token problem names the account, never
the key or the token); 409 (another operation runs on the instance), 429, 5xx and network
failures are retryable. A retried step adopts its own still-running operation (same kind,
same URI) instead of waiting for it to end and starting over.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

import aiohttp
import jwt
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from functions.httpguard import http_failure, policy_of, read_limited
from functions.rendered import NameList, OptionalSecret, OptionalText
from functions.sdk import Context, PermanentError, RetryableError, function

SCOPE = "https://www.googleapis.com/auth/sqlservice.admin"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
API_URL = "https://sqladmin.googleapis.com"
METADATA_URL = "http://metadata.google.internal"
METADATA_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
_ASSERTION_LIFETIME = 3600  # the longest Google accepts
# A cached token is renewed this long before it expires; at most half its lifetime, so a
# token issued for 60 s is still reused for 30.
_REFRESH_MARGIN = 120.0
_MAX_LIFETIME = 86400.0  # whatever a token endpoint claims
_MARGIN = 2.0  # seconds kept back so we, not the runner's timeout, say why we stopped
_MAX_POLL = 30.0
_BUSY_DELAY = 30.0  # an export of a large database runs for minutes
_MAX_BODY = 1024 * 1024  # answers are small JSON documents; the guard may allow less
_SHOWN = 300  # characters of a peer's error message kept in ours


BaseUrl = Annotated[
    str, Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$"), AfterValidator(lambda u: u.rstrip("/"))
]


# --- params and outputs ------------------------------------------------------------------


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "my-project", or a domain-scoped "example.com:my-project".
    project: str = Field(pattern=r"^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
    instance: str = Field(pattern=r"^[a-z][a-z0-9-]{0,97}$")
    uri: str = Field(pattern=r"^gs://[a-z0-9][a-z0-9._-]{1,221}/\S+$")
    file_type: Literal["SQL", "CSV"] = "SQL"
    # A service-account key file's JSON; unset: the metadata server's default account.
    service_account_json: OptionalSecret = None
    metadata_url: BaseUrl = METADATA_URL
    api_url: BaseUrl = API_URL
    # How long to wait for the operation (bounded by the step's timeout as well). 0: start
    # it and return; a retry of the step adopts it while it runs.
    wait: float = Field(default=3600.0, ge=0, le=86400)
    poll_interval: float = Field(default=5.0, gt=0, le=300)  # first pause; doubles up to 30s
    request_timeout: float = Field(default=30.0, gt=0, le=300)  # one HTTP request


class ExportParams(_Common):
    databases: NameList = Field(default_factory=list)  # SQL: none = all; CSV: the one queried
    offload: bool = False  # serverless export: no load on the instance, costs extra
    select_query: OptionalText = None  # CSV: what to export
    tables: NameList = Field(default_factory=list)  # SQL: only these tables
    schema_only: bool = False  # SQL

    @model_validator(mode="after")
    def _options_fit_file_type(self) -> ExportParams:
        if self.file_type == "CSV" and not self.select_query:
            raise ValueError("a CSV export needs select_query")
        if self.file_type == "SQL" and self.select_query:
            raise ValueError("select_query is for CSV exports")
        if self.file_type == "CSV" and (self.tables or self.schema_only):
            raise ValueError("tables and schema_only are for SQL exports")
        return self


class ImportParams(_Common):
    database: OptionalText = None  # SQL: the dump may name it; CSV: required
    table: OptionalText = None  # CSV
    columns: NameList = Field(default_factory=list)  # CSV: none = all, in file order
    import_user: OptionalText = None  # PostgreSQL: the user the SQL runs as

    @model_validator(mode="after")
    def _options_fit_file_type(self) -> ImportParams:
        if self.file_type == "CSV" and not (self.database and self.table):
            raise ValueError("a CSV import needs database and table")
        if self.file_type == "SQL" and (self.table or self.columns):
            raise ValueError("table and columns are for CSV imports")
        return self


class OperationResult(BaseModel):
    project: str
    instance: str
    operation: str  # the Admin API operation's name
    operation_type: str  # EXPORT / IMPORT
    status: str  # DONE, or PENDING/RUNNING with wait: 0
    uri: str
    started_at: str | None = None
    ended_at: str | None = None
    adopted: bool  # an earlier attempt had started it


# --- access tokens -----------------------------------------------------------------------


class _ServiceAccount(BaseModel):
    """The fields of a service-account key file that the JWT grant needs."""

    model_config = ConfigDict(extra="ignore")  # key files carry more than we use

    type: Literal["service_account"] = "service_account"
    client_email: str = Field(min_length=3)
    private_key: SecretStr
    private_key_id: str = ""
    token_uri: str = Field(default="https://oauth2.googleapis.com/token", pattern=r"^https?://")


@dataclass(frozen=True)
class _Token:
    value: SecretStr
    renew_at: float  # time.monotonic()


# Per process: every step of every run using the same account shares one token.
_tokens: dict[str, _Token] = {}


def _service_account(secret: SecretStr) -> _ServiceAccount:
    """Parse the key file; errors name fields, never values (they include the key)."""
    try:
        data = json.loads(secret.get_secret_value())
    except ValueError:
        raise PermanentError("service_account_json is not JSON") from None
    try:
        return _ServiceAccount.model_validate(data)
    except ValidationError as exc:
        fields = sorted({str(e["loc"][0]) if e["loc"] else "(document)" for e in exc.errors()})
        raise PermanentError(f"service_account_json: bad or missing {', '.join(fields)}") from None


def _assertion(account: _ServiceAccount) -> str:
    """The RS256-signed JWT that asks ``token_uri`` for a Cloud SQL Admin token."""
    now = int(time.time())
    claims = {
        "iss": account.client_email,
        "scope": SCOPE,
        "aud": account.token_uri,
        "iat": now,
        "exp": now + _ASSERTION_LIFETIME,
    }
    headers = {"kid": account.private_key_id} if account.private_key_id else None
    try:
        return jwt.encode(
            claims, account.private_key.get_secret_value(), algorithm="RS256", headers=headers
        )
    except (ValueError, TypeError, jwt.PyJWTError):
        # The library's message may quote the key material: say only what is wrong.
        raise PermanentError(
            f"service account {account.client_email}: private_key is not a usable RSA key"
        ) from None


def _token_key(p: _Common, account: _ServiceAccount | None) -> str:
    if account is None:
        return f"metadata {p.metadata_url}"
    # A token belongs to the key that obtained it: a different (say, revoked) key for the
    # same account must be tried, not answered from the cache.
    key = hashlib.sha256(account.private_key.get_secret_value().encode()).hexdigest()
    return f"sa {account.token_uri} {account.client_email} {key}"


async def _access_token(ctx: Context, p: _Common, *, renew: bool) -> tuple[SecretStr, bool]:
    """A token for the configured credentials, and whether it came from the cache."""
    account = _service_account(p.service_account_json) if p.service_account_json else None
    key = _token_key(p, account)
    cached = _tokens.get(key)
    if cached and not renew and cached.renew_at > time.monotonic():
        return cached.value, True
    if account is not None:
        token, lifetime = await _grant(ctx, p, account)
    else:
        token, lifetime = await _metadata_token(ctx, p)
    renew_at = time.monotonic() + lifetime - min(_REFRESH_MARGIN, lifetime / 2)
    _tokens[key] = _Token(token, renew_at)
    return token, False


async def _grant(ctx: Context, p: _Common, account: _ServiceAccount) -> tuple[SecretStr, float]:
    form = {"grant_type": GRANT_TYPE, "assertion": _assertion(account)}
    what = f"token for {account.client_email}"
    status, payload = await _send(ctx, p, "POST", account.token_uri, what, data=form)
    if status != 200:
        # OAuth errors: {"error": "invalid_grant", "error_description": "..."}
        body = payload if isinstance(payload, dict) else {}
        reason = f"{body.get('error', '')} {body.get('error_description', '')}".strip()
        raise _refusal(what, status, reason)
    return _token_of(payload, what)


async def _metadata_token(ctx: Context, p: _Common) -> tuple[SecretStr, float]:
    what = "token from the metadata server (no service_account_json given)"
    url = p.metadata_url + METADATA_TOKEN_PATH
    headers = {"Metadata-Flavor": "Google"}
    if p.metadata_url == METADATA_URL:
        # The guard refuses metadata addresses for every blueprint-chosen URL. This one
        # fixed URL (the token of the workload's own account) is fetched outside it.
        async with aiohttp.ClientSession(trust_env=False) as session:
            status, payload = await _send(ctx, p, "GET", url, what, session, headers=headers)
    else:
        status, payload = await _send(ctx, p, "GET", url, what, headers=headers)
    if status != 200:
        raise _refusal(what, status, _google_message(payload))
    return _token_of(payload, what)


def _token_of(payload: Any, what: str) -> tuple[SecretStr, float]:
    body = payload if isinstance(payload, dict) else {}
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        raise RetryableError(f"{what}: the answer holds no access_token")
    try:
        lifetime = float(body.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 0.0
    if not math.isfinite(lifetime):
        lifetime = 0.0  # an answer we cannot read: use the token once, cache it not
    return SecretStr(token), min(max(lifetime, 0.0), _MAX_LIFETIME)


# --- HTTP --------------------------------------------------------------------------------


async def _send(
    ctx: Context,
    p: _Common,
    method: str,
    url: str,
    what: str,
    session: aiohttp.ClientSession | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """One request through the dispatcher's guarded session; the status and the decoded
    JSON body (``None`` if not JSON)."""
    timeout = aiohttp.ClientTimeout(total=max(0.1, min(p.request_timeout, ctx.remaining())))
    limit = min(_MAX_BODY, policy_of(ctx.http).max_response_bytes)
    try:
        async with (session or ctx.http).request(method, url, timeout=timeout, **kwargs) as resp:
            raw = await read_limited(resp, limit)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Named by host only, as the guard's words are: never the request itself.
        raise http_failure(f"{what}: {method} {urlsplit(url).netloc}", exc) from None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _google_message(payload: Any) -> str:
    """The message of a Google API error body: {"error": {"code", "message", ...}}."""
    error = payload.get("error") if isinstance(payload, dict) else None
    return str(error.get("message", "")) if isinstance(error, dict) else ""


class _Busy(RetryableError):
    """409: another operation is running on the instance."""


def _refusal(what: str, status: int, reason: str) -> Exception:
    message = f"{what}: HTTP {status}" + (f": {reason[:_SHOWN]}" if reason else "")
    if status == 409:
        return _Busy(message, delay=_BUSY_DELAY)
    if status == 429 or status >= 500:
        return RetryableError(message)
    return PermanentError(message)


async def _api(
    ctx: Context, p: _Common, method: str, path: str, what: str, body: Any = None
) -> dict[str, Any]:
    """An authorised Admin API call; a 2xx answer's body, else a function error."""
    renew = False
    while True:
        token, cached = await _access_token(ctx, p, renew=renew)
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
        status, payload = await _send(
            ctx, p, method, p.api_url + path, what, headers=headers, json=body
        )
        # A cached token can be revoked before it expires: renew it, once.
        if status != 401 or not cached:
            break
        renew = True
    if not 200 <= status < 300:
        raise _refusal(what, status, _google_message(payload))
    return payload if isinstance(payload, dict) else {}


# --- operations --------------------------------------------------------------------------


def _path(*parts: str) -> str:
    return "/v1/" + "/".join(quote(part, safe=":") for part in parts)


async def _adoptable(
    ctx: Context, p: _Common, kind: str, context_key: str
) -> dict[str, Any] | None:
    """Our own operation, still running: same kind, same URI (an earlier attempt's)."""
    path = _path("projects", p.project, "operations") + f"?instance={quote(p.instance)}"
    listed = await _api(ctx, p, "GET", path, f"operations of {p.instance}")
    for op in listed.get("items") or []:
        context = op.get(context_key) or {}
        running = op.get("status") in ("PENDING", "RUNNING")
        if running and op.get("operationType") == kind and context.get("uri") == p.uri:
            found: dict[str, Any] = op
            return found
    return None


async def _until_done(
    ctx: Context, p: _Common, op: dict[str, Any], deadline: float
) -> dict[str, Any]:
    """Poll the operation until DONE, pausing ``poll_interval`` doubling up to 30 s. Past
    the deadline it is retryable: the retry adopts the operation and waits on."""
    name = str(op.get("name", ""))
    what = f"{op.get('operationType', '')} operation {name} of {p.instance}".strip()
    path = _path("projects", p.project, "operations", name)
    interval = p.poll_interval
    while op.get("status") != "DONE":
        left = deadline - time.monotonic()
        if left <= 0:
            raise RetryableError(f"{what} is still {op.get('status', 'unknown')}")
        await asyncio.sleep(min(interval, left))
        interval = min(interval * 2, _MAX_POLL)
        op = await _api(ctx, p, "GET", path, what)
    errors = (op.get("error") or {}).get("errors") or []
    if errors:
        shown = "; ".join(f"{e.get('code', 'error')}: {e.get('message', '')}" for e in errors)
        raise PermanentError(f"{what} failed: {shown[:_SHOWN]}")
    return op


async def _operate(
    ctx: Context, p: _Common, verb: Literal["export", "import"], context: dict[str, Any]
) -> OperationResult:
    """Start an export/import (or adopt ours already running), then wait for it."""
    deadline = time.monotonic() + min(p.wait, max(0.0, ctx.remaining() - _MARGIN))
    kind, context_key = verb.upper(), f"{verb}Context"
    path = _path("projects", p.project, "instances", p.instance, verb)
    adopted = None
    try:
        op = await _api(ctx, p, "POST", path, f"{verb} of {p.instance}", {context_key: context})
    except _Busy:
        adopted = await _adoptable(ctx, p, kind, context_key)
        if adopted is None:
            raise  # somebody else's operation: try again later
        op = adopted
    ctx.logger.info("%s of %s to %s: operation %s", verb, p.instance, p.uri, op.get("name"))
    if p.wait > 0:
        op = await _until_done(ctx, p, op, deadline)
    return OperationResult(
        project=p.project,
        instance=p.instance,
        operation=str(op.get("name", "")),
        operation_type=str(op.get("operationType", kind)),
        status=str(op.get("status", "")),
        uri=p.uri,
        started_at=op.get("startTime"),
        ended_at=op.get("endTime"),
        adopted=adopted is not None,
    )


def _export_context(p: ExportParams) -> dict[str, Any]:
    context: dict[str, Any] = {
        "kind": "sql#exportContext",
        "fileType": p.file_type,
        "uri": p.uri,
        "databases": p.databases,
        "offload": p.offload,
    }
    if p.file_type == "CSV":
        context["csvExportOptions"] = {"selectQuery": p.select_query}
    elif p.tables or p.schema_only:
        context["sqlExportOptions"] = {"tables": p.tables, "schemaOnly": p.schema_only}
    return context


def _import_context(p: ImportParams) -> dict[str, Any]:
    context: dict[str, Any] = {"kind": "sql#importContext", "fileType": p.file_type, "uri": p.uri}
    if p.database:
        context["database"] = p.database
    if p.import_user:
        context["importUser"] = p.import_user
    if p.file_type == "CSV":
        options: dict[str, Any] = {"table": p.table}
        if p.columns:
            options["columns"] = p.columns
        context["csvImportOptions"] = options
    return context


@function("cloudsql.export")
async def export(ctx: Context, p: ExportParams) -> OperationResult:
    """Export databases of a Cloud SQL instance to a gs:// URI and wait until it is done."""
    return await _operate(ctx, p, "export", _export_context(p))


@function("cloudsql.import")
async def import_(ctx: Context, p: ImportParams) -> OperationResult:
    """Import a SQL dump or CSV file from a gs:// URI into a Cloud SQL instance and wait."""
    return await _operate(ctx, p, "import", _import_context(p))
