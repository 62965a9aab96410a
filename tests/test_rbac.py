"""``snaphook rbac``: least-privilege roles from settings and the functions' declared rules;
stable output that the Kubernetes schema accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from dispatcher.cli import main
from dispatcher.rbac import Rule, merge_rules, rbac_manifests, select_functions, to_yaml
from dispatcher.settings import Settings
from functions.sdk import Context, FunctionRegistry, FunctionSpec, KubeRule, function
from tests.conftest import write_blueprints

K8S_VERSION = kubernetes_validate.latest_version()


class Empty(BaseModel):
    pass


def registry() -> FunctionRegistry:
    functions = FunctionRegistry()

    @function("lab.exec", registry=functions, rbac=[KubeRule(("",), ("pods",), ("list",))])
    async def exec_(ctx: Context, p: Empty) -> None: ...

    @function(
        "lab.exec2",
        registry=functions,
        rbac=[
            KubeRule(("",), ("pods/exec",), ("create",)),
            KubeRule(("",), ("pods",), ("get", "list")),
        ],
    )
    async def exec2(ctx: Context, p: Empty) -> None: ...

    @function(
        "lab.scale",
        registry=functions,
        rbac=[KubeRule(("apps",), ("statefulsets", "deployments"), ("patch", "get"))],
    )
    async def scale(ctx: Context, p: Empty) -> None: ...

    @function("lab.plain", registry=functions)
    async def plain(ctx: Context, p: Empty) -> None: ...

    return functions


def specs(*names: str) -> list[FunctionSpec]:
    functions = registry()
    return [spec for name in names if (spec := functions.get(name)) is not None]


def settings(**values: Any) -> Settings:
    return Settings.load(None, **values)


def valid(documents: list[dict[str, Any]]) -> None:
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_rules_merge_into_a_union_with_canonical_verb_order() -> None:
    merged = merge_rules(
        [
            KubeRule(("",), ("pods",), ("list",)),
            KubeRule(("",), ("pods",), ("get", "list")),
            KubeRule(("",), ("services",), ("list", "get")),
            KubeRule(("apps",), ("statefulsets",), ("watch", "patch", "get")),
            Rule(("",), ("secrets",), ("get",), ("b", "a")),
        ]
    )
    assert merged == [
        Rule(("",), ("pods", "services"), ("get", "list")),
        Rule(("",), ("secrets",), ("get",), ("b", "a")),
        Rule(("apps",), ("statefulsets",), ("get", "watch", "patch")),
    ]


EXPECTED = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: snaphook-dispatcher
  labels: {app.kubernetes.io/name: snaphook}
  annotations: {snaphook.io/for: the dispatcher}
rules:
- apiGroups: ['']
  resources: [namespaces]
  verbs: [get, list, watch]
- apiGroups: ['']
  resources: [secrets]
  resourceNames: [mongo-creds]
  verbs: [get]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch]
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: snaphook-dispatcher
  labels: {app.kubernetes.io/name: snaphook}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: snaphook-dispatcher}
subjects:
- {kind: ServiceAccount, name: hooks, namespace: backup}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: snaphook-secrets
  namespace: shop
  labels: {app.kubernetes.io/name: snaphook}
  annotations: {snaphook.io/for: Secrets read by secret()}
rules:
- apiGroups: ['']
  resources: [secrets]
  resourceNames: [pg]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: snaphook-secrets
  namespace: shop
  labels: {app.kubernetes.io/name: snaphook}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: snaphook-secrets}
subjects:
- {kind: ServiceAccount, name: hooks, namespace: backup}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: snaphook-functions
  namespace: db
  labels: {app.kubernetes.io/name: snaphook}
  annotations: {snaphook.io/for: 'hook functions: lab.exec, lab.exec2'}
rules:
- apiGroups: ['']
  resources: [pods]
  verbs: [get, list]
- apiGroups: ['']
  resources: [pods/exec]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: snaphook-functions
  namespace: db
  labels: {app.kubernetes.io/name: snaphook}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: snaphook-functions}
subjects:
- {kind: ServiceAccount, name: hooks, namespace: backup}
"""


def test_least_privilege_roles_for_dispatcher_secrets_and_functions() -> None:
    manifests = rbac_manifests(
        settings(
            kube_bindings=True,
            kube_binding_kinds=["StatefulSet"],
            kube_secrets=True,
            kube_secret_allow=["mongo-creds", "shop/pg"],
            auth={"tokenreview": {"enabled": True}},
        ),
        specs("lab.exec", "lab.exec2", "lab.plain"),
        namespaces=["db"],
        service_account=("backup", "hooks"),
    )
    assert to_yaml(manifests.documents) == EXPECTED  # stable: the Helm chart diffs it
    assert manifests.warnings == []
    valid(manifests.documents)


def test_defaults_need_nothing_and_say_so() -> None:
    manifests = rbac_manifests(settings(), specs("lab.plain"))
    assert manifests.documents == []
    assert manifests.warnings == [
        "nothing to grant: no feature or function needs the Kubernetes API"
    ]


def test_get_only_without_watch_and_cluster_wide_functions_without_namespaces() -> None:
    manifests = rbac_manifests(
        settings(kube_bindings=True, kube_watch=False, kube_binding_kinds=["Deployment"]),
        specs("lab.scale"),
    )
    valid(manifests.documents)
    kinds = [(d["kind"], d["metadata"]["name"]) for d in manifests.documents]
    assert kinds == [
        ("ClusterRole", "snaphook-dispatcher"),
        ("ClusterRoleBinding", "snaphook-dispatcher"),
        ("ClusterRole", "snaphook-functions"),
        ("ClusterRoleBinding", "snaphook-functions"),
    ]
    dispatcher, functions = manifests.documents[0], manifests.documents[2]
    assert {tuple(r["verbs"]) for r in dispatcher["rules"]} == {("get",)}
    assert functions["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments", "statefulsets"],
            "verbs": ["get", "patch"],
        }
    ]
    assert manifests.warnings == [
        "no --namespace: the functions' rules are granted in every namespace"
    ]


def test_secret_globs_widen_the_grant_and_warn() -> None:
    manifests = rbac_manifests(
        settings(kube_secrets=True, kube_secret_allow=["db/app-*", "*/s3", "*-creds"]),
        [],
        include_dispatcher=True,
    )
    valid(manifests.documents)
    by_name = {(d["kind"], d["metadata"].get("namespace")): d for d in manifests.documents}
    cluster_rules = by_name[("ClusterRole", None)]["rules"]
    # "*-creds" needs every Secret everywhere; "*/s3" (folded into it) would be s3 only.
    assert cluster_rules == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    assert by_name[("Role", "db")]["rules"] == cluster_rules  # app-*: every Secret in db
    assert manifests.warnings == [
        "kube_secret_allow 'db/app-*': RBAC cannot match names by glob, the grant covers "
        "every Secret in namespace db",
        "kube_secret_allow '*/s3': RBAC cannot match namespaces by glob, the grant covers "
        "every namespace",
        "kube_secret_allow '*-creds': RBAC cannot match names by glob, the grant covers "
        "every Secret in every namespace",
    ]


def test_functions_default_to_those_the_blueprints_call(tmp_path: Path) -> None:
    write_blueprints(
        tmp_path / "hooks",
        {
            "bp": """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: bp}
spec:
  actions:
    backup.pre:
      - name: lock
        function: lab.exec
        lease: {ttl: 1m, release: lab.exec2}
""",
        },
    )
    functions = registry()
    chosen = select_functions(settings(hooks=tmp_path / "hooks"), functions, None)
    assert [s.name for s in chosen] == ["lab.exec", "lab.exec2"]
    assert [s.name for s in select_functions(settings(), functions, "all")] == [
        "lab.exec",
        "lab.exec2",
        "lab.plain",
        "lab.scale",
    ]
    with pytest.raises(Exception, match=r"--functions: unknown function\(s\): lab.nope"):
        select_functions(settings(), functions, "lab.exec, lab.nope")


def test_functions_on_function_hosts_are_not_granted_to_the_dispatcher(tmp_path: Path) -> None:
    # Their rules belong to the host's service account (`snaphook rbac --no-dispatcher`).
    write_blueprints(
        tmp_path / "hooks",
        {
            "bp": """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: bp}
spec:
  actions:
    backup.pre:
      - name: lock
        function: lab.exec
        lease: {ttl: 1m, release: lab.exec2}
      - name: stop
        function: lab.scale
        invoke: {url: "https://functions.example/"}
    backup.post:
      - name: again
        function: lab.exec2
""",
        },
    )
    functions = registry()
    hosted = settings(hooks=tmp_path / "hooks", remote_functions={"lab.exec*": "https://h/"})
    assert select_functions(hosted, functions, None) == []
    routed = settings(hooks=tmp_path / "hooks", remote_functions={"lab.exec2": "https://h/"})
    assert [s.name for s in select_functions(routed, functions, None)] == ["lab.exec"]
    local = settings(hooks=tmp_path / "hooks")
    assert [s.name for s in select_functions(local, functions, None)] == ["lab.exec", "lab.exec2"]
    # For a function host's own account (--no-dispatcher): every function the blueprints call.
    every = select_functions(hosted, functions, None, dispatcher=False)
    assert [s.name for s in every] == ["lab.exec", "lab.exec2", "lab.scale"]


def test_cli_prints_yaml_and_reports_bad_input(tmp_path: Path) -> None:
    config = tmp_path / "snaphook.yaml"
    config.write_text("kube_bindings: true\nkube_binding_kinds: [StatefulSet]\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["rbac", "--config", str(config), "--functions", "notify.log", "--namespace", "db,shop"],
    )
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(result.stdout))
    valid(documents)
    assert [d["kind"] for d in documents] == ["ClusterRole", "ClusterRoleBinding"]

    unknown = runner.invoke(main, ["rbac", "--functions", "no.such"])
    assert unknown.exit_code == 1
    assert "unknown function(s): no.such" in unknown.stderr
    account = runner.invoke(main, ["rbac", "--service-account", "nocolon"])
    assert account.exit_code == 2
    assert "--service-account must be namespace:name" in account.stderr
