"""RUN steps are confined as BuildKit confines them (issue 14), checked as data: the runc spec, Docker's
seccomp profile, and the user and working directory resolved inside the image's root, never the host's.
(The same confinement tried from inside real runs under runc: integration/test_run_confinement.py.)"""

from __future__ import annotations

import pytest

from lazybuild.runtime import runc, seccomp

DEFAULT_CAPS = list(runc.CAPABILITIES)


def _allowed(profile: dict) -> set[str]:
    """Names allowed whatever their arguments."""
    return {n for e in profile["syscalls"] if e["action"] == "SCMP_ACT_ALLOW" and "args" not in e for n in e["names"]}


def test_profile_for_the_default_capabilities():
    p = seccomp.profile(DEFAULT_CAPS, machine="x86_64", kernel_release="6.1.0-18-amd64")
    assert p["defaultAction"] == "SCMP_ACT_ERRNO" and p["defaultErrnoRet"] == 1
    assert p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed = _allowed(p)
    # What builds need, allowed (chown and mknod with CAP_CHOWN / CAP_MKNOD, chroot with CAP_SYS_CHROOT).
    assert {"chown", "fchownat", "lchown", "mknod", "mknodat", "setuid", "setgroups", "chroot", "execve",
            "arch_prctl", "ptrace"} <= allowed
    # CAP_SYS_ADMIN's, and what no capability of the default set allows: refused.
    for name in ("mount", "umount2", "unshare", "setns", "bpf", "keyctl", "add_key", "reboot", "init_module",
                 "open_by_handle_at", "perf_event_open", "io_uring_setup", "clone", "clone3", "socket", "personality"):
        assert name not in allowed, name
    by_name = {}
    for e in p["syscalls"]:
        for n in e["names"]:
            by_name.setdefault(n, []).append(e)
    assert [e["args"] for e in by_name["clone"]] == [
        [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]]
    assert [(e["action"], e["errnoRet"]) for e in by_name["clone3"]] == [("SCMP_ACT_ERRNO", 38)]
    assert sorted(e["args"][0]["value"] for e in by_name["personality"]) == [0, 8, 0x20000, 0x20008, 0xFFFFFFFF]
    assert [(a["op"], a["value"]) for e in by_name["socket"] for a in e["args"]] == [
        ("SCMP_CMP_LT", 38), ("SCMP_CMP_EQ", 39), ("SCMP_CMP_GT", 40)]  # AF_ALG and AF_VSOCK refused


def test_profile_follows_capabilities_architecture_and_kernel():
    admin = seccomp.profile(DEFAULT_CAPS + ["CAP_SYS_ADMIN"], machine="x86_64", kernel_release="6.1.0")
    assert {"mount", "unshare", "setns", "clone", "clone3"} <= _allowed(admin)
    assert not [e for e in admin["syscalls"] if "clone3" in e["names"] and e["action"] != "SCMP_ACT_ALLOW"]
    arm = seccomp.profile(DEFAULT_CAPS, machine="aarch64", kernel_release="5.10.0")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "arch_prctl" not in _allowed(arm) and "set_tls" in _allowed(arm)
    old = seccomp.profile(DEFAULT_CAPS, machine="x86_64", kernel_release="4.4.0")
    assert "ptrace" not in _allowed(old)  # before 4.8 ptrace could step around seccomp
    with pytest.raises(ValueError, match="this machine is mips"):
        seccomp.profile(DEFAULT_CAPS, machine="mips")


def test_spec_carries_buildkits_defaults():
    s = runc.spec("/r", ["true"], [], "/", runc.User(0, 0, [0]), [], "host", "/b/hosts", "/b/resolv.conf")
    proc, linux = s["process"], s["linux"]
    assert proc["noNewPrivileges"] is True and "rlimits" not in proc
    assert proc["capabilities"] == {k: DEFAULT_CAPS for k in ("bounding", "effective", "permitted")}
    assert len(DEFAULT_CAPS) == 14
    assert {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
            "/proc/acpi", "/proc/latency_stats", "/proc/timer_stats", "/sys/devices/virtual/powercap"} == set(
        linux["maskedPaths"])
    assert {"/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"} == set(
        linux["readonlyPaths"])
    assert linux["seccomp"] == seccomp.profile(DEFAULT_CAPS)
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "ipc", "uts", "mount"]
    mounts = {m["destination"]: m for m in s["mounts"]}
    assert "ro" in mounts["/sys"]["options"] and "ro" in mounts["/sys/fs/cgroup"]["options"]
    for point in ("/proc", "/dev/shm", "/dev/mqueue", "/sys", "/etc/resolv.conf", "/etc/hosts"):
        assert {"nosuid", "noexec", "nodev"} <= set(mounts[point]["options"]), point
    assert "size=65536k" in mounts["/dev/shm"]["options"]


def test_resolve_user_reads_the_images_files_only(tmp_path, canary):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    passwd = root / "etc" / "passwd"
    passwd.symlink_to(canary.secret)  # an absolute host path, read on the host it would make root uid 19000
    with pytest.raises(ValueError, match="unable to find user root: no matching entries in /etc/passwd"):
        runc.resolve_user(str(root), "root")
    # The same link inside the image leads to the image's own file (and `..` stops at its top).
    inside = root / canary.secret.lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("root:x:7:8::/:/bin/sh\n")
    assert runc.resolve_user(str(root), "root") == runc.User(7, 8, [8])
    passwd.unlink()
    passwd.symlink_to("../../../../.." + canary.secret)
    assert runc.resolve_user(str(root), "root") == runc.User(7, 8, [8])
    (root / "etc" / "group").write_text("big:x:9:" + "root," * 300000 + "\n")
    with pytest.raises(ValueError, match="/etc/group is larger than 1048576 bytes"):
        runc.resolve_user(str(root), "root")


def test_cwd_is_made_inside_the_root(tmp_path, canary):
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    (root / "app" / "sub").symlink_to(canary.writable_dir)
    runc._ensure_cwd(str(root), "/app/sub/x/y")
    assert (root / canary.writable_dir.lstrip("/") / "x" / "y").is_dir()
    (root / "file").write_text("")
    with pytest.raises(ValueError, match="/file is not a directory"):
        runc._ensure_cwd(str(root), "/file/x")
