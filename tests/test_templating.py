"""The sandboxed template engine: rendering, strictness, the sandbox, env(), secret()."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import jinja2
import pytest
from pydantic import SecretStr

from dispatcher.redaction import MASK, redactor
from dispatcher.secrets import EnvSecretResolver, SecretNotFoundError
from dispatcher.templating import TemplateEngine, TemplateError


class RecordingResolver:
    """A resolver that yields to the loop before answering, as a Kubernetes lookup would."""

    def __init__(self, values: dict[tuple[str, str], str]) -> None:
        self.values = values
        self.calls: list[tuple[str, str, str | None]] = []

    async def get(self, name: str, key: str, *, namespace: str | None = None) -> SecretStr:
        await asyncio.sleep(0)  # a coroutine jinja2 must await, not print
        self.calls.append((name, key, namespace))
        return SecretStr(self.values[(name, key)])


CONTEXT: dict[str, Any] = {
    "params": {"database": "app", "port": 5432, "tables": ["a", "b"]},
    "target": {"namespace": "prod", "name": "pg"},
    "steps": {"freeze": {"outputs": {"lsn": "0/16B3748"}}},
}


@pytest.fixture
def engine() -> TemplateEngine:
    return TemplateEngine(EnvSecretResolver({}), environ={"HOME": "/root", "APP_MODE": "x"})


async def test_renders_every_string_in_nested_structures(engine: TemplateEngine) -> None:
    value: dict[str, Any] = {
        "dsn": "postgres://db:{{ params.port }}/{{ params.database }}",
        "nested": [{"lsn": "{{ steps.freeze.outputs.lsn }}"}, "plain {text}", 7, None],
        "tuple": ("{{ target.namespace }}",),
        "flags": {"on": True},
        "loop": "{% for t in params.tables %}{{ t }};{% endfor %}",
    }
    rendered = await engine.render(value, CONTEXT)
    assert rendered == {
        "dsn": "postgres://db:5432/app",
        "nested": [{"lsn": "0/16B3748"}, "plain {text}", 7, None],
        "tuple": ["prod"],
        "flags": {"on": True},
        "loop": "a;b;",
    }
    assert value["nested"][0] == {"lsn": "{{ steps.freeze.outputs.lsn }}"}  # input untouched


async def test_non_template_values_come_back_unchanged(engine: TemplateEngine) -> None:
    marker = object()
    assert await engine.render("no template {here}", {}) == "no template {here}"
    assert await engine.render(marker, {}) is marker
    assert await engine.render("line\n", {}) == "line\n"
    assert await engine.render("{{ 'kept' }}\n", {}) == "kept\n"  # block scalars keep it


@pytest.mark.parametrize(
    "source, missing",
    [
        ("{{ params.databse }}", "databse"),
        ("{{ nothing }}", "'nothing' is undefined"),
        ("x{{ steps['thaw'].outputs }}", "thaw"),
        ("{% if params.flag %}on{% endif %}", "flag"),
    ],
)
async def test_undefined_names_raise_naming_the_template_not_the_values(
    engine: TemplateEngine, source: str, missing: str
) -> None:
    with pytest.raises(TemplateError) as info:
        await engine.render({"k": source}, CONTEXT)
    message = str(info.value)
    assert repr(source) in message and missing in message
    assert "0/16B3748" not in message and "5432" not in message


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ params.__class__ }}",
        "{{ params.tables.append('c') }}",  # immutable sandbox: no mutation
        "{{ cycler.__init__.__globals__ }}",
        "{{ (lipsum).__globals__['os'] }}",
        "{{ env.__self__ }}",  # our own globals do not lead back to the engine
        "{{ secret.__closure__ }}",
    ],
)
async def test_the_sandbox_blocks_escapes(engine: TemplateEngine, source: str) -> None:
    with pytest.raises(TemplateError, match=r"unsafe|undefined"):
        await engine.render(source, CONTEXT)
    assert CONTEXT["params"]["tables"] == ["a", "b"]


async def test_other_failures_become_template_errors(engine: TemplateEngine) -> None:
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        await engine.render("{{ 1 / 0 }}", {})
    with pytest.raises(TemplateError, match="expected name or number"):
        await engine.render("{{ params. }}", CONTEXT)


async def test_env_reads_allowed_variables_only() -> None:
    environ = {"HOME": "/root", "APP_MODE": "fast", "SECRET_KEY": "nope"}
    engine = TemplateEngine(EnvSecretResolver({}), environ=environ, env_allow=["HOME", "APP_*"])
    assert await engine.render("{{ env('HOME') }} {{ env('APP_MODE') }}", {}) == "/root fast"
    assert await engine.render("{{ env('APP_OTHER', 'dflt') }}", {}) == "dflt"
    with pytest.raises(TemplateError, match="'SECRET_KEY' is not in the env allow-list"):
        await engine.render("{{ env('SECRET_KEY') }}", {})
    with pytest.raises(TemplateError, match="'APP_OTHER' is not set and has no default"):
        await engine.render("{{ env('APP_OTHER') }}", {})


async def test_env_without_allow_list_reads_anything(engine: TemplateEngine) -> None:
    assert await engine.render("{{ env('APP_MODE') }}", {}) == "x"


async def test_secret_is_awaited_registered_and_redactable() -> None:
    password = f"pw-{uuid.uuid4().hex}"
    resolver = RecordingResolver({("pg-creds", "password"): password})
    engine = TemplateEngine(resolver)

    dsn = await engine.render(
        "postgres://app:{{ secret('pg-creds', 'password') }}@db/app", {}, namespace="prod"
    )

    assert dsn == f"postgres://app:{password}@db/app"  # the step gets the plain value
    assert resolver.calls == [("pg-creds", "password", "prod")]
    assert redactor.redact(f"connecting with {password}") == f"connecting with {MASK}"


async def test_secret_works_inside_filters_and_loops() -> None:
    token = f"tok-{uuid.uuid4().hex}"
    engine = TemplateEngine(RecordingResolver({("api", "token"): token}))
    source = "{% for i in range(2) %}{{ secret('api', 'token') | upper }}|{% endfor %}"
    assert await engine.render(source, {}) == f"{token.upper()}|{token.upper()}|"


async def test_a_missing_secret_names_the_variable_to_set() -> None:
    engine = TemplateEngine(EnvSecretResolver({}))
    with pytest.raises(
        TemplateError, match=r"secret pg-creds/dsn not found \(set SNAPHOOK_SECRET_PG_CREDS_DSN\)"
    ):
        await engine.render("{{ secret('pg-creds', 'dsn') }}", {})


async def test_env_secret_resolver() -> None:
    resolver = EnvSecretResolver({"SNAPHOOK_SECRET_PG_CREDS_DSN": "postgres://x"})
    assert resolver.variable("pg.creds", "tls-key") == "SNAPHOOK_SECRET_PG_CREDS_TLS_KEY"
    value = await resolver.get("pg-creds", "dsn", namespace="ignored")
    assert isinstance(value, SecretStr) and value.get_secret_value() == "postgres://x"
    with pytest.raises(KeyError) as info:
        await resolver.get("pg-creds", "user")
    assert isinstance(info.value, SecretNotFoundError)
    assert str(info.value) == "secret pg-creds/user not found (set SNAPHOOK_SECRET_PG_CREDS_USER)"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("{{ params.database }}", {("params", "database")}),
        (
            "{{ steps.freeze.outputs.lsn }} {{ steps['dump'].outputs }}",
            {("steps", "freeze", "outputs", "lsn"), ("steps", "dump", "outputs")},
        ),
        ("{{ secret('pg', 'dsn') }}{{ env('X') }}", {("secret",), ("env",)}),
        ("{{ params[target.key] }}", {("params",), ("target", "key")}),
        ("{{ steps.a.outputs.rows[0] }}", {("steps", "a", "outputs", "rows")}),
        ("{% for t in params.tables %}{{ t.name }}{% endfor %}", {("params", "tables")}),
        ("{% set x = backup.id %}{{ x }}", {("backup", "id")}),
        ("{{ params.items() | list }}", {("params",)}),
        (
            "{{ range(3) | join }}{% set env = 1 %}{{ env }}",
            {("range",)},
        ),  # a method call, not a param named items
        (
            "{{ leases.freeze if outcome == 'failed' else '' }}",
            {("leases", "freeze"), ("outcome",)},
        ),
        ("no template", set()),
    ],
)
def test_referenced_names_with_constant_paths(
    engine: TemplateEngine, source: str, expected: set[tuple[str, ...]]
) -> None:
    assert engine.referenced(source) == expected


def test_parse_raises_syntax_errors_with_a_line(engine: TemplateEngine) -> None:
    with pytest.raises(jinja2.TemplateSyntaxError) as info:
        engine.parse("ok\n{% if %}")
    assert info.value.lineno == 2


def test_is_template(engine: TemplateEngine) -> None:
    assert engine.is_template("{{ x }}") and engine.is_template("{% if x %}{% endif %}")
    assert not engine.is_template("{x}") and not engine.is_template("plain")


def test_global_names(engine: TemplateEngine) -> None:
    assert {"env", "secret", "range", "dict"} <= engine.global_names


async def test_compiled_templates_are_cached_by_source() -> None:
    engine = TemplateEngine(EnvSecretResolver({}), cache_size=2)
    first = engine.compiled("{{ params.database }}")
    assert engine.compiled("{{ params.database }}") is first
    assert await engine.render("{{ params.database }}", CONTEXT) == "app"
    assert engine.compiled("{{ params.database }}") is first
    engine.compiled("{{ 1 }}")
    engine.compiled("{{ 2 }}")  # evicts the least recently used
    assert engine.compiled("{{ params.database }}") is not first
