"""The Dockerfile and its build context, checked without a Docker daemon (none runs on the
development machines, and base images cannot be pulled there): the instructions are parsed
and held to what the image promises — pinned bases, a builder stage, a non-root numeric user,
no build tools at run time, the chart's paths — and .dockerignore is applied with Docker's
matching rules to show the context holds exactly what the wheel is built from.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
UID = "65532"
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "libc6-dev", "python3-dev", "git")


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with line continuations joined and comments
    dropped (the Dockerfile reference's syntax, escape character backslash)."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are removed
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: only ARG before FROM"
            name, _, default = instruction.arguments.partition("=")
            args[name] = default.strip('"')
        else:
            stages[-1].instructions.append(instruction)
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())[1]


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for pair in shlex.split(instruction.arguments):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def test_every_base_image_is_pinned(stages: list[Stage]) -> None:
    for stage in stages:
        repository, _, tag = stage.image.partition(":")
        assert "@sha256:" in stage.image or (tag and tag != "latest"), stage.image
        assert repository == "python" and tag.startswith("3.11-slim"), stage.image
    assert not [i for s in stages for i in s.all("ADD")], "ADD fetches and unpacks: use COPY"


def test_wheels_are_built_in_a_builder_stage_and_only_installed_after(
    stages: list[Stage],
) -> None:
    assert [s.name for s in stages] == ["builder", "runtime"]
    builder, runtime = stages
    assert any("pip wheel" in i.arguments for i in builder.all("RUN"))
    install = [i.arguments for i in runtime.all("RUN") if "pip install" in i.arguments]
    assert len(install) == 1
    # From the builder's wheels only, mounted for that one step: no wheel layer, no index.
    assert "--mount=type=bind,from=builder,source=/wheels" in install[0]
    assert "--no-index" in install[0]
    assert not runtime.all("COPY"), "the runtime stage takes nothing but the wheels"
    for instruction in runtime.all("RUN"):
        words = set(re.split(r"[\s;&|]+", instruction.arguments))
        assert not words & set(BUILD_TOOLS), f"line {instruction.line}: build tools at run time"
    # Nothing installs packages at run time.
    assert "pip uninstall --yes pip setuptools wheel" in install[0]


def test_the_runtime_stage_runs_snaphook_as_a_fixed_non_root_user(stages: list[Stage]) -> None:
    runtime = stages[-1]
    (user,) = runtime.all("USER")
    # Numeric, so that a kubelet enforcing runAsNonRoot can check it.
    assert user.arguments == f"{UID}:{UID}"
    last_user_line = user.line
    assert all(i.line < last_user_line for i in runtime.all("RUN")), "RUN after USER"
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert yaml.safe_load(entrypoint.arguments) == ["snaphook"]  # exec form: gets SIGTERM
    (cmd,) = runtime.all("CMD")
    assert yaml.safe_load(cmd.arguments) == ["serve"]
    assert not runtime.all("HEALTHCHECK"), "Kubernetes probes, not a Docker HEALTHCHECK"
    assert runtime.all("EXPOSE")[0].arguments == "8080"
    creates = " ".join(i.arguments for i in runtime.all("RUN"))
    assert f"--uid {UID}" in creates and f"--gid {UID}" in creates


def test_the_image_suits_a_read_only_root_filesystem(stages: list[Stage]) -> None:
    runtime = stages[-1]
    env = env_of(runtime)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["SNAPHOOK_HOST"] == "0.0.0.0"
    assert env["PORT"] == "8080"
    assert "SNAPHOOK_PORT" not in env, "it would override Knative's PORT"
    (volume,) = runtime.all("VOLUME")
    volumes = yaml.safe_load(volume.arguments)
    assert set(volumes) == {env["SNAPHOOK_STATE_DIR"], "/tmp"}
    # The chart mounts its volumes at the same paths.
    pod = (REPO / "charts" / "snaphook" / "templates" / "_pod.tpl").read_text()
    assert f"mountPath: {env['SNAPHOOK_STATE_DIR']}" in pod
    assert f"value: {env['SNAPHOOK_HOOKS']}" in pod
    state_dir = [
        i.arguments for i in runtime.all("RUN") if env["SNAPHOOK_STATE_DIR"] in i.arguments
    ]
    assert f"--owner {UID} --group {UID} --mode 0700 {env['SNAPHOOK_STATE_DIR']}" in state_dir[0]


# --- the build context -------------------------------------------------------------------------


def docker_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore lines as (exception, regex), by Docker's rules: paths are cleaned and
    relative to the context, ``*`` and ``?`` stay within a path segment, ``**`` spans any
    number of them, ``!`` re-includes."""
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exception, re.compile(regex)))
    return patterns


def in_context(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends ``path``: the last pattern matching it or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exception, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not exception
    return not excluded


@pytest.fixture(scope="module")
def context() -> set[str]:
    patterns = docker_patterns((REPO / ".dockerignore").read_text())
    files = set()
    for directory, subdirectories, names in os.walk(REPO):
        base = Path(directory).relative_to(REPO)
        if base == Path("."):
            # Hidden top-level directories (.git, virtualenvs, caches) are not worth walking:
            # it is enough that the context leaves them out.
            hidden = [d for d in subdirectories if d.startswith(".")]
            assert not [d for d in hidden if in_context(f"{d}/file", patterns)]
            subdirectories[:] = [d for d in subdirectories if d not in hidden]
        for name in names:
            relative = (base / name).as_posix()
            if in_context(relative, patterns):
                files.add(relative)
    return files


def test_the_matcher_follows_docker_rules() -> None:
    patterns = docker_patterns("*\n!src/\n**/__pycache__\n**/*.py[cod]\n")
    assert in_context("src/a/b.py", patterns)
    assert not in_context("src/a/__pycache__/b.cpython-311.pyc", patterns)
    assert not in_context("src/b.pyc", patterns)
    assert not in_context("tests/test_a.py", patterns)
    assert not in_context(".env", patterns)


def test_the_context_holds_the_package_sources_and_nothing_else(context: set[str]) -> None:
    tops = {path.split("/")[0] for path in context}
    assert tops == {"pyproject.toml", "README.md", "dispatcher", "functions"}
    assert not [p for p in context if "__pycache__" in p or p.endswith((".pyc", ".pyo"))]
    # Local state and configs (journals, secrets) never reach a builder.
    assert not [p for p in context if p.endswith((".sqlite3", ".env", ".pem", ".key"))]


def test_the_context_has_everything_the_wheel_is_built_from(
    stages: list[Stage], context: set[str]
) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["readme"] in context
    modules = [target.split(":")[0] for target in project["project"]["scripts"].values()]
    for group in project["project"]["entry-points"].values():
        modules += [target.split(":")[0] for target in group.values()]
    for module in modules:
        path = module.replace(".", "/")
        assert f"{path}.py" in context or f"{path}/__init__.py" in context, module
    # Every package setuptools would find in the repository is in the context.
    for init in REPO.glob("*/**/__init__.py"):
        relative = init.relative_to(REPO).as_posix()
        if relative.split("/")[0] in ("dispatcher", "functions"):
            assert relative in context
    # And the builder copies exactly what is there.
    for instruction in stages[0].all("COPY"):
        for source in instruction.arguments.split()[:-1]:
            assert any(p == source or p.startswith(f"{source}/") for p in context), source
