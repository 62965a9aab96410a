"""A fake Google Cloud SQL Admin API (v1), OAuth 2.0 token endpoint and GCE metadata
server in one aiohttp app, strict where the real ones are:

- ``POST /token`` takes the JWT-bearer grant and checks the assertion as Google does: RS256
  signature under the service account's public key, ``kid``, ``iss``, ``aud`` (this very
  URL), ``scope``, ``iat``/``exp``. Only tokens it issued open the API.
- ``GET /computeMetadata/v1/instance/service-accounts/default/token`` wants
  ``Metadata-Flavor: Google``.
- ``POST /v1/projects/{p}/instances/{i}/export`` (and ``/import``) check the bearer token and
  the body's shape, answer 409 while another operation runs on the instance, and return an
  operation that goes PENDING → RUNNING → DONE over the next polls
  (``GET /v1/projects/{p}/operations/{name}``); ``GET /v1/projects/{p}/operations?instance=``
  lists them. :meth:`FakeCloudSql.fail_next` makes the next operation end in an error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

SCOPE = "https://www.googleapis.com/auth/sqlservice.admin"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
EXPORT_KEYS = {"kind", "fileType", "uri", "databases", "offload", "csvExportOptions"}
EXPORT_KEYS |= {"sqlExportOptions"}
IMPORT_KEYS = {"kind", "fileType", "uri", "database", "importUser", "csvImportOptions"}


class BadRequest(Exception):
    """The request does not match the API; answered 400 with the reason."""


@dataclass
class Operation:
    name: str
    project: str
    instance: str
    kind: str  # EXPORT / IMPORT
    context: dict[str, Any]
    polls: int = 0
    errors: list[dict[str, str]] | None = None

    @property
    def status(self) -> str:
        return ("PENDING", "RUNNING", "DONE")[min(self.polls, 2)]

    def resource(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "sql#operation",
            "name": self.name,
            "status": self.status,
            "operationType": self.kind,
            "targetId": self.instance,
            "targetProject": self.project,
            "startTime": "2024-05-01T10:00:00.000Z",
            f"{self.kind.lower()}Context": self.context,
        }
        if self.status == "DONE":
            body["endTime"] = "2024-05-01T10:01:00.000Z"
            if self.errors:
                body["error"] = {"kind": "sql#operationErrors", "errors": self.errors}
        return body


@dataclass
class FakeCloudSql:
    """Serves one service account (by its public key) and a set of instances."""

    public_key: RSAPublicKey
    client_email: str
    key_id: str
    project: str = "shop-prod"
    instances: set[str] = field(default_factory=lambda: {"orders"})
    token_lifetime: int = 3600
    tokens: set[str] = field(default_factory=set)
    grants: int = 0  # tokens issued by the JWT grant
    metadata_grants: int = 0
    operations: dict[str, Operation] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)  # API bodies received
    _next_errors: list[dict[str, str]] | None = None
    _server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return str(self._server.make_url("")).rstrip("/")

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def service_account(self, private_key_pem: str) -> dict[str, str]:
        """A key file as Google hands it out, pointing at this fake."""
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": self.key_id,
            "private_key": private_key_pem,
            "client_email": self.client_email,
            "client_id": "1234567890",
            "token_uri": self.token_uri,
        }

    def fail_next(self, code: str, message: str) -> None:
        """The next operation started ends DONE with this error."""
        self._next_errors = [{"kind": "sql#operationError", "code": code, "message": message}]

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_get(
            "/computeMetadata/v1/instance/service-accounts/default/token", self._metadata
        )
        app.router.add_post("/v1/projects/{project}/instances/{instance}/export", self._export)
        app.router.add_post("/v1/projects/{project}/instances/{instance}/import", self._import)
        app.router.add_get("/v1/projects/{project}/operations", self._list)
        app.router.add_get("/v1/projects/{project}/operations/{name}", self._get)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    # --- tokens --------------------------------------------------------------------------

    def _issue(self) -> web.Response:
        token = f"ya29.{uuid.uuid4().hex}"
        self.tokens.add(token)
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        return web.json_response(body)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != GRANT_TYPE:
            return _oauth_error("unsupported_grant_type", "Invalid grant_type")
        try:
            self._verify(str(form.get("assertion", "")))
        except (jwt.PyJWTError, BadRequest) as exc:
            return _oauth_error("invalid_grant", str(exc))
        self.grants += 1
        return self._issue()

    def _verify(self, assertion: str) -> None:
        if jwt.get_unverified_header(assertion).get("kid") != self.key_id:
            raise BadRequest("Invalid key id")
        try:
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=self.client_email,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidSignatureError:
            raise BadRequest("Invalid JWT Signature.") from None
        if SCOPE not in str(claims["scope"]).split():
            raise BadRequest("Invalid scope")
        if claims["exp"] - claims["iat"] > 3600 or claims["iat"] > time.time() + 60:
            raise BadRequest("Invalid JWT: Token must be a short-lived token")

    async def _metadata(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        self.metadata_grants += 1
        return self._issue()

    # --- the Admin API -------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth.removeprefix("Bearer ") not in self.tokens:
            message = "Request had invalid authentication credentials."
            return _api_error(401, message, "UNAUTHENTICATED")
        if request.match_info["project"] != self.project:
            message = "The client is not authorized to make this request."
            return _api_error(403, message, "PERMISSION_DENIED")
        return None

    async def _export(self, request: web.Request) -> web.Response:
        return await self._start(request, "EXPORT", _check_export)

    async def _import(self, request: web.Request) -> web.Response:
        return await self._start(request, "IMPORT", _check_import)

    async def _start(
        self, request: web.Request, kind: str, check: Callable[[dict[str, Any]], None]
    ) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return refused
        instance = request.match_info["instance"]
        if instance not in self.instances:
            return _api_error(404, f"The Cloud SQL instance {instance} does not exist.")
        body = await request.json()
        self.requests.append(body)
        context_key = f"{kind.lower()}Context"
        try:
            if set(body) != {context_key}:
                raise BadRequest(f"expected exactly {context_key}, got {sorted(body)}")
            check(body[context_key])
        except BadRequest as exc:
            return _api_error(400, f"Invalid request: {exc}", "INVALID_ARGUMENT")
        if any(op.instance == instance and op.status != "DONE" for op in self.operations.values()):
            message = "Operation failed because another operation was already in progress."
            return _api_error(409, message, "ABORTED")
        op = Operation(uuid.uuid4().hex, self.project, instance, kind, body[context_key])
        op.errors, self._next_errors = self._next_errors, None
        self.operations[op.name] = op
        return web.json_response(op.resource())

    async def _get(self, request: web.Request) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return refused
        op = self.operations.get(request.match_info["name"])
        if op is None:
            return _api_error(404, "The operation does not exist.")
        op.polls += 1
        return web.json_response(op.resource())

    async def _list(self, request: web.Request) -> web.Response:
        refused = self._authorised(request)
        if refused is not None:
            return refused
        instance = request.query.get("instance")
        items = [op.resource() for op in self.operations.values() if op.instance == instance]
        return web.json_response({"kind": "sql#operationsList", "items": items})


def _oauth_error(error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=400)


def _api_error(status: int, message: str, reason: str = "") -> web.Response:
    body = {"error": {"code": status, "message": message, "status": reason, "errors": []}}
    return web.json_response(body, status=status)


def _check_common(context: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = set(context) - allowed
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}")
    if context.get("kind", kind) != kind:
        raise BadRequest(f"kind must be {kind}")
    if context.get("fileType") not in ("SQL", "CSV"):
        raise BadRequest("fileType must be SQL or CSV")
    if not str(context.get("uri", "")).startswith("gs://"):
        raise BadRequest("uri must be a gs:// URI")


def _check_export(context: dict[str, Any]) -> None:
    _check_common(context, EXPORT_KEYS, "sql#exportContext")
    databases = context.get("databases", [])
    if not isinstance(databases, list) or not all(isinstance(d, str) for d in databases):
        raise BadRequest("databases must be a list of names")
    if not isinstance(context.get("offload", False), bool):
        raise BadRequest("offload must be a boolean")
    if context["fileType"] == "CSV":
        if not context.get("csvExportOptions", {}).get("selectQuery"):
            raise BadRequest("CSV exports need csvExportOptions.selectQuery")
        if len(databases) > 1:
            raise BadRequest("CSV exports take at most one database")


def _check_import(context: dict[str, Any]) -> None:
    _check_common(context, IMPORT_KEYS, "sql#importContext")
    if context["fileType"] == "CSV":
        if not context.get("database"):
            raise BadRequest("CSV imports need database")
        if not context.get("csvImportOptions", {}).get("table"):
            raise BadRequest("CSV imports need csvImportOptions.table")
