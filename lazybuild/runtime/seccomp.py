"""Docker's default seccomp profile for RUN steps, and the `linux.seccomp` section it gives a spec.

A RUN step runs code from a base image and a Dockerfile that someone else wrote, as root. BuildKit
(and so `docker build`) confines it with Docker's default profile: every syscall not listed fails
with EPERM; a few are allowed only for certain arguments; some only when the step holds a
capability (the CAP_SYS_ADMIN ones — mount, unshare, setns, clone with namespace flags, bpf, ... —
are therefore refused, since RUN steps never get that capability).

The rules below are Docker's, written out as data from moby/profiles `seccomp/default.json` at tag
seccomp/v0.2.3 (May 2026; the module Docker Engine takes its default profile from, formerly
moby/moby profiles/seccomp). `profile()` applies them the way Docker's loader does: a rule that
needs a capability is kept only when the step's capability set has it, a rule for other
architectures or older kernels is dropped, and the architectures are this machine's own plus the
compatibility ones it can also execute (x86 and x32 beside x86_64, arm beside aarch64).

Names that this machine's libseccomp does not know (syscalls newer than it) are skipped by runc;
runc answers ENOSYS for those, so programs fall back as they would on an older kernel.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

SOURCE = "moby/profiles seccomp/default.json, tag seccomp/v0.2.3"

ERRNO_EPERM = 1
ERRNO_ENOSYS = 38

# Allowed whatever the arguments and capabilities.
ALLOWED = """
    accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chown32
    clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep
    clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3 epoll_create
    epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2
    execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
    fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork
    fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex
    futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat getcpu getcwd getdents getdents64
    getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid
    getpgrp getpid getppid getpriority getrandom getresgid getresgid32 getresuid getresuid32 getrlimit
    get_robust_list getrusage getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32
    getxattr getxattrat inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy
    io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit ipc kill
    landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat
    listen listmount listxattr listxattrat llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise
    map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2
    mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedreceive_time64
    mq_timedsend mq_timedsend_time64 mq_unlink mremap mseal msgctl msgget msgrcv msgsnd msync munlock munlockall
    munmap name_to_handle_at nanosleep newfstatat _newselect open openat openat2 pause pidfd_open
    pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv
    preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read readahead
    readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages removexattr
    removexattrat rename renameat renameat2 restart_syscall riscv_hwprobe rmdir rseq rt_sigaction rt_sigpending
    rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64
    rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam sched_get_priority_max
    sched_get_priority_min sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64
    sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget
    semop semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32
    setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority setregid setregid32
    setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 setrlimit set_robust_list setsid setsockopt
    set_thread_area set_tid_address setuid setuid32 setxattr setxattrat shmat shmctl shmdt shmget shutdown
    sigaltstack signalfd signalfd4 sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs
    statfs64 statmount statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
    timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64 timerfd_create
    timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate truncate64
    ugetrlimit umask uname unlink unlinkat uretprobe utime utimensat utimensat_time64 utimes vfork vmsplice
    wait4 waitid waitpid write writev
""".split()

# Namespace flags of clone(2): CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET. Without
# CAP_SYS_ADMIN clone is allowed only when none of them is set, so a step cannot make a user
# namespace (where it would hold every capability) or any other namespace.
CLONE_NAMESPACE_FLAGS = 0x7E020000

# Address families socket(2) refuses: AF_ALG (38, the kernel crypto API, a recurring source of
# kernel bugs) and AF_VSOCK (40, which reaches the hypervisor host). Everything else is allowed.
AF_ALG = 38
AF_VSOCK = 40


@dataclass(frozen=True)
class Rule:
    """One entry of the profile: NAMES get ACTION (with ARGS all matching, if any), kept only when
    the step has every cap in CAPS and none in NOT_CAPS, on ARCHES (if given) and not NOT_ARCHES,
    on a kernel at least MIN_KERNEL."""

    names: tuple[str, ...]
    args: tuple[tuple[int, str, int], ...] = ()  # (index, op, value); MASKED_EQ compares arg & value with 0
    errno: int | None = None  # None: allow; a number: fail with that errno
    caps: tuple[str, ...] = ()
    not_caps: tuple[str, ...] = ()
    arches: tuple[str, ...] = ()  # Go's GOARCH names, as the upstream profile writes them
    not_arches: tuple[str, ...] = ()
    min_kernel: tuple[int, int] | None = None


def _personality(value: int) -> Rule:
    return Rule(("personality",), args=((0, "SCMP_CMP_EQ", value),))


RULES: tuple[Rule, ...] = (
    Rule(tuple(ALLOWED)),
    # Before 4.8 a ptrace'd process could escape seccomp, so these are allowed only after it.
    Rule(("process_vm_readv", "process_vm_writev", "ptrace"), min_kernel=(4, 8)),
    # socket: every family below AF_ALG, the one between AF_ALG and AF_VSOCK, every one above.
    Rule(("socket",), args=((0, "SCMP_CMP_LT", AF_ALG),)),
    Rule(("socket",), args=((0, "SCMP_CMP_EQ", AF_ALG + 1),)),
    Rule(("socket",), args=((0, "SCMP_CMP_GT", AF_VSOCK),)),
    # personality: only PER_LINUX (0), PER_LINUX32 (8), UNAME26 (0x20000), PER_LINUX32|UNAME26, and
    # the query 0xffffffff; flags like ADDR_NO_RANDOMIZE or READ_IMPLIES_EXEC stay refused.
    _personality(0x0),
    _personality(0x8),
    _personality(0x20000),
    _personality(0x20008),
    _personality(0xFFFFFFFF),
    Rule(("sync_file_range2", "swapcontext"), arches=("ppc64le",)),
    Rule(("arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush", "set_tls"),
         arches=("arm", "arm64")),
    Rule(("arch_prctl",), arches=("amd64", "x32")),
    Rule(("modify_ldt",), arches=("amd64", "x32", "x86")),
    Rule(("s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"), arches=("s390", "s390x")),
    Rule(("riscv_flush_icache",), arches=("riscv64",)),
    Rule(("open_by_handle_at",), caps=("CAP_DAC_READ_SEARCH",)),
    Rule(("bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick", "lookup_dcookie",
          "lsm_get_self_attr", "lsm_list_modules", "lsm_set_self_attr", "mount", "mount_setattr", "move_mount",
          "open_tree", "perf_event_open", "quotactl", "quotactl_fd", "setdomainname", "sethostname", "setns",
          "syslog", "umount", "umount2", "unshare"), caps=("CAP_SYS_ADMIN",)),
    Rule(("clone",), args=((0, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS),), not_caps=("CAP_SYS_ADMIN",),
         not_arches=("s390", "s390x")),
    Rule(("clone",), args=((1, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS),), not_caps=("CAP_SYS_ADMIN",),
         arches=("s390", "s390x")),  # s390 passes clone's flags second
    # clone3 passes its flags in memory, out of seccomp's sight: answer ENOSYS so libc falls back to
    # clone, whose flags the rule above can check.
    Rule(("clone3",), errno=ERRNO_ENOSYS, not_caps=("CAP_SYS_ADMIN",)),
    Rule(("reboot",), caps=("CAP_SYS_BOOT",)),
    Rule(("chroot",), caps=("CAP_SYS_CHROOT",)),
    Rule(("delete_module", "init_module", "finit_module"), caps=("CAP_SYS_MODULE",)),
    Rule(("acct",), caps=("CAP_SYS_PACCT",)),
    Rule(("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace"),
         caps=("CAP_SYS_PTRACE",)),
    Rule(("iopl", "ioperm"), caps=("CAP_SYS_RAWIO",)),
    Rule(("settimeofday", "stime", "clock_settime", "clock_settime64"), caps=("CAP_SYS_TIME",)),
    Rule(("vhangup",), caps=("CAP_SYS_TTY_CONFIG",)),
    Rule(("get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"), caps=("CAP_SYS_NICE",)),
    Rule(("syslog",), caps=("CAP_SYSLOG",)),
    Rule(("bpf",), caps=("CAP_BPF",)),
    Rule(("perf_event_open",), caps=("CAP_PERFMON",)),
)

# This machine (platform.machine()) -> its GOARCH name (what the rules name) and the seccomp
# architectures a filter must cover: the native one first, then those its CPU also runs (a 32-bit
# binary in the image must meet the same filter, not slip past it under another syscall table).
_ARCHES: dict[str, tuple[str, list[str]]] = {
    "x86_64": ("amd64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
    "aarch64": ("arm64", ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]),
    "s390x": ("s390x", ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]),
    "riscv64": ("riscv64", ["SCMP_ARCH_RISCV64"]),
    "ppc64le": ("ppc64le", ["SCMP_ARCH_PPC64LE"]),
}


def _kernel(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def profile(capabilities: list[str], machine: str | None = None, kernel_release: str | None = None) -> dict:
    """The OCI `linux.seccomp` for a step holding CAPABILITIES (its bounding set) on this machine."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise ValueError(f"lazybuild build has Docker's seccomp profile for {', '.join(sorted(_ARCHES))} only; "
                           f"this machine is {machine}, so RUN steps cannot be confined as BuildKit confines them")
    goarch, architectures = _ARCHES[machine]
    kernel = _kernel(kernel_release or platform.release())
    held = set(capabilities)
    syscalls = []
    for rule in RULES:
        if rule.arches and goarch not in rule.arches or goarch in rule.not_arches:
            continue
        if not held.issuperset(rule.caps) or held.intersection(rule.not_caps):
            continue
        if rule.min_kernel and kernel < rule.min_kernel:
            continue
        entry: dict = {"names": list(rule.names)}
        if rule.errno is None:
            entry["action"] = "SCMP_ACT_ALLOW"
        else:
            entry["action"], entry["errnoRet"] = "SCMP_ACT_ERRNO", rule.errno
        if rule.args:
            entry["args"] = [{"index": i, "value": v, "valueTwo": 0, "op": op} for i, op, v in rule.args]
        syscalls.append(entry)
    return {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": ERRNO_EPERM, "architectures": architectures,
            "syscalls": syscalls}
