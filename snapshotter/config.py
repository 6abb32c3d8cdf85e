"""`lazybuild snapshotter --config FILE`: TOML in the spirit of stargz-snapshotter's config.toml. Without
--config, DEFAULT_PATH is read when it exists (stargz-snapshotter's own default,
/etc/containerd-stargz-grpc/config.toml, is not read implicitly: pass it with --config).

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

stargz-snapshotter's keys (its fs/config/config.go, service/config.go, service/resolver/registry.go,
cmd/containerd-stargz-grpc/main.go) are read too, so its config.toml works here: those that mean one of
ours are aliases (STARGZ_ALIASES); tuning of its own machinery is accepted with a warning that it has no
effect (STARGZ_TUNING); features it has and lazybuild has not are refused when turned on
(STARGZ_UNSUPPORTED), accepted when off.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

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
    path: str = ""  # the file read ("": none)
    warnings: list[str] = field(default_factory=list)  # for the daemon's log: settings read but without effect

    def candidates(self, host: str) -> list[Host]:
        """Where to read `host`'s blobs from, in order: its mirrors, then itself."""
        return self.mirrors.get(host, []) + [Host(host, host in self.insecure_hosts)]


class ConfigError(InputError):
    pass


DEFAULT_PATH = "/etc/lazybuild/snapshotter.toml"
_OURS = {f for f in Config.__dataclass_fields__ if f not in ("mirrors", "insecure_hosts", "warnings", "path")}


@dataclass(frozen=True)
class Alias:
    """A stargz-snapshotter key that sets one of ours: `ours` = value, or `not value` when `negated`."""
    ours: str
    negated: bool = False


STARGZ_ALIASES = {
    "noprefetch": Alias("prefetch", negated=True),
    "no_background_fetch": Alias("background_fetch", negated=True),
    # mount layers without a TOC digest (unverified); layers with one are verified either way, as there
    "allow_no_verification": Alias("insecure_skip_verify"),
    "resolver.request_timeout_sec": Alias("timeout_seconds"),  # per registry request, as ours
}
# Knobs of stargz-snapshotter's own caches, fetcher, FUSE and metrics: lazybuild has none of them to turn,
# and leaving them out changes no result, so they are accepted with a warning.
STARGZ_TUNING = {
    "http_cache_type", "filesystem_cache_type", "resolve_result_entry_ttl_sec", "resolve_result_entry",
    "prefetch_size", "prefetch_timeout_sec", "prefetch_async_size", "debug", "max_concurrency", "no_prometheus",
    "log_file_access", "metrics_address", "debug_address", "metadata_store",
    "blob.valid_interval", "blob.check_always", "blob.chunk_size", "blob.fetching_timeout_sec",
    "blob.force_single_range_mode", "blob.prefetch_chunk_size", "blob.max_retries", "blob.min_wait_msec",
    "blob.max_wait_msec",
    "directory_cache.max_lru_cache_entry", "directory_cache.max_cache_fds", "directory_cache.sync_add",
    "directory_cache.direct", "directory_cache.fadv_dontneed",
    "fuse.attr_timeout", "fuse.entry_timeout", "fuse.passthrough", "fuse.merge_buffer_size", "fuse.merge_worker_count",
    "snapshotter.allow_invalid_mounts_on_restart",  # lazybuild always starts and reports such layers unavailable
    # inert while their feature's switch (STARGZ_UNSUPPORTED) is off
    "kubeconfig_keychain.kubeconfig_path", "cri_keychain.image_service_path", "cri_keychain.listen_path",
    "fuse_manager.address", "fuse_manager.path", "fuse_manager.metrics_address",
}
# Features lazybuild does not have: refused when turned on (true, or a non-empty value), fine when off.
STARGZ_UNSUPPORTED = {
    "disable_verification": "lazybuild verifies every chunk against the layer's TOC and cannot turn that off",
    "ipfs": "lazybuild reads layers from registries only",
    "kubeconfig_keychain.enable_keychain": "credentials come from ~/.docker/config.json only",
    "cri_keychain.enable_keychain": "credentials come from ~/.docker/config.json only (no CRI keychain)",
    "fuse_manager.enable": "lazybuild has no separate FUSE manager process",
}
_MIRROR_KEYS = {"host", "insecure"}
_STARGZ_MIRROR_TUNING = {"request_timeout_sec"}  # per mirror; lazybuild has one timeout for every host
_STARGZ_MIRROR_UNSUPPORTED = {"header": "lazybuild sends no extra request headers to mirrors"}


def _flatten(doc: dict, prefix: str = "") -> dict[str, Any]:
    """{"blob": {"chunk_size": 1}} -> {"blob.chunk_size": 1}; `resolver.host` stays one value (hosts are
    names, not settings)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = prefix + key
        if isinstance(value, dict) and name != "resolver.host":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _typed(path: str, key: str, value, want: type):
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):  # true is no number here
        raise ConfigError(f"{path}: {key} must be {_KIND.get(want, want.__name__)}, not {value!r}")
    return value


def load(path: str | None, default_path: str = DEFAULT_PATH) -> Config:
    """The config in `path`, else in `default_path` if that exists, else the defaults. Raises ConfigError
    (naming the file and the key) for anything it cannot take."""
    cfg = Config()
    if not path:
        if not os.path.exists(default_path):
            return cfg
        path = default_path
    cfg.path = path
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    tuning: list[str] = []
    unknown: list[str] = []
    for key, value in _flatten(doc).items():
        if key in _OURS:
            setattr(cfg, key, _typed(path, key, value, type(getattr(cfg, key))))
        elif key == "resolver.host":
            _load_hosts(path, cfg, value, tuning)
        elif key in STARGZ_ALIASES:
            alias = STARGZ_ALIASES[key]
            if alias.ours in doc:
                raise ConfigError(f"{path}: both {alias.ours} and {key} (stargz-snapshotter's name for it) are set; "
                                  "keep one")
            value = _typed(path, key, value, type(getattr(cfg, alias.ours)))
            if alias.ours == "timeout_seconds" and value <= 0:  # stargz: 0 = its default 30 s, < 0 = none
                cfg.warnings.append(f"{path}: {key} = {value:g}: lazybuild always times registry requests out; "
                                    f"using {cfg.timeout_seconds:g} s")
                continue
            setattr(cfg, alias.ours, (not value) if alias.negated else value)
        elif key in STARGZ_TUNING:
            tuning.append(key)
        elif key in STARGZ_UNSUPPORTED:
            if value:
                raise ConfigError(f"{path}: {key} = {value!r} is a stargz-snapshotter setting that lazybuild does not "
                                  f"support: {STARGZ_UNSUPPORTED[key]}; remove it or set it to false")
        else:
            unknown.append(key)
    if unknown:
        hint = (" (top-level settings go before the first [section])" if any("." in k for k in unknown) else "")
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}{hint}; known: {', '.join(sorted(_OURS))}, "
                          "resolver.host, and stargz-snapshotter's keys (README: `lazybuild snapshotter`)")
    if tuning:
        cfg.warnings.append(f"{path}: stargz-snapshotter setting(s) {', '.join(tuning)} have no effect here "
                            "(lazybuild's reader has no such knob); ignored")
    if cfg.cache_dir:
        cfg.cache_dir = os.path.abspath(cfg.cache_dir)
    return cfg


def _load_hosts(path: str, cfg: Config, hosts, tuning: list[str]) -> None:
    if not isinstance(hosts, dict):
        raise ConfigError(f"{path}: resolver.host must be a table of hosts, not {hosts!r}")
    for host, spec in hosts.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: resolver.host.{host!r} must be a table, not {spec!r}")
        stray = sorted(set(spec) - {"insecure", "mirrors"})
        if stray:  # usually a top-level setting written after a [resolver.host."..."] header
            raise ConfigError(f"{path}: resolver.host.{host!r} has unknown key(s) {', '.join(stray)} (known: insecure, "
                              "mirrors); top-level settings go before the first [section]")
        if _typed(path, f"resolver.host.{host!r}.insecure", spec.get("insecure", False), bool):
            cfg.insecure_hosts.add(host)
        for m in spec.get("mirrors") or []:
            where = f"a mirror of {host}"
            if not isinstance(m, dict) or "host" not in m:
                raise ConfigError(f"{path}: {where} has no host")
            for key in sorted(set(m) - _MIRROR_KEYS):
                if key in _STARGZ_MIRROR_TUNING:
                    tuning.append(f"resolver.host.{host!r}.mirrors.{key}")
                elif key in _STARGZ_MIRROR_UNSUPPORTED:
                    if m[key]:
                        raise ConfigError(f"{path}: {key} of {where} is a stargz-snapshotter setting that lazybuild "
                                          f"does not support: {_STARGZ_MIRROR_UNSUPPORTED[key]}")
                else:
                    raise ConfigError(f"{path}: {where} has unknown key {key} (known: host, insecure; and "
                                      "stargz-snapshotter's request_timeout_sec, header)")
            cfg.mirrors.setdefault(host, []).append(Host(_typed(path, f"host of {where}", m["host"], str),
                                                         _typed(path, f"insecure of {where}", m.get("insecure", False),
                                                                bool)))
