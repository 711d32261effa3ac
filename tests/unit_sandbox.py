"""Run a command inside a systemd unit's seccomp sandbox, as systemd would set it up.

Usage: /usr/bin/python3 tests/unit_sandbox.py SPEC_JSON COMMAND [ARG...]

Run by Debian's /usr/bin/python3, which has the libseccomp bindings (python3-seccomp); the
test venv does not. tests/test_units.py reads the unit file and writes SPEC_JSON:
  user                  uid (and gid) to switch to when started as root, else null
  nofile                [soft, hard] for RLIMIT_NOFILE (LimitNOFILE=), or null
  allow_list            true when the first SystemCallFilter= line is an allow list
  syscalls              {name: errno}: -1 takes the list's own action (allow, in an allow
                        list), a number fails the call with that errno (`name:EPERM`)
  default_errno         SystemCallErrorNumber=: null kills the process (SIGSYS)
  memory_deny_write_execute, address_families (numbers, or null)
  refuse_new_limits     (for a test of broker itself, with an allow list) prlimit64() may
                        read limits; setting one takes the default action
Each feature is a filter of its own, loaded in systemd's order (the system call filter last:
it may deny seccomp() itself). SystemCallArchitectures=native: the filters hold the native
architecture only and kill a call from any other. libseccomp sets no_new_privs before loading
(NoNewPrivileges=, which an unprivileged process needs for seccomp). Then the command is
exec'd: the filters and the limits survive exec.
"""

import errno
import json
import mmap
import os
import resource
import sys

import seccomp

SHM_EXEC = 0o100000


def new_filter(default):
    sandbox = seccomp.SyscallFilter(default)
    sandbox.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    return sandbox


def add(sandbox, action, name, *args):
    # systemd skips a name that is no system call on this architecture (a negative number)
    if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0:
        sandbox.add_rule_exactly(action, name, *args)


def address_family_filter(families):
    """RestrictAddressFamilies=: socket() with another family fails with EAFNOSUPPORT."""
    sandbox = new_filter(seccomp.ALLOW)
    refuse = seccomp.ERRNO(errno.EAFNOSUPPORT)
    add(sandbox, refuse, "socket", seccomp.Arg(0, seccomp.GT, max(families)))
    for family in range(max(families)):
        if family not in families:
            add(sandbox, refuse, "socket", seccomp.Arg(0, seccomp.EQ, family))
    return sandbox


def memory_deny_write_execute_filter():
    """MemoryDenyWriteExecute=: no memory both writable and executable, and no memory made
    executable after the fact (systemd's seccomp rules, as on x86-64)."""
    sandbox = new_filter(seccomp.ALLOW)
    refuse = seccomp.ERRNO(errno.EPERM)
    write_exec = mmap.PROT_WRITE | mmap.PROT_EXEC
    add(sandbox, refuse, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, write_exec, write_exec))
    for name in ("mprotect", "pkey_mprotect"):
        add(sandbox, refuse, name, seccomp.Arg(2, seccomp.MASKED_EQ, mmap.PROT_EXEC,
                                               mmap.PROT_EXEC))
    add(sandbox, refuse, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    return sandbox


def syscall_filter(spec):
    """SystemCallFilter= and SystemCallErrorNumber=."""
    error = spec["default_errno"]
    refuse = seccomp.KILL_PROCESS if error is None else seccomp.ERRNO(error)
    listed = seccomp.ALLOW if spec["allow_list"] else refuse
    sandbox = new_filter(refuse if spec["allow_list"] else seccomp.ALLOW)
    for name, number in spec["syscalls"].items():
        add(sandbox, listed if number < 0 else seccomp.ERRNO(number), name)
    if spec.get("refuse_new_limits"):  # glibc's getrlimit and setrlimit both use prlimit64
        add(sandbox, listed, "prlimit64", seccomp.Arg(2, seccomp.EQ, 0))
    return sandbox


def set_open_file_limit(soft, hard):
    """LimitNOFILE=, as far as this machine allows: raising the hard limit needs
    CAP_SYS_RESOURCE, which a container's root may lack."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ValueError, OSError):
        ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, ceiling), min(hard, ceiling)))


def drop_privileges(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def main():
    spec = json.loads(sys.argv[1])
    command = sys.argv[2:]
    if spec["nofile"]:
        set_open_file_limit(*spec["nofile"])
    if spec["user"] is not None and os.geteuid() == 0:
        drop_privileges(spec["user"])
    filters = []
    if spec["address_families"]:
        filters.append(address_family_filter(spec["address_families"]))
    if spec["memory_deny_write_execute"]:
        filters.append(memory_deny_write_execute_filter())
    filters.append(syscall_filter(spec))
    for sandbox in filters:
        sandbox.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
