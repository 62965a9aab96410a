"""The secret-hygiene plugin (tests/secret_hygiene.py) catches what it is there to catch.

Planted leaks live outside this session's temporary directory (``TemporaryDirectory``,
an inner pytest's ``--basetemp``): the session's own end-of-run scan would rightly report
them otherwise.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.logs import configure_logging
from dispatcher.redaction import MASK, redactor
from dispatcher.secrets import EnvSecretResolver
from dispatcher.templating import TemplateEngine, TemplateError
from tests import secrets_registry
from tests.conftest import HarnessFactory
from tests.secret_hygiene import HYGIENE, Hygiene, Matcher, excerpt
from tests.secrets_registry import LITERALS, PATTERNS, TestSecret
from tests.secrets_registry import test_secret as make_secret

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
PLANTED = TestSecret("planted", 'pl@nted "pw"/ü', "here")


@pytest.fixture
def outside() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hygiene-") as directory:
        yield Path(directory)


# --- matching -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "landed",
    [
        'pl@nted "pw"/ü',  # as is
        'pl@nted \\"pw\\"/\\u00fc',  # JSON, ensure_ascii (the journal's encoding)
        'pl@nted \\"pw\\"/ü',  # JSON, ensure_ascii=False (the log lines' encoding)
        "pl%40nted%20%22pw%22%2F%C3%BC",  # percent-encoded, in a URL
    ],
)
def test_a_secret_is_found_in_every_form_it_takes(landed: str) -> None:
    [hit] = Matcher([PLANTED]).hits(f"error: login with {landed} failed")
    assert hit.label == "planted"


def test_random_secrets_are_found_by_their_shape() -> None:
    samples = {
        "random secret": "pw-" + "a" * 32,
        "whsec_ key": "whsec_" + "A" * 43 + "=",
        "PEM private key": "-----BEGIN RSA PRIVATE KEY-----",
        "registered test secret": make_secret("shape"),
    }
    matcher = Matcher([])
    for label, value in samples.items():
        assert [hit.label for hit in matcher.hits(f"x {value} y")] == [label]
    assert matcher.hits(f"masked: {MASK}, id run-{'a' * 32}") == []


def test_excerpts_show_the_context_but_never_the_secret() -> None:
    text = f"{'x' * 100} token={PLANTED.value} and again {PLANTED.value} {'y' * 100}"
    hits = Matcher([PLANTED]).hits(text)
    shown = excerpt(text, hits)
    assert PLANTED.value not in shown
    assert shown.startswith("…") and shown.endswith("…")
    assert "token=«planted» and again «planted»" in shown


# --- the registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("secret", LITERALS, ids=lambda s: s.value)
def test_every_literal_is_still_used_where_the_registry_says(secret: TestSecret) -> None:
    source = (ROOT / secret.origin).read_text(encoding="utf-8")
    written = secret.written or secret.value
    assert written in source or json.dumps(written)[1:-1] in source, (
        f"{secret.origin} no longer uses {secret.label!r}: update tests/secrets_registry.py"
    )


def test_patterns_are_distinct_from_literals() -> None:
    for label, pattern in PATTERNS:
        assert not any(pattern.search(s.value) for s in LITERALS), label


def test_test_secret_is_unique_registered_and_shaped() -> None:
    first, second = make_secret("db pw"), make_secret("db pw")
    assert first != second and re.fullmatch(r"tsecret-dbpw-[0-9a-f]{32}", first)
    assert {first, second} <= {s.value for s in secrets_registry.snapshot()[1]}


def test_env_secrets_register_only_what_is_secret() -> None:
    password, plain = make_secret("x") + "-pw", make_secret("x") + "-key"
    secrets_registry.register_env(
        {
            "SNAPHOOK_SECRET_DB_DSN": f"postgresql://app:{password}@db:5432/app",
            "SNAPHOOK_SECRET_CACHE_URL": "redis://cache:6379/0",  # an address, no credential
            "SNAPHOOK_SECRET_API_KEY": plain,
            "SNAPHOOK_SECRET_SHORT": "abc",
            "NOT_A_SECRET": "public-value-123",
        },
        "test",
    )
    values = {s.value for s in secrets_registry.snapshot()[1]}
    assert {password, plain} <= values
    assert not {"redis://cache:6379/0", "abc", "public-value-123"} & values


# --- files ----------------------------------------------------------------------------------


def journal(path: Path, secret: str) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (run_id TEXT, params TEXT, reason TEXT)")
    db.execute("CREATE TABLE steps (run_id TEXT, name TEXT, error TEXT)")
    db.execute("INSERT INTO runs VALUES ('r1', ?, '')", (json.dumps({"token": secret}),))
    db.execute("INSERT INTO steps VALUES ('r1', 'ok', NULL)")
    db.execute("INSERT INTO steps VALUES ('r1', 'freeze', ?)", (f"login failed: {secret}",))
    db.commit()
    db.close()


def test_journal_rows_are_checked_except_resume_state(outside: Path) -> None:
    secret = make_secret("journal")
    journal(outside / "journal.sqlite3", secret)
    (outside / "notes.txt").write_text(secret)  # neither a journal nor a log file
    hygiene = Hygiene()
    hygiene.scan_files(outside)
    s = hygiene.summary
    assert (s.journal_files, s.journal_rows, s.resume_state_rows) == (1, 3, 1)
    [leak] = s.leaks
    assert leak["kind"] == "journal" and "table steps, column error, rowid 2" in leak["where"]
    assert (
        secret not in leak["excerpt"]
        and "login failed: «test_secret('journal')»" in leak["excerpt"]
    )


def test_log_files_are_checked_line_by_line(outside: Path) -> None:
    secret = make_secret("logfile")
    lines = ['{"msg": "started"}', json.dumps({"msg": f"dsn={secret}"}), "{}"]
    (outside / "server0.log").write_text("\n".join(lines))
    hygiene = Hygiene()
    hygiene.scan_files(outside)
    assert (hygiene.summary.log_files, hygiene.summary.log_file_lines) == (1, 3)
    [leak] = hygiene.summary.leaks
    assert leak["kind"] == "log file" and leak["where"].endswith("server0.log:2")


# --- capture in this session ----------------------------------------------------------------


@pytest.fixture
def hygiene(request: pytest.FixtureRequest) -> Hygiene:
    found = request.config.stash.get(HYGIENE, None)
    if found is None:
        pytest.skip("the plugin is disabled (-p no:tests.secret_hygiene)")
    return found


def test_log_records_are_captured_even_after_configure_logging(hygiene: Hygiene) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", stream=io.StringIO())  # replaces every root handler
        logging.getLogger("snaphook.test").info("hygiene probe %s", "one", extra={"k": "v"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    [line] = [line for line in hygiene.pending("log") if "hygiene probe" in line]
    assert json.loads(line)["msg"] == "hygiene probe one" and json.loads(line)["k"] == "v"


def test_info_records_are_produced(hygiene: Hygiene) -> None:
    logging.getLogger("snaphook.test").info("hygiene info probe")
    assert any("hygiene info probe" in line for line in hygiene.pending("log"))


async def test_run_records_served_by_the_api_are_captured(
    harness: HarnessFactory, hygiene: Hygiene
) -> None:
    h = await harness(
        {
            "bp": """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: bp}
spec:
  actions:
    backup.pre:
      - {name: a, function: test.effect}
"""
        }
    )
    accepted = await h.emit()
    run = await h.final(accepted["run_id"])
    answers = [json.loads(text) for text in hygiene.pending("http")]
    assert {"run_id": accepted["run_id"], "status": "accepted"}.items() <= answers[0].items()
    assert run in answers  # GET /v1/runs/{id}, exactly as served


def test_reply_events_are_captured(hygiene: Hygiene) -> None:
    import dispatcher.replies
    from dispatcher.journal import RunRecord, RunStatus

    run = RunRecord(
        run_id="run-hygiene", source="test", event_id="e1", type="io.snaphook.backup.pre",
        subject="ns/Deployment/app", blueprint="bp", failure_policy="fail",
        status=RunStatus.FAILED, created_at=0.0, updated_at=0.0, event={}, reason="probe",
    )  # fmt: skip
    dispatcher.replies.reply_event(run, [], "snaphook")
    [data] = [json.loads(text) for text in hygiene.pending("reply")]
    assert data["run_id"] == "run-hygiene" and data["reason"] == "probe"


# --- leak paths found on the way -----------------------------------------------------------


def test_mapping_keys_are_redacted_too() -> None:
    # Step outputs and run records pass redact_obj before the journal and the API; a peer's
    # answer keyed by a credential (an echo of the headers it got, say) must not slip by.
    secret = make_secret("key")
    redactor.add(secret)
    value = {"headers": {secret: "x", f"Bearer {secret}": [secret]}}
    assert redactor.redact_obj(value) == {"headers": {MASK: "x", f"Bearer {MASK}": [MASK]}}


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="templating.TemplateEngine._env: env() reads any variable, SNAPHOOK_SECRET_* too "
    "(unless env_allow says otherwise), and does not register it with the redactor",
)
async def test_env_does_not_hand_out_secrets_unmasked() -> None:
    value = make_secret("env")
    engine = TemplateEngine(EnvSecretResolver({}), environ={"SNAPHOOK_SECRET_DB_PASSWORD": value})
    try:
        rendered = await engine.render("{{ env('SNAPHOOK_SECRET_DB_PASSWORD') }}", {})
    except TemplateError:
        return  # refused: as good as masked
    assert value not in redactor.redact(rendered), "env() value is not masked"


# --- whole sessions (an inner pytest) -------------------------------------------------------

INNER = """
import json, logging, sqlite3

from dispatcher.redaction import redactor
from tests.secrets_registry import test_secret as make_secret

LEAKED = make_secret("inner")
SAFE = make_secret("safe")
redactor.add(SAFE)  # known to the one redaction path: masked wherever it goes


def test_redacted_log_is_fine():
    logging.getLogger("inner.careful").warning("connecting with %s", SAFE)


def test_unredacted_log_leaks():
    logging.getLogger("inner.leaky").warning("connecting with %s", LEAKED)


def test_journal_leaks(tmp_path):
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    db.execute("CREATE TABLE runs (run_id TEXT, params TEXT)")
    db.execute("CREATE TABLE steps (name TEXT, error TEXT)")
    db.execute("INSERT INTO runs VALUES ('r1', ?)", (json.dumps({"token": LEAKED}),))
    db.execute("INSERT INTO steps VALUES ('freeze', ?)", ("login failed: " + LEAKED,))
    db.commit()
    db.close()


def test_log_file_leaks(tmp_path):
    (tmp_path / "serve.log").write_text('{"msg": "ok"}\\n{"msg": "dsn=%s"}\\n' % LEAKED)
"""


def inner_session(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, basetemp: Path, *args: str
) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_inner=INNER)
    return pytester.runpytest_subprocess(
        "-p", "tests.secret_hygiene", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
        *args, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_a_session_with_planted_leaks_fails_and_says_where(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outside: Path, xdist: list[str]
) -> None:
    result = inner_session(pytester, monkeypatch, outside / "basetemp", *xdist)
    output = result.stdout.str()
    result.assert_outcomes(passed=4)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    assert "3 LEAK(S) of test secrets" in output
    assert "1 runs.params rows hold a secret param" in output
    expected = [
        r"log: test_secret\('inner'\)\n\s+test:  test_inner.py::test_unredacted_log_leaks \(call\)"
        r"\n\s+where: logger inner.leaky at .*test_inner.py:\d+",
        r"journal: test_secret\('inner'\)\n\s+test:  test_inner.py::test_journal_leaks\n"
        r"\s+where: .*journal.sqlite3 table steps, column error, rowid 1",
        r"log file: test_secret\('inner'\)\n\s+test:  test_inner.py::test_log_file_leaks\n"
        r"\s+where: .*serve.log:2",
    ]
    for pattern in expected:
        assert re.search(pattern, output), pattern
    assert "inner.careful" not in output
    assert not re.search(r"tsecret-(inner|safe)-[0-9a-f]{32}", output)  # labels, not values


def test_a_clean_session_passes_and_reports_what_it_scanned(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, outside: Path
) -> None:
    result = inner_session(
        pytester, monkeypatch, outside / "basetemp", "-k", "careful or fine", "-n", "2"
    )
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, output
    assert re.search(r"scanned [1-9]\d* log records", output)
    assert "no test secret leaked" in output
