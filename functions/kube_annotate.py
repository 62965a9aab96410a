"""``kube.annotate``: set or remove annotations (and labels) on the event's target or a
named object, with one JSON merge patch of its metadata.

A key whose value is ``null`` is removed; any other value is set (numbers and booleans as
their text, since annotation and label values are strings). Typical uses: stamp the
workload with the last backup (``snaphook.io/last-backup: "{{ backup.id }}"``), or label a
Namespace while it is being backed up.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, model_validator

from functions.kube_client import KINDS, api_client, patch_object
from functions.kube_params import LabelKey, LabelValue, ObjectParams, object_ref, text_map
from functions.sdk import Context, KubeRule, function

ANNOTATION_BYTES = 256 * 1024  # the API server's limit for all annotations of an object

# The kinds kube.annotate can address (see kube_client.KINDS); each needs patch on its own.
# Every kind but Secret: patch on secrets would let snaphook rewrite any Secret's data.
ANNOTATABLE = tuple(info.kind for info in KINDS if info.kind != "Secret")
RBAC = (
    KubeRule(("apps",), ("deployments", "statefulsets", "daemonsets", "replicasets"), ("patch",)),
    KubeRule(
        ("",),
        ("pods", "services", "configmaps", "persistentvolumeclaims", "namespaces"),
        ("patch",),
    ),
    KubeRule(("batch",), ("jobs", "cronjobs"), ("patch",)),
)


Annotations = Annotated[dict[LabelKey, str | None], BeforeValidator(text_map)]
Labels = Annotated[dict[LabelKey, LabelValue | None], BeforeValidator(text_map)]


class AnnotateParams(ObjectParams):
    annotations: Annotations = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)

    @model_validator(mode="after")
    def _something(self) -> AnnotateParams:
        if not self.annotations and not self.labels:
            raise ValueError("give annotations or labels (a null value removes one)")
        size = sum(len(k) + len(v or "") for k, v in self.annotations.items())
        if size > ANNOTATION_BYTES:
            raise ValueError(f"annotations: {size} bytes, the API server takes at most 256 KiB")
        return self


class AnnotateResult(BaseModel):
    kind: str
    namespace: str
    name: str
    set: list[str]  # keys set, annotations and labels alike
    removed: list[str]  # keys removed (whether or not they were there)
    resource_version: str


@function("kube.annotate", rbac=RBAC)
async def annotate(ctx: Context, p: AnnotateParams) -> AnnotateResult:
    """Set (or with ``null`` remove) annotations and labels on the target or a named object."""
    ref = object_ref(ctx, p, what="kube.annotate", allowed=ANNOTATABLE, cluster_scoped=True)
    metadata: dict[str, Any] = {}
    if p.annotations:
        metadata["annotations"] = p.annotations
    if p.labels:
        metadata["labels"] = p.labels
    api = await api_client(ctx.kube)
    stored = await patch_object(api, ref, {"metadata": metadata})
    changes = {**p.annotations, **p.labels}
    ctx.logger.info("annotated %s", ref)
    return AnnotateResult(
        kind=ref.kind.kind,
        namespace=ref.namespace,
        name=ref.name,
        set=sorted(k for k, v in changes.items() if v is not None),
        removed=sorted(k for k, v in changes.items() if v is None),
        resource_version=str(stored.get("metadata", {}).get("resourceVersion", "")),
    )
