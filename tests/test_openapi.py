"""The OpenAPI 3.1 document: a valid document, served at /openapi.json, true to live answers;
and schemathesis against a live ``snaphook serve``.

The schemathesis run is time-boxed (``SNAPHOOK_FUZZ_SECONDS``, default 45 s): fuzzing goes on
until the budget is spent, and the number of generated inputs is reported (printed, and as
the ``schemathesis_cases`` property in JUnit XML). ``SNAPHOOK_FUZZ_SECONDS=300`` is a long run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from jsonschema_rs import Draft202012Validator  # typed, and comes with schemathesis
from openapi_spec_validator import validate

from dispatcher.openapi import document
from dispatcher.settings import Settings
from tests.conftest import Harness, HarnessFactory, event_json, free_port
from tests.processes import wait_ready

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FUZZ_SECONDS = float(os.environ.get("SNAPHOOK_FUZZ_SECONDS", "45"))
# A floor against a run that quietly tests (almost) nothing; ~100/s on a laptop core.
MIN_CASES = int(20 * FUZZ_SECONDS)

FREEZE = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: freeze}
spec:
  actions:
    backup.pre:
      - name: freeze
        function: sleep
        lease: {ttl: 1h, release: sleep}
    backup.post:
      - {name: report, function: sleep}
    restore.pre:
      - {name: prepare, function: sleep}
    restore.post:
      - {name: verify, function: sleep}
"""


def conforms(doc: dict[str, Any], model: str, instance: Any) -> None:
    """``instance`` is valid against ``#/components/schemas/<model>`` of ``doc``."""
    schema = {"$ref": f"#/components/schemas/{model}", "components": doc["components"]}
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(instance)]
    assert not errors, f"{model}: {errors} in {json.dumps(instance)[:500]}"


# --- the document -----------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    doc = document(Settings.load())
    validate(doc)  # openapi-spec-validator: the OpenAPI 3.1 meta-schema and references
    assert doc["openapi"] == "3.1.0"
    operations = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert operations == {
        ("/v1/events", "post"),
        ("/v1/events", "options"),
        ("/", "post"),
        ("/", "options"),
        ("/v1/runs", "get"),
        ("/v1/runs/{run_id}", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    }


def test_credentials_are_declared_only_when_authentication_is_on() -> None:
    assert "securitySchemes" not in document(Settings.load())["components"]
    principal = {"name": "k10", "sources": ["k10/*"], "bearer_sha256": ["ab" * 32]}
    doc = document(Settings.load(auth={"principals": [principal]}))
    validate(doc)
    assert set(doc["components"]["securitySchemes"]) == {
        "bearer",
        "webhookSignature",
        "clientCertificate",
    }
    assert "security" in doc["paths"]["/v1/events"]["post"]
    assert "security" in doc["paths"]["/v1/runs/{run_id}"]["get"]
    assert "security" not in doc["paths"]["/healthz"]["get"]  # probes stay open


def test_event_operations_document_every_answer() -> None:
    post = document(Settings.load())["paths"]["/v1/events"]["post"]
    statuses = {"200", "202", "400", "401", "403", "408", "409", "413", "415", "422", "429", "503"}
    assert set(post["responses"]) == statuses
    assert set(post["requestBody"]["content"]) == {
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "application/json",
    }
    parameters = {(p["in"], p["name"]) for p in post["parameters"]}
    assert {("query", "wait"), ("header", "Prefer"), ("header", "ce-id")} <= parameters
    for status in ("429", "503"):
        assert post["responses"][status]["headers"]["Retry-After"]["required"] is True


def test_event_data_schema_comes_from_the_model() -> None:
    schemas = document(Settings.load())["components"]["schemas"]
    data = schemas["HookEventData"]
    assert data["required"] == ["backup"] and data["additionalProperties"] is False
    assert schemas["CloudEvent"]["properties"]["data"] == {
        "$ref": "#/components/schemas/HookEventData"
    }
    good = event_json()
    conforms({"components": {"schemas": schemas}}, "CloudEvent", good)
    post = event_json("backup.post")
    del post["data"]["outcome"]
    with pytest.raises(AssertionError, match="outcome"):
        conforms({"components": {"schemas": schemas}}, "CloudEvent", post)


# --- served, and true to the live answers ---------------------------------------------------


@pytest.fixture
async def h(harness: HarnessFactory) -> Harness:
    # Three events per source, then 429 for a long while.
    return await harness(
        {"freeze": FREEZE}, max_batch=7, rate_limit_per_source=0.001, rate_limit_burst=3
    )


async def fetch(h: Harness, method: str, path: str, **kw: Any) -> tuple[int, str, Any]:
    async with h.client.request(method, path, **kw) as resp:
        ctype = resp.headers.get("Content-Type", "").split(";")[0]
        text = await resp.text()
        return resp.status, ctype, json.loads(text) if "json" in ctype else text


async def test_served_document_describes_this_server(h: Harness) -> None:
    status, ctype, doc = await fetch(h, "GET", "/openapi.json")
    assert (status, ctype) == (200, "application/json")
    assert doc == document(h.settings)
    batch = doc["paths"]["/"]["post"]["requestBody"]["content"][
        "application/cloudevents-batch+json"
    ]
    assert batch["schema"]["maxItems"] == 7  # the configured max_batch


async def test_live_answers_conform_to_the_document(h: Harness) -> None:
    doc = document(h.settings)
    status, _, accepted = await fetch(h, "POST", "/v1/events", **structured(backup_id="b1"))
    assert status == 202
    conforms(doc, "Accepted", accepted)
    status, _, decision = await fetch(
        h, "POST", "/v1/events", params={"wait": "5"}, **structured(backup_id="b1")
    )
    assert status == 200 and decision["allowed"] is True
    conforms(doc, "Decision", decision)
    status, ctype, conflict = await fetch(h, "POST", "/", **structured(backup_id="b2"))
    assert (status, ctype) == (409, "application/problem+json")
    conforms(doc, "Problem", conflict)
    status, _, limited = await fetch(h, "POST", "/", **structured(backup_id="b3"))
    assert status == 429
    conforms(doc, "Problem", limited)
    status, _, run = await fetch(h, "GET", f"/v1/runs/{accepted['run_id']}")
    assert status == 200 and run["leases"]
    conforms(doc, "RunDetail", run)
    for path, model in (("/v1/runs", "RunList"), ("/healthz", "Health"), ("/readyz", "Ready")):
        status, _, body = await fetch(h, "GET", path)
        assert status == 200
        conforms(doc, model, body)


def structured(**kw: Any) -> dict[str, Any]:
    return {
        "data": json.dumps(event_json(**kw)).encode(),
        "headers": {"Content-Type": "application/cloudevents+json"},
    }


# --- schemathesis against a live server -----------------------------------------------------

# All of schemathesis's checks run, with two adjustments to what the API documents:
# * a negative input may also be refused as too large (413: a batch over max_batch);
# * a schema-valid event may still be refused, so positive_data_acceptance is off for POST:
#   whether an event is bound to a blueprint (422), a binary-mode body (application/json)
#   needs ce-* headers that OpenAPI cannot make conditional on the media type (400), and
#   params are checked against the bound blueprint (400).
SCHEMATHESIS_CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "409", "413", "415", "422", "429"]

[[operations]]
include-method = "POST"
checks.positive_data_acceptance.enabled = false
"""


@dataclass
class LiveServer:
    url: str
    log: Path

    def tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-2000:]

    def errors(self) -> list[dict[str, Any]]:
        """Log entries at error level or above (the server logs JSON lines)."""
        entries = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                    entries.append(entry)
        return entries


@pytest.fixture
async def live_server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "freeze.yaml").write_text(FREEZE, encoding="utf-8")
    config = tmp_path / "config.yaml"
    settings = {
        "bindings": [{"blueprint": "freeze"}],  # every subject: most events reach a run
        "journal_sync": "normal",  # fsync per event would only slow the fuzzing down
        "max_batch": 4,
        "max_wait": 2,
        "reply_wait": 2,
        "rate_limit_per_source": 50,  # generous, but a source reused a lot meets 429
        "rate_limit_burst": 50,
    }
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    port = free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPHOOK_")}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "snaphook"), "serve", f"--port={port}", f"--state-dir={tmp_path / 'state'}",
            f"--hooks={hooks}", f"--config={config}",
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=tmp_path,
        )  # fmt: skip
    server = LiveServer(f"http://127.0.0.1:{port}", log)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            await wait_ready(
                http, server.url, alive=lambda: proc.returncode is None, log=server.tail, within=30
            )
        yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(FUZZ_SECONDS + 120)
async def test_schemathesis_finds_nothing_against_a_live_server(
    live_server: LiveServer, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG, encoding="utf-8")
    reports = tmp_path / "reports"
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "st"), f"--config-file={config}", "run", f"{live_server.url}/openapi.json",
        f"--max-time={FUZZ_SECONDS:g}", "--workers=1",  # every check is on by default
        "--request-timeout=10",  # a hang is a failure, not a stuck test
        "--generation-database=none", "--report=json", f"--report-dir={reports}", "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), FUZZ_SECONDS + 90)
    elapsed = time.monotonic() - started
    text = output.decode(errors="replace")
    [report_file] = reports.glob("*.json")
    report = json.loads(report_file.read_text(encoding="utf-8"))
    cases = report["test_cases"]["generated"]
    record_property("schemathesis_cases", cases)
    record_property("schemathesis_seconds", round(elapsed, 1))
    print(f"\nschemathesis: {cases} generated inputs in {elapsed:.1f}s (seed {report['seed']})")
    assert proc.returncode == 0, text[-6000:]
    assert not report["failures"] and not report["errors"], text[-6000:]
    assert cases >= MIN_CASES, text[-3000:]
    assert live_server.errors() == []
    async with aiohttp.ClientSession() as http, http.get(f"{live_server.url}/readyz") as resp:
        assert resp.status == 200  # and still serving
