"""Platform glue (hooks/platforms/) run the way K10, Kanister and Velero run it.

Nothing is retyped: every command is read from the shipped YAML and executed as a
subprocess — the real ``snaphook`` console script of this virtualenv, found on ``PATH`` as
in the image, and the real ``curl`` of the scripts — against a live dispatcher (the conftest
harness, a real aiohttp server on 127.0.0.1) whose auth wants the token the YAML takes from
a Secret. What a platform would do to the YAML first is done here in the small, documented
ways below, so a change to the glue is a change to what these tests run:

* Kanister renders phase args as Go templates. The glue uses four placeholders, replaced
  verbatim (:func:`render_kanister`); any other ``{{`` left over fails the test.
* The kubelet builds a container's environment: ``value`` (with ``$(VAR)`` expanded from
  the variables before it), ``fieldRef`` and ``secretKeyRef`` (:func:`container_env`).
* ``SNAPHOOK_URL`` is the in-cluster Service address; it is pointed at the test server.

The YAML shapes are checked against the field lists of the platforms' references: the
Kanister KubeTask arguments and Blueprint fields, K10's reserved action names and the
BlueprintBinding spec, Velero's hook annotations.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.blueprint_loader import load_blueprints
from dispatcher.principals import hash_token
from functions.sdk import FunctionRegistry
from tests.conftest import Harness, HarnessFactory
from tests.processes import Result, run_command
from tests.secrets_registry import test_secret

REPO = Path(__file__).resolve().parent.parent
PLATFORMS = REPO / "hooks" / "platforms"
BIN = Path(sys.executable).parent  # where `snaphook` is installed, as on the image's PATH
SERVICE_URL = "http://snaphook.snaphook.svc.cluster.local:8080"

TOKEN = test_secret("platform-glue")
SECRETS = {("snaphook-emitter", "token"): TOKEN}
AUTH = {
    "principals": [
        {
            "name": "platforms",
            "sources": ["k10/*", "kanister/*", "velero/*", "curl/*"],
            "bearer_sha256": [hash_token(TOKEN)],
        }
    ]
}

# `shop` is bound to a blueprint that freezes (a lease) and thaws; `legacy` to one whose pre
# step fails, on_error fail: the pre phase is denied.
GLUE = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: glue}
spec:
  actions:
    backup.pre:
      - name: freeze
        function: test.freeze
        with: {db: "{{ target.name }}"}
        lease: {ttl: 1h, release: {function: test.thaw, with: {db: "{{ target.name }}"}}}
    backup.post:
      - name: thaw
        function: test.thaw
        with: {db: "{{ target.name }}", lease: "{{ leases.freeze }}"}
    restore.post:
      - {name: warm-up, function: test.effect}
"""
DENY = """\
apiVersion: snaphook.io/v1
kind: Blueprint
metadata: {name: deny}
spec:
  actions:
    backup.pre:
      - {name: freeze, function: test.fail, on_error: fail}
"""
BINDINGS = [
    {"blueprint": "deny", "match": {"namespace": "legacy"}},
    {"blueprint": "glue", "match": {"namespace": "shop"}},
]


@pytest.fixture
async def live(harness: HarnessFactory) -> Harness:
    return await harness({"glue": GLUE, "deny": DENY}, bindings=BINDINGS, auth=AUTH)


async def run_of(h: Harness, run_id: str) -> dict[str, Any]:
    resp = await h.client.get(f"/v1/runs/{run_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def final(h: Harness, run_id: str) -> dict[str, Any]:
    """The run once it is finished (finalizers included), read through the API."""
    run = await h.state.runner.wait_final(run_id, 10.0)
    assert run is not None and run.status.final, f"run {run_id} not final: {run}"
    return await run_of(h, run_id)


# -- executing commands ---------------------------------------------------------------------


async def execute(argv: Sequence[str], env: Mapping[str, str], timeout: float = 60) -> Result:
    """Run ``argv`` with only ``env`` (plus a PATH reaching this virtualenv's scripts)."""
    full_env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **env}
    result = await run_command(argv, env=full_env, cwd=REPO, timeout=timeout)
    assert TOKEN not in result.out + result.err
    return result


_DEPENDENT = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_env(
    container: Mapping[str, Any], *, fields: Mapping[str, str], url: str
) -> dict[str, str]:
    """The environment the kubelet gives ``container``; SNAPHOOK_URL aimed at ``url``."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            # Kubernetes expands $(VAR) from the variables defined before this one.
            value = _DEPENDENT.sub(lambda m: env.get(m[1], m[0]), str(entry["value"]))
        elif "fieldRef" in entry["valueFrom"]:
            value = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            value = SECRETS[(ref["name"], ref["key"])]
        env[entry["name"]] = value
    assert env.get("SNAPHOOK_URL") == SERVICE_URL, "the glue points at the in-cluster Service"
    env["SNAPHOOK_URL"] = url
    return env


# -- Kanister / K10 -------------------------------------------------------------------------


def kanister_blueprint() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((PLATFORMS / "kanister-blueprint.yaml").read_text())
    return document


def render_kanister(arg: str, obj: Mapping[str, str], time: str) -> str:
    """Kanister's rendering of the placeholders the glue uses, by plain substitution."""
    values = {
        "{{ .Object.metadata.namespace }}": obj["namespace"],
        "{{ .Object.kind }}": obj["kind"],
        "{{ .Object.metadata.name }}": obj["name"],
        "{{ .Time }}": time,
    }
    for placeholder, value in values.items():
        arg = arg.replace(placeholder, value)
    assert "{{" not in arg, f"a template this test does not render: {arg}"
    return arg


@dataclass
class KubeTask:
    """One KubeTask phase of the blueprint, ready to run for one object at one .Time."""

    phase: dict[str, Any]

    def argv(self, obj: Mapping[str, str], time: str) -> list[str]:
        return [render_kanister(a, obj, time) for a in self.phase["args"]["command"]]

    def env(self, url: str) -> dict[str, str]:
        [container] = self.phase["args"]["podOverride"]["containers"]
        return container_env(container, fields={}, url=url)

    async def run(self, h: Harness, obj: Mapping[str, str], time: str) -> Result:
        return await execute(self.argv(obj, time), self.env(h.url))


def kube_task(action: str, index: int) -> KubeTask:
    return KubeTask(kanister_blueprint()["actions"][action]["phases"][index])


DB = {"namespace": "shop", "kind": "StatefulSet", "name": "db"}
T1 = "2025-03-01T02:00:00.123456789Z"
T2 = "2025-03-01T02:03:41.5Z"


async def test_k10_prehook_freezes_and_posthook_thaws_the_same_backup(live: Harness) -> None:
    pre = await kube_task("backupPrehook", 0).run(live, DB, T1)
    assert pre.code == 0, pre.err
    decision = pre.json()
    assert decision["allowed"] is True
    run = await run_of(live, decision["run_id"])
    assert (run["type"], run["subject"], run["source"]) == (
        "io.snaphook.backup.pre",
        "shop/StatefulSet/db",
        "k10/cluster-a",
    )
    assert run["event_id"] == f"shop.db.{T1}.pre"
    assert run["event"]["data"]["backup"] == {"name": "k10-db", "id": f"k10-db-{T1}"}
    assert [lease["status"] for lease in run["leases"]] == ["open"]
    assert live.recorder.frozen == {"db": True}

    # K10's backupPosthook is another action (another .Time): it follows the pre run.
    post = await kube_task("backupPosthook", 0).run(live, DB, T2)
    assert post.code == 0, post.err
    post_run = await final(live, post.json()["run_id"])
    assert post_run["status"] == "succeeded"
    assert post_run["event"]["data"]["backup"] == {"name": "k10-db", "id": f"k10-db-{T1}"}
    assert post_run["event"]["data"]["outcome"] == "succeeded"
    [lease] = (await run_of(live, decision["run_id"]))["leases"]
    assert (lease["status"], lease["released_by"]) == (
        "released",
        f"step:{post_run['run_id']}/thaw",
    )
    assert live.recorder.frozen == {"db": False}


async def test_k10_prehook_denied_fails_the_phase(live: Harness) -> None:
    legacy = {**DB, "namespace": "legacy"}
    pre = await kube_task("backupPrehook", 0).run(live, legacy, T1)
    assert pre.code == 1, pre.err  # non-zero: the KubeTask fails, so does the K10 backup
    decision = pre.json()
    assert decision["allowed"] is False
    assert "refused on purpose" in decision["reason"]
    run = await run_of(live, decision["run_id"])
    assert (run["subject"], run["allowed"]) == ("legacy/StatefulSet/db", False)


async def test_k10_posthook_without_a_pre_run_fails_clearly(live: Harness) -> None:
    post = await kube_task("backupPosthook", 0).run(live, DB, T2)
    assert post.code == 2
    assert "no io.snaphook.backup.pre run of shop/StatefulSet/db" in post.err


async def test_kanister_backup_action_wraps_the_data_phases(live: Harness) -> None:
    phases = kanister_blueprint()["actions"]["backup"]["phases"]
    first, last = KubeTask(phases[0]), KubeTask(phases[-1])
    # One ActionSet: every phase sees the same .Time, hence the same backup id.
    pre = await first.run(live, DB, T1)
    assert pre.code == 0, pre.err
    pre_run = await run_of(live, pre.json()["run_id"])
    assert pre_run["source"] == "kanister/cluster-a"
    assert pre_run["event"]["data"]["backup"]["id"] == f"kanister-db-{T1}"

    post = await last.run(live, DB, T1)
    assert post.code == 0, post.err
    post_run = await final(live, post.json()["run_id"])
    assert post_run["event"]["data"]["backup"]["id"] == f"kanister-db-{T1}"
    assert post_run["event_id"] == f"shop.db.{T1}.post"
    [lease] = (await run_of(live, pre_run["run_id"]))["leases"]
    assert lease["released_by"] == f"step:{post_run['run_id']}/thaw"

    # Kanister retrying the phase resends the same event: the same run, not a second one.
    again = await first.run(live, DB, T1)
    assert again.code == 0, again.err
    assert again.json()["run_id"] == pre_run["run_id"]


# Kanister's KubeTask arguments (pkg/function/kube_task.go: Arguments, RequiredArgs) and the
# Blueprint's action/phase fields (docs.kanister.io, docs.kasten.io blueprint schema).
KUBETASK_ARGS = {"image", "command", "namespace", "podOverride", "podAnnotations", "podLabels"}
KUBETASK_REQUIRED = {"image", "command"}
ACTION_FIELDS = {
    "kind",
    "configMapNames",
    "secretNames",
    "inputArtifactNames",
    "outputArtifacts",
    "phases",
    "deferPhase",
}
PHASE_FIELDS = {"func", "name", "args", "objects"}
# K10 calls these action names for a bound workload (docs.kasten.io reserved action names).
K10_RESERVED = {
    "backupPrehook",
    "backupPosthook",
    "backup",
    "restorePrehook",
    "restorePosthook",
    "restore",
    "delete",
}


def test_kanister_blueprint_has_the_fields_kanister_reads() -> None:
    doc = kanister_blueprint()
    assert (doc["apiVersion"], doc["kind"]) == ("cr.kanister.io/v1alpha1", "Blueprint")
    assert set(doc) == {"apiVersion", "kind", "metadata", "actions"}
    assert doc["metadata"]["namespace"] == "kasten-io"  # K10 only finds blueprints there
    assert {"backupPrehook", "backupPosthook"} <= set(doc["actions"]) <= K10_RESERVED
    for name, action in doc["actions"].items():
        assert set(action) <= ACTION_FIELDS, name
        names = [phase["name"] for phase in action["phases"]]
        assert len(names) == len(set(names)), f"{name}: phase names must be unique"
        for phase in action["phases"]:
            assert set(phase) <= PHASE_FIELDS and phase["func"] == "KubeTask", phase
            args = phase["args"]
            assert KUBETASK_REQUIRED <= set(args) <= KUBETASK_ARGS, phase["name"]
            assert all(isinstance(part, str) for part in args["command"])
            assert args["command"][:2] == ["snaphook", "emit"]
            # The KubeTask pod's container is named "container"; podOverride merges by name.
            [container] = args["podOverride"]["containers"]
            assert container["name"] == "container"
            assert any(e["name"] == "SNAPHOOK_TOKEN" and "secretKeyRef" in e["valueFrom"]
                       for e in container["env"] if "valueFrom" in e)  # fmt: skip
            assert "--wait=120" in args["command"]


def test_k10_blueprint_binding_names_the_blueprint() -> None:
    doc = yaml.safe_load((PLATFORMS / "k10-binding.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("config.kio.kasten.io/v1alpha1", "BlueprintBinding")
    assert doc["metadata"]["namespace"] == "kasten-io"
    spec = doc["spec"]
    assert set(spec) <= {"blueprintRef", "resources", "disabled"}
    blueprint = kanister_blueprint()["metadata"]
    assert spec["blueprintRef"] == {"name": blueprint["name"], "namespace": blueprint["namespace"]}
    assert set(spec["resources"]) <= {"matchAll", "matchAny"} and spec["resources"]
    for requirement in spec["resources"]["matchAll"]:
        # Each requirement sets exactly one constraint (docs.kasten.io BlueprintBinding).
        [(constraint, rule)] = requirement.items()
        assert constraint in {"type", "namespace", "annotations", "labels"}
        assert rule["operator"] in {"In", "NotIn", "Exists", "DoesNotExist"}


# -- Velero ---------------------------------------------------------------------------------

# Velero's pod-annotation hooks (velero.io docs: backup hooks, restore exec hooks).
VELERO_KEYS = {
    f"{when}.hook.backup.velero.io/{field}"
    for when in ("pre", "post")
    for field in ("container", "command", "on-error", "timeout")
} | {
    f"post.hook.restore.velero.io/{field}"
    for field in ("container", "command", "on-error", "exec-timeout", "wait-timeout")
}
GO_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")


def velero_statefulset() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((PLATFORMS / "velero-annotations.yaml").read_text())
    return document


@dataclass
class VeleroHook:
    """One hook annotation of the pod template, exec'd as Velero does in pod ``pod``."""

    prefix: str  # e.g. "pre.hook.backup.velero.io"

    def argv(self) -> list[str]:
        command: list[str] = json.loads(self.annotations[f"{self.prefix}/command"])
        return command

    @property
    def annotations(self) -> dict[str, str]:
        annotations: dict[str, str] = velero_statefulset()["spec"]["template"]["metadata"][
            "annotations"
        ]
        return annotations

    def env(self, url: str, pod: str, namespace: str) -> dict[str, str]:
        name = self.annotations[f"{self.prefix}/container"]
        [container] = [
            c for c in velero_statefulset()["spec"]["template"]["spec"]["containers"]
            if c["name"] == name
        ]  # fmt: skip
        fields = {"metadata.name": pod, "metadata.namespace": namespace}
        return container_env(container, fields=fields, url=url)

    async def run(self, h: Harness, pod: str = "db-0", namespace: str = "shop") -> Result:
        return await execute(self.argv(), self.env(h.url, pod, namespace))


PRE_HOOK = VeleroHook("pre.hook.backup.velero.io")
POST_HOOK = VeleroHook("post.hook.backup.velero.io")
RESTORE_HOOK = VeleroHook("post.hook.restore.velero.io")


async def test_velero_pre_hook_freezes_and_post_hook_thaws_the_pod(live: Harness) -> None:
    pre = await PRE_HOOK.run(live)
    assert pre.code == 0, pre.err
    pre_run = await run_of(live, pre.json()["run_id"])
    assert (pre_run["type"], pre_run["subject"], pre_run["source"]) == (
        "io.snaphook.backup.pre",
        "shop/Pod/db-0",
        "velero/cluster-a",
    )
    backup = pre_run["event"]["data"]["backup"]
    assert backup["name"] == "velero" and backup["id"].startswith("velero-")
    assert live.recorder.frozen == {"db-0": True}

    # Another replica's hook is its own subject: no 409 for the same backup.
    other = await PRE_HOOK.run(live, pod="db-1")
    assert other.code == 0, other.err

    post = await POST_HOOK.run(live)
    assert post.code == 0, post.err
    post_run = await final(live, post.json()["run_id"])
    assert post_run["event"]["data"]["backup"] == backup  # followed the pod's pre run
    [lease] = (await run_of(live, pre_run["run_id"]))["leases"]
    assert lease["released_by"] == f"step:{post_run['run_id']}/thaw"
    assert live.recorder.frozen == {"db-0": False, "db-1": True}


async def test_velero_pre_hook_denied_exits_non_zero(live: Harness) -> None:
    pre = await PRE_HOOK.run(live, namespace="legacy")
    assert pre.code == 1, pre.err  # with on-error Fail, Velero fails the pod's backup
    assert pre.json()["allowed"] is False
    run = await run_of(live, pre.json()["run_id"])
    assert (run["subject"], run["allowed"]) == ("legacy/Pod/db-0", False)


async def test_velero_restore_hook_sends_restore_post(live: Harness) -> None:
    restore = await RESTORE_HOOK.run(live)
    assert restore.code == 0, restore.err
    run = await final(live, restore.json()["run_id"])
    assert (run["type"], run["subject"], run["status"]) == (
        "io.snaphook.restore.post",
        "shop/Pod/db-0",
        "succeeded",
    )


async def test_follow_pre_takes_either_url_and_only_fits_post_events(live: Harness) -> None:
    env = {
        "SNAPHOOK_URL": f"{live.url}/v1/events",  # the events URL works as well
        "SNAPHOOK_TOKEN": TOKEN,
        "SNAPHOOK_SUBJECT": "shop/Deployment/api",
        "SNAPHOOK_SOURCE": "velero/cluster-b",
    }
    emit = ["snaphook", "emit", "--wait", "10"]
    pre = await execute([*emit, "--type", "backup.pre", "--backup-id", "b-42"], env)
    assert pre.code == 0, pre.err
    post = await execute([*emit, "--type", "backup.post", "--follow-pre"], env)
    assert post.code == 0, post.err
    assert (await run_of(live, post.json()["run_id"]))["event"]["data"]["backup"]["id"] == "b-42"

    misuse = await execute([*emit, "--type", "backup.pre", "--follow-pre"], env)
    assert misuse.code == 2 and "is for post events" in misuse.err
    both = await execute([*emit, "--type", "backup.post", "--follow-pre", "--backup-id", "b"], env)
    assert both.code == 2 and "drop --data/--backup-id" in both.err


def test_velero_annotations_are_the_documented_keys() -> None:
    template = velero_statefulset()["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert set(annotations) <= VELERO_KEYS, set(annotations) - VELERO_KEYS
    containers = {c["name"] for c in template["spec"]["containers"]}
    for key, value in annotations.items():
        field = key.rsplit("/", 1)[1]
        if field == "command":
            command = json.loads(value)  # Velero wants a JSON array, run without a shell
            assert isinstance(command, list) and all(isinstance(p, str) for p in command)
            assert command[:2] == ["snaphook", "emit"]
        elif field == "container":
            assert value in containers
        elif field == "on-error":
            assert value in {"Fail", "Continue"}
        else:
            assert GO_DURATION.fullmatch(value), f"{key}: {value!r} is not a Go duration"


def test_platform_files_are_not_snaphook_blueprints() -> None:
    # hooks/ is the dispatcher's blueprint directory: these foreign documents are skipped.
    assert load_blueprints(PLATFORMS, FunctionRegistry()).names() == []


# -- curl -----------------------------------------------------------------------------------


def curl_env(h: Harness, **extra: str) -> dict[str, str]:
    return {"SNAPHOOK_URL": h.url, "SNAPHOOK_SOURCE": "curl/ci", **extra}


async def curl(script: str, h: Harness, *args: str, **env: str) -> Result:
    return await execute(["sh", str(PLATFORMS / script), *args], curl_env(h, **env))


async def test_curl_structured_pre_and_binary_post(live: Harness) -> None:
    token = {"SNAPHOOK_TOKEN": TOKEN}
    pre = await curl(
        "curl-structured.sh", live, "backup.pre", "shop/StatefulSet/web", "b1", **token
    )
    assert pre.code == 0, pre.err
    assert pre.json()["allowed"] is True
    pre_run = await run_of(live, pre.json()["run_id"])
    assert (pre_run["event_id"], pre_run["source"]) == ("b1.backup.pre", "curl/ci")

    post = await curl("curl-binary.sh", live, "backup.post", "shop/StatefulSet/web", "b1",
                      TRACEPARENT="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                      **token)  # fmt: skip
    assert post.code == 0, post.err
    post_run = await final(live, post.json()["run_id"])
    assert post_run["event"]["data"] == {
        "backup": {"name": "b1", "id": "b1"},
        "outcome": "succeeded",
        "target": {"namespace": "shop", "kind": "StatefulSet", "name": "web", "labels": {}},
        "params": {},
    }
    assert post_run["event"]["traceparent"].startswith("00-4bf92f35")
    [lease] = (await run_of(live, pre_run["run_id"]))["leases"]
    assert lease["released_by"] == f"step:{post_run['run_id']}/thaw"

    # Sending the same event again (same id) answers with the same run.
    again = await curl("curl-binary.sh", live, "backup.pre", "shop/StatefulSet/web", "b1", **token)
    assert again.json()["run_id"] == pre_run["run_id"]


@pytest.mark.parametrize("script", ["curl-structured.sh", "curl-binary.sh"])
async def test_curl_scripts_exit_like_emit(live: Harness, script: str) -> None:
    token = {"SNAPHOOK_TOKEN": TOKEN}
    denied = await curl(script, live, "backup.pre", "legacy/Deployment/api", "b2", **token)
    assert (denied.code, denied.json()["allowed"]) == (1, False)

    # Without a wait the answer is 202 Accepted, whatever the decision will be.
    accepted = await curl(script, live, "backup.pre", "legacy/Deployment/api", "b3",
                          SNAPHOOK_WAIT="", **token)  # fmt: skip
    assert accepted.code == 0, accepted.err
    assert accepted.json()["status"] == "accepted"

    unauthenticated = await curl(script, live, "backup.pre", "shop/Deployment/api", "b4")
    assert unauthenticated.code == 2
    assert "answered 401" in unauthenticated.err

    bad = await curl(script, live, "backup.pre", 'shop/Deployment/a"b', "b5", **token)
    assert bad.code == 2 and "invalid value" in bad.err
