"""The Helm chart charts/snaphook, rendered by the real Helm engine and checked the way a
cluster would check it.

Rendering: helm-python-sdk (Helm v4's Go SDK in a bundled shared library; no helm binary).
Built-in kinds: kubernetes-validate's strict OpenAPI schemas of the newest Kubernetes it
ships. Knative Service/Trigger and ServiceMonitor: the field sets of their API references
(tests/chart_api_refs.py). Values and the schema: tests/test_chart_values.py; RBAC:
tests/test_chart_rbac.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest

from tests import chart_api_refs as refs
from tests.chart_render import (
    CHART,
    FULLNAME,
    NAMESPACE,
    REPO,
    SCENARIOS,
    UID,
    named,
    of_kind,
    pod_specs,
    render,
    render_files,
)

KUBE_VERSION = kubernetes_validate.utils.latest_version()

# Kinds kubernetes-validate cannot know, checked against their API references instead.
CUSTOM = {
    ("serving.knative.dev/v1", "Service"): refs.KNATIVE_SERVICE,
    ("eventing.knative.dev/v1", "Trigger"): refs.TRIGGER,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): refs.SERVICE_MONITOR,
}
HOOK_TYPES = ["backup.pre", "backup.post", "restore.pre", "restore.post"]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


# --- every manifest is valid ----------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_is_valid_for_its_api(chart: helm.Chart, scenario: str) -> None:
    documents = render(chart, SCENARIOS[scenario])
    assert documents
    for doc in documents:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        shape = CUSTOM.get((doc["apiVersion"], doc["kind"]))
        if shape is not None:
            assert list(refs.unknown_fields(doc, shape)) == [], where
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{where} is invalid for Kubernetes {KUBE_VERSION}: {path}: {exc.message}")


def test_lint_is_clean() -> None:
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_packaged_chart_renders_the_same(chart: helm.Chart, tmp_path: Path) -> None:
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        assert render_files(packaged, SCENARIOS["everything"]) == render_files(
            chart, SCENARIOS["everything"]
        )
        # The catalog's generator is a development tool, not part of a release.
        assert not [f for f in packaged.files if f["name"].startswith("hack/")]


def test_default_install_is_a_dispatcher_with_its_state_on_a_volume(chart: helm.Chart) -> None:
    documents = render(chart, {})
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    deployment = named(documents, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 1
    # Two pods must never share one SQLite journal.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["serve", "--config", "/etc/snaphook/config/snaphook.yaml"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SNAPHOOK_HOST"] == "0.0.0.0"
    assert env["SNAPHOOK_STATE_DIR"] == "/var/lib/snaphook"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-state"
    pvc = named(documents, "PersistentVolumeClaim", f"{FULLNAME}-state")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    probes = {
        name: (container[name]["httpGet"]["path"], container[name]["httpGet"]["port"])
        for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/healthz", "http"),
        "livenessProbe": ("/healthz", "http"),
        "readinessProbe": ("/readyz", "http"),
    }
    assert container["resources"]["limits"]["memory"] == "512Mi"
    service = named(documents, "Service", FULLNAME)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    pdb = named(documents, "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_runs_locked_down(chart: helm.Chart, scenario: str) -> None:
    documents = render(chart, SCENARIOS[scenario])
    specs = pod_specs(documents)
    assert specs
    for where, pod in specs:
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["runAsUser"] == UID, where
            assert context["runAsGroup"] == UID, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            # With a read-only root, everything written goes to a volume.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            tmpdir = next((e["value"] for e in container["env"] if e["name"] == "TMPDIR"), "/tmp")
            assert mounts.get(tmpdir) == "tmp", where
            if container["name"] == "snaphook":
                assert mounts["/var/lib/snaphook"] == "state", where
                assert all(
                    m.get("readOnly")
                    for m in container["volumeMounts"]
                    if m["name"] in ("config", "blueprints")
                )
        if "securityContext" in pod:  # Knative takes no pod-level context by default
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["fsGroup"] == UID, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        # No API token unless a function or feature needs the Kubernetes API.
        if scenario in ("default", "knative", "nats-replicas"):
            assert pod["automountServiceAccountToken"] is False, where
    for account in of_kind(documents, "ServiceAccount"):
        if scenario == "default":
            assert account["automountServiceAccountToken"] is False


def test_the_image_user_is_the_one_the_pods_run_as() -> None:
    users = re.findall(r"^USER\s+(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert users[-1] == f"{UID}:{UID}"


# --- Knative ---------------------------------------------------------------------------------


def test_knative_mode_replaces_the_deployment(chart: helm.Chart) -> None:
    documents = render(chart, SCENARIOS["knative"])
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in documents}
    assert ("apps/v1", "Deployment") not in kinds
    assert ("v1", "Service") not in kinds
    assert not of_kind(documents, "PodDisruptionBudget")
    assert not of_kind(documents, "PersistentVolumeClaim")
    service = named(documents, "Service", FULLNAME)
    assert service["apiVersion"] == "serving.knative.dev/v1"
    assert service["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
    template = service["spec"]["template"]
    # Freeze leases need a live dispatcher to expire them: never scale to zero; SQLite: one.
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "1"
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] == "1"
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SNAPHOOK_SINK_URL"] == (
        f"http://broker-ingress.knative-eventing.svc.cluster.local/{NAMESPACE}/default"
    )


@pytest.mark.parametrize("scenario", ["knative", "knative-nats-prefix"])
def test_knative_services_follow_the_runtime_contract(chart: helm.Chart, scenario: str) -> None:
    services = [
        doc
        for doc in render(chart, SCENARIOS[scenario])
        if doc["apiVersion"] == "serving.knative.dev/v1"
    ]
    assert services
    for service in services:
        where = service["metadata"]["name"]
        assert list(refs.unknown_fields(service, refs.KNATIVE_SERVICE)) == [], where
        spec = service["spec"]["template"]["spec"]
        assert spec.get("automountServiceAccountToken", False) is False, where
        (container,) = spec["containers"]
        (port,) = container["ports"]
        assert port["name"] in refs.KNATIVE_PORT_NAMES, where
        assert port["containerPort"] not in refs.KNATIVE_RESERVED_PORTS, where
        assert not refs.KNATIVE_RESERVED_ENV & {e["name"] for e in container["env"]}, where
        for mount in container["volumeMounts"]:
            assert mount["mountPath"] not in refs.KNATIVE_RESERVED_PATHS, where
        for probe in ("livenessProbe", "readinessProbe"):
            assert "port" not in container[probe]["httpGet"], where  # queue-proxy probes it
        annotations = service["spec"]["template"]["metadata"]["annotations"]
        low = int(annotations["autoscaling.knative.dev/min-scale"])
        assert low <= int(annotations["autoscaling.knative.dev/max-scale"]), where


@pytest.mark.parametrize("scenario", ["knative", "knative-nats-prefix"])
def test_triggers_route_exactly_the_hook_events(chart: helm.Chart, scenario: str) -> None:
    documents = render(chart, SCENARIOS[scenario])
    triggers = of_kind(documents, "Trigger")
    assert triggers
    for trigger in triggers:
        assert list(refs.unknown_fields(trigger, refs.TRIGGER)) == []
        assert trigger["spec"]["broker"] == "default"
        assert trigger["spec"]["subscriber"] == {
            "ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": FULLNAME}
        }

    def delivered(event_type: str) -> int:
        event = {"type": event_type, "source": "k10/prod", "specversion": "1.0", "id": "1"}
        return sum(refs.trigger_accepts(t["spec"], event) for t in triggers)

    for hook in HOOK_TYPES:
        assert delivered(f"io.snaphook.{hook}") == 1, hook  # once, not once per Trigger
    for other in (
        "io.snaphook.run.completed",
        "io.snaphook.run.failed",
        "io.snaphook.function.invoke",
        "com.example.backup.pre",
        "io.snaphook",
    ):
        assert delivered(other) == 0, other
    if scenario == "knative-nats-prefix":
        assert [t["spec"]["delivery"] for t in triggers] == [
            {"retry": 5, "backoffPolicy": "exponential", "backoffDelay": "PT1S"}
        ]


# --- ServiceMonitor, NetworkPolicy -----------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_endpoint(chart: helm.Chart) -> None:
    documents = render(chart, SCENARIOS["everything"])
    monitor = named(documents, "ServiceMonitor", FULLNAME)
    assert list(refs.unknown_fields(monitor, refs.SERVICE_MONITOR)) == []
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["scheme"] in refs.SERVICE_MONITOR_SCHEMES
    assert endpoint["scheme"] == "https"  # tls.secretName is set
    for duration in (endpoint["interval"], endpoint["scrapeTimeout"]):
        assert re.match(refs.PROMETHEUS_DURATION, duration)
    service = named(documents, "Service", FULLNAME)
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_network_policies_admit_only_who_needs_in(chart: helm.Chart) -> None:
    default = named(render(chart, {}), "NetworkPolicy", FULLNAME)["spec"]
    assert default["policyTypes"] == ["Ingress"]
    assert default["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]

    documents = render(chart, SCENARIOS["everything"])
    policy = named(documents, "NetworkPolicy", FULLNAME)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    sources = [
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for peer in ingress["from"]
    ]
    assert sources == ["kasten-io", "monitoring"]
    egress_ports = [port["port"] for rule in policy["egress"] for port in rule["ports"]]
    assert egress_ports == [53, 53, "http", 5432]  # DNS, the function hosts, the database
    # A function host receives rendered params, secrets included: only the dispatcher calls.
    host = named(documents, "NetworkPolicy", f"{FULLNAME}-fn-databases")["spec"]
    dispatcher = named(documents, "Deployment", FULLNAME)["spec"]["selector"]["matchLabels"]
    assert host["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": dispatcher}}],
            "ports": [{"port": "http", "protocol": "TCP"}],
        }
    ]


def test_function_hosts_serve_their_functions(chart: helm.Chart) -> None:
    documents = render(chart, SCENARIOS["function-hosts"])
    host = named(documents, "Deployment", f"{FULLNAME}-fn-databases")
    assert host["spec"]["replicas"] == 2
    pod = host["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:4] == ["function", "serve", "--functions", "postgres,mysql.dump"]
    assert pod["serviceAccountName"] == f"{FULLNAME}-fn-databases"
    service = named(documents, "Service", f"{FULLNAME}-fn-databases")
    assert service["spec"]["selector"] == host["spec"]["selector"]["matchLabels"]
    # In Knative mode the hosts are Knative Services that may scale to zero.
    knative = render(chart, SCENARIOS["knative-nats-prefix"])
    kube_host = named(knative, "Service", f"{FULLNAME}-fn-kube")
    assert kube_host["apiVersion"] == "serving.knative.dev/v1"
    annotations = kube_host["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
