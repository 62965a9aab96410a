"""What the fake Kubernetes API server knows about resources: the served types, how a
request path names one, label/field selectors, and ``Status`` error bodies.

URL layout, as the real API server serves it::

    /api/v1/<plural>[/<name>[/<subresource>]]                         cluster-scoped core
    /api/v1/namespaces/<ns>/<plural>[/<name>[/<subresource>]]         namespaced core
    /apis/<group>/<version>/...                                       the same for a group

A namespaced plural without a namespace (``/api/v1/pods``) lists across all namespaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False  # has a status subresource: the main endpoint ignores status
    scale: bool = False  # has a scale subresource (autoscaling/v1 Scale)
    generation: bool = False  # metadata.generation follows spec changes
    fields: tuple[str, ...] = ()  # field selector keys beyond metadata.name/namespace

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``deployments.apps`` as the API server names it in messages (``pods`` for core)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "namespaces", "Namespace", namespaced=False, status=True),
    Resource(
        "",
        "v1",
        "pods",
        "Pod",
        status=True,
        generation=True,
        fields=("status.phase", "spec.nodeName", "spec.serviceAccountName"),
    ),
    Resource("", "v1", "secrets", "Secret", fields=("type",)),
    Resource("", "v1", "configmaps", "ConfigMap"),
    Resource("", "v1", "services", "Service", status=True),
    Resource(
        "",
        "v1",
        "events",
        "Event",
        fields=(
            "involvedObject.kind",
            "involvedObject.name",
            "involvedObject.namespace",
            "involvedObject.uid",
            "reason",
            "type",
        ),
    ),
    Resource(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        fields=("regarding.kind", "regarding.name", "regarding.namespace", "reason", "type"),
    ),
    Resource("apps", "v1", "deployments", "Deployment", status=True, scale=True, generation=True),
    Resource("apps", "v1", "statefulsets", "StatefulSet", status=True, scale=True, generation=True),
    Resource("apps", "v1", "daemonsets", "DaemonSet", status=True, generation=True),
    Resource("apps", "v1", "replicasets", "ReplicaSet", status=True, scale=True, generation=True),
    Resource(
        "batch", "v1", "jobs", "Job", status=True, generation=True, fields=("status.successful",)
    ),
)

_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}


def find_resource(name: str, group: str | None = None) -> Resource:
    """A resource by plural (``pods``), kind (``Pod``) or ``plural.group``; core first."""
    plural, _, qualifier = name.partition(".")
    wanted_group = group if group is not None else (qualifier or None)
    for r in RESOURCES:
        if plural in (r.plural, r.kind) and wanted_group in (None, r.group):
            return r
    raise KeyError(f"the fake API server does not serve {name!r}")


@dataclass(frozen=True)
class Target:
    """What a request path addresses."""

    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def rbac_resource(self) -> str:
        return (
            f"{self.resource.plural}/{self.subresource}"
            if self.subresource
            else self.resource.plural
        )


def parse_path(path: str) -> Target | None:
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        inner = _BY_PATH.get((group, version, rest[2]))
        if inner is not None and inner.namespaced:
            namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    resource = _BY_PATH.get((group, version, rest[0]))
    if resource is None:
        return None
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if resource.namespaced and namespace is None and name is not None:
        return None  # a namespaced object is only addressable inside its namespace
    if not resource.namespaced and namespace is not None:
        return None
    return Target(resource, namespace, name, sub)


# --- selectors ---------------------------------------------------------------------------

_SET_TERM = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|!=|=)\s*([A-Za-z0-9_.-]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*$")


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # in, notin, exists, !exists (= and == are "in", != is "notin")
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op == "in":
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses: ``a in (x,y),b`` is two terms."""
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t for t in terms if t.strip()]


def parse_label_selector(text: str) -> list[Requirement]:
    requirements = []
    for term in _split_terms(text):
        if match := _SET_TERM.match(term):
            values = frozenset(v.strip() for v in match[3].split(",") if v.strip())
            requirements.append(Requirement(match[1], match[2], values))
        elif match := _EQ_TERM.match(term):
            op = "notin" if match[2] == "!=" else "in"
            requirements.append(Requirement(match[1], op, frozenset({match[3]})))
        elif match := _EXISTS_TERM.match(term):
            requirements.append(Requirement(match[2], "!exists" if match[1] else "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {term.strip()!r}")
    return requirements


def field_value(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse_field_selector(text: str, resource: Resource) -> list[tuple[str, bool, str]]:
    """(field, equal?, value) terms; unknown fields are refused as the API server does."""
    allowed = {"metadata.name", "metadata.namespace", *resource.fields}
    terms = []
    for term in _split_terms(text):
        match = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*?)\s*$", term)
        if match is None:
            raise SelectorError(f"invalid selector: {term.strip()!r}; can't understand it")
        if match[1] not in allowed:
            raise SelectorError(
                f'field label not supported: {match[1]} for "{resource.kind}" objects'
            )
        terms.append((match[1], match[2] != "!=", match[3]))
    return terms


@dataclass(frozen=True)
class Selector:
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, bool, str], ...] = ()

    @classmethod
    def from_query(cls, query: Any, resource: Resource) -> Selector:
        return cls(
            tuple(parse_label_selector(query.get("labelSelector", ""))),
            tuple(parse_field_selector(query.get("fieldSelector", ""), resource)),
        )

    def matches(self, obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        return all((field_value(obj, f) == v) == eq for f, eq, v in self.fields)


# --- Status bodies -----------------------------------------------------------------------


def status_body(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ``metav1.Status`` failure as the API server sends it."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


class ApiError(Exception):
    """Raised inside the fake; answered as a ``Status`` with ``code``."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.body = status_body(code, reason, message, details)
        self.code = code

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.code)


def _details(resource: Resource, name: str | None) -> dict[str, Any]:
    details: dict[str, Any] = {"kind": resource.plural}
    if name:
        details["name"] = name
    if resource.group:
        details["group"] = resource.group
    return details


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{resource.qualified} "{name}" not found', _details(resource, name)
    )


def already_exists(resource: Resource, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{resource.qualified} "{name}" already exists',
        _details(resource, name),
    )


def conflict(resource: Resource, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource.qualified} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        _details(resource, name),
    )


def invalid(resource: Resource, name: str, field: str, problem: str) -> ApiError:
    details = {
        "name": name,
        "group": resource.group,
        "kind": resource.kind,
        "causes": [{"reason": "FieldValueInvalid", "message": problem, "field": field}],
    }
    return ApiError(
        422, "Invalid", f'{resource.kind} "{name}" is invalid: {field}: {problem}', details
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def forbidden(target: Target, verb: str, user: str) -> ApiError:
    r = target.resource
    subject = f'{r.qualified} "{target.name}"' if target.name else r.qualified
    scope = f'in the namespace "{target.namespace}"' if target.namespace else "at the cluster scope"
    message = (
        f'{subject} is forbidden: User "{user}" cannot {verb} resource '
        f'"{target.rbac_resource}" in API group "{r.group}" {scope}'
    )
    return ApiError(403, "Forbidden", message, _details(r, target.name))
