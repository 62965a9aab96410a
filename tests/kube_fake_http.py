"""The HTTP face of the fake Kubernetes API server (see :mod:`tests.kube_fake`).

Every request is recorded (``cluster.requests``), authenticated (bearer token, else 401),
routed by path (:func:`tests.kube_fake_resources.parse_path`, else 404), authorised
against ``cluster.deny`` rules (403), then served: get, list, watch (newline-delimited
JSON events over a chunked response), create, update, patch, delete, deletecollection,
and the status, scale, log and exec subresources.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import MultiDict

from tests.kube_fake_exec import serve_exec
from tests.kube_fake_patch import CONTENT_TYPES, PatchError, apply_patch
from tests.kube_fake_resources import (
    ApiError,
    Resource,
    Selector,
    SelectorError,
    Target,
    bad_request,
    forbidden,
    parse_path,
)

if TYPE_CHECKING:
    from tests.kube_fake import FakeCluster, RecordedRequest
    from tests.kube_fake_store import Change

CLUSTER: web.AppKey[FakeCluster] = web.AppKey("cluster")


def build_app(cluster: FakeCluster) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[CLUSTER] = cluster
    app.router.add_route("*", "/{tail:.*}", _handle)

    async def stop(_: web.Application) -> None:
        await cluster.shutdown()

    app.on_shutdown.append(stop)
    return app


async def _handle(request: web.Request) -> web.StreamResponse:
    from tests.kube_fake import RecordedRequest

    cluster = request.app[CLUSTER]
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
    record = RecordedRequest(
        request.method, request.path, MultiDict(request.query), content_type, None
    )
    cluster.requests.append(record)
    cluster.notify()  # lets tests wait_until a request arrived
    try:
        response = await _serve(cluster, request, record)
    except ApiError as error:
        response = error.response()
    record.status = response.status
    return response


def _verb(method: str, target: Target, query: Any) -> str:
    if target.subresource == "exec":
        return "create"
    watching = str(query.get("watch", "")).lower() in ("1", "true")
    if method == "GET":
        if watching:
            return "watch"
        return "get" if target.name else "list"
    if method == "DELETE":
        return "delete" if target.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


async def _serve(
    cluster: FakeCluster, request: web.Request, record: RecordedRequest
) -> web.StreamResponse:
    if request.headers.get("Authorization") != f"Bearer {cluster.token}":
        raise ApiError(401, "Unauthorized", "Unauthorized")
    target = parse_path(request.path)
    if target is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    verb = _verb(request.method, target, request.query)
    record.verb, record.resource = verb, target.rbac_resource
    record.namespace, record.name = target.namespace, target.name
    if target.subresource != "exec" and request.body_exists:
        try:
            record.body = json.loads(await request.read() or b"null")
        except ValueError:
            raise bad_request("the body of the request is not valid JSON") from None
    if cluster.is_denied(verb, target.rbac_resource, target.namespace):
        raise forbidden(target, verb, cluster.user)
    injected = cluster.injected_failure(verb, target.rbac_resource)
    if injected is not None:
        return injected
    if target.subresource == "exec":
        return await serve_exec(cluster, request, target)
    if target.subresource == "log" and target.resource.plural == "pods":
        return await _logs(cluster, request, target)
    if target.subresource == "scale" and target.resource.scale:
        return _scale(cluster, request.method, target, record)
    if target.subresource == "status" and target.resource.status:
        return _status_subresource(cluster, request.method, target, record)
    if target.subresource is not None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return await _serve_object(cluster, request, target, verb, record)


async def _serve_object(
    cluster: FakeCluster,
    request: web.Request,
    target: Target,
    verb: str,
    record: RecordedRequest,
) -> web.StreamResponse:
    resource, namespace, name = target.resource, target.namespace, target.name or ""
    try:
        selector = Selector.from_query(request.query, resource)
    except SelectorError as exc:
        raise bad_request(str(exc)) from None
    if verb == "watch":
        if target.name:
            selector = Selector(selector.labels, (*selector.fields, ("metadata.name", True, name)))
        return await _watch(cluster, request, resource, namespace, selector)
    if verb == "list":
        return _list(cluster, resource, namespace, selector)
    if verb == "get":
        return _json(cluster.require(resource, namespace, name))
    if verb == "create":
        body = _object_body(record.body, resource)
        return _json(cluster.create_object(resource, body, namespace), 201)
    if verb == "update":
        body = _object_body(record.body, resource)
        if (body.get("metadata") or {}).get("name") != name:
            raise bad_request("the name of the object does not match the name on the URL")
        current = cluster.require(resource, namespace, name)
        return _json(cluster.replace_object(resource, current, body))
    if verb == "patch":
        current = cluster.require(resource, namespace, name)
        return _json(cluster.replace_object(resource, current, _patched(record, current)))
    if verb == "delete":
        return _delete(cluster, resource, namespace, name, record.propagation_policy)
    if verb == "deletecollection":
        gone = [
            cluster.delete_object(resource, namespace, o["metadata"]["name"], None)
            for o in list(cluster.select(resource, namespace, selector))
        ]
        return _json(_list_body(cluster, resource, gone))
    raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method: {verb}")


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def _object_body(body: Any, resource: Resource) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the body of the request must be a JSON object")
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if (kind and kind != resource.kind) or (api_version and api_version != resource.api_version):
        raise bad_request(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({resource.api_version}) or kind {kind} is not {resource.kind}"
        )
    return body


def _patched(record: RecordedRequest, current: dict[str, Any]) -> dict[str, Any]:
    if record.content_type not in CONTENT_TYPES:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types "
            f"include: {', '.join(CONTENT_TYPES)}",
        )
    try:
        return apply_patch(record.content_type, copy.deepcopy(current), record.body)
    except PatchError as exc:
        raise ApiError(422, "Invalid", str(exc)) from None


def _list_body(
    cluster: FakeCluster, resource: Resource, items: list[dict[str, Any]]
) -> dict[str, Any]:
    stripped = []
    for item in items:
        copied = copy.deepcopy(item)
        copied.pop("kind", None)  # list items carry no kind/apiVersion of their own
        copied.pop("apiVersion", None)
        stripped.append(copied)
    return {
        "kind": f"{resource.kind}List",
        "apiVersion": resource.api_version,
        "metadata": {"resourceVersion": str(cluster.resource_version)},
        "items": stripped,
    }


def _list(
    cluster: FakeCluster, resource: Resource, namespace: str | None, selector: Selector
) -> web.Response:
    return _json(_list_body(cluster, resource, cluster.select(resource, namespace, selector)))


def _delete(
    cluster: FakeCluster,
    resource: Resource,
    namespace: str | None,
    name: str,
    policy: str | None,
) -> web.Response:
    gone = cluster.delete_object(resource, namespace, name, policy)
    if resource.plural == "pods":
        return _json(gone)  # pods answer with the object, most kinds with a Status
    details: dict[str, Any] = {
        "name": name,
        "kind": resource.plural,
        "uid": gone["metadata"]["uid"],
    }
    if resource.group:
        details["group"] = resource.group
    return _json(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }
    )


# --- subresources ------------------------------------------------------------------------


def _status_subresource(
    cluster: FakeCluster, method: str, target: Target, record: RecordedRequest
) -> web.Response:
    current = cluster.require(target.resource, target.namespace, target.name or "")
    if method == "GET":
        return _json(current)
    if method == "PUT":
        body = _object_body(record.body, target.resource)
    elif method == "PATCH":
        body = _patched(record, current)
    else:
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on status")
    return _json(cluster.replace_object(target.resource, current, body, part="status"))


def _selector_string(spec: dict[str, Any]) -> str:
    selector = spec.get("selector") or {}
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        values = ",".join(expr.get("values") or [])
        op = {"In": "in", "NotIn": "notin"}.get(expr["operator"])
        if op:
            terms.append(f"{expr['key']} {op} ({values})")
        else:
            terms.append(expr["key"] if expr["operator"] == "Exists" else f"!{expr['key']}")
    return ",".join(terms)


def scale_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The autoscaling/v1 Scale view of a workload."""
    meta = obj["metadata"]
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            key: meta[key]
            for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
        },
        "spec": {"replicas": obj["spec"].get("replicas", 1)},
        "status": {
            "replicas": (obj.get("status") or {}).get("replicas", 0),
            "selector": _selector_string(obj["spec"]),
        },
    }


def _scale(
    cluster: FakeCluster, method: str, target: Target, record: RecordedRequest
) -> web.Response:
    current = cluster.require(target.resource, target.namespace, target.name or "")
    if method == "GET":
        return _json(scale_of(current))
    view = scale_of(current)
    if method == "PUT":
        if not isinstance(record.body, dict) or record.body.get("kind") not in (None, "Scale"):
            raise bad_request("the body of the request must be an autoscaling/v1 Scale")
        wanted = record.body
    elif method == "PATCH":
        wanted = _patched(record, view)
    else:
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on scale")
    updated = copy.deepcopy(current)
    updated["spec"]["replicas"] = (wanted.get("spec") or {}).get("replicas")
    rv = (wanted.get("metadata") or {}).get("resourceVersion")
    updated["metadata"]["resourceVersion"] = rv or current["metadata"]["resourceVersion"]
    return _json(scale_of(cluster.replace_object(target.resource, current, updated)))


async def _logs(cluster: FakeCluster, request: web.Request, target: Target) -> web.StreamResponse:
    pod = cluster.require(target.resource, target.namespace, target.name or "")
    names = [c["name"] for c in pod["spec"]["containers"]]
    container = request.query.get("container")
    if container is None:
        if len(names) > 1:
            raise bad_request(
                f"a container name must be specified for pod {target.name}, choose one of: "
                f"[{' '.join(names)}]"
            )
        container = names[0]
    elif container not in names:
        raise bad_request(f"container {container} is not valid for pod {target.name}")
    text = cluster.logs_of(target.namespace or "", target.name or "", container)
    if "tailLines" in request.query:
        tail = int(request.query["tailLines"])
        text = "".join(text.splitlines(keepends=True)[-tail:] if tail else [])
    data = text.encode()
    if "limitBytes" in request.query:
        data = data[: int(request.query["limitBytes"])]
    follow = str(request.query.get("follow", "")).lower() in ("1", "true")
    if not follow:
        return web.Response(body=data, content_type="text/plain")
    return await _follow_logs(cluster, request, target, container, data)


async def _follow_logs(
    cluster: FakeCluster, request: web.Request, target: Target, container: str, sent: bytes
) -> web.StreamResponse:
    """Stream logs until the pod stops running (or is deleted)."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    await response.write(sent)
    offset = len(cluster.logs_of(target.namespace or "", target.name or "", container).encode())
    while True:
        text = cluster.logs_of(target.namespace or "", target.name or "", container).encode()
        if len(text) > offset:
            await response.write(text[offset:])
            offset = len(text)
        pod = cluster.lookup(target.resource, target.namespace, target.name or "")
        if pod is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            break
        await cluster.changed().wait()
    await response.write_eof()
    return response


# --- watch -------------------------------------------------------------------------------


def _visible(
    change: Change, resource: Resource, namespace: str | None, selector: Selector
) -> tuple[str, dict[str, Any]] | None:
    """The event a watcher sees for ``change``: objects moving out of the selection are
    DELETED for it, objects moving in are ADDED, as the API server's watch cache does."""
    if change.resource != resource:
        return None

    def selected(obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        in_namespace = namespace in (None, obj["metadata"].get("namespace"))
        return in_namespace and selector.matches(obj)

    if change.type == "DELETED":
        return ("DELETED", change.obj) if selected(change.old) else None
    now, before = selected(change.obj), change.type == "MODIFIED" and selected(change.old)
    if now and before:
        return "MODIFIED", change.obj
    if now:
        return "ADDED", change.obj
    return ("DELETED", change.obj) if before else None


async def _watch(
    cluster: FakeCluster,
    request: web.Request,
    resource: Resource,
    namespace: str | None,
    selector: Selector,
) -> web.StreamResponse:
    since = request.query.get("resourceVersion", "")
    timeout = request.query.get("timeoutSeconds")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    queue: asyncio.Queue[Change | None] = asyncio.Queue()
    cluster.add_watcher(queue)  # no await between this and the snapshot: nothing is missed
    try:
        if since in ("", "0"):
            # "Most recent" and "any": the current objects as ADDED, then changes.
            events = [("ADDED", o) for o in cluster.select(resource, namespace, selector)]
        else:
            try:
                backlog = cluster.history_since(int(since))
            except ApiError as error:
                await _write_event(response, "ERROR", error.body)
                return response
            events = [e for c in backlog if (e := _visible(c, resource, namespace, selector))]
        for kind, obj in events:
            await _write_event(response, kind, obj)
        async with asyncio.timeout(float(timeout) if timeout else None):
            while (change := await queue.get()) is not None:
                if event := _visible(change, resource, namespace, selector):
                    await _write_event(response, *event)
    except TimeoutError:
        pass  # timeoutSeconds elapsed: the server ends the watch, the client may renew it
    except ConnectionResetError:
        return response  # the client went away
    finally:
        cluster.watchers.discard(queue)
    with contextlib.suppress(ConnectionResetError):  # the server may be shutting down
        await response.write_eof()
    return response


async def _write_event(response: web.StreamResponse, kind: str, obj: dict[str, Any]) -> None:
    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
