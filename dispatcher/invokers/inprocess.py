"""Run a registered function in this process."""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any

import aiohttp
from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError

from dispatcher.invokers import Invocation
from dispatcher.redaction import redactor
from functions.sdk import (
    AwsConfig,
    Context,
    FunctionRegistry,
    KubeConfig,
    ObjectStore,
    PermanentError,
    SecretResolver,
)

log = logging.getLogger("snaphook.functions")

_SECRET_TYPES = (SecretStr, SecretBytes)  # a tuple: ``A | B`` would build a union per call
_SEQUENCES = (list, tuple, set)
# Field names per params model: ``model_fields`` is a computed property, and the models
# are the registered functions', a fixed set.
_FIELD_NAMES: dict[type[BaseModel], tuple[str, ...]] = {}


class StepLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds run_id/step/function to every record, keeping the caller's own ``extra``
    (the stdlib adapter would replace it)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def remember_secrets(value: Any) -> None:
    """Teach the redactor every SecretStr in validated params, so that a function which
    echoes one into a plain string output or log line cannot leak it."""
    if isinstance(value, _SECRET_TYPES):
        redactor.add(value)
    elif isinstance(value, BaseModel):
        for name in _field_names(type(value)):
            remember_secrets(getattr(value, name))
    elif isinstance(value, dict):
        for item in value.values():
            remember_secrets(item)
    elif isinstance(value, _SEQUENCES):
        for item in value:
            remember_secrets(item)


def _field_names(model: type[BaseModel]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(model)
    if names is None:
        names = _FIELD_NAMES[model] = tuple(model.model_fields)
    return names


def describe_validation(function: str, exc: ValidationError) -> str:
    """Name each bad field and why, never the value (it may be a secret)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "(params)"
        problems.append(f"{field}: {error['msg']}")
    return f"invalid params for {function}: " + "; ".join(problems)


def outputs_of(result: BaseModel | None) -> dict[str, Any]:
    """JSON-ready outputs; SecretStr fields serialise masked, known secrets are redacted."""
    if result is None:
        return {}
    dumped = result.model_dump(mode="json", by_alias=True)
    return dict(redactor.redact_obj(dumped))


class InProcessInvoker:
    def __init__(
        self,
        registry: FunctionRegistry,
        http: aiohttp.ClientSession,
        secrets: SecretResolver,
        object_store: ObjectStore | None = None,
        aws: AwsConfig | None = None,
        kube: KubeConfig | None = None,
    ) -> None:
        self._registry = registry
        self._http = http
        self._secrets = secrets
        self._object_store = object_store or ObjectStore()
        self._aws = aws or AwsConfig()
        self._kube = kube or KubeConfig()

    async def invoke(self, invocation: Invocation) -> dict[str, Any]:
        spec = self._registry.get(invocation.function)
        if spec is None:
            raise PermanentError(f"unknown function {invocation.function!r}")
        try:
            params = spec.params_model.model_validate(invocation.params)
        except ValidationError as exc:
            raise PermanentError(describe_validation(spec.name, exc)) from None
        remember_secrets(params)
        ctx = Context(
            event=invocation.event,
            run_id=invocation.run_id,
            step=invocation.step,
            attempt=invocation.attempt,
            deadline=time.monotonic() + invocation.timeout,
            http=self._http,
            secrets=self._secrets,
            logger=StepLogger(
                log,
                {"run_id": invocation.run_id, "step": invocation.step, "function": spec.name},
            ),
            outputs=invocation.outputs,
            lease_id=invocation.lease_id,
            object_store=self._object_store,
            aws=self._aws,
            kube=self._kube,
        )
        return outputs_of(await spec.fn(ctx, params))
