"""redis.* against the machine's real Redis, S3 through moto.

Every test works under its own key prefixes (db 0, and SPARE_DB for the cross-DB import)
and deletes only its own keys, so tests run in parallel under xdist. Tests that touch
server-wide state (BGSAVE, CONFIG SET, the save status) take turns through a file lock.
"""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import hashlib
import json
import os
import signal
import struct
import tempfile
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from functions.sdk import ObjectStore, PermanentError, RetryableError
from functions.storage import MIN_PART, s3_client
from tests.conftest import FunctionCaller, HarnessFactory, free_port

REDIS = os.environ.get("SNAPHOOK_TEST_REDIS", "redis://127.0.0.1:6379")
SPARE_DB = 11  # the cross-DB import writes here, under its own prefix
TTL_TOLERANCE_MS = 100
T = TypeVar("T")
BLUEPRINT = Path(__file__).resolve().parent.parent / "hooks" / "redis.yaml"


async def cmd(client: Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


@pytest.fixture
async def r() -> AsyncIterator[Redis]:
    client = Redis.from_url(f"{REDIS}/0")
    try:
        await cmd(client, "PING")
    except RedisConnectionError:
        await client.aclose()
        if os.environ.get("CI"):  # CI provides Redis: its absence is a failure there
            pytest.fail(f"no Redis at {REDIS}")
        pytest.skip(f"no Redis at {REDIS} (see DEVELOPERS.md)")
    yield client
    await client.aclose()


@pytest.fixture
async def spare(r: Redis) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"{REDIS}/{SPARE_DB}")
    yield client
    await client.aclose()


@pytest.fixture
async def prefixes(r: Redis, spare: Redis) -> AsyncIterator[Callable[[], bytes]]:
    """Makes unique key prefixes; afterwards deletes their keys (only theirs) in both DBs."""
    made: list[bytes] = []

    def new() -> bytes:
        made.append(f"snaphook-test:{uuid.uuid4().hex[:12]}:".encode())
        return made[-1]

    yield new
    for client in (r, spare):
        for prefix in made:
            keys = [key async for key in client.scan_iter(match=prefix + b"*", count=1000)]
            if keys:
                await cmd(client, "DEL", *keys)


@pytest.fixture
async def server_wide() -> AsyncIterator[None]:
    """Held by tests that save or reconfigure the server, across xdist workers."""
    with (Path(tempfile.gettempdir()) / "snaphook-redis-tests.lock").open("a") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- data -------------------------------------------------------------------------------


async def populate(client: Redis, p: bytes) -> None:
    """Every type, small and large encodings, a binary key name, with and without TTLs."""
    await cmd(client, "SET", p + b"str", b"hello\x00world\xff")
    await cmd(client, "SET", p + b"str:ttl", b"short-lived", "PX", 60_000)
    await cmd(client, "SET", p + b"\x00bin\xff key*?[x]\n", b"binary", "PX", 90_000)
    await cmd(client, "HSET", p + b"hash", "a", "1", "b", b"\x00\x01")
    await cmd(client, "HSET", p + b"hash:big", *[f"f{i}" for i in range(600)])
    await cmd(client, "RPUSH", p + b"list", "x", "y", "x", "z")
    await cmd(client, "PEXPIRE", p + b"list", 120_000)
    await cmd(client, "SADD", p + b"set", "a", "b", "c")
    await cmd(client, "SADD", p + b"set:ints", *range(300))
    await cmd(client, "ZADD", p + b"zset", 1.5, "one", -2, "two", 3e10, "three")
    await cmd(client, "ZADD", p + b"zset:big", *[x for i in range(200) for x in (i, f"m{i}")])
    for n in range(3):
        await cmd(client, "XADD", p + b"stream", "*", "n", n, "blob", os.urandom(8))
    await cmd(client, "XGROUP", "CREATE", p + b"stream", "readers", "0")


async def value_of(client: Redis, key: bytes) -> tuple[str, Any]:
    kind = (await cmd(client, "TYPE", key)).decode()
    read = {
        "string": ("GET", key),
        "hash": ("HGETALL", key),
        "list": ("LRANGE", key, 0, -1),
        "set": ("SMEMBERS", key),
        "zset": ("ZRANGE", key, 0, -1, "WITHSCORES"),
        "stream": ("XRANGE", key, "-", "+"),
    }[kind]
    value = await cmd(client, *read)
    if kind == "stream":  # consumer groups travel with the stream
        groups = await cmd(client, "XINFO", "GROUPS", key)
        value = (value, [(g[b"name"], g[b"last-delivered-id"]) for g in groups])
    return kind, value


async def snapshot(client: Redis, p: bytes) -> dict[bytes, tuple[str, Any, int]]:
    """key (without its prefix) → (type, value, absolute expiry in ms or -1)."""
    keys = [key async for key in client.scan_iter(match=p + b"*", count=1000)]
    found = {}
    for key in keys:
        kind, value = await value_of(client, key)
        found[key[len(p) :]] = (kind, value, await cmd(client, "PEXPIRETIME", key))
    return found


def assert_same(after: dict[bytes, Any], before: dict[bytes, Any]) -> None:
    assert sorted(after) == sorted(before)
    for key, (kind, value, expiry) in before.items():
        assert after[key][:2] == (kind, value), key
        if expiry == -1:
            assert after[key][2] == -1, key
        else:
            assert abs(after[key][2] - expiry) <= TTL_TOLERANCE_MS, key


async def drop(client: Redis, p: bytes) -> None:
    keys = [key async for key in client.scan_iter(match=p + b"*", count=1000)]
    await cmd(client, "DEL", *keys)


async def fetch(store: ObjectStore, url: str) -> bytes:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    async with s3_client(store) as s3:
        answer = await s3.get_object(Bucket=bucket, Key=key)
        async with answer["Body"] as body:
            data: bytes = await body.read()
            return data


async def put(store: ObjectStore, url: str, data: bytes) -> None:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    async with s3_client(store) as s3:
        await s3.put_object(Bucket=bucket, Key=key, Body=data)


# --- export / import --------------------------------------------------------------------


async def test_round_trip_keeps_types_values_and_ttls(
    call_function: FunctionCaller, r: Redis, prefixes: Callable[[], bytes], bucket: str
) -> None:
    p = prefixes()
    await populate(r, p)
    before = await snapshot(r, p)
    url = f"s3://{bucket}/ns/b1/redis.snap.gz"
    match = p.decode() + "*"
    exported = await call_function("redis.export", {"url": f"{REDIS}/0", "to": url, "match": match})
    assert (exported["keys"], exported["vanished"], exported["url"]) == (len(before), 0, url)
    assert exported["parts"] == 1

    await drop(r, p)
    imported = await call_function("redis.import", {"url": f"{REDIS}/0", "from": url})
    assert imported["keys"] == len(before) == 11
    assert (imported["expired"], imported["renamed"]) == (0, 0)
    assert (imported["sha256"], imported["bytes"]) == (exported["sha256"], exported["bytes"])
    assert_same(await snapshot(r, p), before)


async def test_stream_format_is_as_documented(
    call_function: FunctionCaller,
    r: Redis,
    prefixes: Callable[[], bytes],
    bucket: str,
    object_store: ObjectStore,
) -> None:
    p = prefixes()
    await cmd(r, "SET", p + b"plain", b"v")
    await cmd(r, "SET", p + b"ttl", b"w", "PX", 30_000)
    url = f"s3://{bucket}/format.snap.gz"
    out = await call_function(
        "redis.export", {"url": REDIS, "to": url, "match": p.decode() + "*", "db": 0}
    )
    stored = await fetch(object_store, url)
    assert hashlib.sha256(stored).hexdigest() == out["sha256"] and len(stored) == out["bytes"]

    # Parsed here with struct, independently of the module, per its docstring.
    data = gzip.decompress(stored)
    magic, version, size = struct.unpack_from(">8sHI", data)
    assert (magic, version) == (b"SHKREDIS", 1)
    meta = json.loads(data[14 : 14 + size])
    assert (meta["db"], meta["match"]) == (0, p.decode() + "*")
    assert set(meta) == {"redis_version", "db", "match", "exported_at_ms"}
    pos, records = 14 + size, {}
    while data[pos : pos + 1] == b"K":
        (klen,) = struct.unpack_from(">I", data, pos + 1)
        key = data[pos + 5 : pos + 5 + klen]
        expire_at, plen = struct.unpack_from(">qQ", data, pos + 5 + klen)
        start = pos + 5 + klen + 16
        records[key] = (expire_at, data[start : start + plen])
        pos = start + plen
    assert data[pos : pos + 1] == b"E"
    assert struct.unpack_from(">Q", data, pos + 1) == (2,) and len(data) == pos + 9
    assert records[p + b"plain"] == (-1, await cmd(r, "DUMP", p + b"plain"))
    expire_at, payload = records[p + b"ttl"]
    assert abs(expire_at - await cmd(r, "PEXPIRETIME", p + b"ttl")) <= TTL_TOLERANCE_MS
    assert payload == await cmd(r, "DUMP", p + b"ttl")


async def test_import_into_another_db(
    call_function: FunctionCaller,
    r: Redis,
    spare: Redis,
    prefixes: Callable[[], bytes],
    bucket: str,
) -> None:
    p = prefixes()
    await populate(r, p)
    before = await snapshot(r, p)
    url = f"s3://{bucket}/db.snap.gz"
    await call_function("redis.export", {"url": f"{REDIS}/0", "to": url, "match": p.decode() + "*"})
    out = await call_function("redis.import", {"url": f"{REDIS}/0", "from": url, "db": SPARE_DB})
    assert out["keys"] == len(before)
    assert_same(await snapshot(spare, p), before)
    assert_same(await snapshot(r, p), before)  # the source is untouched


async def test_prefix_rewrite(
    call_function: FunctionCaller, r: Redis, prefixes: Callable[[], bytes], bucket: str
) -> None:
    p, q = prefixes(), prefixes()
    await populate(r, p)
    before = await snapshot(r, p)
    other = q + p + b"other"  # exported too, but does not start with `from`: kept as is
    await cmd(r, "SET", other, b"v")
    url = f"s3://{bucket}/rename.snap.gz"
    await call_function("redis.export", {"url": REDIS, "to": url, "match": f"*{p.decode()}*"})
    await cmd(r, "DEL", other)
    rule = {"from": p.decode(), "to": q.decode()}
    out = await call_function("redis.import", {"url": REDIS, "from": url, "rename_prefix": rule})
    assert (out["keys"], out["renamed"]) == (len(before) + 1, len(before))
    assert_same(await snapshot(r, q), {**before, p + b"other": ("string", b"v", -1)})


async def test_existing_keys_fail_unless_replace(
    call_function: FunctionCaller, r: Redis, prefixes: Callable[[], bytes], bucket: str
) -> None:
    p = prefixes()
    await populate(r, p)
    before = await snapshot(r, p)
    url = f"s3://{bucket}/busy.snap.gz"
    await call_function("redis.export", {"url": REDIS, "to": url, "match": p.decode() + "*"})
    await cmd(r, "SET", p + b"str", b"changed since the backup")
    await cmd(r, "DEL", p + b"list")

    with pytest.raises(PermanentError) as refused:
        await call_function("redis.import", {"url": REDIS, "from": url})
    message = str(refused.value)
    assert f"{len(before) - 1} keys already existed" in message
    assert "first: 'snaphook-test:" in message and "1 keys were restored" in message
    assert "replace: true" in message
    assert await cmd(r, "GET", p + b"str") == b"changed since the backup"  # not overwritten
    assert await cmd(r, "LRANGE", p + b"list", 0, -1) == [b"x", b"y", b"x", b"z"]

    out = await call_function("redis.import", {"url": REDIS, "from": url, "replace": True})
    assert out["keys"] == len(before)
    assert_same(await snapshot(r, p), before)


def export_of(records: list[tuple[bytes, int, bytes]]) -> bytes:
    """An export written here per the documented format: (key, expire_at, payload)."""
    meta = json.dumps({"redis_version": "7.0.0", "db": 0, "match": "*"}).encode()
    out = struct.pack(">8sHI", b"SHKREDIS", 1, len(meta)) + meta
    for key, expire_at, payload in records:
        out += (
            b"K" + struct.pack(">I", len(key)) + key + struct.pack(">qQ", expire_at, len(payload))
        )
        out += payload
    return gzip.compress(out + b"E" + struct.pack(">Q", len(records)))


async def test_keys_expired_in_transfer_are_skipped_and_counted(
    call_function: FunctionCaller,
    r: Redis,
    prefixes: Callable[[], bytes],
    bucket: str,
    object_store: ObjectStore,
) -> None:
    p = prefixes()
    await cmd(r, "SET", p + b"tmp", b"value")
    payload = await cmd(r, "DUMP", p + b"tmp")
    seconds, micros = await cmd(r, "TIME")
    now_ms = seconds * 1000 + micros // 1000
    records = [
        (p + b"expired", now_ms - 1, payload),  # its TTL ran out while the export travelled
        (p + b"later", now_ms + 60_000, payload),
        (p + b"lasting", -1, payload),
    ]
    url = f"s3://{bucket}/expiry.snap.gz"
    await put(object_store, url, export_of(records))
    # A key of that name written since must survive even a REPLACE import: the expired
    # record is skipped, not restored as "already expired" (which would delete it).
    await cmd(r, "SET", p + b"expired", b"newer")
    out = await call_function("redis.import", {"url": REDIS, "from": url, "replace": True})
    assert (out["keys"], out["expired"]) == (2, 1)
    assert await cmd(r, "MGET", p + b"expired", p + b"later", p + b"lasting") == [
        b"newer",
        b"value",
        b"value",
    ]
    assert await cmd(r, "PEXPIRETIME", p + b"later") == now_ms + 60_000
    assert await cmd(r, "PEXPIRETIME", p + b"lasting") == -1


async def test_a_payload_redis_refuses_fails_naming_the_key(
    call_function: FunctionCaller,
    r: Redis,
    prefixes: Callable[[], bytes],
    bucket: str,
    object_store: ObjectStore,
) -> None:
    p = prefixes()
    await cmd(r, "SET", p + b"tmp", b"value")
    good = await cmd(r, "DUMP", p + b"tmp")
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])  # checksum no longer matches
    url = f"s3://{bucket}/payload.snap.gz"
    await put(object_store, url, export_of([(p + b"ok", -1, good), (p + b"bad", -1, bad)]))
    with pytest.raises(PermanentError) as refused:
        await call_function("redis.import", {"url": REDIS, "from": url})
    assert f"RESTORE '{p.decode()}bad': DUMP payload version or checksum are wrong" in str(
        refused.value
    )
    assert "exported from Redis 7.0.0" in str(refused.value)


async def test_large_export_uses_multipart(
    call_function: FunctionCaller,
    r: Redis,
    prefixes: Callable[[], bytes],
    bucket: str,
    object_store: ObjectStore,
) -> None:
    p, q = prefixes(), prefixes()
    values = {p + b"blob:%d" % i: os.urandom(256 * 1024) for i in range(24)}  # 6 MiB, random
    await cmd(r, "MSET", *[x for item in values.items() for x in item])
    url = f"s3://{bucket}/big.snap.gz"
    params = {"url": REDIS, "to": url, "match": p.decode() + "*", "count": 5}
    out = await call_function("redis.export", {**params, "part_size": MIN_PART})
    assert out["keys"] == 24 and out["bytes"] > MIN_PART and out["parts"] == 2
    bucket_name, key = url.removeprefix("s3://").split("/", 1)
    async with s3_client(object_store) as s3:
        head = await s3.head_object(Bucket=bucket_name, Key=key)
    assert head["ETag"].strip('"').endswith("-2")
    await drop(r, p)

    rule = {"from": p.decode(), "to": q.decode()}
    back = await call_function("redis.import", {"url": REDIS, "from": url, "rename_prefix": rule})
    assert back["keys"] == 24 and back["sha256"] == out["sha256"]
    restored = await cmd(r, "MGET", *[q + key[len(p) :] for key in values])
    assert restored == list(values.values())


async def test_objects_that_are_not_exports_are_refused(
    call_function: FunctionCaller,
    r: Redis,
    prefixes: Callable[[], bytes],
    bucket: str,
    object_store: ObjectStore,
) -> None:
    p = prefixes()
    await cmd(r, "SET", p + b"k", b"v")
    good = f"s3://{bucket}/good.snap.gz"
    await call_function("redis.export", {"url": REDIS, "to": good, "match": p.decode() + "*"})
    plain = gzip.decompress(await fetch(object_store, good))
    cases = {
        "not a snaphook Redis export": gzip.compress(b"PGDMP and so on" * 10),
        "truncated": gzip.compress(plain[:-9]),  # the end record cut off
        "corrupt export: 1 records read, end record says 2": gzip.compress(
            plain[:-8] + struct.pack(">Q", 2)
        ),
        "not a valid gzip stream": b"\x1f\x8b" + os.urandom(64),
    }
    async with s3_client(object_store) as s3:
        for n, data in enumerate(cases.values()):
            await s3.put_object(Bucket=bucket, Key=f"bad{n}.snap.gz", Body=data)
    for n, expected in enumerate(cases):
        url = f"s3://{bucket}/bad{n}.snap.gz"
        with pytest.raises(PermanentError, match=expected):
            await call_function("redis.import", {"url": REDIS, "from": url, "replace": True})
    with pytest.raises(PermanentError, match="sha256"):
        params = {"url": REDIS, "from": good, "replace": True, "sha256": "0" * 64}
        await call_function("redis.import", params)


async def test_params_are_strict(call_function: FunctionCaller, bucket: str) -> None:
    with pytest.raises(PermanentError, match=r"invalid params for redis\.export: matcher"):
        await call_function(
            "redis.export", {"url": REDIS, "to": f"s3://{bucket}/x", "matcher": "*"}
        )
    with pytest.raises(PermanentError, match=r"rename_prefix\.too"):
        params = {
            "url": REDIS,
            "from": f"s3://{bucket}/x",
            "rename_prefix": {"from": "a", "too": "b"},
        }
        await call_function("redis.import", params)


# --- secrets never leak -----------------------------------------------------------------


def as_user(user: str, password: str) -> str:
    return f"redis://{user}:{password}@{urlsplit(REDIS).netloc}/0"


def assert_hidden(exc: BaseException, *secrets: str) -> None:
    text = "".join(traceback.format_exception(exc))
    for secret in secrets:
        assert secret not in text, text


async def test_passwords_never_appear_in_errors(
    call_function: FunctionCaller, r: Redis, prefixes: Callable[[], bytes], bucket: str
) -> None:
    p = prefixes()
    await cmd(r, "SET", p + b"k", b"v")
    export = f"s3://{bucket}/secret.snap.gz"
    await call_function("redis.export", {"url": REDIS, "to": export, "match": p.decode() + "*"})
    secret = f"Pw{uuid.uuid4().hex}"
    port = free_port()

    nobody = f"redis://snaphook:{secret}@127.0.0.1:{port}/0"
    calls = {
        "redis.bgsave": {"url": nobody},
        "redis.export": {"url": nobody, "to": f"s3://{bucket}/never.snap.gz"},
        "redis.import": {"url": nobody, "from": export},
    }
    for name, params in calls.items():
        with pytest.raises(
            RetryableError, match=f"redis://127.0.0.1:{port}/0: .*connecting"
        ) as down:
            await call_function(name, params)
        assert_hidden(down.value, secret)

    for url in (f"http://u:{secret}@host/0", f"redis://u:{secret}@host:port/0"):
        with pytest.raises(PermanentError, match="bad redis url") as bad:
            await call_function("redis.bgsave", {"url": url})
        assert_hidden(bad.value, secret)

    # A real ACL user: a wrong password, then the right one without the BGSAVE permission.
    user = f"snaphook-test-{uuid.uuid4().hex[:8]}"
    right = f"Right{uuid.uuid4().hex}"
    await cmd(r, "ACL", "SETUSER", user, "on", f">{right}", f"~{p.decode()}*", "+@all", "-bgsave")
    try:
        with pytest.raises(PermanentError, match="invalid username-password") as wrong:
            await call_function("redis.bgsave", {"url": as_user(user, secret)})
        assert_hidden(wrong.value, secret)
        with pytest.raises(PermanentError, match="no permissions to run the 'bgsave'") as denied:
            await call_function("redis.bgsave", {"url": as_user(user, right)})
        assert_hidden(denied.value, right)
        # The same user may export its own keys: the password is only used, never shown.
        url = as_user(user, right)
        out = await call_function(
            "redis.export",
            {"url": url, "to": f"s3://{bucket}/acl.snap.gz", "match": p.decode() + "*"},
        )
        assert out["keys"] == 1
    finally:
        await cmd(r, "ACL", "DELUSER", user)


# --- redis.bgsave -----------------------------------------------------------------------


async def eventually(probe: Callable[[], Awaitable[T]], timeout: float = 10) -> T:
    """The first truthy answer of ``probe``; the server has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not (answer := await probe()):
        assert time.monotonic() < deadline, f"{probe} never held"
        await asyncio.sleep(0.01)
    return answer


async def persistence(r: Redis) -> dict[str, Any]:
    info: dict[str, Any] = await cmd(r, "INFO", "persistence")
    return info


async def wait_idle(r: Redis) -> None:
    async def idle() -> bool:
        return int((await persistence(r))["rdb_bgsave_in_progress"]) == 0

    await eventually(idle)


async def test_bgsave_advances_lastsave_and_writes_the_rdb(
    call_function: FunctionCaller, r: Redis, server_wide: None
) -> None:
    before = await persistence(r)

    # LASTSAVE counts seconds: start in a later second than the last save, so that
    # "advanced" can be checked strictly.
    async def later() -> bool:
        return int((await cmd(r, "TIME"))[0]) > int(before["rdb_last_save_time"])

    await eventually(later)
    out = await call_function("redis.bgsave", {"url": REDIS})
    after = await persistence(r)
    assert out["lastsave"] > before["rdb_last_save_time"]
    lastsave = (await cmd(r, "LASTSAVE")).timestamp()  # redis-py makes it a datetime
    assert out["lastsave"] == after["rdb_last_save_time"] == lastsave
    assert out["rdb_last_bgsave_status"] == "ok"
    assert after["rdb_saves"] == before["rdb_saves"] + 1
    # With `save ""` persistence is off, but BGSAVE still writes dir/dbfilename.
    config = await cmd(r, "CONFIG", "GET", "dir")
    config.update(await cmd(r, "CONFIG", "GET", "dbfilename"))
    rdb = Path(config[b"dir"].decode()) / config[b"dbfilename"].decode()
    if not rdb.parent.exists():
        pytest.skip(f"{rdb.parent} is not visible here (Redis is not local)")
    assert rdb.stat().st_mtime >= out["lastsave"] - 1


async def slow_saves(r: Redis, p: bytes, micros_per_key: int) -> None:
    """Make the next fork's save take about keys x delay (the child keeps the setting)."""
    await cmd(r, "MSET", *[x for i in range(30) for x in (p + b"%d" % i, b"v")])
    await cmd(r, "CONFIG", "SET", "rdb-key-save-delay", micros_per_key)


async def test_bgsave_waits_out_a_save_already_running_then_saves_anew(
    call_function: FunctionCaller, r: Redis, prefixes: Callable[[], bytes], server_wide: None
) -> None:
    await slow_saves(r, prefixes(), 35_000)  # >= 1 s
    try:
        await cmd(r, "BGSAVE")  # someone else's save, forked before our step began
    finally:
        await cmd(r, "CONFIG", "SET", "rdb-key-save-delay", 0)
    saves = (await persistence(r))["rdb_saves"]
    out = await call_function("redis.bgsave", {"url": REDIS})
    assert out["waited"] >= 0.3 and out["rdb_last_bgsave_status"] == "ok"
    assert (await persistence(r))["rdb_saves"] == saves + 1  # its own save, after the other


async def test_bgsave_gives_up_before_the_step_timeout(
    call_function: FunctionCaller, r: Redis, prefixes: Callable[[], bytes], server_wide: None
) -> None:
    await slow_saves(r, prefixes(), 40_000)  # >= 1.2 s
    try:
        with pytest.raises(
            PermanentError, match=r"BGSAVE was still running after \d+\.\ds; give the step a longer"
        ):
            await call_function("redis.bgsave", {"url": REDIS}, timeout=1.0)
    finally:
        await cmd(r, "CONFIG", "SET", "rdb-key-save-delay", 0)
        await wait_idle(r)


def children_visible(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def test_bgsave_fails_when_the_save_fails(
    call_function: FunctionCaller, r: Redis, prefixes: Callable[[], bytes], server_wide: None
) -> None:
    pid = int((await cmd(r, "INFO", "server"))["process_id"])
    if not children_visible(pid):
        pytest.skip("the Redis server's processes are not visible here")
    await slow_saves(r, prefixes(), 100_000)  # >= 3 s: time to kill the child
    try:
        step = asyncio.create_task(call_function("redis.bgsave", {"url": REDIS}))
        children = await eventually(lambda: asyncio.to_thread(children_of, pid))
        await cmd(r, "CONFIG", "SET", "rdb-key-save-delay", 0)
        try:
            os.kill(children[0], signal.SIGKILL)  # as the OOM killer would
        except PermissionError:
            step.cancel()
            pytest.skip("not allowed to signal the Redis server's child")
        with pytest.raises(RetryableError, match=r"BGSAVE failed \(rdb_last_bgsave_status:err\)"):
            await step
    finally:
        await cmd(r, "CONFIG", "SET", "rdb-key-save-delay", 0)
        await wait_idle(r)
        # A good save puts the status back to ok (with save points configured, Redis
        # would refuse writes until then).
        await call_function("redis.bgsave", {"url": REDIS})
    assert (await persistence(r))["rdb_last_bgsave_status"] == "ok"


# --- the blueprint, through the dispatcher ----------------------------------------------


def steps_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in run["steps"]}


async def test_blueprint_exports_before_the_backup_and_imports_after_the_restore(
    harness: HarnessFactory,
    moto_url: str,
    bucket: str,
    r: Redis,
    prefixes: Callable[[], bytes],
    monkeypatch: pytest.MonkeyPatch,
    object_store: ObjectStore,
    server_wide: None,
) -> None:
    p = prefixes()
    await populate(r, p)
    before = await snapshot(r, p)
    monkeypatch.setenv("SNAPHOOK_SECRET_REDIS_URL", REDIS)
    binding = {
        "blueprint": "redis-export",
        "match": {"namespace": "ns"},
        "params": {"bucket": bucket, "match": p.decode() + "*"},
    }
    h = await harness(
        {"redis": BLUEPRINT.read_text()}, bindings=[binding], s3_endpoint_url=moto_url
    )
    pre = await h.emit("backup.pre", wait=20, backup_id="b42")
    assert pre["allowed"] is True, pre
    steps = steps_of(await h.final(pre["run_id"]))
    assert steps["bgsave"]["status"] == steps["export"]["status"] == "succeeded"
    assert steps["export"]["outputs"]["keys"] == len(before)
    stored = await fetch(object_store, f"s3://{bucket}/ns/b42/redis.snap.gz")
    assert hashlib.sha256(stored).hexdigest() == steps["export"]["outputs"]["sha256"]

    post = await h.final((await h.emit("backup.post", backup_id="b42"))["run_id"])
    assert "redis.snap.gz" in steps_of(post)["report"]["outputs"]["message"]

    await drop(r, p)  # the restored pod starts empty
    restore = await h.final((await h.emit("restore.post", backup_id="b42"))["run_id"], 20)
    steps = steps_of(restore)
    assert steps["import"]["status"] == "succeeded", steps["import"]
    assert steps["import"]["outputs"]["keys"] == len(before)
    assert steps["report"]["outputs"]["message"].endswith("Redis import succeeded")
    assert_same(await snapshot(r, p), before)
