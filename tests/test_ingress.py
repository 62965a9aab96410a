"""The CloudEvents ingress over real HTTP: modes, sync/async answers, idempotency, problems."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from multidict import CIMultiDictProxy

from dispatcher.cehttp import to_binary_message
from tests.conftest import SUBJECT, Harness, HarnessFactory, event_json

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
PROBLEM = "application/problem+json"


def blueprint(name: str, actions: str, params: str = "") -> str:
    return (
        f"apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata: {{name: {name}}}\n"
        f"spec:\n{params}  actions:\n{actions}"
    )


BLUEPRINTS = {
    "ok": blueprint(
        "ok",
        """\
    backup.pre:
      - {name: quiesce, function: test.effect}
    backup.post:
      - {name: report, function: test.effect}
    restore.pre:
      - {name: prepare, function: test.effect}
    restore.post:
      - {name: verify, function: test.effect}
""",
        params="  params:\n    options: {type: object, default: {}}\n",
    ),
    "deny": blueprint(
        "deny",
        """\
    backup.pre:
      - {name: check, function: test.effect}
      - {name: refuse, function: test.fail, needs: [check]}
""",
    ),
    "slow": blueprint(
        "slow",
        """\
    backup.pre:
      - {name: crawl, function: test.effect, with: {seconds: 2}}
""",
    ),
}

BINDINGS: list[dict[str, Any]] = [
    {"blueprint": "ok", "match": {"namespace": "ns"}},
    {"blueprint": "deny", "match": {"namespace": "deny"}},
    *(
        {
            "blueprint": "slow",
            "match": {"namespace": f"slow-{policy}"},
            "failure_policy": policy,
            "timeout": "10s",
        }
        for policy in ("fail", "ignore")
    ),
    {
        "blueprint": "slow",
        "match": {"namespace": "slow-short"},
        "failure_policy": "fail",
        "timeout": "300ms",
    },
]


@pytest.fixture
async def h(harness: HarnessFactory) -> Harness:
    return await harness(BLUEPRINTS, bindings=BINDINGS)


# --- talking to the server ----------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    text: str

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()

    @property
    def json(self) -> Any:
        return json.loads(self.text)


async def call(h: Harness, method: str, path: str = "/v1/events", **kw: Any) -> Answer:
    async with h.client.request(method, path, **kw) as resp:
        return Answer(resp.status, resp.headers, await resp.text())


DROP = object()  # remove the attribute


def structured(event: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """Request kwargs: one event in structured mode, with attributes changed or dropped."""
    event = dict(event or event_json())
    for name, value in changes.items():
        if value is DROP:
            event.pop(name, None)
        else:
            event[name] = value
    return {"data": json.dumps(event).encode(), "headers": {"Content-Type": STRUCTURED}}


def batch(*events: dict[str, Any]) -> dict[str, Any]:
    return {"data": json.dumps(list(events)).encode(), "headers": {"Content-Type": BATCH}}


def binary(
    event: dict[str, Any] | None = None,
    changes: dict[str, str | None] | None = None,
    body: bytes | None = None,
) -> dict[str, Any]:
    """Request kwargs: one event in binary mode; ``changes`` sets (or with None drops) headers."""
    event = event or event_json()
    headers, data = to_binary_message(
        {k: v for k, v in event.items() if k != "data"}, event["data"]
    )
    for name, value in (changes or {}).items():
        headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
        if value is not None:
            headers[name] = value
    return {"data": data if body is None else body, "headers": headers}


def raw(body: bytes | AsyncIterator[bytes], content_type: str) -> dict[str, Any]:
    return {"data": body, "headers": {"Content-Type": content_type}}


def with_query(request: dict[str, Any], **params: str) -> dict[str, Any]:
    return {**request, "params": params}


def with_headers(request: dict[str, Any], **headers: str) -> dict[str, Any]:
    return {**request, "headers": {**request["headers"], **headers}}


def assert_problem(answer: Answer, status: int, field: str | None) -> dict[str, Any]:
    assert answer.status == status, answer.text
    assert answer.content_type == PROBLEM, answer.headers
    problem: dict[str, Any] = answer.json
    assert problem["status"] == status
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    assert problem.get("field") == field, problem
    return problem


def backup(**extra: Any) -> dict[str, Any]:
    return {"backup": {"name": "nightly", "id": "b1"}, **extra}


async def runs_of(h: Harness) -> list[dict[str, Any]]:
    body = (await call(h, "GET", "/v1/runs")).json
    runs: list[dict[str, Any]] = body["runs"]
    return runs


# --- accepted events ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/events", "/"])
@pytest.mark.parametrize(
    "request_of",
    [
        pytest.param(lambda e: structured(e), id="structured"),
        pytest.param(lambda e: binary(e), id="binary"),
        pytest.param(
            lambda e: with_headers(
                structured(e), **{"Content-Type": STRUCTURED + "; charset=utf-8"}
            ),
            id="structured-charset",
        ),
        pytest.param(
            lambda e: binary(e, {"Content-Type": "application/json; charset=utf-8"}),
            id="binary-charset",
        ),
    ],
)
async def test_event_is_accepted_async_with_location(
    h: Harness, path: str, request_of: Any
) -> None:
    event = event_json()
    answer = await call(h, "POST", path, **request_of(event))
    assert answer.status == 202, answer.text
    body = answer.json
    assert set(body) == {"run_id", "status"}
    assert body["status"] in ("accepted", "running", "succeeded")
    assert answer.headers["Location"] == f"/v1/runs/{body['run_id']}"

    run = await h.final(body["run_id"])
    assert (run["status"], run["event_id"], run["source"]) == ("succeeded", event["id"], "test")
    assert [s["name"] for s in run["steps"]] == ["quiesce"]
    assert h.recorder.effects == {f"{body['run_id']}/quiesce": 1}
    located = await call(h, "GET", answer.headers["Location"])
    assert located.status == 200 and located.json["run_id"] == body["run_id"]


@pytest.mark.parametrize(
    "event_type, step",
    [
        ("backup.pre", "quiesce"),
        ("backup.post", "report"),
        ("restore.pre", "prepare"),
        ("restore.post", "verify"),
    ],
)
async def test_every_hook_type_runs_its_action(h: Harness, event_type: str, step: str) -> None:
    answer = await call(h, "POST", **structured(event_json(event_type)))
    assert answer.status == 202, answer.text
    run = await h.final(answer.json["run_id"])
    assert run["type"] == f"io.snaphook.{event_type}"
    assert [(s["name"], s["status"]) for s in run["steps"]] == [(step, "succeeded")]


async def test_event_is_journaled_before_the_answer(h: Harness) -> None:
    event = event_json()
    answer = await call(h, "POST", **binary(event))
    assert answer.status == 202
    run_id = answer.json["run_id"]
    # No waiting: the answer promises the run is already recorded.
    stored = await h.state.journal.get_run(run_id)
    assert stored is not None and stored.event_id == event["id"]
    found = await h.state.journal.find_run("test", event["id"])
    assert found is not None and found.run_id == run_id
    await h.final(run_id)


@pytest.mark.parametrize("request_of", [structured, binary], ids=["structured", "binary"])
async def test_traceparent_is_kept_in_the_run_event(h: Harness, request_of: Any) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    event = {**event_json(), "traceparent": traceparent}
    answer = await call(h, "POST", **request_of(event))
    assert answer.status == 202, answer.text
    run = await h.final(answer.json["run_id"])
    assert run["event"]["traceparent"] == traceparent


async def test_extensions_keep_their_canonical_string_form(h: Harness) -> None:
    answer = await call(h, "POST", **structured(sampled=True, retries=3, region="eu"))
    assert answer.status == 202, answer.text
    run = await h.final(answer.json["run_id"])
    event = run["event"]
    assert (event["sampled"], event["retries"], event["region"]) == ("true", "3", "eu")


async def test_nested_params_are_kept(h: Harness) -> None:
    options = {"tables": ["a", "b"], "limits": {"rows": 10, "ratio": 0.5, "deep": [[[True]]]}}
    answer = await call(h, "POST", **structured(data=backup(params={"options": options})))
    assert answer.status == 202, answer.text
    run = await h.final(answer.json["run_id"])
    assert run["params"] == {"options": options}
    assert run["event"]["data"]["params"] == {"options": options}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": [value]}
    return value


def overflowing_number() -> dict[str, Any]:
    """A JSON number literal too large for a float (Python would read it as infinity)."""
    request = structured(data=backup(params={"options": {"n": 7}}))
    return {**request, "data": request["data"].replace(b'"n": 7', b'"n": 1e999')}


# --- batch mode -----------------------------------------------------------------------------


async def test_batch_answers_one_entry_per_event(h: Harness) -> None:
    good = [event_json(), event_json("backup.post")]
    bad_data = event_json(data={"backup": {"name": "nightly"}})
    unbound = event_json(subject="elsewhere/Deployment/app")
    answer = await call(h, "POST", **batch(good[0], bad_data, good[1], unbound))
    assert answer.status == 202, answer.text
    assert answer.content_type == "application/json"
    first, second, third, fourth = answer.json
    for entry, event in ((first, good[0]), (third, good[1])):
        run = await h.final(entry["run_id"])
        assert (run["status"], run["event_id"]) == ("succeeded", event["id"])
    assert (second["status"], second["field"]) == (400, "data.backup.id")
    assert (fourth["status"], fourth["field"]) == (422, "subject")
    assert len(await runs_of(h)) == 2


async def test_batch_waits_for_every_decision(h: Harness) -> None:
    events = [event_json(), event_json(subject="deny/Deployment/db")]
    answer = await call(h, "POST", **with_query(batch(*events), wait="5"))
    assert answer.status == 200, answer.text
    allowed, denied = answer.json
    assert allowed["allowed"] is True and denied["allowed"] is False
    assert "refuse" in denied["reason"]


async def test_batch_of_only_bad_events_is_an_error(h: Harness) -> None:
    bad = [event_json(data={"backup": {"id": "b1"}}), event_json(subject="elsewhere/Pod/p")]
    answer = await call(h, "POST", **batch(*bad))
    assert answer.status == 400, answer.text  # the most basic problem of the batch
    assert [(e["status"], e["field"]) for e in answer.json] == [
        (400, "data.backup.name"),
        (422, "subject"),
    ]
    assert await runs_of(h) == []


async def test_empty_batch_is_an_empty_answer(h: Harness) -> None:
    answer = await call(h, "POST", **batch())
    assert (answer.status, answer.json) == (202, [])


async def test_malformed_batch_element_is_rejected_naming_its_index(h: Harness) -> None:
    # Unlike invalid *data*, a malformed CloudEvent makes the whole batch unreadable.
    malformed = {k: v for k, v in event_json().items() if k != "specversion"}
    answer = await call(h, "POST", **batch(event_json(), malformed))
    assert_problem(answer, 400, "[1].specversion")


# --- synchronous answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ask",
    [
        pytest.param(lambda r: with_query(r, wait="5"), id="query"),
        pytest.param(lambda r: with_query(r, wait="5s"), id="query-duration"),
        pytest.param(lambda r: with_headers(r, Prefer="wait=5"), id="prefer"),
        pytest.param(
            lambda r: with_headers(r, Prefer='respond-async, wait="5"'),
            id="prefer-respond-async-with-wait",
        ),
        pytest.param(
            lambda r: with_headers(r, Prefer="wait=5; x=1, respond-async"),
            id="prefer-unordered-with-parameters",
        ),
    ],
)
async def test_sync_answer_allows_when_every_step_succeeds(h: Harness, ask: Any) -> None:
    answer = await call(h, "POST", **ask(structured()))
    assert answer.status == 200, answer.text
    body = answer.json
    assert set(body) == {"allowed", "reason", "run_id", "status", "steps"}
    assert body["allowed"] is True and body["reason"]
    assert [(s["name"], s["status"], s["attempts"]) for s in body["steps"]] == [
        ("quiesce", "succeeded", 1)
    ]
    assert "Location" not in answer.headers


async def test_sync_answer_denies_naming_the_failed_step(h: Harness) -> None:
    answer = await call(h, "POST", **with_query(structured(subject="deny/Deployment/db"), wait="5"))
    assert answer.status == 200, answer.text
    body = answer.json
    assert body["allowed"] is False
    assert "refuse" in body["reason"]
    steps = {s["name"]: s for s in body["steps"]}
    assert steps["check"]["status"] == "succeeded"
    assert steps["refuse"]["status"] == "failed" and steps["refuse"]["error"]


@pytest.mark.parametrize(
    "policy, allowed, outcome", [("fail", False, "failed"), ("ignore", True, "succeeded")]
)
async def test_sync_timeout_follows_failure_policy(
    h: Harness, policy: str, allowed: bool, outcome: str
) -> None:
    """The answer given on timeout becomes the run's decision: a caller told "denied"
    won't snapshot nor send a post event, so the run stops (and releases what it froze);
    told "allowed", the run goes on. The step already in flight finishes either way."""
    request = structured(subject=f"slow-{policy}/Deployment/db")
    started = time.monotonic()
    answer = await call(h, "POST", **with_query(request, wait="0.3"))
    elapsed = time.monotonic() - started
    assert answer.status == 200, answer.text
    body = answer.json
    assert body["allowed"] is allowed
    assert f"failure_policy={policy}" in body["reason"]
    assert body["status"] in ("accepted", "running")
    assert elapsed < 1.5  # answered at the deadline, not when the 2 s step finished
    run = await h.final(body["run_id"])
    assert (run["status"], run["allowed"]) == (outcome, allowed)
    assert f"failure_policy={policy}" in run["reason"]
    assert h.recorder.effects == {f"{body['run_id']}/crawl": 1}


async def test_binding_timeout_caps_a_longer_wait(h: Harness) -> None:
    request = structured(subject="slow-short/Deployment/db")
    started = time.monotonic()
    answer = await call(h, "POST", **with_query(request, wait="30"))
    assert answer.status == 200 and answer.json["allowed"] is False
    assert time.monotonic() - started < 1.5
    await h.final(answer.json["run_id"])


async def test_respond_async_preference_answers_202(h: Harness) -> None:
    answer = await call(h, "POST", **with_headers(structured(), Prefer="respond-async"))
    assert answer.status == 202, answer.text
    assert answer.headers["Location"] == f"/v1/runs/{answer.json['run_id']}"
    await h.final(answer.json["run_id"])


@pytest.mark.parametrize(
    "subject, reply_type, status",
    [
        (SUBJECT, "io.snaphook.run.completed", "succeeded"),
        ("deny/Deployment/db", "io.snaphook.run.failed", "failed"),
    ],
)
async def test_prefer_reply_answers_with_the_reply_event(
    h: Harness, subject: str, reply_type: str, status: str
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = structured(subject=subject, traceparent=traceparent)
    answer = await call(h, "POST", **with_headers(request, Prefer="reply"))
    assert answer.status == 200, answer.text
    assert answer.headers["Preference-Applied"] == "reply"
    assert answer.headers["ce-specversion"] == "1.0"
    assert answer.headers["ce-type"] == reply_type
    assert answer.headers["ce-source"] == h.settings.reply_source
    assert answer.headers["ce-subject"] == subject
    assert answer.headers["ce-traceparent"] == traceparent
    assert answer.content_type == "application/json"
    data = answer.json
    assert data["status"] == status
    assert answer.headers["ce-id"] == f"{data['run_id']}.reply"
    stored = await h.state.journal.get_run(data["run_id"])
    assert stored is not None and stored.status.value == status


async def test_prefer_reply_falls_back_to_the_decision_when_the_run_is_slow(h: Harness) -> None:
    request = with_query(structured(subject="slow-ignore/Deployment/db"), wait="0.2")
    answer = await call(h, "POST", **with_headers(request, Prefer="reply"))
    assert answer.status == 200, answer.text
    assert "Preference-Applied" not in answer.headers
    assert answer.json["allowed"] is True
    await h.final(answer.json["run_id"])


# --- idempotency --------------------------------------------------------------------------------


async def test_redelivery_returns_the_same_run_and_runs_once(h: Harness) -> None:
    event = event_json()
    first = await call(h, "POST", **structured(event))
    await h.final(first.json["run_id"])
    # Same (source, id) again, in the other mode and synchronously: the same run answers.
    again = await call(h, "POST", **with_query(binary(event), wait="5"))
    assert again.status == 200, again.text
    assert again.json["run_id"] == first.json["run_id"]
    assert again.json["allowed"] is True
    assert h.recorder.effects == {f"{first.json['run_id']}/quiesce": 1}
    assert len(await runs_of(h)) == 1


async def test_same_id_from_another_source_is_a_new_run(h: Harness) -> None:
    one = await call(h, "POST", **structured(event_json(event_id="e-1", source="k10")))
    two = await call(h, "POST", **structured(event_json(event_id="e-1", source="velero")))
    assert one.status == two.status == 202
    assert one.json["run_id"] != two.json["run_id"]
    for answer in (one, two):
        await h.final(answer.json["run_id"])
    assert sum(h.recorder.effects.values()) == 2


async def test_concurrent_duplicates_make_one_run(h: Harness) -> None:
    event = event_json()
    answers = await asyncio.gather(*(call(h, "POST", **structured(event)) for _ in range(20)))
    assert {a.status for a in answers} == {202}
    run_ids = {a.json["run_id"] for a in answers}
    assert len(run_ids) == 1
    await h.final(run_ids.pop())
    assert sum(h.recorder.effects.values()) == 1
    assert len(await runs_of(h)) == 1


# --- rejected input -------------------------------------------------------------------------------

POST_WITHOUT_OUTCOME = event_json("backup.post", data=backup())
MISMATCHED_TARGET = backup(target={"namespace": "other", "kind": "Deployment", "name": "app"})


@pytest.mark.parametrize(
    "request_kw, status, field",
    [
        # 400: unreadable or malformed
        pytest.param(raw(b'{"specversion": "1.0", ', STRUCTURED), 400, None, id="bad-json"),
        pytest.param(raw(b"\xff\xfe{}", STRUCTURED), 400, None, id="not-utf8"),
        pytest.param(raw(b'{"a": 1}', STRUCTURED), 400, "specversion", id="not-an-event"),
        pytest.param(raw(b"[1, 2", BATCH), 400, None, id="bad-batch-json"),
        pytest.param(raw(b"{}", BATCH), 400, None, id="batch-not-array"),
        pytest.param(binary(body=b'{"backup": '), 400, "data", id="binary-bad-json-data"),
        pytest.param(structured(id=DROP), 400, "id", id="missing-id"),
        pytest.param(structured(id=""), 400, "id", id="empty-id"),
        pytest.param(structured(source=DROP), 400, "source", id="missing-source"),
        pytest.param(binary(changes={"ce-id": None}), 400, "ce-id", id="binary-missing-id"),
        pytest.param(binary(changes={"ce-source": None}), 400, "ce-source", id="binary-no-source"),
        pytest.param(structured(specversion="0.3"), 400, "specversion", id="specversion-0.3"),
        pytest.param(structured(specversion=DROP), 400, "specversion", id="no-specversion"),
        pytest.param(
            binary(changes={"ce-specversion": "2.0"}), 400, "ce-specversion", id="binary-spec"
        ),
        pytest.param(structured(id=7), 400, "id", id="id-not-a-string"),
        pytest.param(structured(time="yesterday"), 400, "time", id="bad-time"),
        # percent-encoding of binary-mode headers
        pytest.param(binary(changes={"ce-source": "a%zzb"}), 400, "ce-source", id="bad-percent"),
        pytest.param(binary(changes={"ce-subject": "ns%2"}), 400, "ce-subject", id="cut-percent"),
        pytest.param(binary(changes={"ce-id": "%FF%FE"}), 400, "ce-id", id="percent-not-utf8"),
        pytest.param(binary(changes={"ce-id": "a%00b"}), 400, "ce-id", id="percent-control"),
        # subject and data
        pytest.param(structured(subject="ns/app"), 400, "subject", id="subject-two-parts"),
        pytest.param(structured(subject="ns/Deploy-ment/app"), 400, "subject", id="bad-kind"),
        pytest.param(structured(subject=DROP), 400, "subject", id="missing-subject"),
        pytest.param(structured(data=DROP), 400, "data", id="missing-data"),
        pytest.param(structured(data=[1]), 400, "data", id="data-not-object"),
        pytest.param(binary(changes={"Content-Type": "text/plain"}), 400, "data", id="opaque-data"),
        pytest.param(structured(data={}), 400, "data.backup", id="missing-backup"),
        pytest.param(
            structured(data={"backup": {"name": "n"}}), 400, "data.backup.id", id="no-backup-id"
        ),
        pytest.param(structured(data=backup(extra=1)), 400, "data.extra", id="unknown-data-key"),
        pytest.param(structured(POST_WITHOUT_OUTCOME), 400, "data.outcome", id="post-no-outcome"),
        pytest.param(structured(data=backup(outcome="meh")), 400, "data.outcome", id="bad-outcome"),
        pytest.param(structured(data=MISMATCHED_TARGET), 400, "data.target", id="other-target"),
        pytest.param(structured(data=backup(params={"x": 1})), 400, "data.params", id="params"),
        pytest.param(
            structured(data=backup(params={"options": "no"})), 400, "data.params", id="param-type"
        ),
        pytest.param(
            structured(data=backup(params={"options": nested(200)})),
            400,
            "data.params",
            id="params-too-deep",
        ),
        pytest.param(overflowing_number(), 400, "data.params", id="params-number-overflow"),
        # the wait preference
        *(
            pytest.param(with_query(structured(), wait=value), 400, "wait", id=f"wait={value}")
            for value in ("abc", "-1", "nan", "inf", "1e999", "", "5x", "-5s")
        ),
        pytest.param(
            with_headers(structured(), Prefer="wait=soon"), 400, "Prefer: wait", id="prefer-wait"
        ),
        # 415: not a CloudEvent
        pytest.param(raw(b"hello", "text/plain"), 415, "content-type", id="text-plain"),
        pytest.param(raw(b"<e/>", "application/cloudevents+xml"), 415, "content-type", id="xml"),
        pytest.param(raw(b"[]", "application/cloudevents-batch+xml"), 415, "content-type", id="bx"),
        pytest.param(raw(b"{}", "application/json"), 415, "content-type", id="plain-json"),
        # 422: well-formed, but nothing here handles it
        pytest.param(structured(type="io.snaphook.backup.during"), 422, "type", id="unknown-type"),
        pytest.param(structured(type="com.example.backup.pre"), 422, "type", id="foreign-type"),
        pytest.param(structured(type="backup.pre"), 422, "type", id="unprefixed-type"),
        pytest.param(
            binary(changes={"ce-type": "io.snaphook.run.completed"}), 422, "type", id="reply-type"
        ),
        pytest.param(
            structured(subject="elsewhere/Deployment/app"), 422, "subject", id="no-binding"
        ),
    ],
)
async def test_bad_input_is_a_problem_naming_the_field(
    h: Harness, request_kw: dict[str, Any], status: int, field: str | None
) -> None:
    answer = await call(h, "POST", **request_kw)
    assert_problem(answer, status, field)
    assert await runs_of(h) == []
    assert h.recorder.calls == []


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 512):
        yield b" " * 512


@pytest.mark.parametrize(
    "request_of",
    [
        pytest.param(lambda: structured(data=backup(params={"pad": "x" * 4096})), id="length"),
        pytest.param(lambda: raw(_chunks(8192), STRUCTURED), id="chunked"),
        pytest.param(lambda: batch(*(event_json() for _ in range(3))), id="batch-too-long"),
    ],
)
async def test_too_large_is_413(harness: HarnessFactory, request_of: Any) -> None:
    h = await harness(BLUEPRINTS, bindings=BINDINGS, max_body_bytes=2048, max_batch=2)
    answer = await call(h, "POST", **request_of())
    assert_problem(answer, 413, None)
    assert await runs_of(h) == []
    # The connection stays usable for the next, well-sized event.
    assert (await call(h, "POST", **structured())).status == 202


async def test_undecodable_content_encoding_is_400(h: Harness) -> None:
    request = with_headers(structured(), **{"Content-Encoding": "gzip"})
    assert_problem(await call(h, "POST", **request), 400, None)
    assert await runs_of(h) == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/v1/events", "/"])
async def test_other_methods_are_405_problems(h: Harness, method: str, path: str) -> None:
    answer = await call(h, method, path)
    assert_problem(answer, 405, None)
    assert "POST" in answer.headers["Allow"]


# --- the webhook validation handshake ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/events", "/"])
async def test_options_handshake_allows_any_origin_by_default(h: Harness, path: str) -> None:
    answer = await call(h, "OPTIONS", path, headers={"WebHook-Request-Origin": "k10.example.com"})
    assert answer.status == 200
    assert answer.headers["WebHook-Allowed-Origin"] == "*"
    assert answer.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "origin, status",
    [("k10.example.com", 200), ("K10.Example.com", 200), ("evil.example.com", 403)],
)
async def test_options_handshake_restricted_origins(
    harness: HarnessFactory, origin: str, status: int
) -> None:
    h = await harness(BLUEPRINTS, bindings=BINDINGS, webhook_allowed_origins=["k10.example.com"])
    answer = await call(h, "OPTIONS", headers={"WebHook-Request-Origin": origin})
    assert answer.headers["Allow"] == "POST"
    if status == 200:
        assert answer.status == 200
        assert answer.headers["WebHook-Allowed-Origin"] == origin
    else:
        assert_problem(answer, 403, "WebHook-Request-Origin")
        assert "WebHook-Allowed-Origin" not in answer.headers


async def test_options_without_origin_is_a_400_problem(h: Harness) -> None:
    answer = await call(h, "OPTIONS")
    assert_problem(answer, 400, "WebHook-Request-Origin")
    assert answer.headers["Allow"] == "POST"
