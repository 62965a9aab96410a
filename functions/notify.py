"""``notify.*``: tell people and systems how a run went.

    notify.log      a line in the dispatcher's structured log
    notify.webhook  a JSON POST signed per Standard Webhooks, retried within the step
    notify.slack    a Slack incoming webhook: a run summary in blocks, with a text fallback
    notify.email    SMTP (plain, STARTTLS or TLS), plain text + HTML alternative
    notify.sns      an SNS publish, with message attributes

Each delivery carries an id derived from the run and the step, never from the attempt
(``webhook-id``, ``Message-ID``, the SNS FIFO deduplication id): a retried notification is
recognisable as the same one by whoever receives it twice.

Template values arrive as strings, so the structured params (``data``, ``steps``,
``failed_steps``, ``attributes``) also accept JSON text, as ``{{ steps | tojson }}``
renders it; ``failed_steps`` and ``to`` take a comma-separated list too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import html
import json
import logging
import random
import ssl
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Annotated, Any, Literal

import aiohttp
import aiosmtplib
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from functions.aws import aws_client, aws_failure
from functions.httpguard import http_failure
from functions.rendered import OptionalSecret, OptionalText
from functions.sdk import Context, FunctionError, PermanentError, RetryableError, function

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_USER_AGENT = "snaphook"
_RETRY_STATUSES = frozenset({408, 429})  # besides every 5xx


# -- notify.log -------------------------------------------------------------------------------


class LogParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=10_000)
    level: Literal["debug", "info", "warning"] = "info"


class LogResult(BaseModel):
    message: str


@function("notify.log")
async def log(ctx: Context, p: LogParams) -> LogResult:
    """Log ``message`` at ``level``; the message is also kept as the step's output."""
    ctx.logger.log(_LEVELS[p.level], p.message, extra={"notify": True})
    return LogResult(message=p.message)


# -- shared pieces ----------------------------------------------------------------------------


def _json_text(value: Any) -> Any:
    """A structured param given as JSON text (what a template renders) is decoded; a string
    is never valid for these fields otherwise, so nothing is guessed."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("expected JSON (e.g. rendered with | tojson)") from None
    return value


def _name_list(value: Any) -> Any:
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return _json_text(value)
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


JsonObject = Annotated[dict[str, Any], BeforeValidator(_json_text)]
NameList = Annotated[list[str], BeforeValidator(_name_list)]


class StepSummary(BaseModel):
    """One entry of ``steps`` as templates see it. Other keys (``outputs``, ...) are
    ignored: ``{{ steps | tojson }}`` can be passed as it is."""

    model_config = ConfigDict(extra="ignore")

    status: str = ""
    error: str | None = None
    duration: float | None = None
    attempts: int | None = None


StepTable = Annotated[dict[str, StepSummary], BeforeValidator(_json_text)]


def delivery_id(ctx: Context) -> str:
    """Stable for a run and step, whatever the attempt: the receiver's deduplication key."""
    digest = hashlib.sha256(f"{ctx.run_id}\0{ctx.step}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def _time_left(ctx: Context, limit: float) -> float:
    """``limit``, cut to what the step has left: a request never outlives its step."""
    return max(0.001, min(limit, ctx.remaining()))


def _attempt_timeout(ctx: Context, limit: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=_time_left(ctx, limit))


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None  # the HTTP-date form is not honoured


def _status_failure(
    what: str, status: int, retry_after: float | None = None, detail: str = ""
) -> FunctionError:
    message = f"{what} answered {status}" + (f": {detail}" if detail else "")
    if status >= 500 or status in _RETRY_STATUSES:
        return RetryableError(message, delay=retry_after)
    return PermanentError(message)


def _one_line(text: str, limit: int) -> str:
    """Headers and subjects are one line: templates written as YAML block scalars wrap."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# -- notify.webhook ---------------------------------------------------------------------------


def _whsec_key(secret: SecretStr) -> bytes:
    value = secret.get_secret_value()
    if not value.startswith("whsec_"):
        raise ValueError("must be whsec_ followed by the base64 key")
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("the part after whsec_ is not valid base64") from None
    if not key:
        raise ValueError("the key after whsec_ is empty")
    return key


class WebhookParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    secret: SecretStr  # whsec_<base64 key>, as Standard Webhooks senders hand them out
    type: str = Field(default="snaphook.report", min_length=1, max_length=200)
    data: JsonObject = Field(default_factory=dict)
    attempts: int = Field(default=5, ge=1, le=20)  # deliveries within this step
    backoff: float = Field(default=1.0, ge=0, le=300)  # first wait; doubles each time
    max_backoff: float = Field(default=30.0, ge=0, le=3600)
    timeout: float = Field(default=10.0, gt=0, le=300)  # per delivery

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        _whsec_key(value)
        return value


class WebhookResult(BaseModel):
    status: int
    webhook_id: str
    attempts: int


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


async def _post_signed(
    ctx: Context, p: WebhookParams, key: bytes, webhook_id: str, body: bytes
) -> int | FunctionError:
    """One delivery: the 2xx status, or the failure it ended with."""
    # Signed afresh for every delivery: the timestamp must be recent when it arrives.
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": _USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(key, webhook_id, timestamp, body),
    }
    what = f"POST {p.url.host}"
    try:
        # A receiver that redirects is misconfigured; following would re-POST elsewhere.
        async with ctx.http.post(
            str(p.url),
            data=body,
            headers=headers,
            timeout=_attempt_timeout(ctx, p.timeout),
            allow_redirects=False,
        ) as resp:
            if 200 <= resp.status < 300:
                return resp.status
            return _status_failure(what, resp.status, _retry_after(resp))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return http_failure(what, exc)


def _next_wait(ctx: Context, p: WebhookParams, delivery: int, failure: FunctionError) -> float:
    """How long to wait before the next delivery; raises ``failure`` if there is none."""
    if isinstance(failure, PermanentError) or delivery >= p.attempts:
        raise failure
    hint = failure.delay if isinstance(failure, RetryableError) else None
    if hint is not None:
        wait = min(hint, p.max_backoff)
    else:
        full = min(p.max_backoff, p.backoff * 2 ** (delivery - 1))
        wait = full / 2 + random.uniform(0, full / 2)  # jitter: many runs, one receiver
    if wait >= ctx.remaining():
        raise failure  # no time left in this attempt; the runner's retry may have some
    return wait


@function("notify.webhook")
async def webhook(ctx: Context, p: WebhookParams) -> WebhookResult:
    """POST ``{type, timestamp, data}`` signed per Standard Webhooks.

    5xx, 408, 429, timeouts and connection errors are retried here, up to ``attempts``
    deliveries with exponential backoff (``Retry-After`` honoured), as long as the step's
    timeout leaves room for the wait; then the step fails retryable, so a blueprint
    ``retry:`` carries on with the same ``webhook-id``. Other answers fail it for good.
    """
    key = _whsec_key(p.secret)
    webhook_id = delivery_id(ctx)
    payload = {"type": p.type, "timestamp": datetime.now(UTC).isoformat(), "data": p.data}
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    delivery = 1
    while True:
        outcome = await _post_signed(ctx, p, key, webhook_id, body)
        if isinstance(outcome, int):
            return WebhookResult(status=outcome, webhook_id=webhook_id, attempts=delivery)
        wait = _next_wait(ctx, p, delivery, outcome)
        ctx.logger.info("webhook delivery %d failed, next in %.2fs: %s", delivery, wait, outcome)
        await asyncio.sleep(wait)
        delivery += 1


# -- notify.slack -----------------------------------------------------------------------------

_HTTP_URL: TypeAdapter[AnyHttpUrl] = TypeAdapter(AnyHttpUrl)
_SLACK_HEADER_MAX = 150  # Slack's limit for a header block
_SLACK_TEXT_MAX = 2900  # under the 3000 of a section


class SlackParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhook_url: SecretStr  # the URL is the credential
    title: str = Field(min_length=1, max_length=1000)
    outcome: str = ""
    failed_steps: NameList = Field(default_factory=list)
    steps: StepTable = Field(default_factory=dict)  # timings: {{ steps | tojson }}
    text: str | None = Field(default=None, max_length=10_000)  # notification fallback
    timeout: float = Field(default=10.0, gt=0, le=300)

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        try:
            _HTTP_URL.validate_python(value.get_secret_value())
        except ValidationError:
            raise ValueError("must be an http(s) URL") from None
        return value


class SlackResult(BaseModel):
    status: int


def _timing_line(name: str, step: StepSummary) -> str:
    took = f"{step.duration:.2f}s" if step.duration is not None else "-"
    tries = f", {step.attempts} attempts" if step.attempts and step.attempts > 1 else ""
    return f"{name}: {step.status or '?'} in {took}{tries}"


def _clip(text: str, limit: int = _SLACK_TEXT_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slack_message(p: SlackParams) -> dict[str, Any]:
    """The incoming-webhook payload: header, outcome and failed steps, timings, errors."""
    failed = p.failed_steps or [n for n, s in p.steps.items() if s.status == "failed"]
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _one_line(p.title, _SLACK_HEADER_MAX)},
        },
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*Outcome*\n{p.outcome or '-'}"},
                {"type": "mrkdwn", "text": "*Failed steps*\n" + (", ".join(failed) or "none")},
            ],
        },
    ]
    if p.steps:
        lines = "\n".join(_timing_line(name, step) for name, step in p.steps.items())
        blocks.append(_mrkdwn("*Timings*\n```" + _clip(lines) + "```"))
    errors = [f"*{n}*: {p.steps[n].error}" for n in failed if n in p.steps and p.steps[n].error]
    if errors:
        blocks.append(_mrkdwn(_clip("\n".join(errors))))
    fallback = p.text or f"{p.title}: {p.outcome or 'done'}" + (
        f" (failed: {', '.join(failed)})" if failed else ""
    )
    return {"text": fallback, "blocks": blocks}


def _mrkdwn(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


@function("notify.slack")
async def slack(ctx: Context, p: SlackParams) -> SlackResult:
    """Post a run summary to a Slack incoming webhook. 5xx and 429 are retryable (by the
    step's ``retry:``), other refusals are not; errors never show the URL."""
    url = p.webhook_url.get_secret_value()
    what = f"slack POST {_HTTP_URL.validate_python(url).host}"
    try:
        async with ctx.http.post(
            url,
            json=slack_message(p),
            headers={"User-Agent": _USER_AGENT},
            timeout=_attempt_timeout(ctx, p.timeout),
            allow_redirects=False,
        ) as resp:
            status, retry_after = resp.status, _retry_after(resp)
            reason = (await resp.content.read(200)).decode("utf-8", errors="replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise http_failure(what, exc) from None
    if status != 200:  # Slack says why in a word or two: invalid_token, no_text, ...
        raise _status_failure(what, status, retry_after, _one_line(reason, 200))
    return SlackResult(status=status)


# -- notify.email -----------------------------------------------------------------------------

_DEFAULT_PORTS = {"none": 25, "starttls": 587, "tls": 465}


def _check_address(value: str) -> str:
    _, address = parseaddr(value)
    if "@" not in address or any(c in value for c in "\r\n"):
        raise ValueError("not an email address")
    return value


Address = Annotated[str, BeforeValidator(_check_address)]


class EmailParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)  # 25, 587 or 465 by ``tls``
    tls: Literal["none", "starttls", "tls"] = "starttls"
    # PEM bundle to verify the server with; default: the system's CAs.
    ca_file: OptionalText = None
    username: OptionalSecret = None
    password: OptionalSecret = None
    from_: Address = Field(alias="from")
    to: Annotated[list[Address], BeforeValidator(_name_list)] = Field(min_length=1)
    subject: str = Field(min_length=1, max_length=1000)
    text: str = Field(min_length=1, max_length=1_000_000)
    html: str | None = Field(default=None, max_length=1_000_000)  # default: the text, escaped
    timeout: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _check_login(self) -> EmailParams:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.username is not None and self.tls == "none":
            raise ValueError("a login needs tls: starttls or tls (never a password in clear)")
        return self


class EmailResult(BaseModel):
    message_id: str
    accepted: list[str]
    refused: list[str]


def email_message(ctx: Context, p: EmailParams) -> EmailMessage:
    """multipart/alternative: the plain text first, then the HTML part mail clients show."""
    msg = EmailMessage()
    domain = parseaddr(p.from_)[1].rpartition("@")[2] or "snaphook"
    msg["Subject"] = _one_line(p.subject, 998)
    msg["From"] = p.from_
    msg["To"] = ", ".join(p.to)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{delivery_id(ctx)}@{domain}>"  # the same on every retry
    msg["X-Snaphook-Run"] = ctx.run_id
    msg.set_content(p.text)
    body = p.html if p.html is not None else f"<pre>{html.escape(p.text)}</pre>"
    msg.add_alternative(body, subtype="html")
    return msg


def _tls_context(p: EmailParams) -> ssl.SSLContext | None:
    if p.tls == "none":
        return None
    try:
        return ssl.create_default_context(cafile=p.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(f"ca_file {p.ca_file}: {exc}") from None


def _smtp_client(ctx: Context, p: EmailParams) -> aiosmtplib.SMTP:
    tls_context = _tls_context(p)
    return aiosmtplib.SMTP(
        hostname=p.host,
        port=p.port or _DEFAULT_PORTS[p.tls],
        use_tls=p.tls == "tls",
        # True: STARTTLS is required; False: never, not even opportunistically.
        start_tls=p.tls == "starttls",
        tls_context=tls_context,
        timeout=_time_left(ctx, p.timeout),
    )


def _smtp_failure(exc: Exception) -> FunctionError:
    """4xx answers and lost connections are worth a retry; 5xx, a refused login and a
    certificate that does not verify are not."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return PermanentError(f"smtp: login refused ({exc.code})")
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = ", ".join(r.recipient for r in exc.recipients)
        return PermanentError(f"smtp: all recipients refused: {refused}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        kind = RetryableError if 400 <= exc.code < 500 else PermanentError
        return kind(f"smtp: {exc.code} {_one_line(exc.message, 200)}")
    if isinstance(exc, ssl.SSLCertVerificationError) or isinstance(
        exc.__cause__, ssl.SSLCertVerificationError
    ):
        return PermanentError(f"smtp: TLS certificate not trusted: {exc}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported) or type(exc) is aiosmtplib.SMTPException:
        # The server lacks what we asked for (STARTTLS, an AUTH method): retrying won't help.
        return PermanentError(f"smtp: {exc}")
    return RetryableError(f"smtp: {type(exc).__name__}: {exc}")


@function("notify.email")
async def email(ctx: Context, p: EmailParams) -> EmailResult:
    """Send a plain text + HTML mail through SMTP. The server certificate is verified
    (against ``ca_file`` if given); the password is used for AUTH only, never logged."""
    msg = email_message(ctx, p)
    client = _smtp_client(ctx, p)
    try:
        async with client:
            if p.username is not None and p.password is not None:
                await client.login(p.username.get_secret_value(), p.password.get_secret_value())
            refused, _ = await client.send_message(msg)
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
        raise _smtp_failure(exc) from None
    accepted = [addr for addr in p.to if parseaddr(addr)[1] not in refused]
    ctx.logger.info("mail sent to %d recipient(s)", len(accepted))
    return EmailResult(message_id=str(msg["Message-ID"]), accepted=accepted, refused=list(refused))


# -- notify.sns -------------------------------------------------------------------------------

AttributeValue = str | int | float | list[str]


class SnsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic_arn: str = Field(
        pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]+(\.fifo)?$"
    )
    message: str = Field(min_length=1, max_length=256 * 1024)
    subject: str | None = Field(default=None, max_length=1000)  # cut to SNS's 100
    attributes: Annotated[dict[str, AttributeValue], BeforeValidator(_json_text)] = Field(
        default_factory=dict
    )
    group_id: str = Field(default="snaphook", min_length=1, max_length=128)  # FIFO topics


class SnsResult(BaseModel):
    message_id: str


def _attribute(value: AttributeValue) -> dict[str, str]:
    if isinstance(value, list):
        return {"DataType": "String.Array", "StringValue": json.dumps(value)}
    if isinstance(value, int | float):
        return {"DataType": "Number", "StringValue": str(value)}
    return {"DataType": "String", "StringValue": value}


def _publish_request(ctx: Context, p: SnsParams) -> dict[str, Any]:
    request: dict[str, Any] = {"TopicArn": p.topic_arn, "Message": p.message}
    if p.subject:
        request["Subject"] = _one_line(p.subject, 100)
    if p.attributes:
        request["MessageAttributes"] = {k: _attribute(v) for k, v in p.attributes.items()}
    if p.topic_arn.endswith(".fifo"):
        # SNS drops a repeat with the same id for five minutes: retries publish once.
        request["MessageGroupId"] = p.group_id
        request["MessageDeduplicationId"] = delivery_id(ctx)
    return request


@function("notify.sns")
async def sns(ctx: Context, p: SnsParams) -> SnsResult:
    """Publish ``message`` to an SNS topic (in the topic's region) through aiobotocore."""
    region = p.topic_arn.split(":")[3]
    try:
        async with aws_client(ctx, "sns", region=region) as client:
            answer = await client.publish(**_publish_request(ctx, p))
    except (BotoCoreError, ClientError) as exc:
        raise aws_failure(f"sns publish to {p.topic_arn}", exc) from None
    return SnsResult(message_id=str(answer["MessageId"]))
