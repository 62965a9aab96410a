"""Field sets of the custom resources the chart renders, taken from their published API
references, and a checker that walks a rendered object against them.

kubernetes-validate knows the built-in kinds only; for Knative and the Prometheus Operator
these shapes stand in for the CRD schemas a cluster would enforce:

- Knative Serving ``serving.knative.dev/v1`` Service: the Serving API reference
  (https://knative.dev/docs/serving/reference/serving-api/) — ServiceSpec = ConfigurationSpec
  (template) + RouteSpec (traffic); RevisionSpec = PodSpec + containerConcurrency,
  timeoutSeconds, responseStartTimeoutSeconds, idleTimeoutSeconds — narrowed to the PodSpec
  fields Knative admits with its default feature flags (knative/serving
  pkg/apis/serving/fieldmask.go and k8s_validation.go: reserved paths, env vars, ports).
- Knative Eventing ``eventing.knative.dev/v1`` Trigger: the Eventing API reference
  (https://knative.dev/docs/eventing/reference/eventing-api/) — TriggerSpec broker, filter
  (attributes), filters (SubscriptionsAPIFilter: all, any, not, exact, prefix, suffix, cesql),
  subscriber (Destination), delivery (DeliverySpec).
- Prometheus Operator ``monitoring.coreos.com/v1`` ServiceMonitor: the API reference
  (https://prometheus-operator.dev/docs/api-reference/api/#monitoring.coreos.com/v1.ServiceMonitor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

ANY: Any = object()  # any value


@dataclass(frozen=True)
class MapOf:
    """A mapping with free keys whose values all follow ``value``."""

    value: Any


Shape = Any  # ANY | dict[str, Shape] | list[Shape] (one item shape) | MapOf | Callable[[], Shape]


def unknown_fields(obj: Any, shape: Shape, path: str = "") -> Iterator[str]:
    """Paths in ``obj`` that ``shape`` does not allow (wrong container type included)."""
    if callable(shape) and not isinstance(shape, MapOf):
        shape = shape()
    if shape is ANY:
        return
    if isinstance(shape, MapOf):
        if not isinstance(obj, dict):
            yield f"{path}: expected a mapping"
            return
        for key, value in obj.items():
            yield from unknown_fields(value, shape.value, f"{path}.{key}")
    elif isinstance(shape, dict):
        if not isinstance(obj, dict):
            yield f"{path}: expected a mapping"
            return
        for key, value in obj.items():
            if key not in shape:
                yield f"{path}.{key}"
            else:
                yield from unknown_fields(value, shape[key], f"{path}.{key}")
    elif isinstance(shape, list):
        if not isinstance(obj, list):
            yield f"{path}: expected a list"
            return
        for index, item in enumerate(obj):
            yield from unknown_fields(item, shape[0], f"{path}[{index}]")


OBJECT_META = {
    "name": ANY,
    "namespace": ANY,
    "labels": MapOf(ANY),
    "annotations": MapOf(ANY),
}

# --- Knative Serving -------------------------------------------------------------------
KEY_TO_PATH = {"key": ANY, "path": ANY, "mode": ANY}
KNATIVE_VOLUME = {
    "name": ANY,
    "secret": {"secretName": ANY, "items": [KEY_TO_PATH], "defaultMode": ANY, "optional": ANY},
    "configMap": {"name": ANY, "items": [KEY_TO_PATH], "defaultMode": ANY, "optional": ANY},
    "projected": ANY,
    "emptyDir": {"medium": ANY, "sizeLimit": ANY},  # kubernetes.podspec-volumes-emptydir: Enabled
}
KNATIVE_PROBE = {
    "httpGet": {"host": ANY, "path": ANY, "scheme": ANY, "httpHeaders": ANY, "port": ANY},
    "tcpSocket": {"host": ANY, "port": ANY},
    "exec": {"command": ANY},
    "grpc": ANY,
    "initialDelaySeconds": ANY,
    "timeoutSeconds": ANY,
    "periodSeconds": ANY,
    "successThreshold": ANY,
    "failureThreshold": ANY,
}
KNATIVE_SECURITY_CONTEXT = {
    "capabilities": {"drop": ANY},  # add: only with kubernetes.containerspec-addcapabilities
    "readOnlyRootFilesystem": ANY,
    "runAsUser": ANY,
    "runAsGroup": ANY,
    "runAsNonRoot": ANY,
    "allowPrivilegeEscalation": ANY,
    "seccompProfile": {"type": ANY, "localhostProfile": ANY},
}
KNATIVE_ENV = {
    "name": ANY,
    "value": ANY,
    "valueFrom": {"configMapKeyRef": ANY, "secretKeyRef": ANY},  # fieldRef: feature flag
}
KNATIVE_CONTAINER = {
    "name": ANY,
    "args": ANY,
    "command": ANY,
    "env": [KNATIVE_ENV],
    "workingDir": ANY,
    "envFrom": [{"prefix": ANY, "configMapRef": ANY, "secretRef": {"name": ANY, "optional": ANY}}],
    "image": ANY,
    "imagePullPolicy": ANY,
    "livenessProbe": KNATIVE_PROBE,
    "readinessProbe": KNATIVE_PROBE,
    "ports": [{"containerPort": ANY, "name": ANY, "protocol": ANY}],
    "resources": {"limits": MapOf(ANY), "requests": MapOf(ANY)},
    "securityContext": KNATIVE_SECURITY_CONTEXT,
    "terminationMessagePath": ANY,
    "terminationMessagePolicy": ANY,
    "volumeMounts": [{"name": ANY, "readOnly": ANY, "mountPath": ANY, "subPath": ANY}],
}
KNATIVE_REVISION_SPEC = {
    # The PodSpec fields admitted without feature flags ...
    "serviceAccountName": ANY,
    "containers": [KNATIVE_CONTAINER],
    "volumes": [KNATIVE_VOLUME],
    "imagePullSecrets": [{"name": ANY}],
    "enableServiceLinks": ANY,
    "automountServiceAccountToken": ANY,  # only false (checked separately)
    # ... and the Revision's own.
    "containerConcurrency": ANY,
    "timeoutSeconds": ANY,
    "responseStartTimeoutSeconds": ANY,
    "idleTimeoutSeconds": ANY,
}
KNATIVE_SERVICE = {
    "apiVersion": ANY,
    "kind": ANY,
    "metadata": OBJECT_META,
    "spec": {
        "template": {"metadata": OBJECT_META, "spec": KNATIVE_REVISION_SPEC},
        "traffic": [
            {
                "tag": ANY,
                "revisionName": ANY,
                "configurationName": ANY,
                "latestRevision": ANY,
                "percent": ANY,
                "url": ANY,
            }
        ],
    },
}
# k8s_validation.go: what a user container may not use.
KNATIVE_RESERVED_PATHS = frozenset({"/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"})
KNATIVE_RESERVED_ENV = frozenset({"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"})
KNATIVE_RESERVED_PORTS = frozenset({8012, 8013, 8022, 9090, 9091, 8008})
KNATIVE_PORT_NAMES = frozenset({"", "http1", "h2c"})

# --- Knative Eventing ------------------------------------------------------------------
K_REFERENCE = {
    "kind": ANY,
    "namespace": ANY,
    "name": ANY,
    "apiVersion": ANY,
    "group": ANY,
    "address": ANY,
}
DESTINATION = {"ref": K_REFERENCE, "uri": ANY, "CACerts": ANY, "audience": ANY}


def _filter() -> Shape:
    return SUBSCRIPTIONS_API_FILTER


SUBSCRIPTIONS_API_FILTER = {
    "all": [_filter],
    "any": [_filter],
    "not": _filter,
    "exact": MapOf(ANY),
    "prefix": MapOf(ANY),
    "suffix": MapOf(ANY),
    "cesql": ANY,
}
TRIGGER = {
    "apiVersion": ANY,
    "kind": ANY,
    "metadata": OBJECT_META,
    "spec": {
        "broker": ANY,
        "brokerRef": K_REFERENCE,
        "filter": {"attributes": MapOf(ANY)},
        "filters": [SUBSCRIPTIONS_API_FILTER],
        "subscriber": DESTINATION,
        "delivery": {
            "deadLetterSink": DESTINATION,
            "retry": ANY,
            "timeout": ANY,
            "backoffPolicy": ANY,
            "backoffDelay": ANY,
            "retryAfterMax": ANY,
            "format": ANY,
        },
    },
}


def trigger_accepts(spec: dict[str, Any], attributes: dict[str, str]) -> bool:
    """Whether a Trigger with ``spec`` passes an event with these context attributes, by the
    semantics of the reference: ``filters`` (all must hold) overrides ``filter.attributes``
    (exact match of each; an empty value matches any)."""
    filters = spec.get("filters")
    if filters:
        return all(_passes(f, attributes) for f in filters)
    wanted = (spec.get("filter") or {}).get("attributes") or {}
    return all(
        name in attributes and (value == "" or attributes[name] == value)
        for name, value in wanted.items()
    )


def _passes(expression: dict[str, Any], attributes: dict[str, str]) -> bool:
    checks: list[Callable[[], bool]] = []
    for dialect, argument in expression.items():
        if dialect == "all":
            checks.append(lambda a=argument: all(_passes(f, attributes) for f in a))
        elif dialect == "any":
            checks.append(lambda a=argument: any(_passes(f, attributes) for f in a))
        elif dialect == "not":
            checks.append(lambda a=argument: not _passes(a, attributes))
        elif dialect in ("exact", "prefix", "suffix"):
            # "must contain exactly one property"
            assert len(argument) == 1, f"{dialect} must name exactly one attribute"
            ((name, value),) = argument.items()
            actual = attributes.get(name)
            test = {
                "exact": lambda v, x=value: v == x,
                "prefix": lambda v, x=value: v.startswith(x),
                "suffix": lambda v, x=value: v.endswith(x),
            }[dialect]
            checks.append(lambda a=actual, t=test: a is not None and t(a))
        else:
            raise AssertionError(f"filter dialect {dialect!r} not handled here")
    return all(check() for check in checks)


# --- Prometheus Operator ---------------------------------------------------------------
SAFE_TLS_CONFIG = {
    "ca": ANY,
    "cert": ANY,
    "keySecret": ANY,
    "serverName": ANY,
    "insecureSkipVerify": ANY,
    "minVersion": ANY,
    "maxVersion": ANY,
    "caFile": ANY,
    "certFile": ANY,
    "keyFile": ANY,
}
RELABEL_CONFIG = {
    "sourceLabels": ANY,
    "separator": ANY,
    "targetLabel": ANY,
    "regex": ANY,
    "modulus": ANY,
    "replacement": ANY,
    "action": ANY,
}
SERVICE_MONITOR_ENDPOINT = {
    "port": ANY,
    "targetPort": ANY,
    "path": ANY,
    "scheme": ANY,
    "params": ANY,
    "interval": ANY,
    "scrapeTimeout": ANY,
    "tlsConfig": SAFE_TLS_CONFIG,
    "bearerTokenFile": ANY,
    "bearerTokenSecret": ANY,
    "authorization": ANY,
    "honorLabels": ANY,
    "honorTimestamps": ANY,
    "trackTimestampsStaleness": ANY,
    "basicAuth": ANY,
    "oauth2": ANY,
    "metricRelabelings": [RELABEL_CONFIG],
    "relabelings": [RELABEL_CONFIG],
    "proxyUrl": ANY,
    "noProxy": ANY,
    "proxyFromEnvironment": ANY,
    "proxyConnectHeader": ANY,
    "followRedirects": ANY,
    "enableHttp2": ANY,
    "filterRunning": ANY,
}
SERVICE_MONITOR = {
    "apiVersion": ANY,
    "kind": ANY,
    "metadata": OBJECT_META,
    "spec": {
        "jobLabel": ANY,
        "targetLabels": ANY,
        "podTargetLabels": ANY,
        "endpoints": [SERVICE_MONITOR_ENDPOINT],
        "selector": {"matchLabels": MapOf(ANY), "matchExpressions": ANY},
        "selectorMechanism": ANY,
        "namespaceSelector": {"any": ANY, "matchNames": ANY},
        "sampleLimit": ANY,
        "scrapeProtocols": ANY,
        "fallbackScrapeProtocol": ANY,
        "targetLimit": ANY,
        "labelLimit": ANY,
        "labelNameLengthLimit": ANY,
        "labelValueLengthLimit": ANY,
        "scrapeClassicHistograms": ANY,
        "nativeHistogramBucketLimit": ANY,
        "nativeHistogramMinBucketFactor": ANY,
        "convertClassicHistogramsToNHCB": ANY,
        "keepDroppedTargets": ANY,
        "attachMetadata": ANY,
        "scrapeClass": ANY,
        "bodySizeLimit": ANY,
        "serviceDiscoveryRole": ANY,
    },
}
# Endpoint.scheme and the Duration pattern of interval/scrapeTimeout in the reference.
SERVICE_MONITOR_SCHEMES = frozenset({"http", "https", "HTTP", "HTTPS"})
PROMETHEUS_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
