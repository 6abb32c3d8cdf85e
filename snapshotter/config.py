"""`lazybuild snapshotter --config FILE`: TOML in the spirit of stargz-snapshotter's config.toml.

    cache_dir = "/var/lib/lazybuild-snapshotter/cache"   # default: ROOT/cache
    cache_limit_bytes = 10737418240                       # LRU limit of the chunk cache
    prefetch = true                 # fetch [0, .prefetch.landmark) of each layer when it is mounted
    background_fetch = true         # then the rest, once no read has come for background_idle_seconds
    background_idle_seconds = 5.0
    read_around_bytes = 65536       # a read miss also fetches the uncached chunks in its aligned window
                                    # (layers without a prefetch landmark only)
    timeout_seconds = 30.0          # per registry request
    insecure_skip_verify = false    # mount layers without a TOC digest annotation (unverified TOC)

    # registry hosts: mirrors are tried in order before the host itself; `insecure` = plain HTTP
    # (127.0.0.1 and localhost are plain HTTP or TLS as they answer, without configuration)
    [[resolver.host."registry.example.com".mirrors]]
      host = "mirror.example.com:5000"
      insecure = true
    [resolver.host."10.0.0.5:5000"]
      insecure = true
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from lazybuild.mounter import DEFAULT_CACHE_LIMIT_BYTES
from lazybuild.errors import InputError


@dataclass
class Host:
    host: str
    insecure: bool = False


@dataclass
class Config:
    cache_dir: str = ""
    cache_limit_bytes: int = DEFAULT_CACHE_LIMIT_BYTES
    prefetch: bool = True
    background_fetch: bool = True
    background_idle_seconds: float = 5.0
    read_around_bytes: int = 64 << 10
    timeout_seconds: float = 30.0
    insecure_skip_verify: bool = False
    mirrors: dict[str, list[Host]] = field(default_factory=dict)
    insecure_hosts: set[str] = field(default_factory=set)

    def candidates(self, host: str) -> list[Host]:
        """Where to read `host`'s blobs from, in order: its mirrors, then itself."""
        return self.mirrors.get(host, []) + [Host(host, host in self.insecure_hosts)]


class ConfigError(InputError):
    pass


def load(path: str | None) -> Config:
    cfg = Config()
    if not path:
        return cfg
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    known = {f for f in Config.__dataclass_fields__ if f not in ("mirrors", "insecure_hosts")} | {"resolver"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in known - {"resolver"}:
        if key in doc:
            want = type(getattr(cfg, key))
            value = doc[key]
            if want is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, want):
                raise ConfigError(f"{path}: {key} must be a {want.__name__}, not {value!r}")
            setattr(cfg, key, value)
    for host, spec in (doc.get("resolver", {}).get("host") or {}).items():
        stray = sorted(set(spec) - {"insecure", "mirrors"})
        if stray:  # usually a top-level setting written after a [resolver.host."..."] header
            raise ConfigError(f"{path}: resolver.host.{host!r} has unknown key(s) {', '.join(stray)} (known: insecure, "
                              "mirrors); top-level settings go before the first [section]")
        if spec.get("insecure"):
            cfg.insecure_hosts.add(host)
        for m in spec.get("mirrors") or []:
            if "host" not in m:
                raise ConfigError(f"{path}: a mirror of {host} has no host")
            cfg.mirrors.setdefault(host, []).append(Host(m["host"], bool(m.get("insecure", False))))
    if cfg.cache_dir:
        cfg.cache_dir = os.path.abspath(cfg.cache_dir)
    return cfg
