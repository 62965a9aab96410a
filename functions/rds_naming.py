"""Names for what the ``rds.*`` functions create: RDS identifiers filled in from templates
with values of the event (``{db}``, ``{backup_id}``, ...), and the ``snaphook.io/*`` tags
that trace a snapshot or a restored database back to its backup and run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from functions.sdk import Context, PermanentError

TAG_PREFIX = "snaphook.io/"
_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_NOT_NAME = re.compile(r"[^a-z0-9]+")
_NOT_TAG = re.compile(r"[^\w\s.:/=+\-@]")


def event_names(ctx: Context, db: str) -> dict[str, str]:
    """What identifier templates may name. ``{backup_id}`` falls back to the run id, which
    a retried step keeps, so the identifier stays stable either way."""
    backup = _mapping(ctx.event.data.get("backup"))
    target = _mapping(ctx.event.data.get("target"))
    return {
        "db": db,
        "backup_id": str(backup.get("id") or ctx.run_id),
        "backup_name": str(backup.get("name") or ""),
        "run_id": ctx.run_id,
        "namespace": str(target.get("namespace") or ""),
        "target": str(target.get("name") or ""),
    }


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def rds_identifier(template: str, names: Mapping[str, str], max_len: int) -> str:
    """Fill ``template`` and make the result a valid RDS identifier: lower-case letters,
    digits and single hyphens, starting with a letter. An over-long result is cut and gets
    a digest of the whole, so two long names never collapse into one."""

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in names:
            known = ", ".join(f"{{{name}}}" for name in names)
            raise PermanentError(f"identifier template: unknown {{{key}}} (known: {known})")
        return names[key]

    name = _NOT_NAME.sub("-", _PLACEHOLDER.sub(fill, template).lower()).strip("-")
    if not name:
        raise PermanentError(f"identifier template {template!r} renders empty")
    if not name[0].isalpha():
        name = f"snaphook-{name}"
    if len(name) > max_len:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: max_len - 9].rstrip('-')}-{digest}"
    return name


def resource_tags(ctx: Context, extra: Mapping[str, str], **more: str) -> list[dict[str, str]]:
    """The caller's tags plus ours (ours win: they are how a snapshot is traced back)."""
    backup = _mapping(ctx.event.data.get("backup"))
    ours = {
        "backup-id": str(backup.get("id") or ""),
        "backup-name": str(backup.get("name") or ""),
        "run-id": ctx.run_id,
        **more,
    }
    tags = dict(extra)
    tags.update({TAG_PREFIX + key: value for key, value in ours.items() if value})
    # RDS refuses a whole request over one odd character in a tag value.
    return [{"Key": k, "Value": _NOT_TAG.sub("_", v)[:256]} for k, v in tags.items()]
