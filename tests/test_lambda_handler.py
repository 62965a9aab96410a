"""The AWS Lambda adapter, called the way Lambda calls it: ``handler(event, context)`` with
recorded event shapes from tests/data/lambda/ — EventBridge (invocation data or a
CloudEvent in ``detail``), a bare CloudEvent, a function URL request (binary mode) and an
API Gateway REST request (structured, base64 body)."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import functions.lambda_handler
from dispatcher.lambda_adapter import LambdaAdapter
from dispatcher.settings import Settings
from tests.hookfns import Recorder, fresh
from tests.secrets_registry import test_secret

DATA = Path(__file__).parent / "data" / "lambda"
RESULT = "io.snaphook.function.result"
ERROR = "io.snaphook.function.error"


def recorded(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return loaded


@dataclass
class LambdaContext:
    """What Lambda passes as ``context`` (the attributes the adapter may read)."""

    remaining_ms: int = 60_000
    aws_request_id: str = "0b1d6f9e-3c5a-4f8e-9b2d-7a6c5e4d3b21"
    function_name: str = "snaphook-functions"

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def adapter(recorder: Recorder) -> LambdaAdapter:
    return LambdaAdapter(Settings.load(None), fresh(recorder))


def test_eventbridge_with_invocation_data(adapter: LambdaAdapter) -> None:
    answer = adapter(recorded("eventbridge_invocation"), LambdaContext())
    assert answer["type"] == RESULT
    assert answer["subject"] == "sleep"
    assert answer["snaphookinvocation"] == "run-0d5c3b0e1a2f/settle/1"
    assert answer["data"] == {"outputs": {"slept": 0.0}}
    assert answer["time"].endswith("Z")  # plain JSON, as Lambda returns it


def test_eventbridge_redelivery_runs_the_function_once(
    adapter: LambdaAdapter, recorder: Recorder
) -> None:
    event = recorded("eventbridge_cloudevent")
    first = adapter(event, LambdaContext())
    assert first["type"] == RESULT and first["data"] == {"outputs": {"effect": 1}}
    assert recorder.calls == [("test.effect", "notify", 1)]
    redelivered = copy.deepcopy(event)
    redelivered["id"] = "9d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"  # EventBridge retries anew
    assert adapter(redelivered, LambdaContext()) == first
    assert recorder.effects.total() == 1


def test_a_bare_cloudevent(adapter: LambdaAdapter, recorder: Recorder) -> None:
    answer = adapter(recorded("cloudevent"), LambdaContext())
    assert answer["type"] == RESULT
    assert recorder.calls == [("test.effect", "check", 2)]


def test_a_function_url_request_in_binary_mode(adapter: LambdaAdapter) -> None:
    response = adapter(recorded("function_url_binary"), LambdaContext())
    assert response["statusCode"] == 200, response
    assert response["headers"]["ce-type"] == RESULT
    assert response["headers"]["ce-subject"] == "sleep"  # named by the path /functions/sleep
    assert json.loads(response["body"]) == {"outputs": {"slept": 0.0}}
    assert response["isBase64Encoded"] is False


def test_an_api_gateway_rest_request_in_structured_mode(
    adapter: LambdaAdapter, recorder: Recorder
) -> None:
    response = adapter(recorded("apigateway_rest_structured"), LambdaContext())
    assert response["statusCode"] == 200, response
    assert response["headers"]["Content-Type"] == "application/cloudevents+json"
    answer = json.loads(response["body"])
    assert answer["type"] == RESULT and answer["data"] == {"outputs": {"effect": 1}}
    assert recorder.calls == [("test.effect", "effect", 1)]


def test_function_errors_are_error_events(adapter: LambdaAdapter) -> None:
    event = recorded("cloudevent")
    event["snaphookfunction"] = "test.fail"
    answer = adapter(event, LambdaContext())
    assert answer["type"] == ERROR
    assert answer["data"] == {"message": "refused on purpose", "retryable": False, "delay": None}


def test_bad_events_are_answered_with_a_problem_not_an_exception(adapter: LambdaAdapter) -> None:
    assert adapter({"hello": "world"}, LambdaContext())["status"] == 400
    assert adapter([1, 2], LambdaContext())["status"] == 400

    unknown = recorded("eventbridge_invocation")
    unknown["detail"]["function"] = "no.such"
    problem = adapter(unknown, LambdaContext())
    assert problem["status"] == 404 and "'no.such' is not served here" in problem["detail"]

    nameless = recorded("eventbridge_invocation")
    del nameless["detail"]["function"]
    assert adapter(nameless, LambdaContext())["field"] == "snaphookfunction"

    broken = recorded("eventbridge_invocation")
    broken["detail"]["timeout"] = "soon"
    problem = adapter(broken, LambdaContext())
    assert (problem["status"], problem["field"]) == (400, "data.timeout")

    proxy = recorded("function_url_binary")
    proxy["body"] = "{not json"
    response = adapter(proxy, LambdaContext())
    assert response["statusCode"] == 400
    assert response["headers"]["Content-Type"] == "application/problem+json"
    assert "not valid JSON" in json.loads(response["body"])["detail"]


@pytest.mark.parametrize(
    ("body", "encoded", "detail"),
    [
        ("not base64!", True, "base64"),
        ({"a": 1}, False, "body"),
        ("\udcff", False, "UTF-8"),
    ],
)
def test_an_undecodable_proxy_body_is_a_400_problem(
    adapter: LambdaAdapter, body: Any, encoded: bool, detail: str
) -> None:
    # A 5xx (or a Lambda error) would tell API Gateway and the caller to retry forever.
    proxy = recorded("function_url_binary")
    proxy["body"], proxy["isBase64Encoded"] = body, encoded
    response = adapter(proxy, LambdaContext())
    assert response["statusCode"] == 400, response
    assert detail in json.loads(response["body"])["detail"]


def test_lambdas_deadline_caps_the_function_timeout(
    adapter: LambdaAdapter, recorder: Recorder
) -> None:
    event = recorded("cloudevent")
    event["data"]["params"] = {"seconds": 30}
    answer = adapter(event, LambdaContext(remaining_ms=700))  # 0.5 s kept to answer
    assert answer["type"] == ERROR
    assert answer["data"]["message"] == "timed out after 0.2s"
    assert not recorder.effects


def test_proxy_requests_need_the_token_when_one_is_set(recorder: Recorder) -> None:
    token = test_secret("lambda-token")
    adapter = LambdaAdapter(Settings.load(None, function_token=token), fresh(recorder))
    request = recorded("function_url_binary")
    assert adapter(request, LambdaContext())["statusCode"] == 401
    request["headers"]["authorization"] = f"Bearer {token}"
    assert adapter(request, LambdaContext())["statusCode"] == 200


@pytest.fixture
def lambda_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh execution environment: a cold start, configured by its environment."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(functions.lambda_handler, "_adapter", None)
    monkeypatch.setenv("SNAPHOOK_FUNCTIONS", "sleep")
    yield
    root.handlers[:] = handlers  # the cold start configured JSON logging on stderr
    root.setLevel(level)


@pytest.mark.usefixtures("lambda_environment")
def test_the_documented_handler_path() -> None:
    from functions.lambda_handler import handler

    answer = handler(recorded("eventbridge_invocation"), LambdaContext())
    assert answer["type"] == RESULT and answer["data"] == {"outputs": {"slept": 0.0}}
    # One function selected: EventBridge detail may leave the name out.
    event = recorded("eventbridge_invocation")
    del event["detail"]["function"]
    event["detail"]["attempt"] = 2
    assert handler(event, LambdaContext())["subject"] == "sleep"
    assert functions.lambda_handler._adapter is not None  # built once, at the cold start
