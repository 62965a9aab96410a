"""Sandboxed Jinja2 for blueprint ``with`` values.

Templates render in Jinja2's immutable sandbox with :class:`jinja2.StrictUndefined`: a typo
in ``{{ params.databse }}`` fails the step instead of sending an empty string to a database.
Two globals reach outside the template:

``env(name, default)``
    an environment variable, optionally limited to an allow-list;
``secret(name, key)``
    an async lookup through a :class:`functions.sdk.SecretResolver`. The value is registered
    with :data:`dispatcher.redaction.redactor` before the template sees it, so it is masked
    wherever the rendered text ends up, while the step still receives the plain string
    (it usually lands inside a DSN or a header).

Error messages name the template and what was missing, never a rendered value.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Collection, Mapping
from typing import Any

import jinja2
from jinja2 import StrictUndefined, meta, nodes, pass_context
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dispatcher.errors import SnaphookError
from dispatcher.redaction import redactor
from functions.sdk import SecretResolver

__all__ = ["TemplateEngine", "TemplateError"]

# Carries the namespace of the current render to ``secret()``; not a name authors use.
_NAMESPACE_VAR = "__snaphook_namespace__"
_SHOWN_CHARS = 160
_NO_DEFAULT = object()


class TemplateError(SnaphookError):
    """A template failed to render: undefined name, sandbox violation, missing secret, ...

    Retryable only when what failed was an outage (a secret store that did not answer)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class TemplateEngine:
    """Parses, statically inspects and renders blueprint templates. One per process."""

    def __init__(
        self,
        secrets: SecretResolver,
        *,
        environ: Mapping[str, str] | None = None,
        env_allow: Collection[str] | None = None,
        cache_size: int = 512,
    ) -> None:
        self._secrets = secrets
        self._environ = os.environ if environ is None else environ
        self._env_allow = None if env_allow is None else tuple(env_allow)
        self._jinja = ImmutableSandboxedEnvironment(
            enable_async=True,
            undefined=StrictUndefined,
            autoescape=False,  # the output goes to functions, not to HTML
            keep_trailing_newline=True,  # YAML block scalars keep their last newline
        )
        self._jinja.globals.update(env=self._env, secret=self._make_secret())
        self._compile = functools.lru_cache(maxsize=cache_size)(self._jinja.from_string)

    @property
    def global_names(self) -> frozenset[str]:
        """Names every template may use besides the render context (``env``, ``range``, ...)."""
        return frozenset(self._jinja.globals)

    @staticmethod
    def is_template(value: str) -> bool:
        return "{{" in value or "{%" in value

    def parse(self, source: str) -> nodes.Template:
        """The template's AST; raises :class:`jinja2.TemplateSyntaxError`."""
        return self._jinja.parse(source)

    def referenced(self, source: str) -> set[tuple[str, ...]]:
        """Names the template reads from its context, each with its constant attribute path.

        ``{{ steps.freeze.outputs.lsn }}`` gives ``("steps", "freeze", "outputs", "lsn")``;
        the path stops at the first non-constant part (``params[name]`` gives ``("params",)``).
        Names the template sets itself (loop variables, ``{% set %}``) are left out.
        """
        ast = self.parse(source)
        free = meta.find_undeclared_variables(ast) | self._globals_used(ast)
        found: set[tuple[str, ...]] = set()
        _collect_paths(ast, free, found)
        return found

    def _globals_used(self, ast: nodes.Template) -> set[str]:
        # jinja2.meta leaves out the environment's globals, but callers want to see uses of
        # ``secret()`` and ``env()`` too. A name the template assigns itself shadows a global.
        names = list(ast.find_all(nodes.Name))
        assigned = {name.name for name in names if name.ctx != "load"}
        loaded = {name.name for name in names if name.ctx == "load"}
        return (loaded & set(self._jinja.globals)) - assigned

    def compiled(self, source: str) -> jinja2.Template:
        """The compiled template for ``source``, from an LRU cache keyed by the source."""
        return self._compile(source)

    async def render(
        self, value: Any, context: Mapping[str, Any], *, namespace: str | None = None
    ) -> Any:
        """``value`` with every template string in it rendered; dicts and lists are copied,
        everything else is returned as it is."""
        variables = {**context, _NAMESPACE_VAR: namespace}
        return await self._render_value(value, variables)

    async def _render_value(self, value: Any, variables: dict[str, Any]) -> Any:
        if isinstance(value, str):
            if not self.is_template(value):
                return value
            return await self._render_string(value, variables)
        if isinstance(value, Mapping):
            return {key: await self._render_value(item, variables) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [await self._render_value(item, variables) for item in value]
        return value

    async def _render_string(self, source: str, variables: dict[str, Any]) -> str:
        try:
            return await self.compiled(source).render_async(variables)
        except Exception as exc:  # anything a template does wrong becomes one error type
            retryable = isinstance(exc, SnaphookError) and exc.retryable
            raise TemplateError(
                f"template {_shown(source)}: {_describe(exc)}", retryable=retryable
            ) from exc

    def _env(self, name: str, default: Any = _NO_DEFAULT) -> Any:
        name = str(name)
        if not self._env_allowed(name):
            raise TemplateError(f"environment variable {name!r} is not in the env allow-list")
        value = self._environ.get(name)
        if value is not None:
            return value
        if default is _NO_DEFAULT:
            raise TemplateError(f"environment variable {name!r} is not set and has no default")
        return default

    def _env_allowed(self, name: str) -> bool:
        if self._env_allow is None:
            return True
        return any(
            name.startswith(entry[:-1]) if entry.endswith("*") else name == entry
            for entry in self._env_allow
        )

    def _make_secret(self) -> Any:
        resolver = self._secrets

        # A plain closure: jinja2 marks pass_context on the function object, which a bound
        # method cannot carry. In async mode jinja2 awaits the coroutine this returns.
        @pass_context
        async def secret(context: Context, name: str, key: str) -> str:
            namespace = context.get(_NAMESPACE_VAR)
            value = await resolver.get(str(name), str(key), namespace=namespace)
            plain = value.get_secret_value()
            redactor.add(plain)
            return plain

        return secret


def _collect_paths(node: nodes.Node, free: Collection[str], found: set[tuple[str, ...]]) -> None:
    path = _constant_path(node)
    if path is not None:
        if path[0] in free:
            found.add(path)
        return
    children: list[nodes.Node | None] = list(node.iter_child_nodes())
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
        # A method call (``params.items()``): the method name is not a key of the data.
        children = [node.node.node, *node.args, *node.kwargs, node.dyn_args, node.dyn_kwargs]
    for child in children:
        if child is not None:
            _collect_paths(child, free, found)


def _constant_path(node: nodes.Node) -> tuple[str, ...] | None:
    """``("a", "b", "c")`` for ``a.b['c']``; ``None`` unless the whole chain is constant."""
    if isinstance(node, nodes.Name):
        return (node.name,) if node.ctx == "load" else None
    if isinstance(node, nodes.Getattr):
        base = _constant_path(node.node)
        return None if base is None else (*base, node.attr)
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        base = _constant_path(node.node)
        return None if base is None else (*base, node.arg.value)
    return None


def _shown(source: str) -> str:
    if len(source) > _SHOWN_CHARS:
        source = source[: _SHOWN_CHARS - 3] + "..."
    return repr(source)


def _describe(exc: Exception) -> str:
    if isinstance(exc, jinja2.TemplateError | SnaphookError):
        detail = exc.message if isinstance(exc, jinja2.TemplateError) else str(exc)
    else:
        detail = f"{type(exc).__name__}: {exc}"
    # A dynamic key (params[secret(...)]) can put a secret into jinja2's own message.
    return redactor.redact(detail or type(exc).__name__)
