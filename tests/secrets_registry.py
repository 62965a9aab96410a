"""Every secret the test suite uses, so that tests/secret_hygiene.py can look for them.

Three kinds:

``LITERALS``
    fixed values written in the tests (passwords, API keys, tokens), each with the file
    that uses it; ``tests/test_secret_hygiene.py`` checks that each one still appears
    there, so the list cannot silently drift from the tests.
``PATTERNS``
    the shapes of the random secrets tests make on the fly (``f"pw-{uuid4().hex}"``,
    fresh ``whsec_`` keys, PEM private keys), for tests that do not register them.
``test_secret(prefix)``
    a fresh, unique, registered value for new tests: prefer it to a literal.

Values of ``SNAPHOOK_SECRET_*`` environment variables set while a test runs are registered
too (see :func:`register_env`); for a URL only its password counts as the secret, since a
password-less DSN is an address, not a credential.

Deliberately absent: the AWS credentials ``testing``/``testing`` that moto wants (an
ordinary English word would match innocent text everywhere) and the empty MySQL password of
a development machine.
"""

from __future__ import annotations

import base64
import re
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "LITERALS",
    "PATTERNS",
    "TestSecret",
    "register",
    "register_env",
    "snapshot",
    "test_secret",
]

MIN_LENGTH = 6  # shorter values would match innocent text (the redactor's floor is 4)


@dataclass(frozen=True)
class TestSecret:
    """A secret value and where it comes from. The label is what reports show."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    label: str
    value: str
    origin: str
    written: str = ""  # how the origin file spells it, when not as the value itself


LITERALS: tuple[TestSecret, ...] = (
    # Databases and data stores
    TestSecret("postgres password", "Pw-7f3kq!never-shown", "tests/test_postgres.py"),
    TestSecret("mongodb password", "Hunter2-s3cret", "tests/test_mongodb.py"),
    TestSecret("mysql wrong password", "Wr0ng-pa55word", "tests/test_mysql.py"),
    TestSecret("mysql awkward password", "p\"a\\ss #w;rd'x ", "tests/test_mysql.py"),
    TestSecret("couchbase password", "cb-s3cret-Pa55", "tests/test_couchbase.py"),
    TestSecret("couchbase wrong password", "wrong-Pa55word", "tests/test_couchbase.py"),
    TestSecret("rds master password", "not-a-secret-1", "tests/test_rds.py"),
    TestSecret(
        "elasticsearch api key",
        "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==",
        "tests/test_elasticsearch.py",
    ),
    TestSecret(
        "elasticsearch wrong api key",
        "d3Jvbmcta2V5LWlkOndyb25nLWtleS1zZWNyZXQ=",
        "tests/test_elasticsearch.py",
    ),
    TestSecret("elasticsearch password", "s3cret-pw", "tests/test_elasticsearch.py"),
    TestSecret(
        "elasticsearch basic auth", "YmFja3VwOnMzY3JldC1wdw==", "tests/test_elasticsearch.py"
    ),
    TestSecret("elasticsearch wrong password", "not-the-password", "tests/test_elasticsearch.py"),
    # Notifications
    TestSecret("slack webhook token", "s3cr3t-token", "tests/test_notify.py"),
    TestSecret("smtp password", "mail-pw-0123", "tests/test_notify.py"),
    TestSecret("smtp wrong password", "wrong-password", "tests/test_notify.py"),
    TestSecret("smtp password in clear", "pw-in-clear", "tests/test_notify.py"),
    TestSecret("webhook key without whsec_", "plain-key-1234", "tests/test_notify.py"),
    # Cloud SQL: the key material of a deliberately broken service-account key
    TestSecret("cloudsql broken key", "c2VjcmV0LWtleS1tYXRlcmlhbA==", "tests/test_cloudsql.py"),
    # Templates, params and runs
    TestSecret("template secret", "hunter2-very-secret", "tests/test_runner.py"),
    TestSecret("secret param", "tok-7c1d0b2e-never-shown", "tests/test_runner.py"),
    TestSecret("secret param (blueprints)", "tok-58213", "tests/test_blueprints.py"),
    TestSecret("dsn password (blueprints)", "pw-0451", "tests/test_blueprints.py"),
    TestSecret("url password (logs)", "hunter2-pw", "tests/test_logs.py"),
    TestSecret("url password (logs)", "p4ssw0rd", "tests/test_logs.py"),
    # Ingress authentication: Standard Webhooks keys, as the sender holds them (whsec_ +
    # base64, also matched by the whsec_ pattern), as bare base64 and as the key bytes.
    *(
        secret
        for key in (
            b"k10-signing-key-0123456789abcdef",
            b"k10-signing-key-next-0123456789ab",
            b"nobody-knows-this-key-0123456789",
        )
        for secret in (
            TestSecret("webhook key", key.decode(), "tests/test_auth.py"),
            TestSecret(
                "webhook key (base64)",
                base64.b64encode(key).decode(),
                "tests/test_auth.py",
                written=key.decode(),
            ),
        )
    ),
)

PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern))
    for label, pattern in (
        # f"s3cr3t-{uuid4().hex}" (test_logs), f"pw-…" (test_sdk, test_templating),
        # f"tok-…" (test_builtin_functions, test_templating), f"hunter2-…" (test_sdk)
        ("random secret", r"(?:s3cr3t|pw|tok|hunter2)-[0-9a-f]{32}"),
        ("random redis password", r"Pw[0-9a-f]{32}"),  # test_redis
        # A Standard Webhooks key: whsec_ and the base64 of 24-64 random bytes.
        ("whsec_ key", r"whsec_[A-Za-z0-9+/]{24,}={0,2}"),
        ("fake Google access token", r"ya29\.[0-9a-f]{32}"),  # tests/cloudsql_server.py
        ("PEM private key", r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        ("registered test secret", r"tsecret-[a-z0-9]{1,24}-[0-9a-f]{32}"),  # test_secret()
    )
)

_lock = threading.Lock()
_dynamic: dict[str, TestSecret] = {}
_version = 0


def register(value: str, label: str, origin: str = "registered at run time") -> str:
    """Look for ``value`` from now on; returns it. Values below six characters are ignored."""
    global _version
    if len(value) >= MIN_LENGTH:
        with _lock:
            if value not in _dynamic and all(value != s.value for s in LITERALS):
                _dynamic[value] = TestSecret(label, value, origin)
                _version += 1
    return value


def test_secret(prefix: str = "secret") -> str:
    """A unique secret value, registered: ``tsecret-<prefix>-<32 hex digits>``.

    The shape also matches a pattern, so a value that reaches a subprocess (whose
    registry is its own) is still recognised in that process's log file.
    """
    cleaned = re.sub(r"[^a-z0-9]", "", prefix.lower())[:24] or "secret"
    return register(f"tsecret-{cleaned}-{uuid.uuid4().hex}", f"test_secret({prefix!r})")


test_secret.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def register_env(environ: Mapping[str, str], origin: str) -> None:
    """Register the secrets held by ``SNAPHOOK_SECRET_*`` variables of ``environ``."""
    for name, value in environ.items():
        if name.startswith("SNAPHOOK_SECRET_"):
            for part in _credential_parts(value):
                register(part, name, origin)


def _credential_parts(value: str) -> Iterable[str]:
    if "://" not in value:
        return [value]
    try:
        password = urlsplit(value).password
    except ValueError:
        return [value]
    return [password] if password else []


def snapshot() -> tuple[int, tuple[TestSecret, ...]]:
    """(version, every literal and registered secret); the version changes on registration."""
    with _lock:
        return _version, (*LITERALS, *_dynamic.values())
