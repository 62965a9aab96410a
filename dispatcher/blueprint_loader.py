"""Read blueprint files: YAML with line numbers → schema → semantic checks.

All errors are reported at once, each with its file and line, because fixing blueprints
one error per restart is miserable.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from pydantic import (
    ValidationError,
)

from dispatcher.blueprint_checks import check_blueprint
from dispatcher.blueprints import API_GROUP, Blueprint, BlueprintErrors, BlueprintSet
from dispatcher.errors import BlueprintError
from dispatcher.secrets import EnvSecretResolver
from dispatcher.templating import TemplateEngine
from dispatcher.yamlsource import Document, read_documents
from functions.sdk import FunctionRegistry

__all__ = ["load_blueprints", "validate_blueprints"]


def load_blueprints(
    path: Path, registry: FunctionRegistry, *, engine: TemplateEngine | None = None
) -> BlueprintSet:
    """The blueprints in ``path`` (a file, or a directory searched recursively for
    ``*.yaml``/``*.yml``). Raises :class:`BlueprintErrors` listing every problem found."""
    blueprints, errors = _load(path, registry, engine)
    if errors:
        raise BlueprintErrors(errors)
    return BlueprintSet(MappingProxyType(blueprints))


def validate_blueprints(
    path: Path, registry: FunctionRegistry, *, engine: TemplateEngine | None = None
) -> list[BlueprintError]:
    """Every problem in the blueprints in ``path``, sorted by file and line; ``[]`` if valid."""
    return _load(path, registry, engine)[1]


def _load(
    path: Path, registry: FunctionRegistry, engine: TemplateEngine | None
) -> tuple[dict[str, Blueprint], list[BlueprintError]]:
    engine = engine or TemplateEngine(EnvSecretResolver())
    loaded: dict[str, tuple[Blueprint, Document]] = {}
    files, errors = _yaml_files(path)
    for file in files:
        documents, read_errors = read_documents(file)
        errors.extend(read_errors)
        for document in documents:
            blueprint = _validate_document(document, errors)
            if blueprint is not None:
                errors.extend(check_blueprint(blueprint, document, registry, engine))
                _add_unique(loaded, blueprint, document, errors)
    blueprints = {name: blueprint for name, (blueprint, _) in loaded.items()}
    return blueprints, sorted(errors, key=lambda error: (error.file, error.line or 0))


def _add_unique(
    loaded: dict[str, tuple[Blueprint, Document]],
    blueprint: Blueprint,
    document: Document,
    errors: list[BlueprintError],
) -> None:
    name_path = ("metadata", "name")
    previous = loaded.get(blueprint.name)
    if previous is None:
        loaded[blueprint.name] = (blueprint, document)
        return
    first = previous[1]
    where = f"{first.file}:{first.line_of(name_path)}"
    errors.append(
        document.error(f"blueprint {blueprint.name!r} is already defined at {where}", name_path)
    )


def _yaml_files(path: Path) -> tuple[list[Path], list[BlueprintError]]:
    if path.is_file():
        return [path], []
    if not path.is_dir():
        return [], [BlueprintError("no such file or directory", file=str(path))]
    files = [
        candidate
        for candidate in path.rglob("*")
        if candidate.suffix in (".yaml", ".yml")
        and candidate.is_file()
        # Kubernetes mounts a ConfigMap with hidden ``..data``/``..<timestamp>`` copies of
        # every file; reading those would define each blueprint twice.
        and not any(part.startswith(".") for part in candidate.relative_to(path).parts)
    ]
    return sorted(files), []


def _validate_document(document: Document, errors: list[BlueprintError]) -> Blueprint | None:
    """The document as a Blueprint; ``None`` if it is invalid (errors appended) or foreign."""
    data = document.data
    if not isinstance(data, dict):
        errors.append(document.error("a document must be a mapping with apiVersion and kind"))
        return None
    api_version = data.get("apiVersion")
    if not isinstance(api_version, str):
        problem = "missing apiVersion" if api_version is None else "apiVersion must be a string"
        errors.append(document.error(problem, ("apiVersion",)))
        return None
    if not api_version.startswith(API_GROUP):
        return None
    kind = data.get("kind")
    if kind == "Config":
        return None  # the dispatcher's own config file (see settings.py) may live beside
    if kind is not None and kind != "Blueprint":
        errors.append(
            document.error(f"unknown kind {kind!r}: expected Blueprint (or Config)", ("kind",))
        )
        return None
    try:
        return Blueprint.model_validate(data, context={"source": document.file})
    except ValidationError as exc:
        errors.extend(document.validation_errors(exc))
        return None
