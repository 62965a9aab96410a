"""Rendering the Helm chart charts/snaphook for tests: the scenarios (values) the chart tests
share, and helpers that turn an install into manifests the way `helm template` prints them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "snaphook"
HOOKS = REPO / "hooks"
NAMESPACE = "backup"
RELEASE = "snap"
FULLNAME = "snap-snaphook"
UID = 65532


def hook_blueprints() -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(HOOKS.glob("*.yaml"))}


FUNCTION_HOSTS = {
    "enabled": True,
    "hosts": [
        {
            "name": "databases",
            "functions": ["postgres", "mysql.dump"],
            "replicas": 2,
            "existingSecret": "db-dump-credentials",
        },
        {"name": "kube", "functions": ["kube"], "minScale": 0, "maxScale": 3},
    ],
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "knative": {"knative": {"enabled": True}},
    "knative-nats-prefix": {
        "backend": "nats",
        "knative": {
            "enabled": True,
            "filterMode": "prefix",
            "maxScale": 3,
            "delivery": {"retry": 5, "backoffPolicy": "exponential", "backoffDelay": "PT1S"},
        },
        "functionHost": FUNCTION_HOSTS,
    },
    "function-hosts": {"functionHost": FUNCTION_HOSTS},
    "nats-replicas": {
        "backend": "nats",
        "replicas": 3,
        "nats": {"url": "nats://nats.nats.svc:4222", "streamReplicas": 3},
        "podDisruptionBudget": {"minAvailable": 2},
    },
    "everything": {
        "blueprints": hook_blueprints(),
        "existingSecret": "snaphook-env",
        "env": {"SNAPHOOK_S3_ENDPOINT_URL": "http://minio.minio.svc:9000"},
        "extraEnv": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
        ],
        "tls": {"secretName": "snaphook-tls"},
        "image": {"digest": "sha256:" + "ab" * 32},
        "persistence": {"storageClass": "fast-ssd", "size": "5Gi"},
        "config": {
            "bindings": [{"blueprint": "postgres-consistent", "match": {"namespace": "shop"}}],
            "kube_bindings": True,
            "kube_secrets": True,
            "kube_secret_allow": ["pg-creds", "shop/s3-keys"],
        },
        "rbac": {"functions": ["kube.scale"], "namespaces": ["shop", "db"], "tokenReview": True},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {
            "ingressFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kasten-io"}}}
            ],
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "egress": {
                "restrict": True,
                "rules": [
                    {
                        "to": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": "shop"}
                                }
                            }
                        ],
                        "ports": [{"port": 5432, "protocol": "TCP"}],
                    }
                ],
            },
        },
        "functionHost": FUNCTION_HOSTS,
    },
}


def render_files(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {path: text for path, text in files.items() if not path.endswith("NOTES.txt")}


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifests of an install, as `helm template` would print them."""
    documents = []
    for _, text in sorted(render_files(chart, values).items()):
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


def named(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in of_kind(documents, kind) if doc["metadata"]["name"] == name]
    return found


def pod_specs(documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload: Deployments and Knative Services."""
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
        for doc in documents
        if doc["kind"] in ("Deployment", "Service") and "template" in doc.get("spec", {})
    ]


def clean_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("SNAPHOOK_")}
