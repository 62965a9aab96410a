"""``elasticsearch.*`` through the official async client, against the REST test double."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elasticsearch import AsyncElasticsearch

import functions.elasticsearch  # noqa: F401  (registers the family for the harness)
from functions.sdk import PermanentError, RetryableError
from tests.conftest import FunctionCaller, HarnessFactory
from tests.es_server import FakeCluster, serve

BLUEPRINT = Path(__file__).parents[1] / "hooks" / "elasticsearch.yaml"

API_KEY = "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="
FAST = {"poll_interval": 0.01, "max_poll_interval": 0.05}


@dataclass
class Es:
    cluster: FakeCluster
    url: str

    def params(self, **more: Any) -> dict[str, Any]:
        return {"url": self.url, "api_key": API_KEY, **more}

    def client(self) -> AsyncElasticsearch:
        return AsyncElasticsearch(self.url, api_key=API_KEY)


@pytest.fixture
async def es() -> AsyncIterator[Es]:
    cluster = FakeCluster(indices={"logs": 2, "metrics": 1}, api_key=API_KEY)
    async with serve(cluster) as url:
        yield Es(cluster, url)


async def test_register_repository_is_idempotent(es: Es, call_function: FunctionCaller) -> None:
    params = es.params(name="backups", type="fs", settings={"location": "/mnt/backups/a"})
    first = await call_function("elasticsearch.register_repository", params)
    assert first == {"name": "backups", "type": "fs", "changed": True}
    again = await call_function("elasticsearch.register_repository", params)
    assert again["changed"] is False
    assert es.cluster.repository_puts == 1  # nothing re-sent, so no verification round

    params["settings"] = {"location": "/mnt/backups/b", "compress": True}
    assert (await call_function("elasticsearch.register_repository", params))["changed"]
    async with es.client() as client:
        assert (await client.info())["version"]["number"].startswith("9.")
        registered = (await client.snapshot.get_repository(name="backups")).body
    assert registered == {
        "backups": {"type": "fs", "settings": {"location": "/mnt/backups/b", "compress": "true"}}
    }
    # Settings come back as strings; the same settings again are still recognised.
    assert not (await call_function("elasticsearch.register_repository", params))["changed"]


@pytest.mark.parametrize(
    ("kind", "settings", "expected"),
    [
        ("fs", {"location": "/etc"}, "path.repo"),
        ("fs", {}, "missing location"),
        ("s3", {"base_path": "x"}, "No bucket"),
        ("hdfs2", {}, "repository type [hdfs2] does not exist"),
    ],
)
async def test_bad_repository_settings_are_permanent(
    es: Es, call_function: FunctionCaller, kind: str, settings: dict[str, Any], expected: str
) -> None:
    params = es.params(name="backups", type=kind, settings=settings)
    with pytest.raises(PermanentError, match="repository_exception") as failure:
        await call_function("elasticsearch.register_repository", params)
    assert expected in str(failure.value)


async def test_snapshot_waits_through_progress_to_success(
    es: Es, call_function: FunctionCaller
) -> None:
    es.cluster.add_repository("backups")
    es.cluster.polls = 5  # each GET of the snapshot or of its _status is one tick
    out = await call_function(
        "elasticsearch.snapshot",
        es.params(repository="backups", snapshot="b1", **FAST),
        step="snap",
    )
    assert out["state"] == "SUCCESS" and out["resumed"] is False
    assert out["indices"] == ["logs", "metrics"]
    assert out["shards"] == {"total": 3, "successful": 3, "failed": 0}
    assert out["duration_seconds"] >= 0
    # Polled while running (state from GET, progress from _status), stopped at the end.
    assert es.cluster.observed == [
        ("get", "IN_PROGRESS"),
        ("status", "STARTED"),
        ("get", "IN_PROGRESS"),
        ("status", "STARTED"),
        ("get", "SUCCESS"),
    ]
    taken = es.cluster.snapshots["backups"]["b1"]
    assert taken.metadata["taken_by"] == "snaphook" and taken.metadata["step"] == "snap"


async def test_snapshot_of_chosen_indices(es: Es, call_function: FunctionCaller) -> None:
    es.cluster.add_repository("backups")
    params = es.params(repository="backups", snapshot="b1", indices="met*", **FAST)
    out = await call_function("elasticsearch.snapshot", params)
    assert out["indices"] == ["metrics"] and out["shards"]["total"] == 1
    params.update(snapshot="b2", indices="nope")
    with pytest.raises(
        PermanentError, match=r"404 index_not_found_exception: no such index \[nope"
    ):
        await call_function("elasticsearch.snapshot", params)


@pytest.mark.parametrize("state", ["PARTIAL", "FAILED"])
async def test_partial_or_failed_snapshot_names_the_shards(
    es: Es, call_function: FunctionCaller, state: str
) -> None:
    es.cluster.add_repository("backups")
    es.cluster.fail_next(
        state,
        [
            ("logs", 1, "IndexShardSnapshotFailedException[disk quota exceeded]"),
            ("metrics", 0, "primary shard is not allocated"),
        ],
    )
    with pytest.raises(PermanentError) as failure:
        await call_function(
            "elasticsearch.snapshot", es.params(repository="backups", snapshot="b1", **FAST)
        )
    message = str(failure.value)
    assert f"snapshot backups/b1 ended {state}" in message
    assert "2 of 3 shards failed" in message
    assert "logs[1]: IndexShardSnapshotFailedException[disk quota exceeded]" in message
    assert "metrics[0]: primary shard is not allocated" in message


async def test_a_retry_waits_for_the_snapshot_already_running(
    es: Es, call_function: FunctionCaller
) -> None:
    es.cluster.add_repository("backups")
    es.cluster.polls = 10_000
    params = es.params(repository="backups", snapshot="b1", poll_interval=0.05)
    with pytest.raises(RetryableError, match="still IN_PROGRESS"):
        await call_function("elasticsearch.snapshot", params, timeout=1.3)
    es.cluster.snapshots["backups"]["b1"].polls = 0  # it finishes meanwhile
    out = await call_function("elasticsearch.snapshot", params)
    assert out["state"] == "SUCCESS" and out["resumed"] is True


async def test_restore_under_new_names(es: Es, call_function: FunctionCaller) -> None:
    es.cluster.add_repository("backups")
    await call_function(
        "elasticsearch.snapshot", es.params(repository="backups", snapshot="b1", **FAST)
    )
    out = await call_function(
        "elasticsearch.restore",
        es.params(
            repository="backups",
            snapshot="b1",
            indices="logs",
            rename_pattern="(.+)",
            rename_replacement="restored-$1",
        ),
    )
    assert out == {
        "snapshot": "b1",
        "accepted": True,
        "indices": ["restored-logs"],
        "shards": {"total": 2, "successful": 2, "failed": 0},
    }
    async with es.client() as client:
        assert await client.indices.exists(index="restored-logs")
        assert not await client.indices.exists(index="restored-metrics")
        listed: Any = (await client.cat.indices(format="json")).body
    assert {row["index"]: row["pri"] for row in listed} == {
        "logs": "2",
        "metrics": "1",
        "restored-logs": "2",
    }


async def test_restore_without_waiting(es: Es, call_function: FunctionCaller) -> None:
    es.cluster.add_repository("backups")
    await call_function(
        "elasticsearch.snapshot", es.params(repository="backups", snapshot="b1", **FAST)
    )
    params = es.params(repository="backups", snapshot="b1", wait_for_completion=False)
    params.update(rename_pattern="(.+)", rename_replacement="copy_$1")
    out = await call_function("elasticsearch.restore", params)
    assert out["accepted"] is True and out["indices"] == []
    assert {"copy_logs", "copy_metrics"} <= set(es.cluster.indices)


async def test_restore_failures_are_permanent(es: Es, call_function: FunctionCaller) -> None:
    es.cluster.add_repository("backups")
    await call_function(
        "elasticsearch.snapshot", es.params(repository="backups", snapshot="b1", **FAST)
    )
    params = es.params(repository="backups", snapshot="b1")
    # In place, onto the open indices: refused with a 500 that retrying cannot fix.
    with pytest.raises(PermanentError, match="open index with same name already exists"):
        await call_function("elasticsearch.restore", params)
    es.cluster.restore_failed_shards = 1
    params.update(rename_pattern="(.+)", rename_replacement="again-$1")
    with pytest.raises(PermanentError, match="1 of 3 shards failed"):
        await call_function("elasticsearch.restore", params)
    params.update(snapshot="nope")
    with pytest.raises(PermanentError, match="404 snapshot_missing_exception"):
        await call_function("elasticsearch.restore", params)
    with pytest.raises(PermanentError, match=r"invalid params.*rename_pattern and"):
        await call_function(
            "elasticsearch.restore", es.params(repository="b", snapshot="s", rename_pattern="x")
        )


async def test_missing_repository_is_permanent_and_says_so(
    es: Es, call_function: FunctionCaller
) -> None:
    with pytest.raises(PermanentError) as failure:
        await call_function("elasticsearch.snapshot", es.params(repository="nope", snapshot="b1"))
    message = str(failure.value)
    assert "404 repository_missing_exception: [nope] missing" in message
    assert "register it first" in message


async def test_invalid_snapshot_name_is_permanent(es: Es, call_function: FunctionCaller) -> None:
    es.cluster.add_repository("backups")
    with pytest.raises(PermanentError, match=r"400 invalid_snapshot_name_exception.*lowercase"):
        await call_function(
            "elasticsearch.snapshot", es.params(repository="backups", snapshot="Nightly")
        )


async def test_api_key_is_sent_and_never_shown(es: Es, call_function: FunctionCaller) -> None:
    es.cluster.add_repository("backups")
    await call_function(
        "elasticsearch.snapshot", es.params(repository="backups", snapshot="b1", **FAST)
    )
    assert set(es.cluster.authorizations) == {f"ApiKey {API_KEY}"}

    wrong = "d3Jvbmcta2V5LWlkOndyb25nLWtleS1zZWNyZXQ="
    params = es.params(repository="backups", snapshot="b2", api_key=wrong)
    with pytest.raises(PermanentError, match="401 security_exception") as failure:
        await call_function("elasticsearch.snapshot", params)
    assert wrong not in str(failure.value) and API_KEY not in str(failure.value)
    assert es.cluster.authorizations[-1] == f"ApiKey {wrong}"


async def test_basic_auth(call_function: FunctionCaller) -> None:
    cluster = FakeCluster(indices={"logs": 1}, basic_auth=("backup", "s3cret-pw"), polls=1)
    cluster.add_repository("backups")
    async with serve(cluster) as url:
        params = {"url": url, "username": "backup", "password": "s3cret-pw"}
        out = await call_function(
            "elasticsearch.snapshot", {**params, "repository": "backups", "snapshot": "b1"}
        )
        assert out["state"] == "SUCCESS"
        assert cluster.authorizations[0] == "Basic YmFja3VwOnMzY3JldC1wdw=="
        params["password"] = "not-the-password"
        with pytest.raises(PermanentError, match="401") as failure:
            await call_function(
                "elasticsearch.snapshot", {**params, "repository": "backups", "snapshot": "b2"}
            )
        assert "not-the-password" not in str(failure.value)
    with pytest.raises(PermanentError, match="not both"):
        await call_function(
            "elasticsearch.snapshot",
            {**params, "api_key": API_KEY, "repository": "r", "snapshot": "s"},
        )


async def test_connection_refused_is_retryable(call_function: FunctionCaller) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    params = {"url": f"http://127.0.0.1:{port}", "api_key": API_KEY}
    with pytest.raises(
        RetryableError, match=f"cannot reach Elasticsearch at 127.0.0.1:{port}"
    ) as e:
        await call_function(
            "elasticsearch.snapshot", {**params, "repository": "r", "snapshot": "s"}
        )
    assert API_KEY not in str(e.value)


async def test_blank_credentials_mean_none(call_function: FunctionCaller) -> None:
    cluster = FakeCluster(indices={"logs": 1}, polls=1)  # security off
    async with serve(cluster) as url:
        out = await call_function(
            "elasticsearch.register_repository",
            {"url": url, "api_key": "", "name": "r", "type": "s3", "settings": {"bucket": "b"}},
        )
    assert out["changed"] is True and cluster.authorizations == ["", ""]


async def test_blueprint_snapshots_and_restores_through_the_dispatcher(
    es: Es, harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hooks/elasticsearch.yaml as shipped: templates, secret, lowercased name, rename."""
    monkeypatch.setenv("SNAPHOOK_SECRET_ELASTICSEARCH_API_KEY", API_KEY)
    es.cluster.polls = 1
    h = await harness({"elasticsearch": BLUEPRINT.read_text()}, bind="elasticsearch-snapshot")

    def data(backup_id: str) -> dict[str, Any]:
        return {"backup": {"name": "nightly", "id": backup_id}, "params": {"url": es.url}}

    body = await h.emit("backup.pre", data=data("Nightly-42"), wait=20)
    assert body["allowed"] is True, body
    run = await h.final(body["run_id"])
    assert API_KEY not in json.dumps(run)
    snap = es.cluster.snapshots["snaphook"]["nightly-42"]
    assert snap.state == "SUCCESS" and snap.indices == ["logs", "metrics"]
    assert es.cluster.repositories["snaphook"]["settings"] == {"location": "/mnt/backups/snaphook"}

    body = await h.emit("restore.pre", data=data("Nightly-42"), wait=20)
    assert body["allowed"] is True, body
    assert {"restored-logs", "restored-metrics"} <= set(es.cluster.indices)

    es.cluster.fail_next("PARTIAL", [("logs", 0, "disk quota exceeded")])
    body = await h.emit("backup.pre", data=data("nightly-43"), wait=20)
    assert body["allowed"] is False
    assert "ended PARTIAL" in json.dumps(body) and "logs[0]: disk quota exceeded" in json.dumps(
        body
    )
