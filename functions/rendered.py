"""Param types for values as blueprint templates render them.

Every templated value arrives as a string: an unset optional param renders as ``""`` and a
list as ``"a, b"``. These types read such values back, so each family declares the intent
(``OptionalText``, ``NameList``) instead of repeating the coercion.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, SecretStr

__all__ = ["NameList", "OptionalSecret", "OptionalText", "blank_is_none", "comma_list"]


def blank_is_none(value: Any) -> Any:
    """``""`` (an unset param, rendered) means "not given"."""
    return None if value == "" else value


def comma_list(value: Any) -> Any:
    """``"sg-1, sg-2"`` → ``["sg-1", "sg-2"]``; blank items are dropped, lists pass as they are."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


OptionalText = Annotated[str | None, BeforeValidator(blank_is_none)]
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(blank_is_none)]
NameList = Annotated[list[str], BeforeValidator(comma_list)]
