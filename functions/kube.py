"""Kubernetes hook functions (kube.*): exec, job, scale, service switch, annotate, event."""

# Importing a module registers its functions.
from functions import (  # noqa: F401
    kube_annotate,
    kube_event,
    kube_exec,
    kube_job,
    kube_scale,
    kube_service,
)
