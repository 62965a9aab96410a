"""What the chart's values become: the config file and blueprints the dispatcher loads,
secrets kept out of the manifests, deterministic output, and values.schema.json with the
template checks refusing bad values with a message naming the value and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from dispatcher.cli import main as snaphook_cli
from dispatcher.settings import Settings
from tests.chart_render import (
    CHART,
    FULLNAME,
    HOOKS,
    NAMESPACE,
    SCENARIOS,
    clean_env,
    hook_blueprints,
    named,
    of_kind,
    render,
    render_files,
)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


# --- values and what they turn into ---------------------------------------------------------


def test_blueprint_configmap_holds_the_blueprints_given(chart: helm.Chart) -> None:
    blueprints = hook_blueprints()
    documents = render(chart, {"blueprints": blueprints})
    configmap = named(documents, "ConfigMap", f"{FULLNAME}-blueprints")
    assert configmap["data"] == {f"{name}.yaml": text for name, text in blueprints.items()}
    # A blueprint may also be given as a mapping; it is written as YAML of the same content.
    demo = yaml.safe_load((HOOKS / "examples" / "demo.yaml").read_text())
    configmap = named(
        render(chart, {"blueprints": {"demo": demo}}), "ConfigMap", f"{FULLNAME}-blueprints"
    )
    assert yaml.safe_load(configmap["data"]["demo.yaml"]) == demo


def mount(configmap: dict[str, Any], directory: Path) -> None:
    """A ConfigMap volume as the kubelet writes it: the files in a hidden timestamped
    directory, ``..data`` linking to it, and one link per key (so that an update is atomic)."""
    payload = directory / "..2025_01_01_00_00_00.000000001"
    payload.mkdir(parents=True)
    (directory / "..data").symlink_to(payload.name)
    for key, text in configmap["data"].items():
        (payload / key).write_text(text)
        (directory / key).symlink_to(f"..data/{key}")


def write_mounts(documents: list[dict[str, Any]], root: Path) -> tuple[Path, Path]:
    """The two ConfigMaps mounted where the pod has them: config file and hooks directory."""
    mount(named(documents, "ConfigMap", f"{FULLNAME}-config"), root / "config")
    mount(named(documents, "ConfigMap", f"{FULLNAME}-blueprints"), root / "hooks")
    return root / "config" / "snaphook.yaml", root / "hooks"


def test_the_dispatcher_accepts_the_rendered_config_and_blueprints(
    chart: helm.Chart, tmp_path: Path
) -> None:
    values = SCENARIOS["everything"]
    config_file, hooks = write_mounts(render(chart, values), tmp_path)
    settings = Settings.load(config_file)
    assert settings.kube_secret_allow == ["pg-creds", "shop/s3-keys"]
    assert [b.blueprint for b in settings.bindings] == ["postgres-consistent"]
    # Function hosts are wired in: their functions go to them over HTTP.
    host = f"http://{FULLNAME}-fn-databases.{NAMESPACE}.svc:80"
    assert settings.remote_functions == {
        "postgres.*": host,
        "mysql.dump": host,
        "kube.*": f"http://{FULLNAME}-fn-kube.{NAMESPACE}.svc:80",
    }
    # `snaphook validate` on the mounted files, as the pod would load them.
    result = CliRunner().invoke(
        snaphook_cli, ["validate", str(hooks), "--config", str(config_file)], env=clean_env()
    )
    assert result.exit_code == 0, result.output


def test_secrets_are_referenced_never_rendered(chart: helm.Chart) -> None:
    documents = render(chart, SCENARIOS["everything"])
    assert of_kind(documents, "Secret") == []
    deployment = named(documents, "Deployment", FULLNAME)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "snaphook-env"}}]
    tls = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls[0]["secret"]["secretName"] == "snaphook-tls"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    host = named(documents, "Deployment", f"{FULLNAME}-fn-databases")
    (host_container,) = host["spec"]["template"]["spec"]["containers"]
    assert host_container["envFrom"] == [{"secretRef": {"name": "db-dump-credentials"}}]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"config": {"auth": {"principals": []}}}, "config.auth: holds webhook keys"),
        ({"config": {"remote_token": "t0ken"}}, "config.remote_token: is a secret"),
        ({"config": {"function_token": "t0ken"}}, "config.function_token: is a secret"),
        (
            {"env": {"SNAPHOOK_SECRET_PG_CREDS_DSN": "postgres://u:pw@db"}},
            "env.SNAPHOOK_SECRET_PG_CREDS_DSN",
        ),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "abc"}}, "env.AWS_SECRET_ACCESS_KEY: a secret must not"),
        (
            {
                "functionHost": {
                    "enabled": True,
                    "hosts": [
                        {"name": "a", "functions": ["s3"], "env": {"SNAPHOOK_FUNCTION_TOKEN": "x"}}
                    ],
                }
            },
            "functionHost.hosts[a].env.SNAPHOOK_FUNCTION_TOKEN",
        ),
    ],
)
def test_secret_values_are_refused(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render(chart, values)
    assert message in str(caught.value)
    assert "existingSecret" in str(caught.value)


def test_secret_settings_are_all_refused_in_config(chart: helm.Chart) -> None:
    """Every setting typed SecretStr (and auth, which holds keys) is kept out of the
    ConfigMap, including ones added to the dispatcher later."""
    secret_fields = [
        name
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation) or name == "auth"
    ]
    assert secret_fields
    for name in secret_fields:
        with pytest.raises(helm.HelmRenderError, match=f"config.{name}: "):
            render(chart, {"config": {name: "x"}})


def test_rendering_is_deterministic(chart: helm.Chart) -> None:
    values = SCENARIOS["everything"]
    first = render_files(chart, values)
    assert render_files(chart, values) == first
    # The order values are given in does not matter either.
    reordered = dict(reversed(list(values.items())))
    reordered["blueprints"] = dict(reversed(list(values["blueprints"].items())))
    assert render_files(chart, reordered) == first


def test_a_changed_config_or_blueprint_rolls_the_pods(chart: helm.Chart) -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        deployment = named(render(chart, values), "Deployment", FULLNAME)
        found: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
        return found

    base = annotations({})
    assert annotations({})["checksum/config"] == base["checksum/config"]
    assert (
        annotations({"config": {"max_wait": "60s"}})["checksum/config"] != base["checksum/config"]
    )
    changed = annotations({"blueprints": {"demo": "kind: Blueprint"}})
    assert changed["checksum/blueprints"] != base["checksum/blueprints"]


def test_replicas_need_nats(chart: helm.Chart) -> None:
    with pytest.raises(
        helm.HelmRenderError, match="replicas: 3 dispatcher replicas need backend: nats"
    ):
        render(chart, {"replicas": 3})
    documents = render(chart, SCENARIOS["nats-replicas"])
    deployment = named(documents, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SNAPHOOK_BACKEND"] == "nats"
    assert env["SNAPHOOK_NATS_URL"] == "nats://nats.nats.svc:4222"
    assert env["SNAPHOOK_NATS_REPLICAS"] == "3"
    # The journal lives in JetStream: no claim to share between replicas.
    assert of_kind(documents, "PersistentVolumeClaim") == []
    state = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "state"]
    assert "emptyDir" in state[0]
    assert named(documents, "PodDisruptionBudget", FULLNAME)["spec"] == {
        "minAvailable": 2,
        "selector": deployment["spec"]["selector"],
    }


# --- values.schema.json ----------------------------------------------------------------------


def test_the_schema_is_draft_07_and_accepts_the_defaults(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(chart.values)
    for values in SCENARIOS.values():
        chart.validate_schema(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "postgres"}, "at '/backend': value must be one of 'sqlite', 'nats'"),
        ({"replicas": 0}, "at '/replicas': minimum: got 0, want 1"),
        ({"image": {"digest": "md5:0123"}}, "at '/image/digest': 'md5:0123' does not match"),
        (
            {"securityContext": {"readOnlyRootFilesystem": False}},
            "at '/securityContext/readOnlyRootFilesystem': value must be true",
        ),
        (
            {"securityContext": {"runAsUser": 0}},
            "at '/securityContext/runAsUser': minimum: got 0, want 1",
        ),
        (
            {"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
            "at '/securityContext/capabilities/drop'",
        ),
        (
            {"securityContext": {"privileged": True}},
            "additional properties 'privileged' not allowed",
        ),
        (
            {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
            "at '/podSecurityContext/seccompProfile/type'",
        ),
        ({"blueprints": {"Postgres_DB": "x"}}, "'Postgres_DB' does not match pattern"),
        ({"knative": {"minScale": 0}}, "at '/knative/minScale': minimum: got 0, want 1"),
        (
            {"knative": {"filterMode": "regex"}},
            "at '/knative/filterMode': value must be one of 'exact', 'prefix'",
        ),
        (
            {"knative": {"eventTypes": ["backup.pre", "run.completed"]}},
            "at '/knative/eventTypes/1'",
        ),
        ({"rbac": {"functions": ["Kube Exec"]}}, "at '/rbac/functions/0'"),
        (
            {"functionHost": {"enabled": True, "hosts": [{"name": "db"}]}},
            "missing property 'functions'",
        ),
        (
            {"functionHost": {"hosts": [{"name": "DB", "functions": ["s3"]}]}},
            "at '/functionHost/hosts/0/name'",
        ),
        ({"service": {"port": 70000}}, "at '/service/port': maximum: got 70,000, want 65,535"),
        ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'"),
        ({"serviceMonitor": {"interval": "30 seconds"}}, "at '/serviceMonitor/interval'"),
        (
            {"networkPolicy": {"egress": {"restrict": "yes"}}},
            "at '/networkPolicy/egress/restrict': got string, want boolean",
        ),
        (
            {"config": {"bindings": [{"match": {"namespace": "shop"}}]}},
            "missing property 'blueprint'",
        ),
        ({"config": {"Max-Wait": 5}}, "'Max-Wait' does not match pattern"),
        ({"replica": 2}, "additional properties 'replica' not allowed"),
    ],
)
def test_the_schema_rejects_bad_values_naming_them(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(values)
    assert message in str(caught.value)
    # An install refuses them the same way, before rendering anything.
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)
    # Any draft-07 validator (editors, CI) agrees with Helm's.
    merged = chart.merge_values(values)
    assert list(jsonschema.Draft7Validator(chart.schema).iter_errors(merged))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"knative": {"enabled": True, "maxScale": 2}},
            "knative.maxScale: 2 instances need backend: nats",
        ),
        (
            {"backend": "nats", "knative": {"enabled": True, "minScale": 3, "maxScale": 2}},
            "knative.minScale (3) is larger than knative.maxScale (2)",
        ),
        (
            {"knative": {"enabled": True}, "serviceMonitor": {"enabled": True}},
            "serviceMonitor.enabled: a ServiceMonitor needs",
        ),
        ({"image": {"tag": "latest"}}, "image.tag: latest is refused"),
        ({"config": {"port": 9000}}, "config.port: set by the chart"),
        ({"config": {"nats_url": "nats://x:4222"}}, "config.nats_url: a chart value: use nats.url"),
        (
            {"rbac": {"functions": ["kube.teleport"]}},
            'rbac.functions: unknown function or family "kube.teleport"',
        ),
        (
            {"functionHost": {"enabled": True}},
            "functionHost.hosts: functionHost.enabled needs at least one host",
        ),
        (
            {
                "functionHost": {
                    "enabled": True,
                    "hosts": [
                        {"name": "a", "functions": ["s3"]},
                        {"name": "a", "functions": ["dns"]},
                    ],
                }
            },
            'functionHost.hosts: the name "a" is used twice',
        ),
        (
            {"config": {"kube_bindings": True, "kube_binding_kinds": ["Deployment", "Gizmo"]}},
            'config.kube_binding_kinds: unknown kind "Gizmo"',
        ),
    ],
)
def test_inconsistent_values_fail_with_the_fix(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render(chart, values)
    assert message in str(caught.value)
