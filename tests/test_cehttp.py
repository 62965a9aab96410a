"""dispatcher.cehttp: CloudEvents 1.0.2 over HTTP, rule by rule."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from dispatcher.cehttp import (
    Mode,
    ParsedEvent,
    ParsedRequest,
    detect_mode,
    extensions_of,
    parse_request,
    to_binary_message,
    to_structured_body,
    webhook_options_response,
)
from dispatcher.errors import EventError

Headers = list[tuple[bytes, bytes]]

CE_HEADERS: Headers = [
    (b"ce-specversion", b"1.0"),
    (b"ce-id", b"42"),
    (b"ce-source", b"/tests"),
    (b"ce-type", b"io.snaphook.backup.pre"),
]
STRUCTURED: Headers = [(b"Content-Type", b"application/cloudevents+json")]
BATCH: Headers = [(b"Content-Type", b"application/cloudevents-batch+json")]


def event_dict(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "42",
        "source": "/tests",
        "type": "io.snaphook.backup.pre",
    }
    event.update(changes)
    return event


def binary(*extra: tuple[bytes, bytes], body: bytes = b"", ct: bytes | None = None) -> ParsedEvent:
    headers = [*CE_HEADERS, *extra]
    if ct is not None:
        headers.append((b"Content-Type", ct))
    request = parse_request(headers, body)
    assert request.mode is Mode.BINARY
    [event] = request.events
    return event


def structured(document: Any) -> ParsedEvent:
    request = parse_request(STRUCTURED, json.dumps(document).encode())
    assert request.mode is Mode.STRUCTURED
    [event] = request.events
    return event


def rejects(headers: Headers, body: bytes, status: int = 400, **kwargs: Any) -> EventError:
    with pytest.raises(EventError) as caught:
        parse_request(headers, body, **kwargs)
    assert caught.value.status == status, caught.value.detail
    expected_title = {400: "Malformed CloudEvent", 415: "Unsupported Media Type"}
    assert caught.value.title == expected_title.get(status, caught.value.title)
    return caught.value


def as_raw(headers: dict[str, str]) -> Headers:
    return [(name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()]


# --- mode detection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "mode"),
    [
        (None, Mode.BINARY),
        ("", Mode.BINARY),
        ("application/json", Mode.BINARY),
        ("text/plain; charset=utf-8", Mode.BINARY),
        ("application/cloudevents+json", Mode.STRUCTURED),
        ("Application/CloudEvents+JSON; charset=UTF-8", Mode.STRUCTURED),
        ("application/cloudevents+xml", Mode.STRUCTURED),
        ("application/cloudevents", Mode.STRUCTURED),
        ("application/cloudevents-batch+json", Mode.BATCH),
        ("APPLICATION/CLOUDEVENTS-BATCH+json ; charset=utf-8", Mode.BATCH),
        ("application/cloudevents-batch+avro", Mode.BATCH),
    ],
)
def test_detect_mode_by_media_type_prefix(content_type: str | None, mode: Mode) -> None:
    assert detect_mode(content_type) is mode


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/cloudevents+xml",
        b"application/cloudevents",
        b"application/cloudevents-batch+avro",
        b"application/cloudevents-batch",
    ],
)
def test_unsupported_event_format_is_415(content_type: bytes) -> None:
    error = rejects([*CE_HEADERS, (b"content-type", content_type)], b"{}", status=415)
    assert error.field == "content-type"


@pytest.mark.parametrize("extra", [[], [(b"Content-Type", b"application/json")]])
def test_no_ce_headers_and_no_cloudevents_type_is_415(extra: Headers) -> None:
    error = rejects(extra, b'{"hello": 1}', status=415)
    assert "binary mode needs ce-* headers" in error.detail
    assert "application/cloudevents+json" in error.detail


def test_ce_headers_without_specversion_is_400() -> None:
    headers = [h for h in CE_HEADERS if h[0] != b"ce-specversion"]
    assert rejects(headers, b"").field == "ce-specversion"


# --- binary mode: header values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        (b"plain", "plain"),
        (b"%2541", "%41"),  # exactly one round of decoding
        (b"%C3%A9", "\u00e9"),
        (b"caf%c3%a9", "caf\u00e9"),  # lower-case hex MUST be accepted
        (b"Euro%20%E2%82%AC%20%F0%9F%98%80", "Euro \u20ac \U0001f600"),
        (b"%41", "A"),  # unnecessary encoding MUST be accepted
        (b"a+b", "a+b"),  # '+' is not a space here
    ],
)
def test_binary_header_is_percent_decoded_once(raw: bytes, decoded: str) -> None:
    assert binary((b"ce-subject", raw)).attributes["subject"] == decoded


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"%FF", "UTF-8"),
        (b"%C0%A0", "UTF-8"),  # overlong encoding of a space
        (b"%4", "percent"),
        (b"%zz", "percent"),
        (b"100%", "percent"),
        ("caf\u00e9".encode(), "non-ASCII"),
        (b"nul%00", "control"),
    ],
)
def test_bad_binary_header_value_is_400_naming_header(raw: bytes, words: str) -> None:
    error = rejects([*CE_HEADERS, (b"ce-subject", raw)], b"")
    assert error.field == "ce-subject"
    assert words in error.detail


def test_binary_header_names_are_case_insensitive() -> None:
    event = binary((b"CE-TraceParent", b"00-abc-def-01"))
    assert event.attributes["traceparent"] == "00-abc-def-01"


@pytest.mark.parametrize(
    ("header", "field"),
    [
        (b"ce-foo_bar", "ce-foo_bar"),
        (b"ce-", "ce-"),
        (b"ce-id", "ce-id"),  # duplicate
        (b"ce-datacontenttype", "ce-datacontenttype"),  # must come from Content-Type
    ],
)
def test_bad_binary_header_name_is_400(header: bytes, field: str) -> None:
    assert rejects([*CE_HEADERS, (header, b"x")], b"").field == field


def test_binary_extensions_stay_strings() -> None:
    event = binary((b"ce-count", b"5"), (b"ce-flag", b"true"))
    assert event.attributes["count"] == "5"
    assert event.attributes["flag"] == "true"


# --- binary mode: data ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"Application/JSON",
        b"text/json",
        b"application/json; charset=utf-8",
        b"application/vnd.snaphook+json",
    ],
)
def test_binary_json_body_is_parsed(content_type: bytes) -> None:
    event = binary(body=b'{"a": [1, "\xc3\xa9"]}', ct=content_type)
    assert event.data == {"a": [1, "\u00e9"]}
    assert event.attributes["datacontenttype"] == content_type.decode()


def test_binary_json_string_body_is_a_json_string() -> None:
    assert binary(body=b'"just a string"', ct=b"application/json").data == "just a string"


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/octet-stream", None])
def test_binary_non_json_body_is_bytes(content_type: bytes | None) -> None:
    event = binary(body=b"\x00\xffraw", ct=content_type)
    assert event.data == b"\x00\xffraw"
    assert ("datacontenttype" in event.attributes) is (content_type is not None)


@pytest.mark.parametrize("content_type", [b"application/json", b"text/plain", None])
def test_binary_empty_body_is_no_data(content_type: bytes | None) -> None:
    assert binary(ct=content_type).data is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'"\xff"', "UTF-8"),
        (b"[" * 100_000, "not valid JSON"),  # too deep to parse
    ],
)
def test_binary_bad_json_body_is_400_naming_data(body: bytes, words: str) -> None:
    error = rejects([*CE_HEADERS, (b"content-type", b"application/json")], body)
    assert error.field == "data"
    assert words in error.detail


def test_non_ascii_content_type_is_400() -> None:
    headers = [*CE_HEADERS, (b"content-type", "text/pl\u00e4in".encode())]
    assert rejects(headers, b"").field == "content-type"


# --- structured mode -----------------------------------------------------------------------


@pytest.mark.parametrize("data", [{"a": 1}, [1, 2], "a string", 3, True, None])
def test_structured_data_is_kept_as_json_value(data: Any) -> None:
    assert structured(event_dict(data=data)).data == data


def test_structured_data_base64_is_bytes() -> None:
    encoded = base64.b64encode(b"\x00\x01binary").decode()
    event = structured(event_dict(datacontenttype="application/octet-stream", data_base64=encoded))
    assert event.data == b"\x00\x01binary"
    assert "data_base64" not in event.attributes


def test_structured_data_and_data_base64_together_is_400() -> None:
    body = json.dumps(event_dict(data={"a": 1}, data_base64="AAAA")).encode()
    assert rejects(STRUCTURED, body).field == "data_base64"


@pytest.mark.parametrize("encoded", ["!!!!", "abc", "AAAA\n", 123, ["AAAA"]])
def test_structured_bad_data_base64_is_400(encoded: Any) -> None:
    body = json.dumps(event_dict(data_base64=encoded)).encode()
    assert rejects(STRUCTURED, body).field == "data_base64"


@pytest.mark.parametrize("body", [b"[]", b'"event"', b"1", b"null", b"{oops", b'{"id": "\xff"}'])
def test_structured_body_must_be_a_utf8_json_object(body: bytes) -> None:
    rejects(STRUCTURED, body)


def test_structured_mode_ignores_ce_headers() -> None:
    headers = [(b"ce-id", b"from-header"), (b"ce-bogus_name", b"%zz"), *STRUCTURED]
    request = parse_request(headers, json.dumps(event_dict()).encode())
    assert request.events[0].attributes["id"] == "42"


def test_structured_null_attribute_is_absent() -> None:
    event = structured(event_dict(subject=None, time=None, traceparent=None))
    assert set(event.attributes) == {"specversion", "id", "source", "type"}


@pytest.mark.parametrize(
    "value", ["text", True, False, 0, -(2**31), 2**31 - 1], ids=lambda v: repr(v)
)
def test_structured_extension_types_allowed(value: Any) -> None:
    assert structured(event_dict(myext=value)).attributes["myext"] == value


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (1.5, "integer"),
        (1.0, "integer"),
        (2**31, "32-bit"),
        (-(2**31) - 1, "32-bit"),
        ([1], "string, boolean or integer"),
        ({"a": 1}, "string, boolean or integer"),
    ],
)
def test_structured_extension_bad_types_are_400(value: Any, words: str) -> None:
    error = rejects(STRUCTURED, json.dumps(event_dict(myext=value)).encode())
    assert error.field == "myext"
    assert words in error.detail


@pytest.mark.parametrize(
    "name", ["id", "source", "type", "specversion", "subject", "time", "dataschema"]
)
@pytest.mark.parametrize("value", [1, True, {"a": "b"}])
def test_structured_core_attributes_must_be_strings(name: str, value: Any) -> None:
    error = rejects(STRUCTURED, json.dumps(event_dict(**{name: value})).encode())
    assert error.field == name


@pytest.mark.parametrize("name", ["MyExt", "my-ext", "my_ext", "\u00e9t\u00e9"])
def test_structured_attribute_names_are_lowercase_alphanumeric(name: str) -> None:
    rejects(STRUCTURED, json.dumps(event_dict(**{name: "x"})).encode())


def test_long_attribute_names_are_accepted() -> None:
    assert "a" * 40 in structured(event_dict(**{"a" * 40: "x"})).attributes


@pytest.mark.parametrize("value", ["a\u0000b", "tab\there", "\ud800", "\ufffe", "\U0001ffff"])
def test_string_attributes_reject_control_and_non_characters(value: str) -> None:
    assert rejects(STRUCTURED, json.dumps(event_dict(subject=value)).encode()).field == "subject"


# --- batch mode ----------------------------------------------------------------------------


def test_empty_batch_is_zero_events() -> None:
    assert parse_request(BATCH, b"[]") == ParsedRequest(Mode.BATCH, [])


def test_batch_of_two() -> None:
    body = json.dumps([event_dict(id="1", data=1), event_dict(id="2", data_base64="AA==")])
    request = parse_request(BATCH, body.encode())
    assert request.mode is Mode.BATCH
    assert [e.attributes["id"] for e in request.events] == ["1", "2"]
    assert [e.data for e in request.events] == [1, b"\x00"]


@pytest.mark.parametrize(
    ("element", "field"),
    [
        (event_dict(source=""), "[1].source"),
        (event_dict(time="yesterday"), "[1].time"),
        (event_dict(specversion="0.3"), "[1].specversion"),
        ("not an object", "[1]"),
    ],
)
def test_batch_element_error_names_index(element: Any, field: str) -> None:
    body = json.dumps([event_dict(), element]).encode()
    assert rejects(BATCH, body).field == field


@pytest.mark.parametrize("body", [b"{}", b'"x"', b"[", b"\xff"])
def test_batch_body_must_be_a_json_array(body: bytes) -> None:
    rejects(BATCH, body)


def test_batch_over_max_is_413() -> None:
    body = json.dumps([event_dict(id=str(i)) for i in range(4)]).encode()
    assert len(parse_request(BATCH, body, max_batch=4).events) == 4
    error = rejects(BATCH, body, status=413, max_batch=3)
    assert "3" in error.detail


def test_batch_default_max_is_100() -> None:
    body = json.dumps([event_dict()] * 101).encode()
    rejects(BATCH, body, status=413)


# --- common attribute rules ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.3", "1", "2.0", "1.0 "])
def test_only_specversion_1_0_is_accepted(version: str) -> None:
    error = rejects(STRUCTURED, json.dumps(event_dict(specversion=version)).encode())
    assert error.field == "specversion"
    assert "only 1.0" in error.detail
    headers = [(b"ce-specversion", version.encode().replace(b" ", b"%20")), *CE_HEADERS[1:]]
    assert rejects(headers, b"").field == "ce-specversion"


@pytest.mark.parametrize("name", ["specversion", "id", "source", "type"])
@pytest.mark.parametrize("missing", [True, False])
def test_required_attributes(name: str, missing: bool) -> None:
    document = event_dict()
    if missing:
        del document[name]
    else:
        document[name] = ""
    assert rejects(STRUCTURED, json.dumps(document).encode()).field == name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2018-04-05T17:31:00Z", datetime(2018, 4, 5, 17, 31, tzinfo=UTC)),
        ("2018-04-05t17:31:00z", datetime(2018, 4, 5, 17, 31, tzinfo=UTC)),
        (
            "2018-04-05T17:31:00.123456789+05:30",
            datetime(2018, 4, 5, 17, 31, 0, 123456, tzinfo=timezone(timedelta(hours=5.5))),
        ),
        (
            "2018-04-05T17:31:00.5-08:00",
            datetime(2018, 4, 5, 17, 31, 0, 500000, tzinfo=timezone(timedelta(hours=-8))),
        ),
        ("2018-04-05T17:31:00-00:00", datetime(2018, 4, 5, 17, 31, tzinfo=UTC)),
    ],
)
def test_time_is_parsed_as_rfc3339(text: str, expected: datetime) -> None:
    parsed = structured(event_dict(time=text)).attributes["time"]
    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    "text",
    [
        "garbage",
        "2018-04-05",
        "2018-04-05T17:31:00",  # no offset
        "2018-04-05 17:31:00Z",  # space instead of T
        "20180405T173100Z",
        "2018-04-05T17:31Z",  # no seconds
        "2018-13-05T17:31:00Z",
        "2018-02-30T17:31:00Z",
        "2018-04-05T24:00:00Z",
        "2018-04-05T17:31:00+24:00",
        "2018-04-05T17:31:00+01:60",
        "2018-04-05T17:31:00.Z",
        "\uff12018-04-05T17:31:00Z",  # non-ASCII digits
    ],
)
def test_bad_time_is_400_naming_time(text: str) -> None:
    assert rejects(STRUCTURED, json.dumps(event_dict(time=text)).encode()).field == "time"


def test_binary_time_is_parsed_and_errors_name_the_header() -> None:
    event = binary((b"ce-time", b"2018-04-05T17:31:00Z"))
    assert event.attributes["time"] == datetime(2018, 4, 5, 17, 31, tzinfo=UTC)
    assert rejects([*CE_HEADERS, (b"ce-time", b"today")], b"").field == "ce-time"


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"subject": ""}, "subject"), ({"dataschema": ""}, "dataschema")],
)
def test_sdk_validation_errors_name_the_attribute(changes: dict[str, Any], field: str) -> None:
    assert rejects(STRUCTURED, json.dumps(event_dict(**changes)).encode()).field == field


def test_reserved_data_extension_in_binary_is_400() -> None:
    assert rejects([*CE_HEADERS, (b"ce-data", b"x")], b"").field == "ce-data"


def test_details_do_not_echo_long_input() -> None:
    error = rejects(STRUCTURED, json.dumps(event_dict(specversion="x" * 10_000)).encode())
    assert len(error.detail) < 200


# --- extensions_of -------------------------------------------------------------------------


def test_extensions_of_stringifies_non_core_attributes() -> None:
    attributes = event_dict(
        time=datetime(2020, 1, 1, tzinfo=UTC),
        subject="s",
        traceparent="00-abc-def-01",
        flag=True,
        count=5,
        blob=b"\x00",
        unset=None,
    )
    assert extensions_of(attributes) == {
        "traceparent": "00-abc-def-01",
        "flag": "true",
        "count": "5",
        "blob": "AA==",
    }


# --- replies and round trips ----------------------------------------------------------------

ROUND_TRIP_ATTRIBUTES = event_dict(
    subject='Euro \u20ac \U0001f600 "quoted" 100%',
    time=datetime(2018, 4, 5, 17, 31, 0, 250000, tzinfo=UTC),
    traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
)


def test_binary_reply_percent_encodes_header_values() -> None:
    headers, _ = to_binary_message(ROUND_TRIP_ATTRIBUTES, None)
    assert headers["ce-subject"] == "Euro%20%E2%82%AC%20%F0%9F%98%80%20%22quoted%22%20100%25"
    assert headers["ce-time"] == "2018-04-05T17:31:00.250000Z"


@pytest.mark.parametrize(
    ("data", "content_type", "expected_data", "expected_type"),
    [
        ({"a": [1, "\u00e9"]}, None, {"a": [1, "\u00e9"]}, "application/json"),
        (["x", None], None, ["x", None], "application/json"),
        ("just a string", None, "just a string", "application/json"),
        ("just a string", "application/vnd.x+json", "just a string", "application/vnd.x+json"),
        ("<x/>", "application/xml", b"<x/>", "application/xml"),
        (b"\x00\xff", "application/octet-stream", b"\x00\xff", "application/octet-stream"),
        (None, None, None, None),
    ],
)
def test_binary_round_trip(
    data: Any, content_type: str | None, expected_data: Any, expected_type: str | None
) -> None:
    attributes = dict(ROUND_TRIP_ATTRIBUTES, flag=True, count=5)
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    headers, body = to_binary_message(attributes, data)
    [event] = parse_request(as_raw(headers), body).events
    assert event.data == expected_data
    assert event.attributes.get("datacontenttype") == expected_type
    assert event.attributes["flag"] == "true"  # binary mode carries canonical strings
    assert event.attributes["count"] == "5"
    for name in ("subject", "time", "traceparent", "id", "source", "type"):
        assert event.attributes[name] == ROUND_TRIP_ATTRIBUTES[name]


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ({"a": 1}, None),
        ("I'm just a string", None),
        (None, None),
        (b"\x00\xff", "application/octet-stream"),
        ("<x/>", "application/xml"),
    ],
)
def test_structured_round_trip(data: Any, content_type: str | None) -> None:
    attributes = dict(ROUND_TRIP_ATTRIBUTES, flag=True, count=5)
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    body = to_structured_body(attributes, data)
    [event] = parse_request(STRUCTURED, body).events
    assert event == ParsedEvent(attributes, data)  # JSON keeps boolean and integer types


def test_replies_do_not_mutate_attributes() -> None:
    attributes = {"source": "/tests", "type": "t", "unset": None}
    headers, _ = to_binary_message(attributes, {"a": 1})
    to_structured_body(attributes, {"a": 1})
    assert attributes == {"source": "/tests", "type": "t", "unset": None}
    assert "ce-unset" not in headers
    assert headers["ce-specversion"] == "1.0"  # the SDK fills in specversion, id and time
    assert headers["ce-id"]


@pytest.mark.parametrize("reply", [to_binary_message, to_structured_body])
def test_replies_refuse_non_string_data_for_non_json_type(reply: Any) -> None:
    with pytest.raises(TypeError):
        reply(event_dict(datacontenttype="text/plain"), {"a": 1})


# --- webhook abuse protection ---------------------------------------------------------------


def test_webhook_allows_any_origin_when_unrestricted() -> None:
    status, headers = webhook_options_response({"WebHook-Request-Origin": "em.example.com"}, None)
    assert status == 200
    assert headers["WebHook-Allowed-Origin"] == "*"
    assert headers["Allow"] == "POST"
    assert headers["WebHook-Allowed-Rate"] == "*"


@pytest.mark.parametrize("name", ["WebHook-Request-Origin", "webhook-request-origin"])
def test_webhook_echoes_an_allowed_origin(name: str) -> None:
    request = {name: "Em.Example.com", "WebHook-Request-Rate": "120"}
    status, headers = webhook_options_response(request, ["em.example.com", "other.example"])
    assert status == 200
    assert headers["WebHook-Allowed-Origin"] == "Em.Example.com"
    assert headers["WebHook-Allowed-Rate"] == "*"


def test_webhook_star_in_allowed_origins_allows_all() -> None:
    _, headers = webhook_options_response({"WebHook-Request-Origin": "x.example"}, ["*"])
    assert headers["WebHook-Allowed-Origin"] == "*"


def test_webhook_refuses_unknown_origin() -> None:
    status, headers = webhook_options_response(
        {"WebHook-Request-Origin": "evil.example"}, ["em.example.com"]
    )
    assert status == 403
    assert "WebHook-Allowed-Origin" not in headers
    assert "WebHook-Allowed-Rate" not in headers


@pytest.mark.parametrize("request_headers", [{}, {"WebHook-Request-Origin": "  "}])
def test_webhook_without_origin_is_400(request_headers: dict[str, str]) -> None:
    status, headers = webhook_options_response(request_headers, None)
    assert status == 400
    assert "WebHook-Allowed-Origin" not in headers
