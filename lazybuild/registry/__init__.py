"""OCI distribution client (httpx): references, auth, manifests, blobs with ranges, push."""

from .auth import Credentials, RegistryAuthError, load_credentials
from .client import Registry, RegistryError, Resolved
from .reference import Reference

__all__ = ["Credentials", "Reference", "Registry", "RegistryAuthError", "RegistryError", "Resolved", "load_credentials"]
