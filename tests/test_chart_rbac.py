"""The chart's RBAC is exactly what `snaphook rbac` grants for the same functions and
settings: compared as effective permissions (who may do what where), since the chart binds one
ClusterRole per namespace where `snaphook rbac` writes a Role into each.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.chart_render import (
    CHART,
    FULLNAME,
    FUNCTION_HOSTS,
    NAMESPACE,
    REPO,
    SCENARIOS,
    clean_env,
    hook_blueprints,
    named,
    render,
)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


# --- RBAC: exactly what `snaphook rbac` grants ------------------------------------------------


def snaphook_rbac(*args: str) -> list[dict[str, Any]]:
    """What `snaphook rbac` prints, run as a user would run it."""
    done = subprocess.run(
        [sys.executable, "-c", "from dispatcher.cli import main; main()", "rbac", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


Grant = tuple[str, str, str, str, str]  # namespace (* = all), group, resource, verb, name (*)


def grants(documents: list[dict[str, Any]], account: str) -> set[Grant]:
    """Everything ``account`` (namespace:name) may do through these roles and bindings."""
    roles = {
        (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc.get(
            "rules", []
        )
        for doc in documents
        if doc["kind"] in ("Role", "ClusterRole")
    }
    found: set[Grant] = set()
    for binding in documents:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subjects = {f"{s['namespace']}:{s['name']}" for s in binding["subjects"]}
        if account not in subjects:
            continue
        scope = binding["metadata"].get("namespace", "*")
        ref = binding["roleRef"]
        role_namespace = scope if ref["kind"] == "Role" else None
        for rule in roles[(ref["kind"], role_namespace, ref["name"])]:
            names = rule.get("resourceNames") or ["*"]
            for parts in product(rule["apiGroups"], rule["resources"], rule["verbs"], names):
                found.add((scope, *parts))
    return found


def kube_functions() -> list[str]:
    catalog = yaml.safe_load((CHART / "files" / "rbac.yaml").read_text())
    return sorted(name for name, rules in catalog["functions"].items() if rules)


def test_the_rbac_catalog_is_what_snaphook_rbac_grants_today() -> None:
    done = subprocess.run(
        [sys.executable, str(CHART / "hack" / "rbac_catalog.py")],
        capture_output=True,
        text=True,
        env=clean_env() | {"PYTHONPATH": str(REPO)},
        cwd=REPO,
        check=True,
    )
    assert done.stdout == (CHART / "files" / "rbac.yaml").read_text(), (
        "charts/snaphook/files/rbac.yaml is stale: run "
        ".venv/bin/python charts/snaphook/hack/rbac_catalog.py > charts/snaphook/files/rbac.yaml"
    )


def test_dispatcher_rbac_equals_snaphook_rbac(chart: helm.Chart, tmp_path: Path) -> None:
    functions = [*kube_functions()[:3], "postgres.freeze", "notify.slack"]
    config = {
        "kube_bindings": True,
        "kube_watch": False,
        "kube_binding_kinds": ["StatefulSet", "pod"],
        "kube_secrets": True,
        "kube_secret_allow": ["pg-creds", "shop/s3-keys", "shop/other", "db/tls-*", "*/x"],
    }
    values = {
        "config": config,
        "rbac": {
            "functions": functions,
            "fromBlueprints": False,
            "namespaces": ["shop", "db"],
            "tokenReview": True,
        },
    }
    chart_grants = grants(render(chart, values), f"{NAMESPACE}:{FULLNAME}")
    config_file = tmp_path / "snaphook.yaml"
    config_file.write_text(yaml.safe_dump(config | {"auth": {"tokenreview": {"enabled": True}}}))
    printed = snaphook_rbac(
        "--config",
        str(config_file),
        "--functions",
        ",".join(functions),
        "--namespace",
        "shop,db",
        "--service-account",
        f"{NAMESPACE}:{FULLNAME}",
    )
    assert chart_grants == grants(printed, f"{NAMESPACE}:{FULLNAME}")
    assert ("*", "authentication.k8s.io", "tokenreviews", "create", "*") in chart_grants
    assert ("shop", "", "secrets", "get", "s3-keys") in chart_grants
    assert ("db", "", "secrets", "get", "*") in chart_grants  # "db/tls-*": a glob, all of db
    assert ("*", "", "secrets", "get", "x") in chart_grants  # "*/x": x in every namespace


def test_rbac_follows_the_blueprints_like_snaphook_rbac(chart: helm.Chart, tmp_path: Path) -> None:
    blueprints = hook_blueprints()
    values = {"blueprints": blueprints, "rbac": {"namespaces": ["shop"]}}
    documents = render(chart, values)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for name, text in blueprints.items():
        (hooks / f"{name}.yaml").write_text(text)
    printed = snaphook_rbac(
        "--hooks", str(hooks), "--namespace", "shop", "--service-account", f"{NAMESPACE}:{FULLNAME}"
    )
    account = f"{NAMESPACE}:{FULLNAME}"
    assert grants(documents, account) == grants(printed, account)
    deployment = named(documents, "Deployment", FULLNAME)
    needs_api = bool(grants(printed, account))
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is needs_api


def test_function_host_rbac_equals_snaphook_rbac(chart: helm.Chart) -> None:
    documents = render(chart, SCENARIOS["function-hosts"])
    for host in FUNCTION_HOSTS["hosts"]:
        account = f"{NAMESPACE}:{FULLNAME}-fn-{host['name']}"
        catalog = yaml.safe_load((CHART / "files" / "rbac.yaml").read_text())["functions"]
        names = [
            n for n in catalog if any(n == e or n.startswith(f"{e}.") for e in host["functions"])
        ]
        printed = snaphook_rbac(
            "--no-dispatcher", "--functions", ",".join(names), "--service-account", account
        )
        assert grants(documents, account) == grants(printed, account), host["name"]
    # The dispatcher does not get what the hosts run for it.
    assert grants(documents, f"{NAMESPACE}:{FULLNAME}") == set()
