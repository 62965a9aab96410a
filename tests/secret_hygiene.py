"""A pytest plugin: no test secret leaves the dispatcher during a whole test session.

Registered by ``tests/conftest.py``; ``-p no:tests.secret_hygiene`` turns it off. It looks
for every secret of :mod:`tests.secrets_registry` in

log lines
    every log record of the session, formatted by :class:`dispatcher.logs.JsonFormatter` at
    the moment it is emitted, so what is checked is what the dispatcher would write. The
    capture sits in ``logging.Logger.callHandlers`` rather than in a root handler because
    ``configure_logging`` replaces the root's handlers. Production logs at ``info``, so the
    root level is lowered to INFO for the session (and ``aiohttp.access`` kept at WARNING,
    as ``configure_logging`` does); DEBUG records are checked whenever a test enables them.
log files
    ``*.log``/``*.err``/``*.out`` files under the session's temporary directory: the JSON
    lines written by ``snaphook serve`` subprocesses.
HTTP answers
    every body a dispatcher app answers with (run records of ``GET /v1/runs/{id}``, sync
    decisions, RFC 9457 problems, metrics), captured by wrapping the app's outermost
    middleware, ``dispatcher.app.problems_middleware``.
reply events
    the data of every reply CloudEvent sent to a sink (``dispatcher.replies.reply_event``;
    ``Prefer: reply`` answers are HTTP answers).
journal rows
    every row of every table of every SQLite file under the session's temporary directory,
    read at the end of the session. One column is *resume state*, not a record:
    ``runs.params`` keeps resolved params, secret ones included, because a restarted
    dispatcher resumes runs from it (docs/blueprints.md). Secrets found there are counted
    and reported, never failed; every other column (the masked event, step outputs and
    errors, reasons, lease contexts and release templates) must be clean.

Findings name the test (or file), the place (logger and source line, table/column/rowid,
request) and the secret's label, with an excerpt in which secrets are replaced by their
labels. Any finding fails the session. Under pytest-xdist each worker checks what it saw
and sends a summary to the controller (``workeroutput``), which reports and fails.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from dispatcher.logs import JsonFormatter
from tests import secrets_registry
from tests.secrets_registry import PATTERNS, TestSecret

__all__ = ["HYGIENE", "Hygiene", "Matcher", "scan_journal", "scan_log_file"]

RESUME_STATE = frozenset({("runs", "params")})
"""Journal columns that legitimately keep secret values (what a resumed run needs)."""

LOG_SUFFIXES = (".log", ".err", ".out")
MAX_FILE_BYTES = 32 << 20
MAX_REPORTED = 50
EXCERPT = 60  # characters of context either side of a hit
SQLITE_MAGIC = b"SQLite format 3\x00"
SESSION = "<session>"


# --- matching -------------------------------------------------------------------------------


def forms(value: str) -> set[str]:
    """How ``value`` may look where it lands: as is, JSON-escaped, percent-encoded."""
    candidates = {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        quote(value, safe=""),
        quote_plus(value),
    }
    return {form for form in candidates if len(form) >= secrets_registry.MIN_LENGTH}


@dataclass(frozen=True)
class Hit:
    label: str
    start: int
    end: int


class Matcher:
    """Finds test secrets (any of their :func:`forms`) and secret-shaped values in text."""

    def __init__(self, secrets: Iterable[TestSecret]) -> None:
        self._labels: dict[str, str] = {}
        for secret in secrets:
            for form in forms(secret.value):
                self._labels.setdefault(form, secret.label)
        # Longest first: a secret containing another is reported as itself.
        self._literals = sorted(self._labels, key=len, reverse=True)
        self._patterns = re.compile("|".join(f"(?:{p.pattern})" for _, p in PATTERNS))

    def hits(self, text: str) -> list[Hit]:
        found: list[Hit] = []
        for literal in self._literals:
            start = text.find(literal)
            while start != -1:
                found.append(Hit(self._labels[literal], start, start + len(literal)))
                start = text.find(literal, start + 1)
        for match in self._patterns.finditer(text):
            label = next((name for name, p in PATTERNS if p.fullmatch(match.group())), "pattern")
            found.append(Hit(self._labels.get(match.group(), label), *match.span()))
        return found


def excerpt(text: str, hits: list[Hit]) -> str:
    """Context around the first hit, every secret replaced by ``«label»``."""
    first = min(hits, key=lambda hit: hit.start)
    lo, hi = max(0, first.start - EXCERPT), min(len(text), first.end + EXCERPT)
    pieces, position = [], lo
    for hit in sorted(hits, key=lambda hit: hit.start):
        if hit.end <= lo or hit.start >= hi or hit.start < position:
            continue
        pieces += [text[position : hit.start], f"«{hit.label}»"]
        position = hit.end
    pieces.append(text[position:hi])
    return ("…" if lo else "") + "".join(pieces) + ("…" if hi < len(text) else "")


# --- findings -------------------------------------------------------------------------------


@dataclass
class Leak:
    kind: str  # "log" | "log file" | "http" | "reply" | "journal"
    test: str  # node id, "<session>", or the file a record was found in
    where: str
    secrets: list[str]
    excerpt: str

    def describe(self) -> str:
        return (
            f"{self.kind}: {', '.join(sorted(set(self.secrets)))}\n"
            f"    test:  {self.test}\n    where: {self.where}\n    text:  {self.excerpt}"
        )


@dataclass
class Summary:
    """What one process scanned and found; JSON-able, so xdist can ship it."""

    log_records: int = 0
    levels: dict[str, int] = field(default_factory=dict)  # log records by level
    unformattable: int = 0
    log_files: int = 0
    log_file_lines: int = 0
    http_answers: int = 0
    replies: int = 0
    journal_files: int = 0
    journal_rows: int = 0
    unreadable_files: list[str] = field(default_factory=list)
    resume_state_rows: int = 0  # runs.params rows holding a test secret (by design)
    secrets: int = 0  # distinct secret values checked
    patterns: int = len(PATTERNS)
    leak_count: int = 0
    leaks: list[dict[str, Any]] = field(default_factory=list)

    def add_leak(self, leak: Leak) -> None:
        self.leak_count += 1
        if len(self.leaks) < MAX_REPORTED:
            self.leaks.append(dataclasses.asdict(leak))

    def merge(self, other: dict[str, Any]) -> None:
        for name, value in other.items():
            if name == "leaks":
                self.leaks.extend(value[: MAX_REPORTED - len(self.leaks)])
            elif name == "levels":
                for level, count in value.items():
                    self.levels[level] = self.levels.get(level, 0) + count
            elif name in ("secrets", "patterns"):
                setattr(self, name, max(getattr(self, name), value))
            else:
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- scanning files -------------------------------------------------------------------------


def scan_journal(
    path: Path, matcher: Matcher, summary: Summary, owner: str
) -> Iterator[tuple[str, str, Leak]]:
    """Every row of every table of the SQLite file ``path``; yields (table, column, leak)
    for each cell holding a test secret. Counts rows in ``summary``."""
    try:
        db = sqlite3.connect(path)
    except sqlite3.Error:
        summary.unreadable_files.append(str(path))
        return
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            try:
                cursor = db.execute(f'SELECT rowid, * FROM "{table}"')
            except sqlite3.OperationalError:  # a WITHOUT ROWID table
                cursor = db.execute(f'SELECT NULL, * FROM "{table}"')
            columns = [d[0] for d in cursor.description][1:]
            for rowid, *values in cursor:
                summary.journal_rows += 1
                for column, value in zip(columns, values, strict=True):
                    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                    if not isinstance(text, str) or not (hits := matcher.hits(text)):
                        continue
                    where = f"{path} table {table}, column {column}, rowid {rowid}"
                    labels = [hit.label for hit in hits]
                    yield table, column, Leak("journal", owner, where, labels, excerpt(text, hits))
    except sqlite3.Error:
        summary.unreadable_files.append(str(path))
    finally:
        db.close()


def scan_log_file(path: Path, matcher: Matcher, summary: Summary, owner: str) -> Iterator[Leak]:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES)
    except OSError:
        summary.unreadable_files.append(str(path))
        return
    summary.log_files += 1
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        summary.log_file_lines += 1
        if hits := matcher.hits(line):
            labels = [hit.label for hit in hits]
            yield Leak("log file", owner, f"{path}:{number}", labels, excerpt(line, hits))


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


# --- the session-wide watcher ---------------------------------------------------------------


@dataclass
class _Pending:
    kind: str
    test: str
    where: str
    text: str


class Hygiene:
    """Collects what one process writes and answers, and checks it for test secrets."""

    def __init__(self) -> None:
        self.summary = Summary()
        self.test = SESSION
        self.owners: dict[Path, str] = {}  # a test's tmp_path → its node id
        self._formatter = JsonFormatter()
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._matcher: Matcher | None = None
        self._version = -1
        self._undo: list[Callable[[], None]] = []

    # Capture -----------------------------------------------------------------------------

    def install(self) -> None:
        original = logging.Logger.callHandlers
        hygiene = self

        def call_handlers(logger: logging.Logger, record: logging.LogRecord) -> None:
            hygiene.record(record)
            original(logger, record)

        setattr(logging.Logger, "callHandlers", call_handlers)  # noqa: B010
        self._undo.append(functools.partial(setattr, logging.Logger, "callHandlers", original))

        for name, level in (("", logging.INFO), ("aiohttp.access", logging.WARNING)):
            logger = logging.getLogger(name)
            saved = logger.level
            if name or saved == logging.NOTSET or saved > level:
                logger.setLevel(level)
            self._undo.append(functools.partial(logger.setLevel, saved))
        self._wrap_middleware()
        self._wrap_replies()

    def _wrap_middleware(self) -> None:
        from aiohttp import web

        import dispatcher.app

        original = getattr(dispatcher.app, "problems_middleware", None)  # the outermost
        if original is None:
            raise RuntimeError(
                "tests/secret_hygiene.py wraps dispatcher.app.problems_middleware to see "
                "every HTTP answer; it is gone: wrap the app's outermost middleware instead"
            )
        hygiene = self

        @web.middleware
        async def watched(request: web.Request, handler: Any) -> web.StreamResponse:
            response: web.StreamResponse = await original(request, handler)
            body = getattr(response, "body", None)
            body = getattr(body, "_value", body)  # a Payload keeps its bytes there
            if isinstance(body, bytes | bytearray):
                where = f"{request.method} {request.path_qs[:200]} → {response.status}"
                hygiene.add("http", where, bytes(body).decode("utf-8", "replace"))
            return response

        name = "problems_middleware"
        setattr(dispatcher.app, name, watched)
        self._undo.append(functools.partial(setattr, dispatcher.app, name, original))

    def _wrap_replies(self) -> None:
        import dispatcher.replies

        original = dispatcher.replies.reply_event
        hygiene = self

        def watched(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            attributes, data = original(*args, **kwargs)
            where = f"reply event {attributes.get('id')} ({attributes.get('type')})"
            hygiene.add("reply", where, json.dumps(data, default=str, ensure_ascii=False))
            return attributes, data

        setattr(dispatcher.replies, "reply_event", watched)  # noqa: B010
        self._undo.append(functools.partial(setattr, dispatcher.replies, "reply_event", original))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def record(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return  # a record logged while formatting one
        self._local.busy = True
        try:
            try:
                line = self._formatter.format(record)
            except Exception:
                self.summary.unformattable += 1
                line = f"{record.msg!r} {record.args!r}"
            where = f"logger {record.name} at {record.pathname}:{record.lineno}"
            self.add("log", where, line)
            with self._lock:
                levels = self.summary.levels
                levels[record.levelname] = levels.get(record.levelname, 0) + 1
        finally:
            self._local.busy = False

    def add(self, kind: str, where: str, text: str) -> None:
        with self._lock:
            self._pending.append(_Pending(kind, self.test, where, text))

    # Checking ----------------------------------------------------------------------------

    def matcher(self) -> Matcher:
        version, secrets = secrets_registry.snapshot()
        if self._matcher is None or version != self._version:
            self._matcher, self._version = Matcher(secrets), version
            self.summary.secrets = len({secret.value for secret in secrets})
        return self._matcher

    def enter(self, test: str) -> None:
        self.check_pending()
        secrets_registry.register_env(os.environ, test)
        self.test = test

    def leave(self, item: pytest.Item) -> None:
        # Secrets set with monkeypatch.setenv inside the test are still set here.
        secrets_registry.register_env(os.environ, item.nodeid)
        tmp = getattr(item, "funcargs", {}).get("tmp_path")
        if isinstance(tmp, Path):
            self.owners[tmp] = item.nodeid
        self.check_pending()
        self.test = SESSION

    def pending(self, kind: str) -> list[str]:
        """What was captured of ``kind`` since the current test phase began, unchecked."""
        with self._lock:
            return [entry.text for entry in self._pending if entry.kind == kind]

    def check_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        matcher = self.matcher()
        for entry in pending:
            if entry.kind == "log":
                self.summary.log_records += 1
            elif entry.kind == "http":
                self.summary.http_answers += 1
            else:
                self.summary.replies += 1
            if hits := matcher.hits(entry.text):
                labels = [hit.label for hit in hits]
                text = excerpt(entry.text, hits)
                self.summary.add_leak(Leak(entry.kind, entry.test, entry.where, labels, text))

    def scan_files(self, root: Path) -> None:
        """The journals and log files the session left under ``root``."""
        matcher = self.matcher()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            owner = self._owner(path)
            if path.suffix in LOG_SUFFIXES:
                for leak in scan_log_file(path, matcher, self.summary, owner):
                    self.summary.add_leak(leak)
            elif _is_sqlite(path):
                self.summary.journal_files += 1
                resume_state: set[str] = set()
                for table, column, leak in scan_journal(path, matcher, self.summary, owner):
                    if (table, column) in RESUME_STATE:
                        resume_state.add(leak.where)
                    else:
                        self.summary.add_leak(leak)
                self.summary.resume_state_rows += len(resume_state)

    def _owner(self, path: Path) -> str:
        for parent in path.parents:
            if parent in self.owners:
                return self.owners[parent]
        return str(path.parent)


# --- pytest hooks ---------------------------------------------------------------------------

HYGIENE = pytest.StashKey[Hygiene]()
_NODES = pytest.StashKey[list[dict[str, Any]]]()


def pytest_configure(config: pytest.Config) -> None:
    hygiene = Hygiene()
    hygiene.install()
    config.stash[HYGIENE] = hygiene
    config.stash[_NODES] = []


def pytest_unconfigure(config: pytest.Config) -> None:
    hygiene = config.stash.get(HYGIENE, None)
    if hygiene is not None:
        hygiene.uninstall()


def _phase(item: pytest.Item, phase: str) -> Generator[None, Any, Any]:
    hygiene = item.config.stash[HYGIENE]
    hygiene.enter(f"{item.nodeid} ({phase})")
    try:
        return (yield)
    finally:
        hygiene.leave(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _phase(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _phase(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _phase(item, "teardown"))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: a worker finished; keep what it found."""
    found = getattr(node, "workeroutput", {}).get("secret_hygiene")
    if found is not None:
        node.config.stash[_NODES].append(found)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    hygiene = config.stash[HYGIENE]
    hygiene.check_pending()
    nodes = config.stash[_NODES]
    worker = hasattr(config, "workerinput")
    factory = getattr(config, "_tmp_path_factory", None)  # pytest's tmp_path_factory
    if factory is not None and (worker or not nodes):  # this process ran the tests
        hygiene.scan_files(factory.getbasetemp())
    if worker:
        config.workeroutput["secret_hygiene"] = hygiene.summary.as_dict()  # type: ignore[attr-defined]
        return
    for found in nodes:
        hygiene.summary.merge(found)
    if hygiene.summary.leak_count and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    s = config.stash[HYGIENE].summary
    write = terminalreporter.write_line
    markup = {"red": True, "bold": True} if s.leak_count else {"green": True}
    terminalreporter.write_sep("-", "secret hygiene", **markup)
    write(
        f"scanned {s.log_records} log records, {s.log_file_lines} lines of {s.log_files} "
        f"log files, {s.http_answers} HTTP answers, {s.replies} reply events, "
        f"{s.journal_rows} rows of {s.journal_files} SQLite journals"
    )
    levels = ", ".join(f"{count} {level}" for level, count in sorted(s.levels.items()))
    write(f"log records by level: {levels or 'none'}")
    write(
        f"for {s.secrets} test secrets (per process) and {s.patterns} secret patterns; "
        f"{s.resume_state_rows} runs.params rows hold a secret param (resume state, by design)"
    )
    if s.unformattable or s.unreadable_files:
        write(f"{s.unformattable} unformattable records; unreadable: {s.unreadable_files}")
    if not s.leak_count:
        write("no test secret leaked")
        return
    write(f"{s.leak_count} LEAK(S) of test secrets:", red=True, bold=True)
    for leak in s.leaks:
        write(Leak(**leak).describe())
    if s.leak_count > len(s.leaks):
        write(f"... and {s.leak_count - len(s.leaks)} more")
