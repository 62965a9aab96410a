"""Params shared by kube.* functions: which object they act on, and values as templates
render them.

Blueprint authors mostly name no object: ``kind``, ``name`` and ``namespace`` each default
to the target's (``ctx.event.subject``, ``namespace/Kind/name``). Naming another kind
without a name is an error rather than a guess; a namespace alone keeps the target's kind
and name (the same app in another namespace).

Templates render to strings, so a list or mapping computed by a template arrives as JSON
text (``{{ x | tojson }}``), and Kubernetes wants text where YAML gives numbers (an env
value ``5432``, a label ``true``): :data:`TextList` and :data:`TextMap` accept both.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from functions.kube_client import KindInfo, ObjectRef, event_target, kind_info
from functions.sdk import Context, PermanentError

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label or annotation key: an optional DNS-subdomain prefix and "/", then a name.
QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"

Namespace = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=QUALIFIED_NAME)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


# --- values as templates render them -------------------------------------------------------


def text(value: Any) -> Any:
    """A YAML scalar as the text Kubernetes wants (``5432`` → ``"5432"``, ``true`` →
    ``"true"``); ``None`` (a key to delete) and anything else are left as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _from_json(value: str, kind: type, what: str) -> Any:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, kind):
        raise ValueError(f"not a JSON {what} (render {what}s with `| tojson`)")
    return parsed


def text_list(value: Any) -> Any:
    """``"[...]"`` is a JSON list, any other string a list of that one item."""
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            return [value]
        value = _from_json(value, list, "list")
    return [text(item) for item in value] if isinstance(value, list) else value


def text_map(value: Any) -> Any:
    """A string is a JSON object (blank: none given); values become text."""
    if isinstance(value, str):
        if not value.strip():
            return None
        value = _from_json(value, dict, "object")
    return {key: text(item) for key, item in value.items()} if isinstance(value, dict) else value


TextList = Annotated[list[str], BeforeValidator(text_list)]
TextMap = Annotated[dict[str, str], BeforeValidator(text_map)]


# --- the object ----------------------------------------------------------------------------


class ObjectParams(BaseModel):
    """The object to act on; each field defaults to the event's target."""

    model_config = ConfigDict(extra="forbid")

    kind: str | None = Field(default=None, min_length=1, max_length=63)
    name: ObjectName | None = None
    namespace: Namespace | None = None


def target_namespace(ctx: Context, given: str | None = None) -> str:
    """``given``, else the namespace of the event's target (any kind, custom ones too)."""
    if given:
        return given
    target = ctx.event.data.get("target") if isinstance(ctx.event.data, dict) else None
    if isinstance(target, dict) and target.get("namespace"):
        return str(target["namespace"])
    namespace = ctx.event.subject.split("/", 1)[0].strip()
    if not namespace:
        raise PermanentError(
            f"the event's subject {ctx.event.subject[:100]!r} names no namespace; give namespace"
        )
    return namespace


def object_ref(
    ctx: Context,
    p: ObjectParams,
    *,
    what: str,
    allowed: tuple[str, ...] | None = None,
    cluster_scoped: bool = False,
) -> ObjectRef:
    """The object ``p`` names, filled in from the event's target; ``allowed`` restricts the
    kinds, ``cluster_scoped`` admits Namespaces (``what`` names the function in errors)."""
    if p.kind is None and p.name is None:
        target = event_target(ctx.event)
        kind, name = target.kind, target.name
    elif p.kind is not None and p.name is not None:
        kind, name = kind_info(p.kind), p.name
    elif p.name is not None:
        kind, name = event_target(ctx.event).kind, p.name  # another object of the same kind
    else:
        raise PermanentError(f"{what}: kind {p.kind} needs a name")
    _check_kind(kind, allowed, cluster_scoped, what)
    return ObjectRef(target_namespace(ctx, p.namespace), kind, name)


def _check_kind(
    kind: KindInfo, allowed: tuple[str, ...] | None, cluster_scoped: bool, what: str
) -> None:
    if allowed is not None and kind.kind not in allowed:
        raise PermanentError(
            f"{what} works on {_either(allowed)} objects, not {kind.kind}; give kind and name"
        )
    if not kind.namespaced and not cluster_scoped:
        raise PermanentError(f"{what} works on namespaced objects, not {kind.kind}")


def _either(kinds: tuple[str, ...]) -> str:
    """``A and B``, ``A, B and C``: the kinds a function works on, as a message names them."""
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} and {kinds[-1]}"
