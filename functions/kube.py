"""Kubernetes hook functions (kube.*): exec, job, scale, service switch, annotate, event."""
