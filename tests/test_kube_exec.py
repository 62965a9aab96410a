"""kube.exec through the function interface, against the fake API server over WebSocket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from functions.sdk import PermanentError, RetryableError, default_registry
from tests.kube_fake import ExecCall, ExecResult, FakeCluster, RunningCluster

EXEC = "kube.exec"


@pytest.fixture
def cluster(kube_cluster: RunningCluster) -> FakeCluster:
    return kube_cluster.cluster


async def test_runs_in_the_named_pod_and_reports_outputs(
    kube_call: Any, cluster: FakeCluster
) -> None:
    cluster.add_pod("ns", "mongo-0", containers=["mongod", "exporter"])
    cluster.on_exec(
        "mongo-0", lambda call: ExecResult(stdout='{ "ok": 1 }\n', stderr="warning: x\n")
    )
    out = await kube_call(
        EXEC,
        {
            "pod": "mongo-0",
            "container": "mongod",
            "command": ["mongosh", "--quiet", "--eval", "db.fsyncLock()"],
        },
    )
    assert out["namespace"] == "ns"  # the event target's namespace
    assert (out["pod"], out["container"], out["exit_code"]) == ("mongo-0", "mongod", 0)
    assert out["stdout"] == '{ "ok": 1 }\n' and out["stderr"] == "warning: x\n"
    assert out["truncated"] is False and len(out["pods"]) == 1

    (call,) = cluster.execs
    assert call.command == ["mongosh", "--quiet", "--eval", "db.fsyncLock()"]
    assert call.container == "mongod" and call.protocol == "v5.channel.k8s.io"
    (request,) = cluster.requests_to(verb="create", resource="pods/exec")
    assert request.path == "/api/v1/namespaces/ns/pods/mongo-0/exec"
    assert request.query.getall("command") == call.command
    assert request.query["container"] == "mongod"


async def test_a_scripted_command_changes_state(kube_call: Any, cluster: FakeCluster) -> None:
    """A fake mongosh: fsyncLock/fsyncUnlock flip a flag the test then checks."""
    cluster.add_pod("db", "mongo-0", labels={"app": "mongo"})
    state = {"locked": False}

    def mongosh(call: ExecCall) -> ExecResult:
        script = call.command[-1]
        if script == "db.fsyncLock()":
            state["locked"] = True
        elif script == "db.fsyncUnlock()":
            state["locked"] = False
        return ExecResult(stdout=f'{{ "ok": 1, "locked": {str(state["locked"]).lower()} }}\n')

    cluster.on_exec("mongo-0", mongosh)
    params = {"namespace": "db", "selector": "app=mongo", "command": ["mongosh", "--eval"]}
    out = await kube_call(EXEC, {**params, "command": ["mongosh", "--eval", "db.fsyncLock()"]})
    assert state["locked"] and '"locked": true' in out["stdout"]
    await kube_call(EXEC, {**params, "command": ["mongosh", "--eval", "db.fsyncUnlock()"]})
    assert not state["locked"]


async def test_selector_picks_the_first_running_pod_by_name(
    kube_call: Any, cluster: FakeCluster
) -> None:
    cluster.add_pod("ns", "web-a", labels={"app": "web"}, phase="Pending")
    cluster.add_pod("ns", "web-c", labels={"app": "web"})
    cluster.add_pod("ns", "web-b", labels={"app": "web"})
    cluster.add_pod("ns", "other", labels={"app": "db"})
    out = await kube_call(EXEC, {"selector": "app=web", "command": ["true"]})
    assert out["pod"] == "web-b"
    assert [c.pod for c in cluster.execs] == ["web-b"]
    assert cluster.requests_to(verb="list", resource="pods")[0].query["labelSelector"] == (
        "app=web"
    )


async def test_non_zero_exit_fails_with_code_and_stderr_tail(
    kube_call: Any, cluster: FakeCluster
) -> None:
    cluster.add_pod("ns", "p")
    noise = "".join(f"line {i}\n" for i in range(2000))
    cluster.on_exec("p", lambda call: ExecResult(stderr=noise + "fatal: disk full\n", exit_code=3))
    with pytest.raises(PermanentError) as failed:
        await kube_call(EXEC, {"pod": "p", "command": ["backup.sh"], "max_output_bytes": 10})
    message = str(failed.value)
    assert "exec in Pod ns/p (container main): 'backup.sh' exited with code 3" in message
    assert message.endswith("fatal: disk full")  # the tail, although output was capped
    assert "line 0\n" not in message


async def test_allowed_exit_codes_pass(kube_call: Any, cluster: FakeCluster) -> None:
    cluster.add_pod("ns", "p")
    cluster.on_exec("p", lambda call: ExecResult(stdout="no changes\n", exit_code=1))
    out = await kube_call(EXEC, {"pod": "p", "command": ["diff"], "allow_exit_codes": [1]})
    assert out["exit_code"] == 1 and out["stdout"] == "no changes\n"


async def test_output_is_truncated_at_the_limit(kube_call: Any, cluster: FakeCluster) -> None:
    cluster.add_pod("ns", "p")
    big = b"x" * 100_000  # several WebSocket frames
    cluster.on_exec("p", lambda call: ExecResult(stdout=big, stderr="short"))
    out = await kube_call(EXEC, {"pod": "p", "command": ["cat"], "max_output_bytes": 1000})
    assert out["stdout"] == "x" * 1000 and out["stderr"] == "short"
    assert out["truncated"] is True and out["pods"][0]["truncated"] is True


async def test_stdin_reaches_the_command_and_is_closed(
    kube_call: Any, cluster: FakeCluster
) -> None:
    cluster.add_pod("ns", "p")

    async def wc(call: ExecCall) -> ExecResult:
        data = await call.read_stdin()  # returns only once stdin is closed (v5)
        return ExecResult(stdout=f"{len(data)} bytes, ends {data[-4:].decode()}\n")

    cluster.on_exec("p", wc)
    script = "print(1);\n" * 4_000  # two stdin frames
    out = await kube_call(EXEC, {"pod": "p", "command": ["mongosh"], "stdin": script})
    assert out["stdout"] == f"{len(script)} bytes, ends 1);\n\n"
    assert cluster.execs[0].stdin and script not in str(out)


async def test_timeout_stops_waiting(kube_call: Any, cluster: FakeCluster) -> None:
    cluster.add_pod("ns", "p")

    async def hangs(call: ExecCall) -> ExecResult:
        await call.write(1, "started\n")
        await asyncio.Event().wait()  # never finishes
        raise AssertionError("unreachable")

    cluster.on_exec("p", hangs)
    with pytest.raises(RetryableError) as slow:
        await kube_call(EXEC, {"pod": "p", "command": ["sleep", "infinity"], "timeout": 0.3})
    assert "'sleep' did not finish within 0.3s" in str(slow.value)
    # The stream was closed: the fake saw the client go away.
    await cluster.wait_until(lambda: cluster.execs[0].outcome == "disconnected")


async def test_step_deadline_bounds_the_timeout(kube_call: Any, cluster: FakeCluster) -> None:
    cluster.add_pod("ns", "p")
    cluster.on_exec("p", lambda call: asyncio.Event().wait())  # type: ignore[arg-type,return-value]
    with pytest.raises(RetryableError, match="did not finish within"):
        await kube_call(EXEC, {"pod": "p", "command": ["sleep"], "timeout": 600}, timeout=0.5)


async def test_all_runs_in_every_matching_pod_concurrently(
    kube_call: Any, cluster: FakeCluster
) -> None:
    for name in ("db-2", "db-0", "db-1"):
        cluster.add_pod("ns", name, labels={"app": "db"})
    together = asyncio.Barrier(3)  # only passable if all three run at once

    async def flush(call: ExecCall) -> ExecResult:
        await together.wait()
        return ExecResult(stdout=f"flushed {call.pod}\n")

    cluster.on_exec(None, flush)
    out = await kube_call(EXEC, {"selector": "app=db", "all": True, "command": ["sync"]})
    assert [p["pod"] for p in out["pods"]] == ["db-0", "db-1", "db-2"]
    assert [p["stdout"] for p in out["pods"]] == [f"flushed db-{i}\n" for i in range(3)]
    assert out["pod"] is None and out["stdout"] is None


async def test_all_pods_share_the_steps_time(kube_call: Any, cluster: FakeCluster) -> None:
    """A pod waiting for its turn (concurrency) gets what is left, not a fresh timeout."""
    for name in ("db-0", "db-1"):
        cluster.add_pod("ns", name, labels={"app": "db"})
    cluster.on_exec(None, lambda call: asyncio.Event().wait())  # type: ignore[arg-type,return-value]
    params = {"selector": "app=db", "all": True, "concurrency": 1, "command": ["sync"]}
    with pytest.raises(RetryableError) as slow:
        await kube_call(EXEC, params, timeout=0.5)
    message = str(slow.value)
    assert "Pod ns/db-0" in message and "did not finish within" in message
    assert "Pod ns/db-1: no time left to exec before the step's timeout" in message
    assert [call.pod for call in cluster.execs] == ["db-0"]


async def test_all_reports_every_failing_pod(kube_call: Any, cluster: FakeCluster) -> None:
    for name in ("db-0", "db-1", "db-2"):
        cluster.add_pod("ns", name, labels={"app": "db"})
    cluster.on_exec(None, lambda call: ExecResult(exit_code=0 if call.pod == "db-1" else 2))
    with pytest.raises(PermanentError) as failed:
        await kube_call(EXEC, {"selector": "app=db", "all": True, "command": ["sync"]})
    message = str(failed.value)
    assert message.startswith("kube.exec failed in 2 of 3 pods: ")
    assert "Pod ns/db-0" in message and "Pod ns/db-2" in message and "db-1" not in message
    assert len(cluster.execs) == 3  # the others still ran


async def test_selector_without_running_pods(kube_call: Any, cluster: FakeCluster) -> None:
    with pytest.raises(PermanentError) as none:
        await kube_call(EXEC, {"selector": "app=mongo", "command": ["true"]})
    assert str(none.value) == "no Running pod in namespace ns matches selector 'app=mongo'"
    cluster.add_pod("ns", "done", labels={"app": "mongo"}, phase="Succeeded")
    with pytest.raises(PermanentError, match=r"\(1 match but none is Running\)"):
        await kube_call(EXEC, {"selector": "app=mongo", "command": ["true"]})
    assert cluster.execs == []


async def test_not_found(kube_call: Any, cluster: FakeCluster) -> None:
    with pytest.raises(PermanentError) as missing:
        await kube_call(EXEC, {"pod": "nope", "command": ["true"]})
    assert str(missing.value) == "Pod ns/nope not found"
    cluster.add_pod("ns", "p", containers=["a", "b"])
    with pytest.raises(PermanentError) as container:
        await kube_call(EXEC, {"pod": "p", "container": "c", "command": ["true"]})
    assert str(container.value) == "Pod ns/p has no container 'c' (it has: a, b)"
    with pytest.raises(PermanentError, match="say which one with 'container'"):
        await kube_call(EXEC, {"pod": "p", "command": ["true"]})


async def test_command_that_cannot_run(kube_call: Any, cluster: FakeCluster) -> None:
    cluster.add_pod("ns", "p")
    error = 'exec: "mongosh": executable file not found in $PATH'
    cluster.on_exec("p", lambda call: ExecResult(error=error))
    with pytest.raises(PermanentError) as failed:
        await kube_call(EXEC, {"pod": "p", "command": ["mongosh"]})
    assert str(failed.value) == f"exec in Pod ns/p (container main): {error}"


async def test_a_stream_that_breaks_off_is_retryable(kube_call: Any, cluster: FakeCluster) -> None:
    cluster.add_pod("ns", "p")
    cluster.on_exec("p", lambda call: ExecResult(stdout="partial", hang_up=True))
    with pytest.raises(RetryableError) as broken:
        await kube_call(EXEC, {"pod": "p", "command": ["mongodump"]})
    assert str(broken.value) == (
        "exec in Pod ns/p (container main): the exec stream closed before the command "
        "reported its exit"
    )


async def test_forbidden(kube_call: Any, cluster: FakeCluster) -> None:
    cluster.add_pod("ns", "p", labels={"app": "x"})
    cluster.deny("create", "pods/exec", namespace="ns")
    with pytest.raises(PermanentError) as refused:
        await kube_call(EXEC, {"pod": "p", "command": ["true"]})
    assert "forbidden by Kubernetes RBAC: may not create pods/exec in namespace ns" in str(
        refused.value
    )
    cluster.deny("list", "pods")
    with pytest.raises(PermanentError) as refused:
        await kube_call(EXEC, {"selector": "app=x", "command": ["true"]})
    assert str(refused.value).endswith(
        'cannot list resource "pods" in API group "" in the namespace "ns"'
    )
    assert cluster.execs == []


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"command": ["true"]}, "give exactly one of 'pod' and 'selector'"),
        ({"pod": "p", "selector": "a=b", "command": ["true"]}, "exactly one"),
        ({"pod": "p", "all": True, "command": ["true"]}, "'all' needs a 'selector'"),
        ({"pod": "p", "command": []}, "command"),
        ({"pod": "P_Q", "command": ["true"]}, "pod"),
    ],
)
async def test_bad_params_are_named(kube_call: Any, params: dict[str, Any], problem: str) -> None:
    with pytest.raises(PermanentError, match=r"invalid params for kube\.exec") as bad:
        await kube_call(EXEC, params)
    assert problem in str(bad.value)


def test_declares_the_rbac_it_needs() -> None:
    import functions.kube  # noqa: F401  (registers kube.*)

    spec = default_registry.get(EXEC)
    assert spec is not None
    rules = {(r.resources, r.verbs) for r in spec.rbac}
    assert rules == {(("pods",), ("get", "list")), (("pods/exec",), ("create", "get"))}
