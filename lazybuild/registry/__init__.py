"""OCI distribution client (httpx): references, auth, manifests, blobs with ranges, push.

Names are imported on first use, so `lazybuild.registry.reference` (all the BuildKit frontend needs)
does not pull in httpx: the frontend starts on every build, and its image carries no HTTP client.
"""

import importlib

# Each name from the module that defines it; `client` is the public Registry, which re-exports the others.
_EXPORTS = {"Credentials": "auth", "RegistryAuthError": "auth", "load_credentials": "auth",
            "Registry": "client", "RegistryError": "errors", "Resolved": "manifests", "Reference": "reference"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
