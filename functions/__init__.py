"""Hook functions and the SDK they are written with.

Function authors need only what is re-exported here.
"""

from functions.sdk import (
    AwsConfig,
    Context,
    EventInfo,
    FunctionError,
    FunctionRegistry,
    FunctionSpec,
    ObjectStore,
    PermanentError,
    RetryableError,
    SecretResolver,
    default_registry,
    function,
)

__all__ = [
    "AwsConfig",
    "Context",
    "EventInfo",
    "FunctionError",
    "FunctionRegistry",
    "FunctionSpec",
    "ObjectStore",
    "PermanentError",
    "RetryableError",
    "SecretResolver",
    "default_registry",
    "function",
]
