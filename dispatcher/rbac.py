"""``snaphook rbac``: least-privilege Kubernetes RBAC for a dispatcher and its functions.

Two sources of needs:

the dispatcher itself
    by settings — ``auth.tokenreview`` creates TokenReviews; ``kube_bindings`` gets (and,
    with ``kube_watch``, lists and watches) Namespaces and the ``kube_binding_kinds`` across
    the cluster; ``kube_secrets`` gets the Secrets ``kube_secret_allow`` names, by
    ``resourceNames`` where the entry is a plain name (a glob cannot be narrowed: it grants
    get on every Secret in its scope, and a warning says so).
the hook functions
    each :class:`functions.sdk.FunctionSpec` declares the rules it needs (``rbac=``); the
    functions are those the blueprints use, or a given list. With namespaces given they are
    granted by a Role in each namespace, else by a ClusterRole (every namespace).

Every role comes with its binding to the service account. The output is deterministic
(sorted rules, canonical verb order) so that the Helm chart and reviews can diff it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from dispatcher.blueprint_loader import load_blueprints
from dispatcher.blueprints import BlueprintSet, InvokeSpec
from dispatcher.errors import BlueprintError, SnaphookError
from dispatcher.invokers.routing import Routes
from dispatcher.kube import NAMESPACES, SECRETS, WORKLOADS, Resource
from dispatcher.secrets import EnvSecretResolver
from dispatcher.settings import Settings
from dispatcher.templating import TemplateEngine
from functions.sdk import FunctionRegistry, FunctionSpec, KubeRule

__all__ = [
    "Manifests",
    "Rule",
    "functions_used",
    "merge_rules",
    "rbac_manifests",
    "select_functions",
    "to_yaml",
]

RBAC_API = "rbac.authorization.k8s.io/v1"
_VERB_ORDER = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
_GLOB = frozenset("*?[")


@dataclass(frozen=True)
class Rule:
    """A ``PolicyRule``; ``resource_names`` empty means every object of the resources."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    resource_names: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        rule: dict[str, Any] = {
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
        }
        if self.resource_names:
            rule["resourceNames"] = list(self.resource_names)
        rule["verbs"] = list(self.verbs)
        return rule


@dataclass(frozen=True)
class Manifests:
    documents: list[dict[str, Any]]
    warnings: list[str]


def _verb_key(verb: str) -> tuple[int, str]:
    return (_VERB_ORDER.index(verb) if verb in _VERB_ORDER else len(_VERB_ORDER), verb)


def merge_rules(rules: Iterable[KubeRule | Rule]) -> list[Rule]:
    """One rule per (API group, verbs, names): the union of what ``rules`` grant."""
    verbs: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    for rule in rules:
        names = rule.resource_names if isinstance(rule, Rule) else ()
        for group in rule.api_groups:
            for resource in rule.resources:
                verbs.setdefault((group, resource, names), set()).update(rule.verbs)
    grouped: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[str]] = {}
    for (group, resource, names), granted in verbs.items():
        ordered = tuple(sorted(granted, key=_verb_key))
        grouped.setdefault((group, ordered, names), []).append(resource)
    merged = [
        Rule((group,), tuple(sorted(resources)), ordered, names)
        for (group, ordered, names), resources in grouped.items()
    ]
    return sorted(merged, key=lambda r: (r.api_groups, r.resources, r.resource_names, r.verbs))


def functions_used(blueprints: BlueprintSet, routes: Routes | None = None) -> list[str]:
    """Every function a blueprint step or lease release calls, sorted; with ``routes``
    (``remote_functions``), only those that run in this process: not a step's with its own
    ``invoke`` URL, nor any routed to a function host (whose service account needs the
    rules instead)."""

    def here(function: str, invoke: InvokeSpec | None = None) -> bool:
        return routes is None or (invoke is None and routes.url_for(function) is None)

    names: set[str] = set()
    for name in blueprints.names():
        blueprint = blueprints.get(name)
        assert blueprint is not None
        for steps in blueprint.spec.actions.values():
            for step in steps:
                if here(step.function, step.invoke):
                    names.add(step.function)
                # A release goes through routing only (it has no invoke of its own).
                if step.lease is not None and here(step.lease.release.function):
                    names.add(step.lease.release.function)
    return sorted(names)


def _resource_rule(resources: Sequence[Resource], verbs: Sequence[str]) -> list[Rule]:
    return [Rule((r.group,), (r.plural,), tuple(verbs)) for r in resources]


def dispatcher_rules(settings: Settings) -> list[Rule]:
    """Cluster-wide rules the dispatcher's own features need (Secrets by name included)."""
    rules: list[Rule] = []
    if settings.auth.tokenreview.enabled:
        rules.append(Rule(("authentication.k8s.io",), ("tokenreviews",), ("create",)))
    if settings.kube_bindings:
        verbs = ("get", "list", "watch") if settings.kube_watch else ("get",)
        kinds = [WORKLOADS[kind.lower()] for kind in settings.kube_binding_kinds]
        rules += _resource_rule([NAMESPACES, *kinds], verbs)
    return rules


def _secret_scopes(settings: Settings) -> tuple[dict[str | None, set[str] | None], list[str]]:
    """Namespace (None: every namespace) → Secret names (None: all of them), and warnings."""
    scopes: dict[str | None, set[str] | None] = {}
    warnings: list[str] = []
    if not settings.kube_secrets:
        return scopes, warnings
    for pattern in settings.kube_secret_allow:
        namespace, _, name = pattern.rpartition("/")
        scope: str | None = namespace or None
        if scope is not None and _GLOB & set(scope):
            warnings.append(
                f"kube_secret_allow {pattern!r}: RBAC cannot match namespaces by glob, "
                "the grant covers every namespace"
            )
            scope = None
        if _GLOB & set(name):
            where = f"namespace {scope}" if scope else "every namespace"
            warnings.append(
                f"kube_secret_allow {pattern!r}: RBAC cannot match names by glob, "
                f"the grant covers every Secret in {where}"
            )
            scopes[scope] = None
            continue
        names = scopes.setdefault(scope, set())
        if names is not None:
            names.add(name)
    if not settings.kube_secret_allow:
        warnings.append("kube_secrets is on but kube_secret_allow is empty: no Secret is read")
    return scopes, warnings


def _secret_rule(names: set[str] | None) -> Rule:
    return Rule((SECRETS.group,), (SECRETS.plural,), ("get",), tuple(sorted(names or ())))


def rbac_manifests(
    settings: Settings,
    functions: Sequence[FunctionSpec],
    *,
    namespaces: Sequence[str] = (),
    service_account: tuple[str, str] = ("snaphook", "snaphook"),
    name: str = "snaphook",
    include_dispatcher: bool = True,
) -> Manifests:
    """Roles and bindings granting exactly what the settings and ``functions`` need."""
    subject = {
        "kind": "ServiceAccount",
        "name": service_account[1],
        "namespace": service_account[0],
    }
    documents: list[dict[str, Any]] = []
    warnings: list[str] = []

    def grant(role_name: str, rules: list[Rule], namespace: str | None, why: str) -> None:
        if rules:
            documents.extend(_role_and_binding(role_name, rules, namespace, subject, why))

    if include_dispatcher:
        scopes, warnings = _secret_scopes(settings)
        cluster_rules = dispatcher_rules(settings)
        if None in scopes:
            cluster_rules.append(_secret_rule(scopes.pop(None)))
        grant(f"{name}-dispatcher", merge_rules(cluster_rules), None, "the dispatcher")
        for namespace in sorted(scopes, key=str):
            secrets = [_secret_rule(scopes[namespace])]
            grant(f"{name}-secrets", secrets, namespace, "Secrets read by secret()")
    function_rules = merge_rules(rule for spec in functions for rule in spec.rbac)
    used = ", ".join(sorted(spec.name for spec in functions if spec.rbac))
    why = f"hook functions: {used}"
    if namespaces:
        for namespace in sorted(set(namespaces)):
            grant(f"{name}-functions", function_rules, namespace, why)
    else:
        grant(f"{name}-functions", function_rules, None, why)
        if function_rules:
            warnings.append("no --namespace: the functions' rules are granted in every namespace")
    if not documents:
        warnings.append("nothing to grant: no feature or function needs the Kubernetes API")
    return Manifests(documents, warnings)


def _role_and_binding(
    role_name: str,
    rules: list[Rule],
    namespace: str | None,
    subject: dict[str, str],
    why: str,
) -> list[dict[str, Any]]:
    kind = "Role" if namespace else "ClusterRole"
    metadata: dict[str, Any] = {"name": role_name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = {"app.kubernetes.io/name": "snaphook"}
    metadata["annotations"] = {"snaphook.io/for": why}
    role = {
        "apiVersion": RBAC_API,
        "kind": kind,
        "metadata": metadata,
        "rules": [rule.to_json() for rule in rules],
    }
    binding = {
        "apiVersion": RBAC_API,
        "kind": f"{kind}Binding",
        "metadata": {k: v for k, v in metadata.items() if k != "annotations"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role_name},
        "subjects": [subject],
    }
    return [role, binding]


def to_yaml(documents: Sequence[dict[str, Any]]) -> str:
    """The documents as one YAML stream, keys in the order built (kubectl's order)."""
    return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=None, width=100)


def select_functions(
    settings: Settings, registry: FunctionRegistry, names: str | None, *, dispatcher: bool = True
) -> list[FunctionSpec]:
    """``names`` (comma-separated), ``all`` registered functions, or by default every
    function the blueprints in ``settings.hooks`` call: for the ``dispatcher``, only those
    it runs itself (not on function hosts). Unknown names are an error."""
    if names is None:
        engine = TemplateEngine(EnvSecretResolver())
        routes = Routes(settings.remote_functions) if dispatcher else None
        try:
            blueprints = load_blueprints(settings.hooks, registry, engine=engine)
            wanted = functions_used(blueprints, routes)
        except BlueprintError as exc:
            raise SnaphookError(f"cannot load the blueprints (use --functions): {exc}") from None
    elif names.strip() == "all":
        wanted = registry.names()
    else:
        wanted = sorted({n.strip() for n in names.split(",") if n.strip()})
        unknown = [n for n in wanted if n not in registry]
        if unknown:
            raise SnaphookError(f"--functions: unknown function(s): {', '.join(unknown)}")
    return [spec for n in wanted if (spec := registry.get(n)) is not None]
