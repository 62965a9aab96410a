"""CloudEvents over HTTP: turn a raw request into events, and events into replies.

Follows CloudEvents 1.0.2 (core spec, HTTP binding, JSON format, webhook spec). The
``cloudevents`` SDK validates events and writes replies; it is lenient when reading
(it percent-decodes with ``unquote``, parses any ISO 8601 time, trusts JSON types), so
this module does the reading itself and only hands finished attributes to the SDK.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn
from urllib.parse import unquote_to_bytes

from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from dispatcher.errors import EventError

MALFORMED = "Malformed CloudEvent"
UNSUPPORTED = "Unsupported Media Type"
STRUCTURED_TYPE = "application/cloudevents+json"
BATCH_TYPE = "application/cloudevents-batch+json"
CORE_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "datacontenttype", "dataschema", "subject", "time"}
)
INT32 = range(-(2**31), 2**31)  # the CloudEvents Integer type

_NAME = re.compile(r"[a-z0-9]+")
# Names every invoke or reply carries: valid by the rule above, so no regex for them.
_USUAL_NAMES = CORE_ATTRIBUTES | {"snaphookfunction", "snaphookinvocation", "traceparent"}
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Control characters, surrogates and BMP noncharacters are not allowed in String values.
_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")
# Noncharacters at the end of every other plane (U+1FFFE, U+1FFFF ... U+10FFFF): one
# compiled class, because a per-character Python loop showed in the hot path of every event.
_PLANE_ENDS = re.compile(
    "["
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(1, 17))
    + "]"
)
# json.dumps with options builds an encoder per call; this is the same encoder, built once.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
# Header values the SDK's binary writer would leave as they are: printable ASCII but space,
# '"' and '%' (HTTP binding 3.1.3.2), i.e. what ``quote(value, safe=...)`` does not touch.
_HEADER_SAFE = re.compile(r"[!#$&-~]*")
_JSON_FORMAT = JSONFormat()
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"  # date, T, time
    r"(?:[Zz]|([+-])([01]\d|2[0-3]):([0-5]\d))",  # offset
    re.ASCII,  # \d would otherwise match any Unicode digit
)

Where = Callable[[str], str]  # attribute name -> where it sits on the wire, for error fields


class Mode(enum.StrEnum):
    BINARY = "binary"
    STRUCTURED = "structured"
    BATCH = "batch"


@dataclass(frozen=True)
class ParsedEvent:
    attributes: dict[str, Any]  # decoded: ``time`` is a datetime, extensions str/bool/int
    data: Any  # a JSON value, bytes, or None


@dataclass(frozen=True)
class ParsedRequest:
    mode: Mode
    events: list[ParsedEvent]


def _clip(text: str, limit: int = 100) -> str:
    """Quote client input for an error detail without echoing all of it."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _malformed(detail: str, field: str | None = None) -> NoReturn:
    raise EventError(400, MALFORMED, detail, field=field)


def _unsupported(detail: str) -> NoReturn:
    raise EventError(415, UNSUPPORTED, detail, field="content-type")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


# Content types repeat (nearly every request says application/json): the two questions
# asked of each, twice per request, are remembered for a few recent values.
@functools.lru_cache(maxsize=32)
def _is_json_type(content_type: str) -> bool:
    # JSON format 3.1: "*/json" or "*/*+json" once parameters are stripped.
    subtype = _media_type(content_type).partition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


@functools.lru_cache(maxsize=32)
def detect_mode(content_type: str | None) -> Mode:
    """The content mode; only the media type prefix counts, not whether it is supported."""
    media_type = _media_type(content_type)
    # The batch prefix also starts with the structured one, so it must be tested first.
    if media_type.startswith("application/cloudevents-batch"):
        return Mode.BATCH
    if media_type.startswith("application/cloudevents"):
        return Mode.STRUCTURED
    return Mode.BINARY


def parse_request(
    raw_headers: Sequence[tuple[bytes, bytes]], body: bytes, *, max_batch: int = 100
) -> ParsedRequest:
    """Decode a request into events; raises :class:`EventError` (400, 413 or 415)."""
    content_type = _content_type(raw_headers)
    mode = detect_mode(content_type)
    if mode is Mode.BINARY:
        return ParsedRequest(mode, [_binary_event(raw_headers, content_type, body)])
    expected = STRUCTURED_TYPE if mode is Mode.STRUCTURED else BATCH_TYPE
    if _media_type(content_type) != expected:
        _unsupported(
            f"event format {_clip(_media_type(content_type))} is not supported; use {expected}"
        )
    document = _load_json(body, None)
    if mode is Mode.STRUCTURED:
        if not isinstance(document, dict):
            _malformed("a structured CloudEvent must be a JSON object")
        return ParsedRequest(mode, [_json_event(document, lambda name: name)])
    if not isinstance(document, list):
        _malformed("a CloudEvents batch must be a JSON array")
    if len(document) > max_batch:
        raise EventError(
            413, "Content Too Large", f"batch of {len(document)} events exceeds {max_batch}"
        )
    return ParsedRequest(mode, [_batch_element(i, item) for i, item in enumerate(document)])


def _content_type(raw_headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    values = [value for name, value in raw_headers if name.lower() == b"content-type"]
    if len(values) > 1:
        _malformed("more than one Content-Type header", "content-type")
    if not values:
        return None
    try:
        return values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        _malformed("Content-Type header is not ASCII", "content-type")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # Python would otherwise accept NaN


# What json.loads(text, parse_constant=...) would build anew on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _load_json(raw: bytes, field: str | None) -> Any:
    what = field or "request body"
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16/32.
        return _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        _malformed(f"{what} is not valid UTF-8", field)
    except (ValueError, RecursionError) as exc:
        _malformed(f"{what} is not valid JSON: {_clip(str(exc))}", field)


# --- binary mode ---------------------------------------------------------------------


def _binary_where(name: str) -> str:
    return "content-type" if name == "datacontenttype" else f"ce-{name}"


def _binary_event(
    raw_headers: Sequence[tuple[bytes, bytes]], content_type: str | None, body: bytes
) -> ParsedEvent:
    attributes: dict[str, Any] = {}
    for raw_name, raw_value in raw_headers:
        if raw_name[:3].lower() != b"ce-":  # before decoding: most headers are not ce-*
            continue
        header = raw_name.decode("latin-1").lower()
        name = header[3:]
        if name not in _USUAL_NAMES:
            _check_name(name, _binary_where)
        if name == "datacontenttype":  # HTTP binding 3.1.1
            _malformed("ce-datacontenttype must not be sent; use Content-Type", header)
        if name in attributes:
            _malformed(f"header {header} appears more than once", header)
        attributes[name] = _decode_header_value(raw_value, header)
    if not attributes:
        _unsupported(
            f"expected a CloudEvent: binary mode needs ce-* headers, or use {STRUCTURED_TYPE}"
        )
    if "specversion" not in attributes:
        _malformed("header ce-specversion is required in binary mode", "ce-specversion")
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    return _finish(attributes, _binary_data(body, content_type), _binary_where)


def _decode_header_value(raw: bytes, header: str) -> str:
    """ASCII, then exactly one round of percent-decoding, then strict UTF-8 (binding 3.1.3.2)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        _malformed(f"{header} holds non-ASCII bytes; they must be percent-encoded", header)
    if "%" not in text:
        return text  # ASCII is valid UTF-8
    if _BAD_PERCENT.search(text):
        _malformed(f"{header} holds a malformed percent-encoding", header)
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        _malformed(f"{header} does not percent-decode to valid UTF-8", header)


def _binary_data(body: bytes, content_type: str | None) -> Any:
    if not body:
        return None
    if content_type is not None and _is_json_type(content_type):
        return _load_json(body, "data")
    return body  # opaque: without a JSON content type there is nothing to interpret


# --- structured and batch mode ---------------------------------------------------------


def _batch_element(index: int, item: Any) -> ParsedEvent:
    if not isinstance(item, dict):
        _malformed(f"batch element {index} is not a JSON object", f"[{index}]")
    return _json_event(item, lambda name: f"[{index}].{name}")


def _json_event(document: dict[str, Any], where: Where) -> ParsedEvent:
    attributes: dict[str, Any] = {}
    for name, value in document.items():
        # JSON format 2.2: a null attribute is the same as an absent one.
        if name in ("data", "data_base64") or value is None:
            continue
        if name not in _USUAL_NAMES:
            _check_name(name, where)
        attributes[name] = _json_attribute(name, value, where)
    encoded = document.get("data_base64")
    if encoded is None:
        return _finish(attributes, document.get("data"), where)
    if "data" in document:
        _malformed("data and data_base64 are mutually exclusive", where("data_base64"))
    if not isinstance(encoded, str):
        _malformed("data_base64 must be a string", where("data_base64"))
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        _malformed("data_base64 is not valid base64", where("data_base64"))
    return _finish(attributes, data, where)


def _json_attribute(name: str, value: Any, where: Where) -> Any:
    """Apply the JSON format's type mapping (2.2) to one attribute value."""
    if isinstance(value, str):
        return value
    if name in CORE_ATTRIBUTES:
        _malformed(f"attribute {name} must be a JSON string", where(name))
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value not in INT32:
            _malformed(f"attribute {name} is outside the 32-bit integer range", where(name))
        return value
    if isinstance(value, float):
        _malformed(f"attribute {name} must be an integer, not a fraction", where(name))
    _malformed(f"attribute {name} must be a string, boolean or integer", where(name))


# --- shared validation -----------------------------------------------------------------


def _check_name(name: str, where: Where) -> None:
    if not _NAME.fullmatch(name):
        _malformed(
            f"attribute name {_clip(name)} must be lowercase letters and digits", where(name)
        )


def _finish(attributes: dict[str, Any], data: Any, where: Where) -> ParsedEvent:
    specversion = attributes.get("specversion")
    if specversion is None:
        _malformed("attribute specversion is required", where("specversion"))
    if specversion != "1.0":
        _malformed(
            f"specversion {_clip(str(specversion))} is not supported; only 1.0 is",
            where("specversion"),
        )
    for name in ("id", "source", "type"):
        if not attributes.get(name):
            _malformed(f"attribute {name} is required and must not be empty", where(name))
    if not _all_printable_ascii(attributes):
        for name, value in attributes.items():
            if isinstance(value, str) and _has_forbidden_chars(value):
                _malformed(f"attribute {name} holds control or non-characters", where(name))
    if "time" in attributes:
        attributes["time"] = _parse_time(attributes["time"], where("time"))
    try:
        # The SDK fills defaults into the dict it gets, so hand it a copy.
        CloudEvent(dict(attributes), data)
    except CloudEventValidationError as exc:
        name, problems = next(iter(exc.errors.items()))
        _malformed(_clip(str(problems[0]), 200), where(name))
    return ParsedEvent(attributes, data)


def _all_printable_ascii(attributes: Mapping[str, Any]) -> bool:
    """Every value is a string of U+0020-U+007E only (the common case): nothing forbidden."""
    try:
        text = "".join(attributes.values())
    except TypeError:  # a boolean or integer (JSON format): look at each string
        return False
    return text.isascii() and text.isprintable()


def _has_forbidden_chars(value: str) -> bool:
    # Core spec "String": also noncharacters at the end of every plane (U+xFFFE, U+xFFFF).
    return bool(_BAD_CHARS.search(value) or _PLANE_ENDS.search(value))


def _parse_time(value: str, field: str) -> datetime:
    """Strict RFC 3339 ``date-time``; ``datetime.fromisoformat`` accepts far more."""
    match = _RFC3339.fullmatch(value)
    if match is None:
        _malformed(f"time {_clip(value)} is not an RFC 3339 timestamp", field)
    *date_time, fraction, sign, offset_hours, offset_minutes = match.groups()
    offset = timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
    micro = int((fraction or "0")[:6].ljust(6, "0"))  # RFC 3339 allows any precision
    year, month, day, hour, minute, second = map(int, date_time)
    try:
        zone = timezone(-offset if sign == "-" else offset)
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)
    except ValueError:  # e.g. month 13, or a leap second Python cannot represent
        _malformed(f"time {_clip(value)} is not a valid date and time", field)


# --- replies ---------------------------------------------------------------------------


def _canonical_string(value: Any) -> str:
    """The core spec's canonical string form of an attribute value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def extensions_of(attributes: Mapping[str, Any]) -> dict[str, str]:
    """The extension attributes (e.g. traceparent), as canonical strings."""
    return {
        name: _canonical_string(value)
        for name, value in attributes.items()
        if name not in CORE_ATTRIBUTES and value is not None
    }


def _reply_data(attributes: dict[str, Any], data: Any, *, binary: bool) -> Any:
    """Serialise data ourselves where the SDK would fall back to ``str()``."""
    if data is None or isinstance(data, bytes):
        return data
    if binary:  # without Content-Type a receiver could not tell the body is JSON
        content_type = attributes.setdefault("datacontenttype", "application/json")
    else:  # JSON format 3.1.1: an absent datacontenttype already means JSON
        content_type = attributes.get("datacontenttype", "application/json")
    if _is_json_type(content_type):
        if not binary:
            return data  # stored as a JSON value, not as a JSON document in a string
        # The SDK would write a str unquoted and a list as its Python repr.
        return _JSON_ENCODER.encode(data).encode("utf-8")
    if isinstance(data, str):
        return data.encode("utf-8") if binary else data
    raise TypeError(f"data for datacontenttype {content_type!r} must be str or bytes")


def to_binary_message(attributes: dict[str, Any], data: Any) -> tuple[dict[str, str], bytes]:
    """Headers and body of a binary-mode message; the SDK fills in missing id and time."""
    attrs = _without_none(attributes)
    body = _reply_data(attrs, data, binary=True)
    for name in attrs.keys() - CORE_ATTRIBUTES:
        if type(attrs[name]) is not str:  # the SDK would write True as "True"
            attrs[name] = _canonical_string(attrs[name])
    event = CloudEvent(attrs, body)
    headers = _plain_headers(event.get_attributes())
    if headers is not None and (body is None or isinstance(body, bytes)):
        return headers, body or b""
    message = to_binary(event, _JSON_FORMAT)  # something to percent-encode
    return dict(message.headers), message.body


def _plain_headers(attributes: Mapping[str, Any]) -> dict[str, str] | None:
    """The SDK's binary-mode headers when no value needs percent-encoding (ids, names,
    timestamps: nearly always), else None. ``quote`` on every header was a good share of
    a reply's cost."""
    plain = dict(attributes)
    content_type = plain.pop("datacontenttype", None)  # the SDK writes it as it is
    when = plain.get("time")
    if isinstance(when, datetime):  # as the SDK writes it
        text = when.isoformat()
        plain["time"] = text[:-6] + "Z" if text.endswith("+00:00") else text
    try:
        joined = "!".join(plain.values())  # one match for all values ('!' is safe itself)
    except TypeError:  # a value that is not a string
        return None
    if not _HEADER_SAFE.fullmatch(joined):
        return None
    # {"ce-" + name: value ...}, without a Python-level loop
    headers = dict(zip(map("ce-".__add__, plain), plain.values(), strict=True))
    if content_type is not None:
        headers["content-type"] = str(content_type)
    return headers


def _without_none(attributes: Mapping[str, Any]) -> dict[str, Any]:
    attrs = dict(attributes)
    if None in attrs.values():  # rare: a copy is all the common case needs
        attrs = {name: value for name, value in attrs.items() if value is not None}
    return attrs


def to_structured_body(attributes: dict[str, Any], data: Any) -> bytes:
    """An ``application/cloudevents+json`` body; the SDK fills in missing id and time."""
    attrs = _without_none(attributes)
    event_data = _reply_data(attrs, data, binary=False)
    for name, value in attrs.items():
        if isinstance(value, bytes):  # Binary-typed extensions are base64 strings in JSON
            attrs[name] = _canonical_string(value)
    return to_structured(CloudEvent(attrs, event_data), _JSON_FORMAT).body


def encode_event(
    event: Mapping[str, Any], mode: str = "structured"
) -> tuple[dict[str, str], bytes]:
    """Headers and body to POST a structured-JSON-shaped ``event`` in ``mode``
    (``structured`` or ``binary``)."""
    attributes = dict(event)
    data = attributes.pop("data", None)
    if mode == "binary":
        return to_binary_message(attributes, data)
    body = to_structured_body(attributes, data)
    return {"Content-Type": STRUCTURED_TYPE}, body


# --- webhook abuse protection ------------------------------------------------------------


def webhook_options_response(
    request_headers: Mapping[str, str], allowed_origins: Collection[str] | None
) -> tuple[int, dict[str, str]]:
    """Answer the OPTIONS validation handshake (webhook spec section 4)."""
    headers = {name.lower(): value for name, value in request_headers.items()}
    origin = headers.get("webhook-request-origin", "").strip()
    reply = {"Allow": "POST"}
    if not origin:
        return 400, reply
    allowed = None if allowed_origins is None else {o.lower() for o in allowed_origins}
    if allowed is None or "*" in allowed:
        granted = "*"
    elif origin.lower() in allowed:
        granted = origin
    else:
        return 403, reply
    # 4.2.2: the rate MUST be answered when requested and SHOULD be otherwise.
    return 200, {**reply, "WebHook-Allowed-Origin": granted, "WebHook-Allowed-Rate": "*"}
