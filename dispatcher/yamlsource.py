"""YAML documents that remember where each value came from.

Blueprint errors must point at a line. PyYAML's ``safe_load`` throws positions away, so we
compose node trees (which keep their marks), build the plain data from those nodes, and keep
both: a pydantic error ``loc`` or a checker's path is then walked down the node tree to find
the line. Composing ourselves also lets us reject duplicate mapping keys, which PyYAML would
silently resolve to the last one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from dispatcher.errors import BlueprintError

__all__ = ["Document", "Location", "dotted", "read_documents"]

Location = Sequence[str | int]
"""A path into a document, as pydantic reports it: mapping keys and list indexes."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class Document:
    """One YAML document of a file: its plain data plus the node tree for line lookups."""

    file: str
    node: yaml.Node
    data: Any

    @property
    def line(self) -> int:
        return _line(self.node)

    def line_of(self, path: Location) -> int:
        """The line of the value at ``path``, or of its deepest existing parent (so a missing
        key points at the mapping that lacks it, and an unknown key at the key itself)."""
        return self._locate(path)[1]

    def text_line(self, path: Location, offset: int) -> int:
        """The line of line ``offset`` (1-based) of the string at ``path``; block scalars
        (``|``, ``>``) start on the line after their indicator."""
        node, line, complete = self._locate(path)
        if not (complete and isinstance(node, yaml.ScalarNode)):
            return line
        first = _line(node) + (1 if node.style in ("|", ">") else 0)
        return first + max(offset, 1) - 1

    def error(self, message: str, path: Location = ()) -> BlueprintError:
        return BlueprintError(message, file=self.file, line=self.line_of(path))

    def validation_errors(
        self, exc: ValidationError, prefix: Location = ()
    ) -> list[BlueprintError]:
        """One :class:`BlueprintError` per pydantic error, each at its own line."""
        return [
            self.error(_describe(error, prefix), (*prefix, *error["loc"]))
            for error in exc.errors(include_url=False, include_input=False)
        ]

    def _locate(self, path: Location) -> tuple[yaml.Node, int, bool]:
        node, line = self.node, _line(self.node)
        for part in path:
            found = _child(node, part)
            if found is None:
                return node, line, False
            line, node = found
        return node, line, True


def read_documents(
    path: Path, *, name: str | None = None
) -> tuple[list[Document], list[BlueprintError]]:
    """The non-empty documents of a YAML file, and the errors found while reading it.

    A syntax error ends the file (the parser cannot resynchronise), but the documents read
    before it are kept so they are still checked. ``name`` is how errors refer to the file.
    """
    file = name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return [], [BlueprintError(f"not valid UTF-8 ({exc.reason})", file=file)]
    except OSError as exc:
        return [], [BlueprintError(f"cannot read file: {exc.strerror}", file=file)]
    documents: list[Document] = []
    errors: list[BlueprintError] = []
    try:
        for node in yaml.compose_all(text, Loader=yaml.SafeLoader):
            errors.extend(_duplicate_key_errors(node, file))
            document = _construct(node, file, errors)
            if document is not None:
                documents.append(document)
    except yaml.MarkedYAMLError as exc:
        errors.append(_syntax_error(exc, file))
    except yaml.YAMLError as exc:  # ReaderError: a character YAML does not allow
        position = getattr(exc, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        errors.append(BlueprintError(f"invalid YAML: {exc}", file=file, line=line))
    except RecursionError:
        # PyYAML recurses once per nesting level: a few KB of brackets would crash startup.
        errors.append(BlueprintError("YAML nested too deeply to read", file=file))
    return documents, errors


MAX_EXPANDED_NODES = 100_000  # far above any real blueprint, far below a "billion laughs"


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes the document has once every alias is expanded (aliases are shared
    node objects, so with memoisation this costs one visit per distinct node)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = 1  # a (recursive) reference to an ancestor counts once
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size
    return min(size, MAX_EXPANDED_NODES + 1)


def _construct(node: yaml.Node | None, file: str, errors: list[BlueprintError]) -> Document | None:
    if node is None:
        return None
    if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
        # Checked before constructing: templates and the runner walk the expanded tree.
        errors.append(
            BlueprintError(
                f"YAML aliases expand to more than {MAX_EXPANDED_NODES} nodes",
                file=file,
                line=node.start_mark.line + 1,
            )
        )
        return None
    try:
        data = yaml.constructor.SafeConstructor().construct_document(node)
    except yaml.MarkedYAMLError as exc:  # an unknown tag, an unhashable key, ...
        errors.append(_syntax_error(exc, file))
        return None
    return None if data is None else Document(file=file, node=node, data=data)


def _syntax_error(exc: yaml.MarkedYAMLError, file: str) -> BlueprintError:
    mark = exc.problem_mark or exc.context_mark
    message = f"invalid YAML: {exc.problem or exc.context or 'syntax error'}"
    if exc.problem and exc.context:
        message += f" ({exc.context})"
    return BlueprintError(message, file=file, line=None if mark is None else mark.line + 1)


def _duplicate_key_errors(root: yaml.Node | None, file: str) -> Iterator[BlueprintError]:
    for key, line, first in _duplicate_keys(root):
        yield BlueprintError(
            f"duplicate key {key!r} (first defined on line {first})", file=file, line=line
        )


def _duplicate_keys(root: yaml.Node | None) -> Iterator[tuple[str, int, int]]:
    # Must run before construction: SafeConstructor flattens merge keys (``<<``) into the
    # node in place, and overriding a merged key is legitimate, not a duplicate.
    stack = [] if root is None else [root]
    seen: set[int] = set()  # aliases share nodes
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    ident = (key.tag, key.value)
                    if ident in first_lines:
                        yield key.value, _line(key), first_lines[ident]
                    first_lines.setdefault(ident, _line(key))
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _child(node: yaml.Node, part: str | int) -> tuple[int, yaml.Node] | None:
    """(line, node) of ``part`` under ``node``; for a mapping entry the line is the key's."""
    if isinstance(node, yaml.MappingNode):
        # The last occurrence wins, as in the constructed data.
        for key, value in reversed(node.value):
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return _line(key), value
    elif (
        isinstance(node, yaml.SequenceNode)
        and isinstance(part, int)
        and 0 <= part < len(node.value)
    ):
        item = node.value[part]
        return _line(item), item
    return None


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _describe(error: ErrorDetails, prefix: Location) -> str:
    loc = (*prefix, *error["loc"])
    parent = f" in {dotted(loc[:-1])}" if len(loc) > 1 else ""
    if error["type"] == "extra_forbidden":
        return f"unknown key '{loc[-1]}'{parent}"
    if error["type"] == "missing":
        return f"missing required key '{loc[-1]}'{parent}"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{dotted(loc)}: {message}" if loc else message


def dotted(path: Location) -> str:
    """``spec.actions.backup.pre[0].timeout`` for a location."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:  # pydantic names a bad dict key "[key]": attach it like an index
            text += part if not text or part.startswith("[") else f".{part}"
    return text
