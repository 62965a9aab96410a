"""notify.webhook, notify.slack, notify.email and notify.sns against real receivers.

The webhook receiver checks Standard Webhooks signatures with its own code (nothing from
functions.notify), email goes to an aiosmtpd server (plain, STARTTLS and TLS with a CA made
here), SNS to moto with an SQS queue subscribed to read the message back.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email
import email.policy
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import functions.notify  # noqa: F401  (registers notify.*)
from dispatcher.invokers import Invocation
from dispatcher.invokers.inprocess import InProcessInvoker
from dispatcher.secrets import EnvSecretResolver
from functions.httpguard import HttpPolicy, guarded_session
from functions.sdk import AwsConfig, EventInfo, PermanentError, RetryableError, default_registry
from tests.conftest import HarnessFactory, free_port

REPO = Path(__file__).resolve().parent.parent
EVENT = EventInfo(
    id="e1",
    source="test",
    type="io.snaphook.backup.post",
    subject="shop/StatefulSet/db",
    data={"backup": {"name": "nightly", "id": "b1"}, "outcome": "failed"},
)


# -- calling functions the way the runner does ------------------------------------------------

Call = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
async def call() -> AsyncIterator[Call]:
    """Invoke a function through a guarded session (the dispatcher's default policy)."""
    session = guarded_session(HttpPolicy())

    async def invoke(
        function: str,
        params: dict[str, Any],
        *,
        run_id: str = "run-1",
        step: str = "report",
        attempt: int = 1,
        timeout: float = 10.0,
        aws: AwsConfig | None = None,
    ) -> dict[str, Any]:
        invoker = InProcessInvoker(default_registry, session, EnvSecretResolver({}), aws=aws)
        return await invoker.invoke(
            Invocation(
                function=function,
                params=params,
                event=EVENT,
                run_id=run_id,
                step=step,
                attempt=attempt,
                timeout=timeout,
            )
        )

    yield invoke
    await session.close()


# -- a webhook receiver that verifies signatures on its own -----------------------------------

TOLERANCE = 5 * 60  # seconds; what Standard Webhooks receivers are told to allow


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signature_problem(secret: str, headers: Any, body: bytes, now: float) -> str | None:
    """Why the delivery must be rejected, or None: checked from the spec, not the sender."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        return "missing webhook headers"
    if not stamp.isdigit() or abs(now - int(stamp)) > TOLERANCE:
        return "stale or bad timestamp"
    key = base64.b64decode(secret[len("whsec_") :])
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (msg_id.encode(), b".", stamp.encode(), b".", body):
        mac.update(part)
    expected = base64.b64encode(mac.digest()).decode()
    for entry in signatures.split(" "):
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return None
    return "signature mismatch"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    problem: str | None
    answered: int

    @property
    def payload(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    server: TestServer
    secret: str = field(default_factory=new_secret)
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # answers, in order
    clock_offset: float = 0.0  # the receiver's clock runs this far ahead
    deliveries: list[Delivery] = field(default_factory=list)
    slack: list[Any] = field(default_factory=list)
    slack_answer: tuple[int, str] = (200, "ok")

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hooks/report"))

    def slack_url(self, token: str) -> str:
        return str(self.server.make_url(f"/services/T0/B0/{token}"))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state: list[Receiver] = []

    async def hook(request: web.Request) -> web.Response:
        rx = state[0]
        body = await request.read()
        problem = signature_problem(rx.secret, request.headers, body, time.time() + rx.clock_offset)
        status, headers = (400, {}) if problem else (rx.script.pop(0) if rx.script else (200, {}))
        rx.deliveries.append(Delivery(dict(request.headers), body, problem, status))
        return web.Response(status=status, headers=headers, text=problem or "")

    async def slack(request: web.Request) -> web.Response:
        rx = state[0]
        rx.slack.append(await request.json())
        status, text = rx.slack_answer
        return web.Response(status=status, text=text)

    app = web.Application()
    app.router.add_post("/hooks/report", hook)
    app.router.add_post("/services/T0/B0/{token}", slack)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.append(Receiver(server))
    yield state[0]
    await server.close()


def webhook_params(rx: Receiver, **extra: Any) -> dict[str, Any]:
    return {"url": rx.url, "secret": rx.secret, "backoff": 0.01, **extra}


async def test_webhook_is_signed_per_standard_webhooks(call: Call, receiver: Receiver) -> None:
    data = {"outcome": "failed", "failed_steps": ["thaw"]}
    out = await call("notify.webhook", webhook_params(receiver, type="backup.report", data=data))
    (delivery,) = receiver.deliveries
    assert delivery.problem is None and delivery.answered == 200
    assert out == {"status": 200, "webhook_id": delivery.headers["webhook-id"], "attempts": 1}
    assert delivery.headers["Content-Type"] == "application/json"
    payload = delivery.payload
    assert payload["type"] == "backup.report" and payload["data"] == data
    assert datetime.datetime.fromisoformat(payload["timestamp"]).tzinfo is not None


async def test_webhook_retries_5xx_with_the_same_id(call: Call, receiver: Receiver) -> None:
    receiver.script = [(503, {}), (503, {})]
    out = await call("notify.webhook", webhook_params(receiver))
    assert out["attempts"] == 3 and out["status"] == 200
    assert [d.answered for d in receiver.deliveries] == [503, 503, 200]
    assert all(d.problem is None for d in receiver.deliveries)  # re-signed, still valid
    ids = {d.headers["webhook-id"] for d in receiver.deliveries}
    assert ids == {out["webhook_id"]}
    assert len({d.body for d in receiver.deliveries}) == 1  # the very same message


async def test_webhook_id_survives_runner_retries(call: Call, receiver: Receiver) -> None:
    receiver.script = [(500, {}), (502, {})]
    with pytest.raises(RetryableError, match="answered 502"):
        await call("notify.webhook", webhook_params(receiver, attempts=2), attempt=1)
    out = await call("notify.webhook", webhook_params(receiver, attempts=2), attempt=2)
    assert out["attempts"] == 1
    assert {d.headers["webhook-id"] for d in receiver.deliveries} == {out["webhook_id"]}
    other = await call("notify.webhook", webhook_params(receiver), step="other-report")
    assert other["webhook_id"] != out["webhook_id"]  # per run and step


async def test_webhook_wait_never_outlasts_the_step(call: Call, receiver: Receiver) -> None:
    receiver.script = [(429, {"Retry-After": "30"})]
    started = time.monotonic()
    with pytest.raises(RetryableError, match="answered 429"):
        await call("notify.webhook", webhook_params(receiver, max_backoff=60), timeout=2.0)
    assert time.monotonic() - started < 1.5 and len(receiver.deliveries) == 1


async def test_receiver_rejects_stale_timestamps(call: Call, receiver: Receiver) -> None:
    receiver.clock_offset = TOLERANCE + 60  # as if the delivery took six minutes
    with pytest.raises(PermanentError, match="answered 400"):
        await call("notify.webhook", webhook_params(receiver))
    assert [d.problem for d in receiver.deliveries] == ["stale or bad timestamp"]


async def test_receiver_rejects_a_wrong_secret(call: Call, receiver: Receiver) -> None:
    with pytest.raises(PermanentError, match="answered 400"):
        await call("notify.webhook", webhook_params(receiver, secret=new_secret()))
    assert [d.problem for d in receiver.deliveries] == ["signature mismatch"]


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("plain-key-1234", "must be whsec_"),
        ("whsec_***key***", "not valid base64"),
        ("whsec_", "empty"),
    ],
)
async def test_webhook_secret_must_be_whsec(
    call: Call, receiver: Receiver, secret: str, why: str
) -> None:
    with pytest.raises(PermanentError, match=f"secret: .*{why}") as info:
        await call("notify.webhook", webhook_params(receiver, secret=secret))
    assert "***key***" not in str(info.value) and "plain-key" not in str(info.value)


async def test_webhook_to_a_metadata_address_is_refused(call: Call) -> None:
    params = {"url": "http://169.254.169.254/latest/", "secret": new_secret()}
    with pytest.raises(PermanentError, match=r"refusing to connect to 169\.254\.169\.254"):
        await call("notify.webhook", params)


async def test_webhook_connection_errors_are_retried(call: Call) -> None:
    params = {"url": f"http://127.0.0.1:{free_port()}/", "secret": new_secret(), "backoff": 0}
    with pytest.raises(RetryableError, match="ClientConnectorError"):
        await call("notify.webhook", params | {"attempts": 2})


# -- slack ------------------------------------------------------------------------------------

STEPS = {
    "freeze": {"status": "succeeded", "duration": 0.25, "attempts": 1, "outputs": {"x": 1}},
    "thaw": {"status": "failed", "duration": 1.5, "attempts": 3, "error": "connection lost"},
}


async def test_slack_summary_blocks(call: Call, receiver: Receiver) -> None:
    params = {
        "webhook_url": receiver.slack_url("s3cr3t-token"),
        "title": "Backup nightly of shop/db",
        "outcome": "failed",
        "failed_steps": "thaw",
        "steps": json.dumps(STEPS),  # as {{ steps | tojson }} renders it
    }
    assert await call("notify.slack", params) == {"status": 200}
    (message,) = receiver.slack
    assert message["text"] == "Backup nightly of shop/db: failed (failed: thaw)"
    header, summary, timings, errors = message["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": params["title"]}}
    assert [f["text"] for f in summary["fields"]] == ["*Outcome*\nfailed", "*Failed steps*\nthaw"]
    assert timings["text"]["text"] == (
        "*Timings*\n```freeze: succeeded in 0.25s\nthaw: failed in 1.50s, 3 attempts```"
    )
    assert errors["text"] == {"type": "mrkdwn", "text": "*thaw*: connection lost"}


async def test_slack_refusal_is_permanent_and_hides_the_url(call: Call, receiver: Receiver) -> None:
    receiver.slack_answer = (403, "invalid_token")
    params = {"webhook_url": receiver.slack_url("s3cr3t-token"), "title": "t"}
    with pytest.raises(PermanentError, match="answered 403: invalid_token") as info:
        await call("notify.slack", params)
    assert "s3cr3t-token" not in str(info.value)
    receiver.slack_answer = (503, "busy")
    with pytest.raises(RetryableError, match="503"):
        await call("notify.slack", params)


# -- email ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, signer: Any, *, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("snaphook test CA", "snaphook test CA", ca_key, ca_key, ca=True)
    cert = _certificate("127.0.0.1", "snaphook test CA", server_key, ca_key, ca=False)
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    login: bytes | None


@dataclass
class Mailbox:
    """aiosmtpd handler + authenticator: keeps what arrived and who logged in."""

    password: bytes = b"mail-pw-0123"
    received: list[Received] = field(default_factory=list)
    logins: list[tuple[str, bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        login = getattr(session.auth_data, "login", None) if session.authenticated else None
        rcpt = list(envelope.rcpt_tos)
        # session.ssl is set by STARTTLS only; implicit TLS shows on the transport.
        transport = server.transport
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )
        self.received.append(Received(str(envelope.mail_from), rcpt, message, tls, login))
        return "250 OK"

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((mechanism, data.login))
        ok = data.login == b"reporter" and data.password == self.password
        # handled=False: aiosmtpd answers the refusal (535) itself.
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


@dataclass
class SmtpServer:
    port: int
    mailbox: Mailbox


StartSmtp = Callable[..., Awaitable[SmtpServer]]


@pytest.fixture
async def smtp(pki: Pki) -> AsyncIterator[StartSmtp]:
    controllers: list[Controller] = []

    async def start(mode: str = "none", *, auth: bool = False) -> SmtpServer:
        mailbox = Mailbox()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(pki.cert, pki.key)
        options: dict[str, Any] = {}
        if mode == "starttls":
            options = {"tls_context": tls, "require_starttls": True}
        elif mode == "tls":
            options = {"ssl_context": tls}
        if auth:
            options |= {"authenticator": mailbox, "auth_required": True}
        port = free_port()
        controller = Controller(mailbox, hostname="127.0.0.1", port=port, **options)
        await asyncio.to_thread(controller.start)
        controllers.append(controller)
        return SmtpServer(port, mailbox)

    yield start
    for controller in controllers:
        await asyncio.to_thread(controller.stop)


def mail(server: SmtpServer, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": server.port,
        "tls": "none",
        "from": "snaphook <snaphook@example.com>",
        "to": "ops@example.com, dba@example.com",
        "subject": "backup nightly:\n  failed",  # wrapped, as a YAML block scalar would
        "text": "thaw failed <after 3 attempts>",
        **extra,
    }


def parts(message: EmailMessage) -> dict[str, str]:
    assert message.get_content_type() == "multipart/alternative"
    found = {}
    for part in message.iter_parts():
        assert isinstance(part, EmailMessage)
        found[part.get_content_type()] = str(part.get_content()).replace("\r\n", "\n")
    return found


async def test_plain_smtp_delivers_text_and_html(call: Call, smtp: StartSmtp) -> None:
    server = await smtp()
    out = await call("notify.email", mail(server, html="<p>thaw <b>failed</b></p>"))
    (got,) = server.mailbox.received
    assert got.rcpt_tos == ["ops@example.com", "dba@example.com"] and not got.tls
    assert got.mail_from == "snaphook@example.com" and got.login is None
    msg = got.message
    assert msg["Subject"] == "backup nightly: failed"
    assert msg["From"] == "snaphook <snaphook@example.com>"
    assert msg["To"] == "ops@example.com, dba@example.com"
    assert msg["Message-ID"] == out["message_id"] and out["message_id"].endswith("@example.com>")
    assert msg["X-Snaphook-Run"] == "run-1" and msg["Date"]
    assert parts(msg) == {
        "text/plain": "thaw failed <after 3 attempts>\n",
        "text/html": "<p>thaw <b>failed</b></p>\n",
    }
    assert out["accepted"] == ["ops@example.com", "dba@example.com"] and out["refused"] == []


async def test_html_defaults_to_the_escaped_text(call: Call, smtp: StartSmtp) -> None:
    server = await smtp()
    await call("notify.email", mail(server, to=["ops@example.com"]))
    html = parts(server.mailbox.received[0].message)["text/html"]
    assert html == "<pre>thaw failed &lt;after 3 attempts&gt;</pre>\n"


async def test_starttls_with_login(
    call: Call, smtp: StartSmtp, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    server = await smtp("starttls", auth=True)
    password = server.mailbox.password.decode()
    params = mail(server, tls="starttls", ca_file=str(pki.ca), username="reporter")
    with caplog.at_level(logging.DEBUG):
        out = await call("notify.email", params | {"password": password})
    (got,) = server.mailbox.received
    assert got.tls and got.login == b"reporter"
    assert [login for _, login in server.mailbox.logins] == [b"reporter"]
    assert password not in json.dumps(out) and password not in caplog.text


async def test_implicit_tls(call: Call, smtp: StartSmtp, pki: Pki) -> None:
    server = await smtp("tls")
    await call("notify.email", mail(server, tls="tls", ca_file=str(pki.ca)))
    assert server.mailbox.received[0].tls


async def test_untrusted_certificate_is_permanent(call: Call, smtp: StartSmtp) -> None:
    server = await smtp("starttls")
    with pytest.raises(PermanentError, match="certificate"):
        await call("notify.email", mail(server, tls="starttls"))  # system CAs: not ours
    assert server.mailbox.received == []


async def test_unreadable_ca_file_is_permanent(call: Call, smtp: StartSmtp) -> None:
    server = await smtp("starttls")
    with pytest.raises(PermanentError, match=r"ca_file /nonexistent/ca\.pem"):
        await call("notify.email", mail(server, tls="starttls", ca_file="/nonexistent/ca.pem"))


async def test_wrong_password_is_permanent(call: Call, smtp: StartSmtp, pki: Pki) -> None:
    server = await smtp("starttls", auth=True)
    params = mail(server, tls="starttls", ca_file=str(pki.ca), username="reporter")
    with pytest.raises(PermanentError, match="login refused") as info:
        await call("notify.email", params | {"password": "wrong-password"})
    assert "wrong-password" not in str(info.value)


async def test_no_password_in_clear(call: Call) -> None:
    params = {"host": "127.0.0.1", "tls": "none", "from": "a@example.com", "to": "b@example.com"}
    params |= {"subject": "s", "text": "t", "username": "u", "password": "pw-in-clear"}
    with pytest.raises(PermanentError, match="login needs tls") as info:
        await call("notify.email", params)
    assert "pw-in-clear" not in str(info.value)


async def test_unreachable_server_is_retryable(call: Call) -> None:
    params = {"host": "127.0.0.1", "port": free_port(), "tls": "none", "from": "a@example.com"}
    params |= {"to": "b@example.com", "subject": "s", "text": "t"}
    with pytest.raises(RetryableError, match="smtp"):
        await call("notify.email", params)


# -- sns --------------------------------------------------------------------------------------


@pytest.fixture
def aws(moto_url: str) -> AwsConfig:
    return AwsConfig(endpoint_url=moto_url, region="us-east-1")


def aws_api(aws: AwsConfig, service: str) -> Any:
    """A test-side client to set moto up and read results back."""
    return get_session().create_client(
        service,  # type: ignore[call-overload]
        region_name=aws.region,
        endpoint_url=aws.endpoint_url,
    )


async def test_sns_publish_reaches_a_subscribed_queue(call: Call, aws: AwsConfig) -> None:
    name = f"reports-{uuid.uuid4().hex[:8]}"
    async with aws_api(aws, "sns") as sns, aws_api(aws, "sqs") as sqs:
        topic = (await sns.create_topic(Name=name))["TopicArn"]
        queue = (await sqs.create_queue(QueueName=name))["QueueUrl"]
        attributes = await sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
        await sns.subscribe(
            TopicArn=topic, Protocol="sqs", Endpoint=attributes["Attributes"]["QueueArn"]
        )
        params = {
            "topic_arn": topic,
            "subject": "backup nightly:\nfailed",
            "message": "thaw failed",
            "attributes": json.dumps({"outcome": "failed", "attempts": 3, "steps": ["thaw"]}),
        }
        out = await call("notify.sns", params, aws=aws)
        answer = await sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=2)
    envelope = json.loads(answer["Messages"][0]["Body"])
    assert envelope["MessageId"] == out["message_id"]
    assert envelope["Message"] == "thaw failed" and envelope["Subject"] == "backup nightly: failed"
    assert envelope["MessageAttributes"] == {
        "outcome": {"Type": "String", "Value": "failed"},
        "attempts": {"Type": "Number", "Value": "3"},
        "steps": {"Type": "String.Array", "Value": '["thaw"]'},
    }


async def test_sns_fifo_topic_gets_group_and_dedup_ids(call: Call, aws: AwsConfig) -> None:
    async with aws_api(aws, "sns") as sns:
        name = f"reports-{uuid.uuid4().hex[:8]}.fifo"
        topic = (await sns.create_topic(Name=name, Attributes={"FifoTopic": "true"}))["TopicArn"]
    out = await call("notify.sns", {"topic_arn": topic, "message": "m"}, aws=aws)
    assert out["message_id"]


async def test_sns_unknown_topic_is_permanent(call: Call, aws: AwsConfig) -> None:
    params = {"topic_arn": "arn:aws:sns:us-east-1:123456789012:nope", "message": "m"}
    with pytest.raises(PermanentError, match="sns publish"):
        await call("notify.sns", params, aws=aws)


# -- end to end through the dispatcher --------------------------------------------------------

REPORT_AFTER_FAILURE = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {{name: bp}}
spec:
  actions:
    backup.post:
      - {{name: thaw, function: test.fail}}
      - name: report
        function: notify.webhook
        when: always
        with:
          url: "{url}"
          secret: "{{{{ secret('notify', 'webhook-secret') }}}}"
          type: backup.report
          data: >-
            {{{{ {{"outcome": outcome, "failed_steps": run.failed_steps, "steps": steps}}
                | tojson }}}}
"""


@pytest.fixture
def webhook_secret(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("SNAPHOOK_SECRET_NOTIFY_WEBHOOK_SECRET", receiver.secret)
    yield receiver.secret


async def test_report_runs_after_a_failure(
    harness: HarnessFactory, receiver: Receiver, webhook_secret: str
) -> None:
    h = await harness({"bp": REPORT_AFTER_FAILURE.format(url=receiver.url)})
    run = await h.final((await h.emit("backup.post", outcome="failed"))["run_id"])
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["thaw"]["status"] == "failed" and steps["report"]["status"] == "succeeded"
    (delivery,) = receiver.deliveries
    assert delivery.problem is None
    data = delivery.payload["data"]
    assert data["outcome"] == "failed" and data["failed_steps"] == ["thaw"]
    assert data["steps"]["thaw"]["error"] == "refused on purpose"
    assert steps["report"]["outputs"]["webhook_id"] == delivery.headers["webhook-id"]
    assert webhook_secret not in json.dumps(run)


async def test_shipped_notify_report_blueprint(
    harness: HarnessFactory, receiver: Receiver, webhook_secret: str, smtp: StartSmtp
) -> None:
    server = await smtp()
    params = {
        "webhook_url": receiver.url,
        "email_to": ["ops@example.com"],
        "smtp_host": "127.0.0.1",
        "smtp_port": server.port,
        "smtp_tls": "none",
    }
    shipped = (REPO / "hooks" / "notify.yaml").read_text(encoding="utf-8")
    # As its comment suggests: the report steps after a blueprint's own post steps.
    own_step = "    backup.post:\n      - {name: thaw, function: test.fail}\n"
    h = await harness(
        {"notify": shipped.replace("    backup.post:\n", own_step)},
        bindings=[{"blueprint": "notify-report", "match": {"namespace": "ns"}, "params": params}],
    )
    run = await h.final((await h.emit("backup.post", outcome="partial"))["run_id"])
    assert [s["status"] for s in run["steps"]] == ["failed", "succeeded", "succeeded"], run
    (delivery,) = receiver.deliveries
    assert delivery.problem is None
    data = delivery.payload["data"]
    assert data["outcome"] == "partial" and data["subject"] == "ns/Deployment/app"
    assert data["backup"] == {"name": "nightly", "id": "b1"} and data["run"] == run["run_id"]
    assert data["failed"] is True and data["failed_steps"] == ["thaw"]
    assert data["steps"]["thaw"]["error"] == "refused on purpose"
    (got,) = server.mailbox.received
    assert got.message["Subject"] == "[snaphook] backup nightly of ns/Deployment/app: partial"
    text, html = parts(got.message)["text/plain"], parts(got.message)["text/html"]
    assert text.startswith("Backup nightly (b1) of ns/Deployment/app: partial\n")
    assert "Failed steps: thaw\n" in text
    assert re.search(r"^  thaw: failed in [0-9.]+s: refused on purpose$", text, re.MULTILINE)
    assert "<h2>Backup nightly of ns/Deployment/app: partial</h2>" in html
    assert "<td>thaw</td><td>failed</td>" in html and "<td>refused on purpose</td>" in html
