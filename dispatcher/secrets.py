"""Secret resolvers: where ``secret(name, key)`` in a template gets its value.

:class:`EnvSecretResolver` reads environment variables, which is what a pod gets from
``envFrom: secretRef`` and what a developer can set in a shell. A Kubernetes-API resolver
implements the same :class:`functions.sdk.SecretResolver` protocol.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pydantic import SecretStr

from dispatcher.errors import SnaphookError

__all__ = ["EnvSecretResolver", "SecretNotFoundError", "SecretUnavailableError"]

_NOT_ALNUM = re.compile(r"[^A-Z0-9]")


class SecretNotFoundError(SnaphookError, KeyError):
    """A secret (or one key of it) does not exist. Also a ``KeyError``, as a failed lookup."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # KeyError would quote the message as if it were a missing key.
        return self.message


class SecretUnavailableError(SnaphookError):
    """Where the secret lives cannot answer now (the API server is away): worth retrying,
    and not a miss (a chain does not fall through to the next resolver)."""

    retryable = True


class EnvSecretResolver:
    """Secrets from environment variables: ``secret('pg-creds', 'dsn')`` reads
    ``SNAPHOOK_SECRET_PG_CREDS_DSN``. The namespace is ignored: a process's environment
    belongs to one namespace.
    """

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, prefix: str = "SNAPHOOK_SECRET_"
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._prefix = prefix

    def variable(self, name: str, key: str) -> str:
        """The environment variable holding ``key`` of secret ``name``."""
        return self._prefix + _NOT_ALNUM.sub("_", f"{name}_{key}".upper())

    async def get(self, name: str, key: str, *, namespace: str | None = None) -> SecretStr:
        variable = self.variable(name, key)
        value = self._environ.get(variable)
        if value is None:
            raise SecretNotFoundError(f"secret {name}/{key} not found (set {variable})")
        return SecretStr(value)
