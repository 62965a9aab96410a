"""Ingress authentication and authorization over real HTTP: bearer tokens, Standard Webhooks
signatures, mTLS, Kubernetes TokenReview; 401 vs 403 vs 503; the CLI's credentials.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from kubernetes_asyncio import client as kube

from dispatcher.app import create_app
from dispatcher.cehttp import BATCH_TYPE, encode_event
from dispatcher.errors import ConfigError
from dispatcher.principals import TokenReviewSettings, hash_token
from dispatcher.settings import Settings
from dispatcher.signatures import ReplayCache, sign
from dispatcher.tls import client_context, peer_names, serving_context
from dispatcher.tokenreview import TokenReviewer, TokenReviewUnavailable
from tests.certs import Pki, make_pki
from tests.conftest import SUBJECT, Harness, HarnessFactory, event_json, write_blueprints
from tests.hookfns import Recorder, fresh
from tests.kube_api import FakeKubeAPI
from tests.test_cli import GOOD, REPO, SNAPHOOK, clean_env, events_url, free_port, snaphook

PASS = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: pass}
spec:
  actions:
    backup.pre:
      - {name: freeze, function: test.effect}
"""

TOKEN = "tok-" + uuid.uuid4().hex
TOKEN_NEXT = "tok-" + uuid.uuid4().hex  # the rotation's new token, active beside TOKEN
OTHER_TOKEN = "tok-" + uuid.uuid4().hex  # velero's
SECRET = "whsec_" + base64.b64encode(b"k10-signing-key-0123456789abcdef").decode()
SECRET_NEXT = "whsec_" + base64.b64encode(b"k10-signing-key-next-0123456789ab").decode()
STRANGER_SECRET = "whsec_" + base64.b64encode(b"nobody-knows-this-key-0123456789").decode()

K10 = {
    "name": "k10",
    "sources": ["k10/*"],
    "namespaces": ["ns", "shop-*"],
    "bearer_sha256": [hash_token(TOKEN), hash_token(TOKEN_NEXT)],
    "webhook_secrets": [SECRET, SECRET_NEXT],
    "client_cert_subjects": ["k10-client"],
}
VELERO = {"name": "velero", "sources": ["velero/*"], "bearer_sha256": [hash_token(OTHER_TOKEN)]}
AUTH = {"principals": [K10, VELERO]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def k10_event(**kw: Any) -> dict[str, Any]:
    kw.setdefault("source", "k10/prod")
    return event_json("backup.pre", **kw)


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Written from the spec, independently of dispatcher.signatures."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(
    secret: str, body: bytes, *, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(secret, msg_id, timestamp, body),
    }


async def post(
    h: Harness,
    payload: Any,
    headers: dict[str, str] | None = None,
    *,
    wait: float | None = None,
) -> aiohttp.ClientResponse:
    """POST an event (dict) or a batch (list) with exactly the given extra headers."""
    if isinstance(payload, list):
        hdrs, body = {"Content-Type": BATCH_TYPE}, json.dumps(payload).encode()
    else:
        hdrs, body = encode_event(payload)
    params = {"wait": str(wait)} if wait is not None else {}
    return await h.client.post(
        "/v1/events", data=body, headers=hdrs | (headers or {}), params=params
    )


async def journaled(h: Harness) -> int:
    return len(await h.state.journal.list_runs(limit=100, status=None))


async def problem(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = await resp.json()
    return body


@pytest.fixture
async def k10(harness: HarnessFactory) -> Harness:
    return await harness({"pass": PASS}, auth=AUTH)


# -- settings ---------------------------------------------------------------------------------


def test_tokens_are_stored_hashed_and_secrets_never_shown(tmp_path: Path) -> None:
    config = tmp_path / "snaphook.yaml"
    config.write_text(json.dumps({"auth": AUTH}), encoding="utf-8")
    settings = Settings.load(config)
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert settings.auth.enforced  # principals make auth required by default
    assert hash_token(TOKEN) in config.read_text() and hash_token(TOKEN) in shown
    assert TOKEN not in config.read_text() and TOKEN_NEXT not in config.read_text()
    # Webhook secrets are HMAC keys, so the file must hold them; nothing shows them.
    for secret in (TOKEN, TOKEN_NEXT, SECRET, SECRET.removeprefix("whsec_")):
        assert secret not in shown


def _one_principal(**credentials: Any) -> dict[str, Any]:
    return {"principals": [{"name": "a", "sources": ["*"], **credentials}]}


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (_one_principal(bearer_sha256=[TOKEN]), "SHA-256"),
        (_one_principal(webhook_secrets=["k"]), "whsec_"),
        (_one_principal(webhook_secrets=["whsec_AAAA"]), "16"),
        (_one_principal(kubernetes_service_accounts=["x"]), "namespace:name"),
        ({"principals": [K10, K10]}, "principal name appears more than once"),
        ({"principals": [K10, {**VELERO, "bearer_sha256": [hash_token(TOKEN)]}]}, "more than"),
        ({"required": True}, "no principal"),
    ],
)  # fmt: skip
def test_invalid_auth_settings_are_refused_without_echoing_secrets(
    auth: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        Settings.load(None, auth=auth)
    assert TOKEN not in str(caught.value)


async def test_hash_token_command_prints_the_sha256_of_stdin() -> None:
    proc = await asyncio.create_subprocess_exec(
        str(SNAPHOOK), "auth", "hash-token",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=clean_env(), cwd=REPO,
    )  # fmt: skip
    out, _ = await proc.communicate(f"{TOKEN}\n".encode())
    assert proc.returncode == 0
    assert out.decode().strip() == hashlib.sha256(TOKEN.encode()).hexdigest()


# -- bearer tokens ----------------------------------------------------------------------------


async def test_valid_token_is_accepted(k10: Harness) -> None:
    resp = await post(k10, k10_event(), bearer(TOKEN))
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["run_id"].startswith("run-")


async def test_wrong_or_missing_token_is_401_and_nothing_is_journaled(k10: Harness) -> None:
    wrong = await post(k10, k10_event(), bearer("tok-" + uuid.uuid4().hex))
    body = await problem(wrong, 401)
    assert body["detail"] == "the bearer token is not valid"
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="snaphook", error="invalid_token"'
    missing = await post(k10, k10_event())
    assert "credentials are required" in (await problem(missing, 401))["detail"]
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="snaphook"'
    basic = await post(k10, k10_event(), {"Authorization": "Basic dXNlcjpwYXNz"})
    assert "Bearer" in (await problem(basic, 401))["detail"]
    assert await journaled(k10) == 0


async def test_rotated_tokens_both_work(k10: Harness) -> None:
    for token in (TOKEN, TOKEN_NEXT):
        resp = await post(k10, k10_event(), bearer(token))
        assert resp.status == 202, await resp.text()
    assert await journaled(k10) == 2


async def test_no_auth_configured_changes_nothing(harness: HarnessFactory) -> None:
    h = await harness({"pass": PASS})
    resp = await post(h, event_json(), bearer("anything") | {"webhook-id": "x"})
    assert resp.status == 202, await resp.text()
    assert (await h.client.get("/v1/runs")).status == 200


# -- Standard Webhooks signatures -------------------------------------------------------------


def test_signing_matches_the_standard_webhooks_test_vector() -> None:
    headers = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        b'{"test": 2432232314}',
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        now=1614265330,
    )
    assert headers["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


async def test_valid_signature_is_accepted_with_either_rotated_secret(k10: Harness) -> None:
    for secret in (SECRET, SECRET_NEXT):
        _, body = encode_event(k10_event())
        resp = await post_raw(k10, body, signed_headers(secret, body))
        assert resp.status == 202, await resp.text()
    # During a rotation the sender signs with both; one known secret is enough.
    _, body = encode_event(k10_event())
    both = signed_headers(SECRET_NEXT, body)
    unknown = standard_signature(STRANGER_SECRET, both["webhook-id"], int(time.time()), body)
    both["webhook-signature"] = f"{unknown} {both['webhook-signature']}"
    assert (await post_raw(k10, body, both)).status == 202


async def post_raw(h: Harness, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
    hdrs = {"Content-Type": "application/cloudevents+json"} | headers
    return await h.client.post("/v1/events", data=body, headers=hdrs)


def _wrong_secret(body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(STRANGER_SECRET, body)


def _stale(body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(SECRET, body, timestamp=int(time.time()) - 301)


def _future(body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(SECRET, body, timestamp=int(time.time()) + 400)


def _tampered(body: bytes) -> tuple[bytes, dict[str, str]]:
    headers = signed_headers(SECRET, body)
    return body.replace(b"nightly", b"weekly!"), headers


def _garbled(body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, signed_headers(SECRET, body) | {"webhook-signature": "v1,not base64!"}


@pytest.mark.parametrize(
    ("forge", "detail"),
    [
        (_wrong_secret, "no webhook-signature matches"),
        (_tampered, "no webhook-signature matches"),
        (_stale, "webhook-timestamp is too old"),
        (_future, "webhook-timestamp is too far in the future"),
        (_garbled, "holds no v1,<base64> signature"),
    ],
)
async def test_bad_signatures_are_401_with_a_distinct_detail(
    k10: Harness, forge: Callable[[bytes], tuple[bytes, dict[str, str]]], detail: str
) -> None:
    _, body = encode_event(k10_event())
    sent, headers = forge(body)
    resp = await post_raw(k10, sent, headers)
    assert detail in (await problem(resp, 401))["detail"]
    assert await journaled(k10) == 0


async def test_replayed_request_is_401_but_a_resigned_retry_is_the_same_run(k10: Harness) -> None:
    _, body = encode_event(k10_event())
    headers = signed_headers(SECRET, body)
    first = await post_raw(k10, body, headers)
    assert first.status == 202, await first.text()
    replay = await post_raw(k10, body, headers)
    assert "replay" in (await problem(replay, 401))["detail"]
    # The sender's own retry keeps the webhook-id but signs afresh (Standard Webhooks);
    # the event's (source, id) idempotency answers it with the existing run.
    retry = signed_headers(
        SECRET, body, msg_id=headers["webhook-id"], timestamp=int(time.time()) + 1
    )
    again = await post_raw(k10, body, retry)
    assert again.status == 202, await again.text()
    assert (await again.json())["run_id"] == (await first.json())["run_id"]


def test_replay_cache_forgets_after_the_window_and_stays_bounded() -> None:
    now = [1000.0]
    cache = ReplayCache(tolerance=300, size=100, clock=lambda: now[0])
    assert cache.claim(("k10", "msg_1", 1))
    assert not cache.claim(("k10", "msg_1", 1))
    assert cache.claim(("velero", "msg_1", 1))  # ids are the sender's: per principal
    now[0] += 601  # 2 x tolerance: that timestamp can no longer pass the freshness check
    assert cache.claim(("k10", "msg_1", 1))
    for i in range(500):
        cache.claim(("k10", f"msg_{i}", 2))
    assert len(cache) == 100


# -- authorization: 403 -----------------------------------------------------------------------


@pytest.mark.parametrize("wait", [None, 5.0])
async def test_wrong_source_for_the_principal_is_403(k10: Harness, wait: float | None) -> None:
    resp = await post(k10, k10_event(source="velero/prod"), bearer(TOKEN), wait=wait)
    body = await problem(resp, 403)
    assert body["field"] == "source"
    assert body["detail"] == "principal 'k10' may not send events with source 'velero/prod'"
    assert await journaled(k10) == 0
    allowed = await post(k10, k10_event(source="velero/prod"), bearer(OTHER_TOKEN), wait=wait)
    assert allowed.status == (202 if wait is None else 200), await allowed.text()


async def test_target_outside_the_principals_namespaces_is_403(k10: Harness) -> None:
    resp = await post(k10, k10_event(subject="kube-system/Deployment/dns"), bearer(TOKEN))
    body = await problem(resp, 403)
    assert (body["field"], body["detail"]) == (
        "subject",
        "principal 'k10' may not send events for 'kube-system/Deployment/dns'",
    )


async def test_batch_refuses_only_the_disallowed_event(k10: Harness) -> None:
    batch = [k10_event(), k10_event(source="velero/prod"), k10_event(source="k10/dr")]
    resp = await post(k10, batch, bearer(TOKEN))
    assert resp.status == 202, await resp.text()
    first, refused, third = await resp.json()
    assert first["run_id"] and third["run_id"]
    assert (refused["status"], refused["field"]) == (403, "source")
    assert await journaled(k10) == 2


async def test_batch_without_valid_credentials_is_401_as_a_whole(k10: Harness) -> None:
    batch = [k10_event(), k10_event()]
    for headers in ({}, bearer("nope")):
        resp = await post(k10, batch, headers)
        await problem(resp, 401)
    assert await journaled(k10) == 0


async def test_credentials_naming_two_principals_are_401(k10: Harness) -> None:
    _, body = encode_event(k10_event())
    headers = signed_headers(SECRET, body) | bearer(OTHER_TOKEN)
    resp = await post_raw(k10, body, headers)
    assert "different principals" in (await problem(resp, 401))["detail"]
    # Both credentials of the same principal: fine.
    same = signed_headers(SECRET, body) | bearer(TOKEN)
    assert (await post_raw(k10, body, same)).status == 202


async def test_migration_mode_protects_only_claimed_sources(harness: HarnessFactory) -> None:
    h = await harness({"pass": PASS}, auth={"required": False, "principals": [K10]})
    assert (await post(h, event_json(source="legacy-script"))).status == 202
    claimed = await post(h, k10_event())
    assert "need credentials" in (await problem(claimed, 401))["detail"]
    assert (await post(h, k10_event(), bearer(TOKEN))).status == 202
    # Wrong credentials are wrong even where none are needed.
    await problem(await post(h, event_json(source="legacy-script"), bearer("nope")), 401)
    assert (await h.client.get("/v1/runs")).status == 200


# -- the read API and what stays open ---------------------------------------------------------


async def test_runs_api_needs_a_principal_probes_do_not(k10: Harness) -> None:
    accepted = await post(k10, k10_event(), bearer(TOKEN))
    run_id = (await accepted.json())["run_id"]
    for path in ("/v1/runs", f"/v1/runs/{run_id}"):
        await problem(await k10.client.get(path), 401)
        await problem(await k10.client.get(path, headers=bearer("nope")), 401)
        assert (await k10.client.get(path, headers=bearer(OTHER_TOKEN))).status == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await k10.client.get(path)).status == 200, path
    handshake = await k10.client.options(
        "/v1/events", headers={"WebHook-Request-Origin": "k10.example.com"}
    )
    assert handshake.status == 200


async def test_failed_auth_logs_the_reason_never_the_credential(
    k10: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="snaphook.auth")
    wrong_token = "tok-" + uuid.uuid4().hex
    await post(k10, k10_event(), bearer(wrong_token) | {"ce-source": "k10/prod"})
    _, body = encode_event(k10_event())
    await post_raw(k10, body, signed_headers(STRANGER_SECRET, body))
    await post(k10, k10_event(source="velero/x"), bearer(TOKEN))
    records = [r for r in caplog.records if r.name == "snaphook.auth"]
    assert [getattr(r, "reason", None) for r in records] == [
        "invalid_token",
        "bad_signature",
        "source_not_allowed",
    ]
    assert records[0].__dict__["source"] == "k10/prod"
    assert records[2].__dict__["source"] == "velero/x"
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    for secret in (wrong_token, TOKEN, STRANGER_SECRET, SECRET):
        assert secret not in logged


# -- mTLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


TlsServer = Callable[..., Awaitable[str]]


@pytest.fixture
async def tls_server(tmp_path: Path, pki: Pki) -> AsyncIterator[TlsServer]:
    """A dispatcher served with the TLS context ``snaphook serve`` would use; returns its URL."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> str:
        hooks = tmp_path / f"hooks{len(servers)}"
        write_blueprints(hooks, {"pass": PASS})
        settings = Settings.load(
            None,
            state_dir=tmp_path / f"state{len(servers)}",
            hooks=hooks,
            bindings=[{"blueprint": "pass", "match": {"namespace": "ns"}}],
            tls_cert=pki.server.cert,
            tls_key=pki.server.key,
            tls_client_ca=pki.ca.path,
            **overrides,
        )
        server = TestServer(create_app(settings, registry=fresh(Recorder())))
        await server.start_server(ssl=serving_context(settings))
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def tls_post(
    url: str, context: ssl.SSLContext, event: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    hdrs, body = encode_event(event)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{url}/v1/events", data=body, headers=hdrs | (headers or {}), ssl=context
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize("subject", ["k10-client", "k10.backup.svc"])  # the CN, a DNS SAN
async def test_client_certificate_names_the_principal(
    tls_server: TlsServer, pki: Pki, subject: str
) -> None:
    k10_by_cert = {"name": "k10", "sources": ["k10/*"], "client_cert_subjects": [subject]}
    url = await tls_server(auth={"principals": [k10_by_cert]})
    context = client_context(pki.ca.path, pki.client.cert, pki.client.key)
    status, body = await tls_post(url, context, k10_event())
    assert status == 202, body
    status, body = await tls_post(url, context, k10_event(source="velero/prod"))
    assert (status, body["detail"]) == (
        403,
        "principal 'k10' may not send events with source 'velero/prod'",
    )


async def test_without_a_trusted_client_certificate_the_handshake_fails(
    tls_server: TlsServer, pki: Pki
) -> None:
    url = await tls_server(auth={"principals": [K10]})
    for context in (
        client_context(pki.ca.path),  # no certificate at all
        client_context(pki.ca.path, pki.stranger.cert, pki.stranger.key),  # another CA's
    ):
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await tls_post(url, context, k10_event())


async def test_optional_client_certificates_leave_it_to_auth(
    tls_server: TlsServer, pki: Pki
) -> None:
    url = await tls_server(auth={"principals": [K10]}, tls_client_cert="optional")
    anonymous = client_context(pki.ca.path)
    status, body = await tls_post(url, anonymous, k10_event())
    assert (status, body["title"]) == (401, "Unauthorized")
    assert (await tls_post(url, anonymous, k10_event(), bearer(TOKEN)))[0] == 202
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/readyz", ssl=anonymous) as resp,
    ):
        assert resp.status == 200  # kubelet probes carry no client certificate


def test_peer_names_are_the_cn_and_name_like_sans() -> None:
    cert = {
        "subject": ((("organizationName", "Kasten"),), (("commonName", "k10-client"),)),
        "subjectAltName": (
            ("DNS", "k10.backup.svc"),
            ("URI", "spiffe://cluster.local/ns/kasten-io/sa/k10"),
            ("IP Address", "10.0.0.7"),
        ),
    }
    assert peer_names(cert) == [
        "k10-client",
        "k10.backup.svc",
        "spiffe://cluster.local/ns/kasten-io/sa/k10",
    ]
    assert peer_names(None) == peer_names({}) == []


def test_tls_settings_must_come_in_pairs(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="together"):
        serving_context(Settings.load(None, tls_cert=pki.server.cert))
    with pytest.raises(ConfigError, match="needs tls_cert"):
        serving_context(Settings.load(None, tls_client_ca=pki.ca.path))
    with pytest.raises(ConfigError, match="cannot load"):
        serving_context(Settings.load(None, tls_cert=pki.server.cert, tls_key=pki.ca.path))
    assert serving_context(Settings.load(None)) is None


# -- Kubernetes TokenReview -------------------------------------------------------------------


@pytest.fixture
async def kube_api() -> AsyncIterator[tuple[FakeKubeAPI, str]]:
    fake = FakeKubeAPI()
    server = TestServer(fake.app())
    await server.start_server()
    yield fake, str(server.make_url("")).rstrip("/")
    await server.close()


BACKUP_JOB = {
    "name": "backup-job",
    "sources": ["jobs/*"],
    "kubernetes_service_accounts": ["backup:runner"],
}


async def reviewing_harness(
    harness: HarnessFactory, tmp_path: Path, fake: FakeKubeAPI, server: str
) -> Harness:
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", server)
    auth = {
        "principals": [K10, BACKUP_JOB],
        "tokenreview": {"enabled": True, "kubeconfig": str(kubeconfig)},
    }
    return await harness({"pass": PASS}, auth=auth)


async def test_tokenreview_maps_a_service_account_to_its_principal(
    harness: HarnessFactory, tmp_path: Path, kube_api: tuple[FakeKubeAPI, str]
) -> None:
    fake, server = kube_api
    h = await reviewing_harness(harness, tmp_path, fake, server)
    token = fake.service_account_token("backup", "runner")
    for _ in range(3):
        resp = await post(h, event_json(source="jobs/nightly"), bearer(token))
        assert resp.status == 202, await resp.text()
    assert len(fake.reviews) == 1  # cached: one review for a burst of events
    assert fake.reviews[0]["spec"]["token"] == token
    wrong_source = await post(h, k10_event(), bearer(token))
    assert "'backup-job' may not" in (await problem(wrong_source, 403))["detail"]
    # A static token still works without asking Kubernetes.
    assert (await post(h, k10_event(), bearer(TOKEN))).status == 202
    assert len(fake.reviews) == 1


async def test_tokenreview_unknown_or_unmapped_tokens_are_401(
    harness: HarnessFactory, tmp_path: Path, kube_api: tuple[FakeKubeAPI, str]
) -> None:
    fake, server = kube_api
    h = await reviewing_harness(harness, tmp_path, fake, server)
    unknown = await post(h, event_json(source="jobs/x"), bearer("not-a-kubernetes-token"))
    assert (await problem(unknown, 401))["detail"] == "the bearer token is not valid"
    stranger = fake.service_account_token("default", "default")
    unmapped = await post(h, event_json(source="jobs/x"), bearer(stranger))
    assert "not mapped to any principal" in (await problem(unmapped, 401))["detail"]
    assert await journaled(h) == 0


@pytest.mark.parametrize("failure", ["unreachable", "forbidden"])
async def test_tokenreview_unavailable_is_503_not_401(
    harness: HarnessFactory,
    tmp_path: Path,
    kube_api: tuple[FakeKubeAPI, str],
    failure: str,
) -> None:
    fake, server = kube_api
    if failure == "unreachable":
        server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    else:
        fake.reviewer_may_review = False  # snaphook's RBAC lacks tokenreviews/create
    h = await reviewing_harness(harness, tmp_path, fake, server)
    token = fake.service_account_token("backup", "runner")
    resp = await post(h, event_json(source="jobs/x"), bearer(token))
    body = await problem(resp, 503)
    assert body["title"] == "Authentication unavailable"
    assert resp.headers["Retry-After"] == "5"
    assert token not in json.dumps(body)
    assert await journaled(h) == 0


async def test_token_reviewer_through_kubernetes_asyncio(kube_api: tuple[FakeKubeAPI, str]) -> None:
    fake, server = kube_api
    configuration = kube.Configuration(
        host=server,
        api_key={"BearerToken": fake.reviewer_token},
        api_key_prefix={"BearerToken": "Bearer"},
    )
    now = [0.0]
    settings = TokenReviewSettings(enabled=True, audiences=["snaphook"], cache_ttl=10)
    reviewer = TokenReviewer(kube.ApiClient(configuration), settings, clock=lambda: now[0])
    try:
        for_us = fake.service_account_token("backup", "runner", audiences=("snaphook",))
        for_api = fake.service_account_token("backup", "runner")
        review = await reviewer.review(for_us)
        assert (review.authenticated, review.user) == (True, "system:serviceaccount:backup:runner")
        assert not (await reviewer.review(for_api)).authenticated  # another audience
        assert fake.reviews[0]["spec"]["audiences"] == ["snaphook"]
        await reviewer.review(for_us)
        assert len(fake.reviews) == 2  # cached
        now[0] += 11
        await reviewer.review(for_us)
        assert len(fake.reviews) == 3  # the cache entry expired
        fake.reviewer_token = "rotated-away"
        now[0] += 11
        with pytest.raises(TokenReviewUnavailable, match="401"):
            await reviewer.review(for_us)
    finally:
        await reviewer.close()


# -- the CLI ----------------------------------------------------------------------------------


async def test_emit_with_token_and_with_webhook_secret(k10: Harness) -> None:
    args = ["emit", "--type", "backup.pre", "--subject", SUBJECT, "--source", "k10/prod",
            "--url", events_url(k10), "--wait", "10"]  # fmt: skip
    by_token, by_flag, signed, refused, bad = await asyncio.gather(
        snaphook(*args, env=clean_env(SNAPHOOK_TOKEN=TOKEN)),
        snaphook(*args, "--token", TOKEN_NEXT, "--mode", "binary"),
        snaphook(*args, env=clean_env(SNAPHOOK_WEBHOOK_SECRET=SECRET)),
        snaphook(*args, "--webhook-secret", STRANGER_SECRET),
        snaphook(*args, "--webhook-secret", "not-a-secret"),
    )
    for result in (by_token, by_flag, signed):
        assert result.code == 0, result.err
        assert result.json()["allowed"] is True
    assert refused.code == 2
    assert "401" in refused.err and "no webhook-signature matches" in refused.err
    assert (bad.code, "not-a-secret" in bad.err + bad.out) == (2, False)
    for result in (by_token, by_flag, signed, refused):
        assert TOKEN not in result.err and SECRET not in result.err + result.out
    runs = await snaphook("runs", "ls", "--url", events_url(k10).removesuffix("/v1/events"),
                          env=clean_env(SNAPHOOK_TOKEN=OTHER_TOKEN))  # fmt: skip
    assert runs.code == 0, runs.err
    assert runs.out.count("run-") == 3


@pytest.mark.slow
async def test_serve_with_mtls_and_emit_with_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    write_blueprints(tmp_path / "hooks", {"good": GOOD})  # built-in functions only
    config = tmp_path / "snaphook.yaml"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(tmp_path / "state"),
                "hooks": str(tmp_path / "hooks"),
                "bindings": [{"blueprint": "good", "match": {"namespace": "ns"}}],
                "auth": {"principals": [{**K10, "namespaces": None}]},
            }
        ),
        encoding="utf-8",
    )
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
           "--tls-client-ca", str(pki.ca.path)]  # fmt: skip
    with (tmp_path / "serve.err").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(SNAPHOOK), "serve", "--config", str(config), "--port", str(port), *tls,
            stdout=asyncio.subprocess.DEVNULL, stderr=log, env=clean_env(), cwd=REPO,
        )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    try:
        await _wait_served(url, client_context(pki.ca.path, pki.client.cert, pki.client.key), proc)
        cert = ["--cacert", str(pki.ca.path), "--cert", str(pki.client.cert),
                "--key", str(pki.client.key)]  # fmt: skip
        emit = ["emit", "--type", "backup.pre", "--subject", SUBJECT, "--source", "k10/prod",
                "--url", f"{url}/v1/events", "--wait", "10"]  # fmt: skip
        result, no_cert = await asyncio.gather(
            snaphook(*emit, *cert), snaphook(*emit, "--cacert", str(pki.ca.path))
        )
        assert result.code == 0, result.err
        assert no_cert.code == 2 and "cannot reach" in no_cert.err
        shown = await snaphook("runs", "show", result.json()["run_id"], "--url", url, *cert)
        assert shown.code == 0, shown.err
        assert shown.json()["source"] == "k10/prod"
    finally:
        proc.terminate()
        await proc.wait()


async def _wait_served(url: str, context: ssl.SSLContext, proc: Any) -> None:
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline and proc.returncode is None:
            try:
                async with session.get(f"{url}/readyz", ssl=context) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"snaphook serve did not come up at {url}")
