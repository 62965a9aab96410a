"""The blueprint loader under hypothesis: whatever a blueprint file holds, loading it ends in a
BlueprintSet or in BlueprintErrors naming the file and a line, quickly.

Inputs are well-formed blueprints with random mutations (unknown keys, wrong types, random
durations, broken and valid Jinja, random ``needs`` and cycles, shared sub-trees that YAML
writes as anchors and aliases, deep nesting), the same documents with their text damaged,
and plain garbage: random text and bytes, including invalid UTF-8. Sizes are bounded: the
tests at the end pin down what happens past the bounds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dispatcher.app import load_functions
from dispatcher.blueprint_loader import load_blueprints, validate_blueprints
from dispatcher.blueprints import BlueprintErrors, BlueprintSet
from dispatcher.errors import BlueprintError
from dispatcher.secrets import EnvSecretResolver
from dispatcher.templating import TemplateEngine
from functions.sdk import FunctionRegistry

MESSAGE_BOUND = 2_000  # characters; generated strings stay below 200, so this is generous
PHASES = ("backup.pre", "backup.post", "restore.pre", "restore.post")
# Messages that quote a whole value, however large (pinned by the xfail tests at the end):
# the fuzzers skip the length bound for these until they are fixed.
KNOWN_ECHOES = re.compile(r"^unknown kind |: invalid duration ")


def fuzzing(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        # Typical examples take milliseconds; this catches a runaway (alias expansion,
        # catastrophic regex) without flaking on a loaded machine.
        deadline=timedelta(seconds=2),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@functools.cache
def registry() -> FunctionRegistry:
    return load_functions([])  # every built-in family: ``with`` is checked against real params


@functools.cache
def engine() -> TemplateEngine:
    return TemplateEngine(EnvSecretResolver({}))


@pytest.fixture(scope="module")
def blueprint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "blueprint.yaml"


def load(path: Path, content: str | bytes) -> BlueprintSet | list[BlueprintError]:
    """Load ``content`` as ``path``; check every property that holds for any input."""
    raw = content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
    path.write_bytes(raw)
    text = raw.decode("utf-8", "replace")
    lines = 1 + sum(text.count(brk) for brk in "\n\r\x85\u2028\u2029")  # YAML's line breaks
    try:
        result: BlueprintSet | list[BlueprintError] = load_blueprints(
            path, registry(), engine=engine()
        )
    except BlueprintErrors as exc:
        result = exc.errors
        assert result, "BlueprintErrors without errors"
        for error in result:
            assert isinstance(error, BlueprintError)
            assert error.file == str(path), error
            assert error.line is None or 1 <= error.line <= lines, (error.line, lines)
            if not KNOWN_ECHOES.search(error.message):
                assert len(error.message) <= MESSAGE_BOUND, error.message[:300]
        event(f"errors: {_first_word(result[0].message)}")
    else:
        assert isinstance(result, BlueprintSet)
        event(f"valid: {len(result)} blueprint(s)")
    return result


def _first_word(message: str) -> str:
    return message.split(":")[0].split("'")[0][:40]


# --- well-formed blueprints -----------------------------------------------------------------

# Small pools rather than regexes and free text: a draw from a pool is cheap, and the values
# are chosen to sit on either side of each rule (name patterns, duration syntax, ...).
NAMES = st.sampled_from(
    ["freeze", "dump", "thaw", "tell-ops", "a", "b", "c", "x-1", "Bad", "-x", "", "a" * 64, "é"]
)
IDENTIFIERS = st.sampled_from(
    ["database", "dsn", "to", "message", "url", "lease", "x", "_y", "1bad", "bad-name", "with"]
)
SHORT_TEXT = st.text(max_size=12)
DURATIONS = st.one_of(
    st.sampled_from(
        ["30s", "15m", "1h30m", "500ms", "2d", "0s", "0", "1.5h", "10", "-1s", "1h1x", "s",
         "1e3s", "\u0663s", " 5s ", "5 s", "1w", "9" * 400 + "s", "8d", "1" * 30, ""]
    ),
    st.integers(-10, 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)  # fmt: skip

TEMPLATE_PIECES = (
    "{{ params.database }}",
    "{{ params.nope }}",
    "{{ secret('pg-creds', 'dsn') }}",
    "{{ env('HOME', 'x') }}",
    "{{ target.namespace }}/{{ backup.id }}",
    "{{ steps.freeze.outputs.label }}",
    "{{ steps[name] }}",
    "{{ leases.freeze }}",
    "{{ lease.id }}",
    "{{ outcome }}",
    "{{ run.id | upper }}",
    "{% for i in range(3) %}{{ i }}{% endfor %}",
    "{% if outcome == 'failed' %}bad{% else %}ok{% endif %}",
    "{{ ''.__class__.__mro__ }}",
    "{{",
    "}}",
    "{%",
    "{% if %}",
    "{{ a.b( }}",
    "{{ 1 +* 2 }}",
    "{# comment",
    "{% raw %}{{ x }}{% endraw %}",
    "{% macro m() %}{% endmacro %}",
    "{{ x }}\n{{ y",
    "s3://bucket/",
    " ",
)
TEMPLATES = st.lists(st.sampled_from(TEMPLATE_PIECES), min_size=1, max_size=3).map("".join)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    SHORT_TEXT,
    TEMPLATES,
    DURATIONS,
)
JSONISH = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(IDENTIFIERS, st.integers(), st.booleans()), children, max_size=3),
    ),
    max_leaves=6,
)


FUNCTIONS = sorted(registry().names())
RELEASES = st.one_of(
    st.sampled_from(FUNCTIONS),
    st.fixed_dictionaries(
        {"function": st.sampled_from(FUNCTIONS)},
        optional={"with": st.dictionaries(IDENTIFIERS, TEMPLATES, max_size=2)},
    ),
)
STEP_OPTIONS = {
    "timeout": DURATIONS,
    "retry": st.fixed_dictionaries(
        {}, optional={"attempts": st.integers(-2, 200), "backoff": DURATIONS}
    ),
    "on_error": st.sampled_from(["fail", "continue", "maybe"]),
    "when": st.sampled_from(["on_success", "on_failure", "always", "never"]),
    "lease": st.fixed_dictionaries({"ttl": DURATIONS}, optional={"release": RELEASES}),
}
PARAMS = st.dictionaries(
    IDENTIFIERS,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(
                ["string", "integer", "number", "boolean", "object", "array", "date"]
            ),
            "default": JSONISH,
            "required": st.booleans(),
            "secret": st.booleans(),
            "enum": st.lists(SCALARS, max_size=3),
        },
    ),
    max_size=3,
)


@functools.cache
def with_values(function: str) -> st.SearchStrategy[dict[str, Any]]:
    """``with`` mappings for ``function``: mostly its own parameter names, some others."""
    spec = registry().get(function)
    model = None if spec is None else spec.params_model
    fields = [] if model is None else [f.alias or n for n, f in model.model_fields.items()]
    keys = st.one_of(st.sampled_from(fields), IDENTIFIERS) if fields else IDENTIFIERS
    return st.dictionaries(keys, JSONISH, max_size=3)


@st.composite
def step_specs(draw: st.DrawFn, names: list[str], index: int) -> dict[str, Any]:
    function = draw(st.one_of(st.sampled_from(FUNCTIONS), NAMES, st.just("postgres.freez")))
    step: dict[str, Any] = {
        "name": names[index],
        "function": function,
        "with": draw(with_values(function)),
    }
    if draw(st.booleans()):
        step["needs"] = draw(st.lists(st.one_of(st.sampled_from(names), NAMES), max_size=3))
    for key, strategy in STEP_OPTIONS.items():
        if draw(st.booleans()):
            step[key] = draw(strategy)
    return step


@st.composite
def blueprints(draw: st.DrawFn) -> dict[str, Any]:
    actions: dict[str, Any] = {}
    for phase in draw(st.lists(st.sampled_from(PHASES), min_size=1, max_size=2, unique=True)):
        names = draw(st.lists(NAMES, min_size=1, max_size=3))  # duplicates are a case too
        actions[phase] = [draw(step_specs(names, i)) for i in range(len(names))]
    return {
        "apiVersion": "snaphook.io/v1",
        "kind": "Blueprint",
        "metadata": {"name": draw(NAMES)},
        "spec": {"params": draw(PARAMS), "actions": actions},
    }


def _containers(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict | list):
        yield path
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            yield from _containers(child, (*path, key))


def _at(root: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        root = root[part]
    return root


def _shared(depth: int, width: int) -> Any:
    """A value YAML writes with anchors and aliases: ``width**depth`` leaves, few bytes."""
    node: Any = ["x"]
    for _ in range(depth):
        node = [node] * width
    return node


def _nested(depth: int) -> Any:
    node: Any = "leaf"
    for level in range(depth):
        node = [node] if level % 2 else {"k": node}
    return node


MUTATIONS = (
    "unknown key",
    "wrong type",
    "delete",
    "shared",
    "deep",
    "cycle",
)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(blueprints())
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        path = draw(st.sampled_from(list(_containers(doc))))
        target = _at(doc, path)
        value = draw(JSONISH)
        if mutation == "shared":
            value = _shared(draw(st.integers(1, 4)), draw(st.integers(1, 4)))
        elif mutation == "deep":
            value = _nested(draw(st.integers(10, 60)))
        event(f"mutation: {mutation}")
        if mutation == "cycle":
            spec = doc.get("spec")
            actions = spec.get("actions") if isinstance(spec, dict) else None
            for steps in actions.values() if isinstance(actions, dict) else ():
                if isinstance(steps, list) and len(steps) > 1:
                    names = [s.get("name") for s in steps if isinstance(s, dict)]
                    for step, need in zip(steps, names[1:] + names[:1], strict=False):
                        if isinstance(step, dict):
                            step["needs"] = [need]
        elif isinstance(target, dict):
            keys = list(target)
            if mutation == "delete" and keys:
                del target[draw(st.sampled_from(keys))]
            elif mutation == "unknown key" or not keys:
                target[draw(st.one_of(IDENTIFIERS, SHORT_TEXT))] = value
            else:
                target[draw(st.sampled_from(keys))] = value
        elif isinstance(target, list):
            if mutation == "delete" and target:
                target.pop(draw(st.integers(0, len(target) - 1)))
            elif target and mutation != "unknown key":
                target[draw(st.integers(0, len(target) - 1))] = value
            else:
                target.append(value)
    return doc


def dump(doc: Any) -> str:
    # A sub-tree used twice is written once, with an anchor, then as aliases.
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's is ~10x faster
    return yaml.dump(doc, Dumper=dumper, sort_keys=False, allow_unicode=True, width=120)


@fuzzing(max_examples=1_000)
@given(doc=mutated())
def test_mutated_blueprints_load_or_fail_with_file_and_line(
    blueprint_file: Path, doc: dict[str, Any]
) -> None:
    result = load(blueprint_file, dump(doc))
    if isinstance(result, list):
        # Some problem was found: it is reported at a line of the document.
        assert all(error.line is not None for error in result if "YAML" not in error.message)


@fuzzing(max_examples=150)
@given(docs=st.lists(blueprints(), min_size=1, max_size=3))
def test_unmutated_documents_of_one_file(blueprint_file: Path, docs: list[dict[str, Any]]) -> None:
    """Several documents per file; the same name twice is an error at the second."""
    text = "---\n".join(dump(doc) for doc in docs)
    result = load(blueprint_file, text)
    names = [doc["metadata"]["name"] for doc in docs]
    if isinstance(result, BlueprintSet):
        assert sorted(result.names()) == sorted(set(names))
        assert len(set(names)) == len(names)


# --- damaged text and garbage ---------------------------------------------------------------

YAML_NOISE = st.sampled_from(
    [":", "- ", "  ", "\t", "\n", "---\n", "...\n", "&a ", "*a", "*nope", "!!python/object ",
     "!tag ", "<<: *a", "{", "}", "[", "]", "'", '"', "|", ">", "#", "%YAML 1.1\n", "? ",
     "\x00", "\ufeff", "\x85", "\u2028", "\ud800"]
)  # fmt: skip


@st.composite
def damaged(draw: st.DrawFn) -> str | bytes:
    text = dump(draw(blueprints()))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 20))
        noise = draw(st.one_of(YAML_NOISE, SHORT_TEXT))
        text = text[:at] + noise + text[at + cut :]
    if draw(st.booleans()):
        return text
    raw = text.encode("utf-8", "surrogatepass")
    at = draw(st.integers(0, len(raw)))
    return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]


@fuzzing(max_examples=800)
@given(content=damaged())
def test_damaged_blueprint_files(blueprint_file: Path, content: str | bytes) -> None:
    load(blueprint_file, content)


@fuzzing(max_examples=1_500)
@given(content=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_garbage_files(blueprint_file: Path, content: str | bytes) -> None:
    load(blueprint_file, content)


@fuzzing(max_examples=300)
@given(
    lines=st.lists(
        st.tuples(st.integers(0, 6), st.one_of(IDENTIFIERS, st.sampled_from(["- ", "-"]))),
        max_size=30,
    )
)
def test_random_indentation(blueprint_file: Path, lines: list[tuple[int, str]]) -> None:
    head = "apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata: {name: x}\nspec:\n"
    body = "".join(f"{' ' * indent}{word}: \n" for indent, word in lines)
    load(blueprint_file, head + body)


# --- past the bounds: known problems, pinned ------------------------------------------------
#
# Each case below is a way the loader currently breaks its contract, marked xfail(strict):
# whoever fixes one sees it XPASS and removes its marker.

LONG = "x" * 5_000
KEY = "k" * 1_000  # YAML allows implicit keys up to 1024 characters
HEAD = (
    "apiVersion: snaphook.io/v1\nkind: Blueprint\nmetadata: {name: a}\nspec:\n  actions:\n"
    "    backup.pre:\n      - name: a\n"
)
STEP = HEAD + "        function: notify.log\n        with: {message: hi}\n"


def _echo(reason: str) -> Any:
    return pytest.mark.xfail(
        strict=True, raises=AssertionError, reason=f"echoes the whole value: {reason}"
    )


ECHO_CASES = [
    pytest.param(
        f"apiVersion: snaphook.io/v1\nkind: {LONG}\n",
        id="kind",
        marks=_echo("blueprint_loader._validate_document, 'unknown kind {kind!r}'"),
    ),
    pytest.param(
        "apiVersion: snaphook.io/v1\nx:\n"
        + "".join(f"  - &a{i} [{', '.join([f'*a{i - 1}' if i else 'x'] * 10)}]\n" for i in range(5))
        + "kind: *a4\n",
        id="kind-alias-bomb",  # refused before construction: aliases expand too far
    ),
    pytest.param(
        "x:\n"
        + "".join(f"  - &a{i} [{', '.join([f'*a{i - 1}' if i else 'x'] * 10)}]\n" for i in range(5))
        + STEP.replace("with: {message: hi}", "with: {message: hi}\n        timeout: *a4"),
        id="duration-alias-bomb",
    ),
    pytest.param(
        HEAD + f"        function: {LONG}\n",
        id="function",
        marks=_echo("blueprint_checks._Checker._check_call, 'unknown function {function!r}'"),
    ),
    pytest.param(
        STEP + f"        needs: [{LONG}]\n",
        id="needs",
        marks=_echo("blueprint_checks._Checker._check_needs, 'needs {need!r}'"),
    ),
    pytest.param(
        STEP + f"        {KEY}: 1\n",
        id="unknown-key",
        marks=_echo("yamlsource._describe, \"unknown key '{loc[-1]}'\""),
    ),
    pytest.param(
        HEAD + f"        function: notify.log\n        with: {{message: hi, {KEY}: 1}}\n",
        id="with-key",
        marks=_echo("blueprint_checks._with_problems, 'has no parameter {key!r}'"),
    ),
    pytest.param(
        STEP.replace("message: hi", "message: '{{ " + LONG + " }}'"),
        id="template-name",
        marks=_echo("blueprint_checks._reference_problem, 'unknown name {root!r}'"),
    ),
    pytest.param(
        STEP.replace("message: hi", "message: '{{ a " + LONG + " }}'"),
        id="template-syntax",
        marks=_echo("blueprint_checks._check_templates, jinja2's own message"),
    ),
    pytest.param(
        STEP + f"        timeout: {LONG}\n",
        id="duration",
        marks=_echo("durations.parse_duration, \"invalid duration '{value}'\""),
    ),
    pytest.param(
        f"{KEY}: 1\n{KEY}: 2\n",
        id="duplicate-key",
        marks=_echo("yamlsource._duplicate_key_errors, 'duplicate key {key!r}'"),
    ),
    pytest.param(
        f"a: !{LONG} x\n",
        id="yaml-tag",
        marks=_echo("yamlsource._syntax_error: PyYAML's problem text quotes the tag"),
    ),
    pytest.param(
        f"a: *{LONG}\n",
        id="yaml-alias",
        marks=_echo("yamlsource._syntax_error: PyYAML's problem text quotes the alias"),
    ),
    pytest.param(STEP + f"        when: {LONG}\n", id="literal-field"),
    pytest.param(f"apiVersion: {LONG}\n", id="foreign-api-version"),
    pytest.param(STEP.replace("name: a\n", f"name: {LONG}\n", 1), id="metadata-name"),
]


@pytest.mark.parametrize("text", ECHO_CASES)
def test_errors_quote_a_bounded_slice_of_the_input(blueprint_file: Path, text: str) -> None:
    blueprint_file.write_text(text, encoding="utf-8")
    errors = validate_blueprints(blueprint_file, registry(), engine=engine())
    assert all(len(error.message) <= 300 for error in errors), [
        (error.line, len(error.message)) for error in errors
    ]


@pytest.mark.parametrize("nesting", ["[", "{a: "])
def test_deep_nesting_is_an_error_not_a_crash(blueprint_file: Path, nesting: str) -> None:
    closing = "]" if nesting == "[" else "}"
    blueprint_file.write_text(f"a: {nesting * 2_000}1{closing * 2_000}\n", encoding="utf-8")
    assert validate_blueprints(blueprint_file, registry(), engine=engine())


@pytest.mark.timeout(60)
def test_alias_expansion_is_bounded(blueprint_file: Path) -> None:
    import time

    anchors = ["            l0: &a0 [x, y]"]
    anchors += [f"            l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    text = HEAD + "        function: http.request\n        with:\n          url: http://x/\n"
    blueprint_file.write_text(text + "          json:\n" + "\n".join(anchors) + "\n")
    started = time.perf_counter()
    validate_blueprints(blueprint_file, registry(), engine=engine())  # 10**6 leaves
    assert time.perf_counter() - started < 0.5
