"""The snapshotter's config file: stargz-snapshotter's config.toml keys (its fs/config/config.go,
service/config.go, service/resolver/registry.go, cmd/containerd-stargz-grpc/main.go) read as aliases,
accepted as tuning with a warning, or refused when they turn on what lazybuild lacks; the default path."""

from __future__ import annotations

import pytest

from lazybuild.snapshotter import config

# a config.toml as stargz-snapshotter's docs and deployments write it
STARGZ_CONFIG = """\
noprefetch = true
no_background_fetch = true
allow_no_verification = true
disable_verification = false
max_concurrency = 2
prefetch_timeout_sec = 10
metadata_store = "db"
[blob]
check_always = true
fetching_timeout_sec = 300
[directory_cache]
direct = true
[fuse]
attr_timeout = 1
[snapshotter]
allow_invalid_mounts_on_restart = false
[cri_keychain]
enable_keychain = false
image_service_path = "/run/containerd/containerd.sock"
[resolver]
request_timeout_sec = 12
[[resolver.host."docker.io".mirrors]]
host = "mirror.example.com:5000"
insecure = true
request_timeout_sec = 5
[[resolver.host."docker.io".mirrors]]
host = "mirror2.example.com"
"""


def load_text(tmp_path, text: str, name: str = "config.toml") -> config.Config:
    path = tmp_path / name
    path.write_text(text)
    return config.load(str(path))


def test_stargz_snapshotter_config_is_read(tmp_path):
    cfg = load_text(tmp_path, STARGZ_CONFIG)
    assert cfg.prefetch is False and cfg.background_fetch is False  # noprefetch, no_background_fetch
    assert cfg.insecure_skip_verify is True  # allow_no_verification
    assert cfg.timeout_seconds == 12.0  # resolver.request_timeout_sec
    assert [(h.host, h.insecure) for h in cfg.candidates("docker.io")] == \
        [("mirror.example.com:5000", True), ("mirror2.example.com", False), ("docker.io", False)]
    assert cfg.path == str(tmp_path / "config.toml")
    # tuning of stargz-snapshotter's own machinery: one warning naming each key; switches left off say nothing
    assert len(cfg.warnings) == 1
    for key in ("max_concurrency", "prefetch_timeout_sec", "metadata_store", "blob.check_always",
                "blob.fetching_timeout_sec", "directory_cache.direct", "fuse.attr_timeout",
                "snapshotter.allow_invalid_mounts_on_restart", "cri_keychain.image_service_path",
                "mirrors.request_timeout_sec"):
        assert key in cfg.warnings[0], key
    assert "disable_verification" not in cfg.warnings[0] and "enable_keychain" not in cfg.warnings[0]
    assert "no effect" in cfg.warnings[0]


def test_our_keys_and_the_aliases_agree(tmp_path):
    assert load_text(tmp_path, "noprefetch = false\n").prefetch is True
    assert load_text(tmp_path, "no_background_fetch = false\n").background_fetch is True
    plain = load_text(tmp_path, "prefetch = false\n")
    assert plain.prefetch is False and plain.warnings == []
    zero = load_text(tmp_path, "[resolver]\nrequest_timeout_sec = 0\n")  # stargz: 0 means its default
    assert zero.timeout_seconds == 30.0 and "always times registry requests out" in zero.warnings[0]


@pytest.mark.parametrize("text, needles", [
    ("disable_verification = true\n", ["disable_verification", "stargz-snapshotter", "verifies every chunk"]),
    ("ipfs = true\n", ["ipfs", "stargz-snapshotter", "registries only"]),
    ("[kubeconfig_keychain]\nenable_keychain = true\n", ["kubeconfig_keychain.enable_keychain", "docker/config.json"]),
    ("[cri_keychain]\nenable_keychain = true\n", ["cri_keychain.enable_keychain", "CRI keychain"]),
    ("[fuse_manager]\nenable = true\n", ["fuse_manager.enable", "FUSE manager"]),
    ('[[resolver.host."docker.io".mirrors]]\nhost = "m"\n[resolver.host."docker.io".mirrors.header]\nx-a = "b"\n',
     ["header", "stargz-snapshotter", "extra request headers"]),
    ("prefetch = true\nnoprefetch = true\n", ["both prefetch and noprefetch"]),
    ("timeout_seconds = 5\n[resolver]\nrequest_timeout_sec = 9\n",
     ["both timeout_seconds and resolver.request_timeout_sec"]),
    ('noprefetch = "yes"\n', ["noprefetch must be true or false"]),
    ("cache_limit_bytes = true\n", ["cache_limit_bytes must be a whole number"]),
    ("max_concurrency = 2\nprefetch_everything = true\n", ["unknown setting(s) prefetch_everything"]),
    ("[blob]\nchunk_size = 1\nprefetch = false\n", ["unknown setting(s) blob.prefetch",
                                                   "top-level settings go before the first [section]"]),
    ('[[resolver.host."docker.io".mirrors]]\nhost = "m"\nweight = 2\n', ["unknown key weight"]),
])
def test_refused_with_the_key_named(tmp_path, text, needles):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, text, "bad.toml")
    assert "bad.toml" in str(e.value)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_default_path(tmp_path):
    """Without --config the default file is read when it exists; stargz-snapshotter's default path never is."""
    assert config.DEFAULT_PATH == "/etc/lazybuild/snapshotter.toml"
    default = tmp_path / "snapshotter.toml"
    cfg = config.load(None, default_path=str(default))  # absent: the defaults, no file named
    assert cfg == config.Config()
    default.write_text("noprefetch = true\n")
    cfg = config.load(None, default_path=str(default))
    assert cfg.prefetch is False and cfg.path == str(default)
    with pytest.raises(config.ConfigError) as e:  # a file named on the command line must be there
        config.load(str(tmp_path / "missing.toml"), default_path=str(default))
    assert "cannot read the config" in str(e.value)
