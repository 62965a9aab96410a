"""``cloudsql.export`` / ``cloudsql.import`` against the fake Admin API, token endpoint and
metadata server of ``tests/cloudsql_server.py``, over real HTTP."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from functions import cloudsql
from functions.httpguard import guarded_session
from functions.sdk import PermanentError, RetryableError
from tests.cloudsql_server import FakeCloudSql
from tests.conftest import FunctionCaller

EMAIL = "snaphook@shop-prod.iam.gserviceaccount.com"
URI = "gs://shop-backups/orders/b1.sql.gz"


def _pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """The service account's key, and an impostor's."""
    return _new_key(), _new_key()


@pytest.fixture(autouse=True)
def no_cached_tokens() -> Iterator[None]:
    # Tokens are cached per process; a test must not start with another test's token.
    cloudsql._tokens.clear()
    yield
    cloudsql._tokens.clear()


@pytest.fixture
async def fake(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> AsyncIterator[FakeCloudSql]:
    server = FakeCloudSql(keys[0].public_key(), EMAIL, key_id="k1")
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def key_file(fake: FakeCloudSql, keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> str:
    return json.dumps(fake.service_account(_pem(keys[0])))


def params(fake: FakeCloudSql, **more: Any) -> dict[str, Any]:
    return {
        "project": fake.project,
        "instance": "orders",
        "uri": URI,
        "api_url": fake.url,
        "poll_interval": 0.01,
        **more,
    }


# --- export ------------------------------------------------------------------------------


async def test_export_with_a_service_account_key(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    p = params(fake, service_account_json=key_file, databases=["orders"])
    out = await call_function("cloudsql.export", p)
    assert out["status"] == "DONE" and out["operation_type"] == "EXPORT"
    assert out["operation"] in fake.operations and out["adopted"] is False
    assert out["uri"] == URI and out["ended_at"]
    assert fake.requests == [
        {
            "exportContext": {
                "kind": "sql#exportContext",
                "fileType": "SQL",
                "uri": URI,
                "databases": ["orders"],
                "offload": False,
            }
        }
    ]
    assert fake.operations[out["operation"]].polls == 2  # PENDING → RUNNING → DONE
    assert not any(token in json.dumps(out) for token in fake.tokens)
    await call_function("cloudsql.export", p)
    assert fake.grants == 1  # the second export used the cached token


async def test_export_with_the_metadata_server_token(
    fake: FakeCloudSql, call_function: FunctionCaller
) -> None:
    out = await call_function("cloudsql.export", params(fake, metadata_url=fake.url))
    assert out["status"] == "DONE"
    assert fake.metadata_grants == 1 and fake.grants == 0


async def test_csv_export_sends_its_query(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    query = "SELECT id, total FROM orders WHERE paid"
    p = params(
        fake,
        service_account_json=key_file,
        file_type="CSV",
        databases="orders",
        select_query=query,
        offload=True,
    )
    await call_function("cloudsql.export", p)
    context = fake.requests[0]["exportContext"]
    assert context["csvExportOptions"] == {"selectQuery": query}
    assert context["databases"] == ["orders"] and context["offload"] is True


async def test_sql_export_of_some_tables(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    p = params(fake, service_account_json=key_file, tables="orders, items", schema_only=True)
    await call_function("cloudsql.export", p)
    options = fake.requests[0]["exportContext"]["sqlExportOptions"]
    assert options == {"tables": ["orders", "items"], "schemaOnly": True}


async def test_csv_export_without_query_is_refused_before_calling(
    fake: FakeCloudSql, call_function: FunctionCaller
) -> None:
    with pytest.raises(PermanentError, match="a CSV export needs select_query"):
        await call_function("cloudsql.export", params(fake, file_type="CSV"))
    assert fake.requests == []


# --- credentials -------------------------------------------------------------------------


async def test_a_key_the_account_does_not_have_is_refused_without_showing_it(
    fake: FakeCloudSql,
    keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey],
    call_function: FunctionCaller,
    caplog: pytest.LogCaptureFixture,
) -> None:
    impostor = _pem(keys[1])
    key_file = json.dumps(fake.service_account(impostor))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PermanentError) as failure:
        await call_function("cloudsql.export", params(fake, service_account_json=key_file))
    message = str(failure.value)
    assert f"token for {EMAIL}: HTTP 400: invalid_grant Invalid JWT Signature." == message
    body = impostor.splitlines()[5]  # a line of the key material
    assert body not in message and body not in caplog.text
    assert fake.requests == [] and fake.tokens == set()


async def test_a_revoked_token_is_renewed_once(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    p = params(fake, service_account_json=key_file)
    await call_function("cloudsql.export", p)
    fake.revoke_tokens()
    out = await call_function("cloudsql.export", p)
    assert out["status"] == "DONE" and fake.grants == 2


async def test_expired_tokens_are_never_reused(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    fake.token_lifetime = 0
    await call_function("cloudsql.export", params(fake, service_account_json=key_file))
    assert fake.grants == 3  # the export, and each of the two polls


async def test_a_project_the_account_may_not_touch_is_permanent(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    p = params(fake, service_account_json=key_file, project="other-project")
    with pytest.raises(PermanentError, match="HTTP 403: The client is not authorized"):
        await call_function("cloudsql.export", p)


@pytest.mark.parametrize(
    ("key_file", "expected"),
    [
        ("{not json", "service_account_json is not JSON"),
        (json.dumps({"client_email": EMAIL}), "bad or missing private_key"),
        (json.dumps({"type": "authorized_user", "private_key": "x"}), "client_email, type"),
    ],
)
async def test_unusable_key_files_name_the_problem(
    fake: FakeCloudSql, call_function: FunctionCaller, key_file: str, expected: str
) -> None:
    with pytest.raises(PermanentError, match=expected):
        await call_function("cloudsql.export", params(fake, service_account_json=key_file))


async def test_a_broken_private_key_is_not_echoed(
    fake: FakeCloudSql, call_function: FunctionCaller
) -> None:
    broken = (
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
    )
    key_file = json.dumps(fake.service_account(broken))
    with pytest.raises(PermanentError, match="private_key is not a usable RSA key") as failure:
        await call_function("cloudsql.export", params(fake, service_account_json=key_file))
    assert "c2VjcmV0" not in str(failure.value)


async def test_an_unreachable_metadata_server_is_retryable(
    fake: FakeCloudSql, call_function: FunctionCaller
) -> None:
    p = params(fake, metadata_url="http://127.0.0.1:9", request_timeout=2)
    with pytest.raises(RetryableError, match="no service_account_json given"):
        await call_function("cloudsql.export", p)


async def test_the_http_guard_refuses_the_real_metadata_address() -> None:
    # The dispatcher hands functions a guarded session; the guard has the last word.
    from dispatcher.app import load_functions
    from dispatcher.invokers.inprocess import InProcessInvoker
    from dispatcher.secrets import EnvSecretResolver

    async with guarded_session() as http:
        caller = FunctionCaller(InProcessInvoker(load_functions([]), http, EnvSecretResolver()))
        p = {"project": "shop-prod", "instance": "orders", "uri": URI}
        with pytest.raises(PermanentError, match=r"GET 169\.254\.169\.254: refusing to connect"):
            await caller("cloudsql.export", {**p, "metadata_url": "http://169.254.169.254"})


# --- operations --------------------------------------------------------------------------


async def test_a_failed_operation_is_permanent_with_its_errors(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    fake.fail_next("ERROR_RDBMS", "pg_dump: permission denied for table payments")
    with pytest.raises(PermanentError) as failure:
        await call_function("cloudsql.export", params(fake, service_account_json=key_file))
    message = str(failure.value)
    assert message.startswith("EXPORT operation ") and " of orders failed: " in message
    assert message.endswith("ERROR_RDBMS: pg_dump: permission denied for table payments")


async def test_another_operation_in_progress_is_retryable(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    started = await call_function(
        "cloudsql.export", params(fake, service_account_json=key_file, wait=0)
    )
    assert started["status"] == "PENDING"
    with pytest.raises(RetryableError, match=r"HTTP 409: .*already in progress") as failure:
        await call_function("cloudsql.import", params(fake, service_account_json=key_file))
    assert failure.value.delay is not None


async def test_a_retried_export_adopts_its_running_operation(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    p = params(fake, service_account_json=key_file, wait=0.01, poll_interval=5)
    with pytest.raises(RetryableError, match=r"EXPORT operation .* is still (PENDING|RUNNING)"):
        await call_function("cloudsql.export", p)
    out = await call_function("cloudsql.export", {**p, "wait": 30, "poll_interval": 0.01})
    assert out["adopted"] is True and out["status"] == "DONE"
    assert len(fake.operations) == 1


async def test_unknown_instance_is_permanent(
    fake: FakeCloudSql, key_file: str, call_function: FunctionCaller
) -> None:
    p = params(fake, service_account_json=key_file, instance="missing")
    with pytest.raises(PermanentError, match="HTTP 404"):
        await call_function("cloudsql.export", p)


# --- import ------------------------------------------------------------------------------


async def test_sql_import(fake: FakeCloudSql, key_file: str, call_function: FunctionCaller) -> None:
    p = params(fake, service_account_json=key_file, database="orders", import_user="app")
    out = await call_function("cloudsql.import", p)
    assert out["status"] == "DONE" and out["operation_type"] == "IMPORT"
    assert fake.requests == [
        {
            "importContext": {
                "kind": "sql#importContext",
                "fileType": "SQL",
                "uri": URI,
                "database": "orders",
                "importUser": "app",
            }
        }
    ]


async def test_csv_import_names_table_and_columns(
    fake: FakeCloudSql, call_function: FunctionCaller
) -> None:
    p = params(
        fake,
        metadata_url=fake.url,
        file_type="CSV",
        database="orders",
        table="payments",
        columns="id, total",
    )
    await call_function("cloudsql.import", p)
    context = fake.requests[0]["importContext"]
    assert context["csvImportOptions"] == {"table": "payments", "columns": ["id", "total"]}


async def test_csv_import_without_table_is_refused(
    fake: FakeCloudSql, call_function: FunctionCaller
) -> None:
    p = params(fake, file_type="CSV", database="orders")
    with pytest.raises(PermanentError, match="a CSV import needs database and table"):
        await call_function("cloudsql.import", p)
