"""Blueprint schema, loader and strict validation: every error names its file and line."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.blueprint_loader import load_blueprints, validate_blueprints
from dispatcher.blueprints import (
    Blueprint,
    BlueprintErrors,
    BlueprintSpec,
    LeaseSpec,
    Metadata,
    ParamSpec,
    ReleaseSpec,
    RetryPolicy,
    StepSpec,
)
from dispatcher.durations import format_duration, parse_duration
from dispatcher.errors import BlueprintError
from dispatcher.events import Phase
from dispatcher.redaction import MASK, redactor
from functions.sdk import Context, FunctionRegistry, function

# --- test functions: their params models drive the ``with`` checks --------------------------


class FreezeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dsn: str
    database: str = "app"
    timeout: float = Field(default=5.0, gt=0)


class FreezeResult(BaseModel):
    lsn: str


class ThawParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease: str  # supplied by the runner, so never "missing" in a release
    force: bool = False


class SayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    channel: str = Field(default="#ops", alias="to")
    tags: list[str] = Field(default_factory=list)


class LooseParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str = ""


@pytest.fixture
def registry() -> FunctionRegistry:
    reg = FunctionRegistry()

    @function("db.freeze", registry=reg)
    async def freeze(ctx: Context, p: FreezeParams) -> FreezeResult:
        return FreezeResult(lsn="0/0")

    @function("db.thaw", registry=reg)
    async def thaw(ctx: Context, p: ThawParams) -> None:
        return None

    @function("notify.say", registry=reg)
    async def say(ctx: Context, p: SayParams) -> None:
        return None

    @function("loose.call", registry=reg)
    async def loose(ctx: Context, p: LooseParams) -> None:
        return None

    return reg


def write(directory: Path, text: str, name: str = "bp.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


VALID = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: postgres-consistent, labels: {team: data}}
spec:
  params:
    database: {type: string, default: app}
    dsn: {type: string, required: true, secret: true}
    retries: {type: integer, default: 3}
    ratio: {type: number}
    mode: {type: string, enum: [fast, safe], default: safe}
  actions:
    backup.pre:
      - name: freeze
        function: db.freeze
        with: {dsn: "{{ secret('pg-creds', 'dsn') }}", database: "{{ params.database }}"}
        timeout: 30s
        lease: {ttl: 15m, release: db.thaw}
      - name: dump
        function: notify.say
        needs: [freeze]
        with:
          text: "dump {{ steps.freeze.outputs.lsn }} to {{ target.namespace }}/{{ backup.id }}"
          to: "#backups"
        retry: {attempts: 3, backoff: 2s}
      - name: verify
        function: notify.say
        needs: [dump]
        with: {text: "{{ steps.freeze.outputs.lsn }} {{ env('HOME', '') }}"}
      - name: tell-ops
        function: notify.say
        when: always
        on_error: continue
        with: {text: "{{ steps['dump'] }} {% for t in params.mode %}{{ t }}{% endfor %}"}
    backup.post:
      - name: thaw
        function: db.thaw
        with: {lease: "{{ leases.freeze }}"}
      - name: report
        function: notify.say
        when: on_failure
        with: {text: "backup {{ backup.name }}: {{ outcome }}", tags: [a, b]}
"""


def test_a_valid_multi_action_blueprint_loads(tmp_path: Path, registry: FunctionRegistry) -> None:
    path = write(tmp_path, VALID)
    blueprints = load_blueprints(path, registry)

    assert blueprints.names() == ["postgres-consistent"]
    assert "postgres-consistent" in blueprints and len(blueprints) == 1
    blueprint = blueprints.get("postgres-consistent")
    assert blueprint is not None and blueprints.get("nope") is None
    assert blueprint.source == str(path)
    assert blueprint.phases() == [Phase.BACKUP_PRE, Phase.BACKUP_POST]
    assert [s.name for s in blueprint.steps(Phase.BACKUP_PRE)] == [
        "freeze",
        "dump",
        "verify",
        "tell-ops",
    ]
    assert blueprint.steps(Phase.RESTORE_PRE) == []
    freeze, dump, _, tell = blueprint.steps(Phase.BACKUP_PRE)
    assert freeze.timeout == 30.0 and dump.timeout == 60.0
    assert freeze.lease == LeaseSpec(ttl=900.0, release=ReleaseSpec(function="db.thaw"))
    assert dump.retry == RetryPolicy(attempts=3, backoff=2.0)
    assert dump.with_["to"] == "#backups"
    assert not dump.final and tell.final and tell.on_error == "continue"
    assert blueprint.lease_steps() == {"freeze"}


def test_resolve_params_applies_defaults_and_checks_types(
    tmp_path: Path, registry: FunctionRegistry
) -> None:
    blueprint = load_blueprints(write(tmp_path, VALID), registry).get("postgres-consistent")
    assert blueprint is not None

    resolved = blueprint.resolve_params({"dsn": "postgres://u:pw-0451@db/app", "ratio": 1})
    assert resolved == {
        "database": "app",
        "dsn": "postgres://u:pw-0451@db/app",
        "retries": 3,
        "ratio": 1,
        "mode": "safe",
    }
    assert "pw-0451" not in redactor.redact("dsn=postgres://u:pw-0451@db/app")  # secret: true

    with pytest.raises(ValueError, match="unknown params: bogus, other"):
        blueprint.resolve_params({"dsn": "x", "bogus": 1, "other": 2})
    with pytest.raises(ValueError, match="missing required param 'dsn'"):
        blueprint.resolve_params({})
    with pytest.raises(ValueError, match="'retries' must be an integer, got bool"):
        blueprint.resolve_params({"dsn": "x", "retries": True})
    with pytest.raises(ValueError, match="'mode' must be one of") as info:
        blueprint.resolve_params({"dsn": "x", "mode": "reckless"})
    assert "reckless" not in str(info.value)  # values never appear in messages


def test_a_secret_param_value_is_masked_after_resolution(tmp_path: Path) -> None:
    blueprint = Blueprint(
        api_version="snaphook.io/v1",
        kind="Blueprint",
        metadata=Metadata(name="memory"),
        spec=BlueprintSpec(
            params={"token": ParamSpec(type="string", secret=True)},
            actions={Phase.BACKUP_PRE: [StepSpec(name="a", function="f", with_={"x": 1})]},
        ),
    )
    assert blueprint.source == "<memory>"
    assert blueprint.steps(Phase.BACKUP_PRE)[0].with_ == {"x": 1}
    blueprint.resolve_params({"token": "tok-58213"})
    assert redactor.redact("Bearer tok-58213") == f"Bearer {MASK}"


HEADER = """
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: bp}
spec:
"""

# Each case is a blueprint with one problem; "# <-" marks the line the error must name.
CASES: dict[str, tuple[str, str]] = {
    "unknown step key": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi}
        retries: 3  # <-
""",
        "unknown key 'retries'",
    ),
    "missing step key": (
        """
  actions:
    backup.pre:
      - name: a  # <-
        with: {text: hi}
""",
        "missing required key 'function'",
    ),
    "bad duration": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi}
        timeout: 10x  # <-
""",
        "invalid duration '10x': use e.g. 30s, 15m, 1h30m",
    ),
    "negative duration": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi}
        retry: {attempts: 2, backoff: -1}  # <-
""",
        "invalid duration '-1'",
    ),
    "backoff above max": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi}
        retry: {backoff: 2m, max_backoff: 1m}  # <-
""",
        "backoff must not exceed max_backoff",
    ),
    "bad step name": (
        """
  actions:
    backup.pre:
      - name: Freeze  # <-
        function: notify.say
        with: {text: hi}
""",
        "String should match pattern",
    ),
    "unknown phase": (
        """
  actions:
    backup.during:  # <-
      - name: a
        function: notify.say
        with: {text: hi}
""",
        "backup.pre",
    ),
    "no actions": (
        """
  actions: {}  # <-
""",
        "at least 1 item",
    ),
    "duplicate step name": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi}
      - name: a  # <-
        function: notify.say
        with: {text: hi}
""",
        "duplicate step name 'a' (also step 0)",
    ),
    "lease ttl too long": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with: {dsn: x}
        lease: {ttl: 8d, release: db.thaw}  # <-
""",
        "less than or equal to 604800",
    ),
    "param default of the wrong type": (
        """
  params:
    retries: {type: integer, default: "3"}  # <-
  actions:
    backup.pre:
      - {name: a, function: notify.say, with: {text: hi}}
""",
        "default must be an integer",
    ),
    "bool default for an integer param": (
        """
  params:
    retries: {type: integer, default: true}  # <-
  actions:
    backup.pre:
      - {name: a, function: notify.say, with: {text: hi}}
""",
        "default must be an integer",
    ),
    "default outside the enum": (
        """
  params:
    mode: {type: string, default: slow, enum: [fast, safe]}  # <-
  actions:
    backup.pre:
      - {name: a, function: notify.say, with: {text: hi}}
""",
        "default must be one of the enum values",
    ),
    "bad param name": (
        """
  params:
    my-param: {type: string}  # <-
  actions:
    backup.pre:
      - {name: a, function: notify.say, with: {text: hi}}
""",
        "spec.params.my-param[key]",
    ),
    "unknown function": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freez  # <-
        with: {dsn: x}
""",
        "unknown function 'db.freez' (did you mean 'db.freeze'?)",
    ),
    "unknown with key": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with:
          dsn: x
          databse: app  # <-
""",
        "function 'db.freeze' has no parameter 'databse' (did you mean 'database'?)",
    ),
    "field name instead of its alias": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with:
          text: hi
          channel: "#ops"  # <-
""",
        "has no parameter 'channel'",
    ),
    "required with key missing": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with: {database: app}  # <-
""",
        "function 'db.freeze' requires parameter 'dsn' in with",
    ),
    "with missing entirely": (
        """
  actions:
    backup.pre:
      - name: a  # <-
        function: notify.say
""",
        "requires parameter 'text'",
    ),
    "literal of the wrong type": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with:
          dsn: x
          timeout: soon  # <-
""",
        "with.timeout: Input should be a valid number",
    ),
    "literal breaking a constraint": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with: {dsn: x, timeout: 0}  # <-
""",
        "with.timeout: Input should be greater than 0",
    ),
    "nested literal of the wrong type": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with:
          text: hi
          tags:
            - ok
            - {not: a string}  # <-
""",
        "with.tags[1]: Input should be a valid string",
    ),
    "needs an unknown step": (
        """
  actions:
    backup.pre:
      - {name: freeze, function: db.freeze, with: {dsn: x}}
      - name: dump
        function: notify.say
        with: {text: hi}
        needs:
          - freeze
          - frezee  # <-
""",
        "step 'dump' needs 'frezee', which is not a step of backup.pre (did you mean 'freeze'?)",
    ),
    "needs cycle": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi}
        needs: [b]  # <-
      - name: b
        function: notify.say
        with: {text: hi}
        needs: [a]
""",
        "needs cycle: a -> b -> a",
    ),
    "needs itself": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi}
        needs: [a]  # <-
""",
        "needs cycle: a -> a",
    ),
    "main step needs a finalizer": (
        """
  actions:
    backup.pre:
      - {name: report, function: notify.say, when: always, with: {text: hi}}
      - name: a
        function: notify.say
        with: {text: hi}
        needs: [report]  # <-
""",
        "step 'a' needs 'report', a 'when: always' step that only runs after the main steps",
    ),
    "unknown release function": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with: {dsn: x}
        lease:
          ttl: 1m
          release: db.thaaw  # <-
""",
        "unknown function 'db.thaaw' (did you mean 'db.thaw'?)",
    ),
    "release with a bad literal": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with: {dsn: x}
        lease:
          ttl: 1m
          release:
            function: db.thaw
            with: {force: maybe}  # <-
""",
        "with.force: Input should be a valid boolean",
    ),
    "release missing a required param": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with: {dsn: x}
        lease:
          ttl: 1m
          release:  # <-
            function: notify.say
""",
        "function 'notify.say' requires parameter 'text'",
    ),
    "template syntax error on a later line of a block scalar": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with:
          text: |
            first line
            {{ params.x }} fine
            {% if %} broken  # <-
""",
        "template syntax error",
    ),
    "unknown template name": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: "{{ targt.name }}"}  # <-
""",
        "unknown name 'targt' (did you mean 'target'?)",
    ),
    "undeclared param": (
        """
  params:
    database: {type: string}
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: "{{ params.databse }}"}  # <-
""",
        "unknown param 'databse' (did you mean 'database'?)",
    ),
    "steps of another action": (
        """
  actions:
    backup.pre:
      - {name: a, function: notify.say, with: {text: hi}}
    backup.post:
      - name: b
        function: notify.say
        with: {text: "{{ steps.a.outputs }}"}  # <-
""",
        "no step 'a' in backup.post",
    ),
    "steps not needed": (
        """
  actions:
    backup.pre:
      - {name: a, function: notify.say, with: {text: hi}}
      - name: b
        function: notify.say
        with: {text: "{{ steps.a.outputs }}"}  # <-
""",
        "reads the outputs of step 'a' but does not need it (add it to needs)",
    ),
    "leases of a step without a lease": (
        """
  actions:
    backup.pre:
      - {name: a, function: notify.say, with: {text: hi}}
    backup.post:
      - name: b
        function: db.thaw
        with: {lease: "{{ leases.a }}"}  # <-
""",
        "no step named 'a' takes a lease in this blueprint",
    ),
    "other leases inside a release": (
        """
  actions:
    backup.pre:
      - name: a
        function: db.freeze
        with: {dsn: x}
        lease:
          ttl: 1m
          release: {function: db.thaw, with: {lease: "{{ leases.a }}"}}  # <-
""",
        "unknown name 'leases'",
    ),
    "outcome in a pre phase": (
        """
  actions:
    restore.pre:
      - name: a
        function: notify.say
        with: {text: "{{ outcome }}"}  # <-
""",
        "'outcome' is only set in backup.post and restore.post, not in restore.pre",
    ),
    "lease record outside a release": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: "{{ lease.id }}"}  # <-
""",
        "unknown name 'lease'",
    ),
    "duplicate yaml key": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi}
        timeout: 1m
        timeout: 2m  # <-
""",
        "duplicate key 'timeout' (first defined on line 11)",
    ),
    "yaml syntax error": (
        """
  actions:
    backup.pre:
      - name: a
        function: notify.say
        with: {text: hi
      - name: b  # <-
""",
        "invalid YAML",
    ),
}


def marked_line(text: str) -> int:
    lines = textwrap.dedent(text).lstrip("\n").splitlines()
    return next(number for number, line in enumerate(lines, 1) if "# <-" in line)


@pytest.mark.parametrize("body, expected", CASES.values(), ids=CASES.keys())
def test_each_problem_is_reported_at_its_line(
    tmp_path: Path, registry: FunctionRegistry, body: str, expected: str
) -> None:
    text = HEADER + body
    path = write(tmp_path, text)

    errors = validate_blueprints(path, registry)

    assert [(e.file, e.line) for e in errors] == [(str(path), marked_line(text))], errors
    assert expected in errors[0].message
    assert str(errors[0]).startswith(f"{path}:{marked_line(text)}: ")


DOCUMENT_CASES: dict[str, tuple[str, str]] = {
    "unknown kind": ("apiVersion: snaphook.io/v1\nkind: Secret  # <-\n", "unknown kind 'Secret'"),
    "not a mapping": ("- just  # <-\n- a list\n", "must be a mapping"),
    "no apiVersion": ("kind: Blueprint  # <-\nmetadata: {name: x}\n", "missing apiVersion"),
    "unknown version": (
        "apiVersion: snaphook.io/v2  # <-\nkind: Blueprint\nmetadata: {name: x}\n"
        "spec: {actions: {backup.pre: [{name: a, function: loose.call}]}}\n",
        "apiVersion: Input should be 'snaphook.io/v1'",
    ),
    "unknown top-level key": (
        "apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata: {name: x}\n"
        "spec: {actions: {backup.pre: [{name: a, function: loose.call}]}}\n"
        "status: {}  # <-\n",
        "unknown key 'status'",
    ),
    "bad blueprint name": (
        "apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata:\n  name: Bad_Name  # <-\n"
        "spec: {actions: {backup.pre: [{name: a, function: loose.call}]}}\n",
        "metadata.name: String should match pattern",
    ),
    "unsafe yaml tag": ("apiVersion: !!python/name:os.system x  # <-\n", "invalid YAML"),
}


@pytest.mark.parametrize("text, expected", DOCUMENT_CASES.values(), ids=DOCUMENT_CASES.keys())
def test_document_level_problems(
    tmp_path: Path, registry: FunctionRegistry, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    errors = validate_blueprints(path, registry)
    assert [(e.file, e.line) for e in errors] == [(str(path), marked_line(text))], errors
    assert expected in errors[0].message


def test_templates_skip_the_literal_type_check_and_see_what_they_may(
    tmp_path: Path, registry: FunctionRegistry
) -> None:
    path = write(
        tmp_path,
        HEADER
        + """
  params:
    t: {type: number, default: 2}
  actions:
    backup.pre:
      - name: freeze
        function: db.freeze
        with: {dsn: x, timeout: "{{ params.t }}"}
        lease:
          ttl: 1m
          release:
            function: db.thaw
            with: {force: "{{ lease.outputs.lsn == params.t }}"}
      - {name: a, function: notify.say, needs: [freeze], with: {text: x}}
      - {name: b, function: notify.say, needs: [a], with: {text: "{{ steps.freeze }}"}}
      - name: late
        function: notify.say
        when: on_failure
        with: {text: "{{ steps.b }} {{ run.id }} {{ event.id }} {{ range(2) | list }}"}
      - name: later
        function: notify.say
        when: always
        needs: [late]
        with: {text: "{{ steps.late }}"}
      - {name: extra, function: loose.call, with: {anything: goes, url: "{{ target.name }}"}}
""",
    )
    assert validate_blueprints(path, registry) == []


def test_merge_keys_are_not_duplicates(tmp_path: Path, registry: FunctionRegistry) -> None:
    path = write(
        tmp_path,
        HEADER
        + """
  actions:
    backup.pre:
      - &base {name: a, function: notify.say, with: {text: hi}, timeout: 5s}
      - <<: *base
        name: b
        timeout: 10s
""",
    )
    blueprint = load_blueprints(path, registry).get("bp")
    assert blueprint is not None
    assert [(s.name, s.timeout) for s in blueprint.steps(Phase.BACKUP_PRE)] == [
        ("a", 5.0),
        ("b", 10.0),
    ]


KANISTER = """
apiVersion: cr.kanister.io/v1alpha1
kind: Blueprint
metadata: {name: postgres-kanister}
actions: {backup: {phases: []}}
"""


def small(name: str) -> str:
    return f"""
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {{name: {name}}}
spec:
  actions:
    backup.pre: [{{name: a, function: notify.say, with: {{text: hi}}}}]
"""


def test_multi_document_files_skip_foreign_and_empty_documents(
    tmp_path: Path, registry: FunctionRegistry
) -> None:
    text = f"# comment only\n---\n{small('one')}---\n{KANISTER}---\n---\n{small('two')}"
    path = write(tmp_path, text)
    assert load_blueprints(path, registry).names() == ["one", "two"]


def test_directories_are_searched_recursively_skipping_hidden_copies(
    tmp_path: Path, registry: FunctionRegistry
) -> None:
    write(tmp_path, small("top"), "top.yaml")
    write(tmp_path, small("nested"), "teams/data/nested.yml")
    write(tmp_path, KANISTER, "platforms/k10.yaml")
    write(tmp_path, "not: yaml to read", "README.md")
    # What a Kubernetes ConfigMap mount looks like: hidden timestamped copies.
    write(tmp_path, small("top"), "..2026_01_01/top.yaml")
    assert load_blueprints(tmp_path, registry).names() == ["nested", "top"]


def test_duplicate_names_across_files_name_both(tmp_path: Path, registry: FunctionRegistry) -> None:
    first = write(tmp_path, small("same"), "a.yaml")
    second = write(tmp_path, small("same"), "b.yaml")
    errors = validate_blueprints(tmp_path, registry)
    assert [(e.file, e.line) for e in errors] == [(str(second), 3)]
    assert f"blueprint 'same' is already defined at {first}:3" in errors[0].message


def test_all_errors_are_collected_and_raised_together(
    tmp_path: Path, registry: FunctionRegistry
) -> None:
    write(tmp_path, HEADER + "  actions: {backup.pre: [{name: a, function: nope}]}\n", "b.yaml")
    write(tmp_path, "key: [unclosed\n", "a.yaml")
    write(tmp_path, small("fine"), "c.yaml")

    errors = validate_blueprints(tmp_path, registry)
    assert [Path(e.file).name for e in errors] == ["a.yaml", "b.yaml"]

    with pytest.raises(BlueprintErrors) as info:
        load_blueprints(tmp_path, registry)
    assert [str(e) for e in info.value.errors] == [str(e) for e in errors]
    assert isinstance(info.value, BlueprintError)
    assert str(info.value).splitlines() == [str(e) for e in errors]


def test_a_missing_path_is_an_error(tmp_path: Path, registry: FunctionRegistry) -> None:
    errors = validate_blueprints(tmp_path / "absent", registry)
    assert [e.message for e in errors] == ["no such file or directory"]


def test_models_reject_bad_values_when_built_in_code() -> None:
    with pytest.raises(ValidationError, match="duplicate step name 'a'"):
        BlueprintSpec(
            actions={
                Phase.BACKUP_PRE: [
                    StepSpec(name="a", function="f"),
                    StepSpec(name="a", function="f"),
                ]
            }
        )
    with pytest.raises(ValidationError, match="greater than 0"):
        LeaseSpec(ttl=0, release=ReleaseSpec(function="f"))
    with pytest.raises(ValidationError, match="frozen"):
        StepSpec(name="a", function="f").name = "b"  # type: ignore[misc]


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("15m", 900.0),
        ("1h30m", 5400.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("1m30s250ms", 90.25),
        ("0", 0.0),
        ("45", 45.0),
        (12, 12.0),
        (0.25, 0.25),
    ],
)
def test_durations_parse(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "-5s", "5 m", "1x", "m", "1h-30m", "inf", -1, True, None, [1]])
def test_invalid_durations_are_rejected(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"invalid duration '.*': use e.g. 30s, 15m, 1h30m"):
        parse_duration(bad)


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0ms"), (0.5, "500ms"), (30, "30s"), (5400, "1h30m"), (90061.5, "1d1h1m1.5s")],
)
def test_durations_format_and_round_trip(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_config_documents_beside_blueprints_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "snaphook.yaml").write_text(
        "apiVersion: snaphook.io/v1\nkind: Config\nbindings: []\n", encoding="utf-8"
    )
    assert validate_blueprints(tmp_path, FunctionRegistry()) == []
