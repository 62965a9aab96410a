"""``kube.service_switch`` / ``kube.service_switch_revert``: send a Service's traffic to a
maintenance backend during a backup, and back.

``mode: maintenance`` replaces the Service's ``spec.selector`` with the maintenance
backend's selector; the selector it replaced goes into the outputs (``original_selector``)
and onto the Service as the annotation ``snaphook.io/original-selector``, in the same
patch, so the revert works from any process and even when the switching step's outputs
were never recorded (it failed after the patch). A repeated switch finds the annotation and
keeps it. ``mode: restore`` (or ``kube.service_switch_revert``, the lease release) puts
back ``selector`` when given, else the annotated one, and drops the annotation; with
neither it does nothing.

Each patch is a JSON merge patch carrying the resourceVersion it was computed from: if the
Service changed meanwhile the API server answers 409 and the switch reads it again. A merge
patch merges maps, so keys of the old selector that the new one lacks are sent as ``null``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from functions.kube_client import ObjectRef, api_client, kind_info, patch_object, read_object
from functions.kube_params import LabelKey, LabelValue, Namespace, target_namespace, text_map
from functions.kube_patch import guarded, retry_conflicts
from functions.sdk import Context, KubeRule, PermanentError, function

if TYPE_CHECKING:  # kubernetes_asyncio is imported where used: it is slow to import
    from kubernetes_asyncio.client import ApiClient

ORIGINAL = "snaphook.io/original-selector"

RBAC = (KubeRule(("",), ("services",), ("get", "patch")),)

SERVICE = kind_info("Service")


Selector = Annotated[dict[LabelKey, LabelValue] | None, BeforeValidator(text_map)]


class RevertParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: str = Field(min_length=1, max_length=63, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    namespace: Namespace | None = None  # default: the event target's
    # The selector to put back; default: the one the switch recorded on the Service.
    selector: Selector = None


class SwitchParams(RevertParams):
    mode: Literal["maintenance", "restore"] = "maintenance"

    @model_validator(mode="after")
    def _needs_selector(self) -> SwitchParams:
        if self.mode == "maintenance" and not self.selector:
            raise ValueError("mode maintenance needs selector: the maintenance backend's labels")
        return self


class SwitchResult(BaseModel):
    service: str
    namespace: str
    mode: Literal["maintenance", "restore"]
    selector: dict[str, str] | None  # the selector in place now
    original_selector: dict[str, str] | None = None  # what maintenance replaced
    changed: bool  # False: it was so already (restoring: or nothing was recorded)


def _current(service: dict[str, Any]) -> dict[str, str]:
    return dict((service.get("spec") or {}).get("selector") or {})


def _recorded(service: dict[str, Any], ref: ObjectRef) -> dict[str, str] | None:
    annotations = (service.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(ORIGINAL)
    if text is None:
        return None
    try:
        selector = json.loads(text)
    except json.JSONDecodeError:
        selector = None
    if not isinstance(selector, dict):
        raise PermanentError(f"{ref}: annotation {ORIGINAL} is not a JSON selector")
    return {str(k): str(v) for k, v in selector.items()}


def _switch_patch(
    service: dict[str, Any], selector: dict[str, str], record: dict[str, str] | None
) -> dict[str, Any]:
    """The guarded merge patch that makes ``selector`` the Service's selector and sets (or,
    with ``record`` None, removes) the annotation. A merge patch merges maps, so keys of the
    old selector that the new one lacks are sent as ``null``."""
    replacing = {key: None for key in _current(service)} | selector
    annotation = None if record is None else json.dumps(record, sort_keys=True)
    patch = {"metadata": {"annotations": {ORIGINAL: annotation}}, "spec": {"selector": replacing}}
    return guarded(service, patch)


def _show(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "nothing"


# --- the two directions --------------------------------------------------------------------


async def _maintenance(
    ctx: Context, api: ApiClient, ref: ObjectRef, selector: dict[str, str]
) -> SwitchResult:
    async def attempt() -> SwitchResult:
        service = await read_object(api, ref)
        current = _current(service)
        recorded = _recorded(service, ref)
        # An earlier switch not reverted yet recorded the real original: keep that one.
        original = current if recorded is None else recorded
        changed = current != selector
        if changed:
            await patch_object(api, ref, _switch_patch(service, selector, original))
        return SwitchResult(
            service=ref.name,
            namespace=ref.namespace,
            mode="maintenance",
            selector=selector,
            original_selector=original,
            changed=changed,
        )

    result = await retry_conflicts(attempt)
    ctx.logger.info(
        "%s selects %s (was %s)", ref, _show(selector), _show(result.original_selector or {})
    )
    return result


async def _restore(
    ctx: Context, api: ApiClient, ref: ObjectRef, given: dict[str, str] | None
) -> SwitchResult:
    async def attempt() -> SwitchResult:
        service = await read_object(api, ref)
        current = _current(service)
        recorded = _recorded(service, ref)
        selector = given if given is not None else recorded
        if selector is None:
            ctx.logger.info("%s: no selector recorded, nothing to restore", ref)
            return _restored(ref, current, changed=False)
        if current != selector or recorded is not None:
            await patch_object(api, ref, _switch_patch(service, selector, None))
        return _restored(ref, selector, changed=current != selector)

    result = await retry_conflicts(attempt)
    if result.changed:
        ctx.logger.info("%s selects %s again", ref, _show(result.selector or {}))
    return result


def _restored(ref: ObjectRef, selector: dict[str, str], *, changed: bool) -> SwitchResult:
    return SwitchResult(
        service=ref.name,
        namespace=ref.namespace,
        mode="restore",
        selector=selector,
        changed=changed,
    )


def _service(ctx: Context, p: RevertParams) -> ObjectRef:
    return ObjectRef(target_namespace(ctx, p.namespace), SERVICE, p.service)


@function("kube.service_switch", rbac=RBAC)
async def service_switch(ctx: Context, p: SwitchParams) -> SwitchResult:
    """Point a Service at a maintenance backend (``mode: maintenance``, ``selector``) or
    back (``mode: restore``); the replaced selector is kept in outputs and on the Service."""
    api = await api_client(ctx.kube)
    if p.mode == "maintenance":
        assert p.selector is not None  # the validator asks for it
        return await _maintenance(ctx, api, _service(ctx, p), p.selector)
    return await _restore(ctx, api, _service(ctx, p), p.selector)


@function("kube.service_switch_revert", rbac=RBAC)
async def service_switch_revert(ctx: Context, p: RevertParams) -> SwitchResult:
    """Put back the selector ``kube.service_switch`` replaced (or ``selector``); idempotent."""
    return await _restore(ctx, await api_client(ctx.kube), _service(ctx, p), p.selector)
