"""kube.job against the fake API server: the Job it creates, waiting, logs, cleanup, errors."""

from __future__ import annotations

import re
from typing import Any

import pytest

from functions.kube_job import job_name
from functions.sdk import PermanentError, RetryableError
from tests.kube_fake import JobScript, RunningCluster
from tests.kube_steps import call_kube

DUMP = {
    "image": "postgres:16",
    "command": ["pg_dump"],
    "args": ["--format=custom", "app"],
    "env": {"PGHOST": "db", "PGPORT": 5432},
    "secret_env": {"PGPASSWORD": {"secret": "pg-creds", "key": "password"}},
    "service_account": "backup",
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
}


@pytest.fixture
def kube(kube_cluster: RunningCluster) -> RunningCluster:
    kube_cluster.cluster.add_namespace("ns")
    return kube_cluster


def created_job(kube: RunningCluster) -> dict[str, Any]:
    [create] = [r for r in kube.cluster.requests_to(verb="create", resource="jobs")]
    body: dict[str, Any] = create.body
    return body


async def test_runs_a_job_and_reports_its_log_tail(kube: RunningCluster) -> None:
    kube.cluster.on_job(JobScript(logs="dumping app\n12 tables, 3.1 MB\ndone\n"))

    out = await call_kube(kube, "kube.job", DUMP, run_id="run-abc123", step="dump", timeout=60)

    assert out["job"] == "snaphook-run-abc123-dump-1"
    assert out["namespace"] == "ns"
    assert out["succeeded"] is True and out["adopted"] is False
    assert out["logs"] == "dumping app\n12 tables, 3.1 MB\ndone\n"
    assert [p["exit_code"] for p in out["pods"]] == [0]
    assert out["duration"] >= 0
    # What the API server was asked to run.
    job = created_job(kube)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "postgres:16"
    assert container["command"] == ["pg_dump"]
    assert container["args"] == ["--format=custom", "app"]
    assert container["env"] == [
        {"name": "PGHOST", "value": "db"},
        {"name": "PGPORT", "value": "5432"},
        {
            "name": "PGPASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "pg-creds", "key": "password"}},
        },
    ]
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert pod["serviceAccountName"] == "backup"
    assert pod["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 0
    assert spec["ttlSecondsAfterFinished"] == 3600
    assert 50 <= spec["activeDeadlineSeconds"] <= 60  # what was left of the step's 60 s
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "snaphook"
    assert job["metadata"]["annotations"] == {
        "snaphook.io/run": "run-abc123",
        "snaphook.io/step": "dump",
    }
    # The secret is referenced, never read.
    assert not kube.cluster.requests_to(resource="secrets")
    # Succeeded, so deleted (default on_success), pods in the background.
    [delete] = kube.cluster.requests_to(verb="delete", resource="jobs")
    assert delete.propagation_policy == "Background"
    assert out["deleted"] is True
    assert kube.cluster.get("jobs", "ns", out["job"]) is None


async def test_a_failed_job_fails_the_step_with_its_log_tail(kube: RunningCluster) -> None:
    logs = "".join(f"line {i}\n" for i in range(50)) + "FATAL: role 'backup' does not exist\n"
    kube.cluster.on_job(JobScript(succeed=False, logs=logs, exit_code=3))

    with pytest.raises(PermanentError) as failed:
        await call_kube(kube, "kube.job", {"image": "postgres:16"}, run_id="run-f", step="dump")

    message = str(failed.value)
    assert "Job ns/snaphook-run-f-dump-1 failed (BackoffLimitExceeded" in message
    assert "exit code 3" in message
    assert message.endswith("FATAL: role 'backup' does not exist\n")
    # on_success keeps a failed Job for a look.
    assert not kube.cluster.requests_to(verb="delete", resource="jobs")
    assert kube.cluster.get("jobs", "ns", "snaphook-run-f-dump-1") is not None


async def test_delete_always_removes_a_failed_job(kube: RunningCluster) -> None:
    kube.cluster.on_job(JobScript(succeed=False))
    params = {"image": "busybox", "delete": "always"}
    with pytest.raises(PermanentError, match="failed"):
        await call_kube(kube, "kube.job", params, run_id="run-d", step="s")
    assert kube.cluster.get("jobs", "ns", "snaphook-run-d-s-1") is None


async def test_delete_never_keeps_a_successful_job(kube: RunningCluster) -> None:
    out = await call_kube(kube, "kube.job", {"image": "busybox", "delete": "never"})
    assert out["deleted"] is False
    assert kube.cluster.get("jobs", "ns", out["job"]) is not None


async def test_a_finished_job_whose_logs_cannot_be_read_still_counts(kube: RunningCluster) -> None:
    """Failing the step after the Job succeeded would run it again on the retry."""
    kube.cluster.on_job(JobScript(logs="done\n"))
    kube.cluster.fail("list", "pods", 503)
    kube.cluster.fail("delete", "jobs", 500)
    out = await call_kube(kube, "kube.job", {"image": "busybox"})
    assert out["succeeded"] is True and out["pods"] == [] and out["logs"] == ""
    assert out["deleted"] is False  # ttlSecondsAfterFinished removes it later
    assert len(kube.cluster.requests_to(verb="create", resource="jobs")) == 1


async def test_a_job_that_does_not_finish_times_out_and_is_removed(kube: RunningCluster) -> None:
    kube.cluster.on_job(JobScript(delay=None))  # runs forever

    with pytest.raises(RetryableError) as timed_out:
        await call_kube(kube, "kube.job", {"image": "busybox"}, run_id="run-t", step="s", timeout=2)

    assert re.search(
        r"timed out after [\d.]+s waiting for Job ns/snaphook-run-t-s-1 to finish "
        r"\(1 active, 0 failed pods\)",
        str(timed_out.value),
    )
    # A Job left running would compete with the retry.
    [delete] = kube.cluster.requests_to(verb="delete", resource="jobs")
    assert delete.propagation_policy == "Background"


async def test_a_rerun_attempt_adopts_its_job(kube: RunningCluster) -> None:
    """A dispatcher restarted mid-step runs the attempt again: same Job, not a second one."""
    kube.cluster.on_job(JobScript(logs="ok\n"))
    params = {"image": "busybox", "delete": "never"}
    first = await call_kube(kube, "kube.job", params, run_id="run-r", step="s", attempt=2)
    again = await call_kube(kube, "kube.job", params, run_id="run-r", step="s", attempt=2)

    assert first["job"] == again["job"] == "snaphook-run-r-s-2"
    assert (first["adopted"], again["adopted"]) == (False, True)
    assert again["logs"] == "ok\n"
    created = [r.status for r in kube.cluster.requests_to(verb="create", resource="jobs")]
    assert created == [201, 409]


async def test_a_job_of_that_name_from_elsewhere_is_not_adopted(kube: RunningCluster) -> None:
    params = {"image": "busybox", "delete": "never"}
    await call_kube(kube, "kube.job", params, run_id="run-x", step="s")
    job = kube.cluster.get("jobs", "ns", "snaphook-run-x-s-1")
    assert job is not None
    kube.cluster.update(
        "jobs", "ns", "snaphook-run-x-s-1", {"metadata": {"annotations": {"snaphook.io/run": "x"}}}
    )
    with pytest.raises(PermanentError, match="exists and was not created by this run"):
        await call_kube(kube, "kube.job", params, run_id="run-x", step="s")


async def test_logs_are_cut_to_the_tail(kube: RunningCluster) -> None:
    kube.cluster.on_job(JobScript(logs="a" * 5000 + "THE END\n"))
    out = await call_kube(kube, "kube.job", {"image": "busybox", "log_bytes": 100})
    [pod] = out["pods"]
    assert pod["truncated"] is True
    assert len(out["logs"]) == 100 and out["logs"].endswith("THE END\n")
    [log] = kube.cluster.requests_to(verb="get", resource="pods/log")
    assert log.query["container"] == "job" and log.query["tailLines"] == "100"


async def test_namespace_param_and_forbidden(kube: RunningCluster) -> None:
    kube.cluster.add_namespace("backups")
    kube.cluster.deny("create", "jobs", namespace="backups")
    with pytest.raises(PermanentError) as refused:
        await call_kube(kube, "kube.job", {"image": "busybox", "namespace": "backups"})
    message = str(refused.value)
    assert "forbidden by Kubernetes RBAC" in message
    assert (
        'cannot create resource "jobs" in API group "batch" in the namespace "backups"' in message
    )


async def test_a_missing_namespace_is_named(kube: RunningCluster) -> None:
    with pytest.raises(PermanentError, match="not found"):
        await call_kube(kube, "kube.job", {"image": "busybox"}, subject="gone/Deployment/app")


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({}, "image: Field required"),
        ({"image": "x", "env": {"BAD=NAME": "1"}}, "not a valid environment variable name"),
        (
            {"image": "x", "env": {"A": "1"}, "secret_env": {"A": {"secret": "s", "key": "k"}}},
            "env and secret_env both set A",
        ),
        ({"image": "x", "secret_env": {"A": {"secret": "Bad_Name", "key": "k"}}}, "secret_env.A"),
        ({"image": "x", "delete": "sometimes"}, "delete"),
        ({"image": "x", "command": "[not json"}, "not a JSON list"),
    ],
)
async def test_bad_params_are_named(
    kube: RunningCluster, params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(PermanentError, match=re.escape(problem)):
        await call_kube(kube, "kube.job", params)
    assert not kube.cluster.requests_to(resource="jobs")


async def test_templated_command_renders_as_a_json_list(kube: RunningCluster) -> None:
    params = {"image": "x", "command": '["sh", "-c", "echo 1"]', "args": "single"}
    await call_kube(kube, "kube.job", params)
    [container] = created_job(kube)["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "-c", "echo 1"]
    assert container["args"] == ["single"]


def test_job_names_are_dns_labels_unique_per_attempt() -> None:
    assert job_name("run-1", "dump", 1) == "snaphook-run-1-dump-1"
    long_step = "Dump_The_Whole_Database_" * 4
    names = {job_name("run-0123456789abcdef0123", long_step, n) for n in (1, 2, 3)}
    assert len(names) == 3
    for name in names:
        assert len(name) <= 63
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert job_name("run-1", "freeze.release", 1) != job_name("run-1", "freeze-release", 1)
