"""A seccomp deny-list for sandbox processes, as the classic-BPF program bwrap's --seccomp reads.

Deno + Pyodide need none of these system calls; each is a way to reach the kernel's more
exposed surface (ptrace, mounts, keyrings, eBPF, perf, userfaultfd, modules, io_uring, new
namespaces) or to change a file's mode or owner (what JavaScript reaching Deno's internal ops
did through a read-only descriptor). A denied call fails with EPERM, so the caller sees an
ordinary error; a call made with another architecture's numbering (x32, or a 32-bit ABI)
kills the process, so the list cannot be sidestepped by renumbering.

The program is assembled here with `struct` (no libseccomp): it is a handful of
instructions, `ld arch; jeq; ld nr; jeq nr_1 ... jeq nr_n; ret allow; ret errno; ret kill`.
"""

from __future__ import annotations

import errno
import platform
import struct

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000
_OFFSET_NR = 0
_OFFSET_ARCH = 4
#: x86_64 numbers with this bit set are the x32 ABI: refused as a whole.
_X32_SYSCALL_BIT = 0x40000000

#: Names of the denied calls; numbers per architecture below (from the kernel's unistd tables).
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "unshare", "setns",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "vhangup",
    "open_by_handle_at", "name_to_handle_at",
    "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "sethostname",
    "setdomainname",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "iopl", "ioperm",
)  # fmt: skip

_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "move_mount": 429,
    "open_tree": 428, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "unshare": 272, "setns": 308,
    "keyctl": 250, "add_key": 248, "request_key": 249,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "acct": 163, "swapon": 167, "swapoff": 168, "reboot": 169,
    "syslog": 103, "quotactl": 179, "vhangup": 153,
    "open_by_handle_at": 304, "name_to_handle_at": 303,
    "settimeofday": 164, "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305,
    "sethostname": 170, "setdomainname": 171,
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93,
    "lchown": 94, "fchownat": 260, "iopl": 172, "ioperm": 173,
}  # fmt: skip

# The generic table (asm-generic/unistd.h): no chmod/chown/lchown, iopl or ioperm.
_AARCH64 = {
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
    "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "move_mount": 429,
    "open_tree": 428, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "unshare": 97, "setns": 268,
    "keyctl": 219, "add_key": 217, "request_key": 218,
    "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427,
    "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
    "delete_module": 106, "acct": 89, "swapon": 224, "swapoff": 225, "reboot": 142,
    "syslog": 116, "quotactl": 60, "vhangup": 58,
    "open_by_handle_at": 265, "name_to_handle_at": 264,
    "settimeofday": 170, "clock_settime": 112, "adjtimex": 171, "clock_adjtime": 266,
    "sethostname": 161, "setdomainname": 162,
    "fchmod": 52, "fchmodat": 53, "fchmodat2": 452, "fchown": 55, "fchownat": 54,
}  # fmt: skip

#: machine name -> (AUDIT_ARCH_* value, syscall table)
_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, _X86_64),
    "aarch64": (0xC00000B7, _AARCH64),
}


def supported(machine: str | None = None) -> bool:
    """Whether a deny-list is known for this machine's architecture."""
    return (machine or platform.machine()) in _ARCHES


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def deny_list_program(machine: str | None = None) -> bytes:
    """The compiled filter (an array of `struct sock_filter`), for `bwrap --seccomp FD`.

    Raises ValueError on an architecture without a table.
    """
    name = machine or platform.machine()
    if name not in _ARCHES:
        raise ValueError(f"no seccomp deny-list for architecture {name!r}")
    arch, table = _ARCHES[name]
    numbers = sorted({table[call] for call in DENIED if call in table})
    # Layout: [0] ld arch, [1] jeq arch, [2] ld nr, [3] x32 guard (x86_64), then one jeq per
    # number, then ret allow, ret errno, ret kill. Jump offsets count from the next insn.
    checks = len(numbers) + (1 if name == "x86_64" else 0)
    allow_at = 3 + checks
    errno_at, kill_at = allow_at + 1, allow_at + 2
    program = [
        _insn(_LD_W_ABS, _OFFSET_ARCH),
        _insn(_JEQ_K, arch, jt=0, jf=kill_at - 2),
        _insn(_LD_W_ABS, _OFFSET_NR),
    ]
    if name == "x86_64":
        program.append(_insn(_JGE_K, _X32_SYSCALL_BIT, jt=kill_at - 4, jf=0))
    for number in numbers:
        here = len(program)
        program.append(_insn(_JEQ_K, number, jt=errno_at - here - 1, jf=0))
    program += [
        _insn(_RET_K, _RET_ALLOW),
        _insn(_RET_K, _RET_ERRNO | errno.EPERM),
        _insn(_RET_K, _RET_KILL_PROCESS),
    ]
    if any(offset > 255 for offset in (kill_at, errno_at)):
        raise ValueError("seccomp program too long for 8-bit jump offsets")
    return b"".join(program)
