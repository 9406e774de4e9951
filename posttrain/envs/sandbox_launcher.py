"""Starts one program inside the sandbox: run as a script, standard library only.

`python -I sandbox_launcher.py SPEC` reads SPEC (a JSON file: argv, environment, files, limits,
read-only paths), then, with `env.sandbox.backend=namespaces`:

    launcher (host)           writes the user/group maps of its child, waits, exits with its status
      `- setup               new user, mount, PID, network, IPC and UTS namespaces
           `- init (PID 1)    builds the file system (read-only binds, a size-limited /tmp, /dev,
                              /proc), pivots into it, drops to an unprivileged nested user
                `- program    rlimits, no new privileges, scrubbed environment, exec

When init exits (the program ended, or anything above was killed), the kernel kills every process
left in the PID namespace, so nothing the program started (daemons included) outlives it. Each
level dies with its parent (PR_SET_PDEATHSIG), so killing the launcher's process group tears
the whole tree down. With `env.sandbox.backend=bubblewrap`, bubblewrap builds the same sandbox
(and runs this script again inside it to set the limits); with `backend=process` the launcher only
sets the limits and execs the program in the host folder SPEC names.
"""

import ctypes
import fcntl
import json
import os
import resource
import signal
import stat
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}  # its system call number
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
DEVICES = ("null", "zero", "full", "random", "urandom")
SANDBOX_UID = 1000  # the program's user and group inside the sandbox
EXIT_SETUP_FAILED = 125  # the sandbox could not be built; why is on the error channel (spec "errors_fd")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(encode(source), target.encode(), encode(fstype), ctypes.c_ulong(flags), encode(data)),
           f"mount {source or fstype} on {target}")


def _die_with_parent() -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:  # the parent died before the line above
        os._exit(EXIT_SETUP_FAILED)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _exit_status(status: int) -> int:
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _map_user(pid: int, outside_uid: int, outside_gid: int) -> None:
    """Map the namespace's root to an outside user: the launcher's own (allowed unprivileged), or,
    when the launcher is root, an unprivileged one (so that the program is not root on the host,
    where root's files and exemptions from the process limit would apply)."""
    if os.geteuid() != 0:
        _write(f"/proc/{pid}/setgroups", "deny")
    _write(f"/proc/{pid}/uid_map", f"0 {outside_uid} 1\n")
    _write(f"/proc/{pid}/gid_map", f"0 {outside_gid} 1\n")


def _drop_to_nested_user() -> None:
    """Become an ordinary user in a nested user namespace: capabilities there give no power over
    the mounts built above, and an exec can no longer regain root's."""
    _unshare(CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{SANDBOX_UID} 0 1\n")
    _write("/proc/self/gid_map", f"{SANDBOX_UID} 0 1\n")


def _mount_point(target: str, folder: bool) -> None:
    """An empty folder or file at `target` (and the folders above it) to mount something on."""
    os.makedirs(target if folder else os.path.dirname(target), exist_ok=True)
    if not folder:
        open(target, "a").close()


def _bind_read_only(source_fd: int, source: str, target: str) -> None:
    """Bind `source`, opened beforehand as `source_fd`, read-only on `target`."""
    _mount_point(target, stat.S_ISDIR(os.fstat(source_fd).st_mode))
    _mount(f"/proc/self/fd/{source_fd}", target, None, MS_BIND | MS_REC)
    # A remount must keep the flags the kernel locked on the source's mount (nosuid, nodev, noexec).
    locked = os.fstatvfs(source_fd).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | locked)


def _build_root(spec: dict, sources: dict[str, int], root: str) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in sources.items():
        _bind_read_only(fd, path, root + path)
    for path, target in spec["links"].items():
        os.symlink(target, root + path)
    os.makedirs(root + "/dev")
    for name in DEVICES:
        device = f"{root}/dev/{name}"
        _mount_point(device, folder=False)
        _mount(f"/dev/{name}", device, None, MS_BIND)
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + spec["cwd"])
    _mount("tmpfs", root + spec["cwd"], "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['limits']['disk_mb']}m,mode=0777")
    _write_files(root + spec["cwd"], spec["files"])
    os.makedirs(root + "/.old_root")
    _check(_libc.syscall(PIVOT_ROOT[os.uname().machine], root.encode(), (root + "/.old_root").encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old_root", MNT_DETACH), "umount the host's root")
    os.rmdir("/.old_root")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _write_files(folder: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        _write(os.path.join(folder, name), text)


def _exec_program(spec: dict) -> None:
    # The program's channels become fds 3, 4, ... in order; every other descriptor is closed but
    # the error channel, which closes itself at exec.
    moved = [os.dup(fd) for fd in spec["pass_fds"]]
    spec["errors_fd"] = fcntl.fcntl(spec["errors_fd"], fcntl.F_DUPFD_CLOEXEC, 3 + len(moved))
    for target, fd in enumerate(moved, start=3):
        os.dup2(fd, target)
        os.set_inheritable(target, True)  # dup2 onto itself leaves os.dup's close-on-exec
    keep = [*range(3, 3 + len(moved)), spec["errors_fd"]]
    for low, high in zip([2, *keep], [*keep, 1 << 16], strict=True):
        os.closerange(low + 1, high)
    limits = spec["limits"]
    for name, value in (("RLIMIT_CPU", limits["cpu_s"]), ("RLIMIT_AS", limits["memory_bytes"]),
                        ("RLIMIT_NPROC", limits["processes"]), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_FSIZE", limits["file_bytes"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.chdir(spec["cwd"])
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def _init(spec: dict, sources: dict[str, int]) -> None:
    """PID 1 of the sandbox: build its file system, start the program, reap, exit with its status."""
    _die_with_parent()
    _build_root(spec, sources, spec["root"])
    for fd in sources.values():
        os.close(fd)
    _drop_to_nested_user()
    program = os.fork()
    if program == 0:
        _exec_program(spec)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))  # PID 1 ignores default actions
    while True:
        pid, status = os.wait()
        if pid == program:
            os._exit(_exit_status(status))


def _become(uid: int, gid: int) -> None:
    """Take on `uid` and `gid` for good, without the supplementary groups (root's) held before."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _inheritable(fd: int) -> str:
    os.set_inheritable(fd, True)
    return str(fd)


def _memory_file(text: str) -> str:
    """A file descriptor holding `text`, for bubblewrap's --file."""
    fd = os.memfd_create("posttrain-sandbox")
    os.write(fd, text.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return _inheritable(fd)


def _exec_bubblewrap(spec: dict) -> None:
    """The same sandbox built by bubblewrap; inside it this script runs again, without namespaces,
    to set the limits and start the program."""
    limits, as_root = spec["limits"], os.geteuid() == 0
    binds = _staged_for_unprivileged_user(spec) if as_root else {path: path for path in spec["read_only"]}
    # Bubblewrap keeps its status channel from the program; the launcher inside gets a copy to say
    # why it failed, if it does.
    inner = dict(spec, backend="process", files={}, errors_fd=int(_inheritable(os.dup(spec["errors_fd"]))))
    args = [spec["bwrap"], "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--json-status-fd", _inheritable(spec["errors_fd"])]
    for path, source in binds.items():
        args += ["--ro-bind", source, path]
    for path, target in spec["links"].items():
        args += ["--symlink", target, path]
    args += ["--dev", "/dev", "--proc", "/proc", "--size", str(limits["disk_mb"] << 20), "--tmpfs", spec["cwd"]]
    for name, text in spec["files"].items():
        args += ["--file", _memory_file(text), os.path.join(spec["cwd"], name)]
    with open(__file__, encoding="utf-8") as f:
        args += ["--file", _memory_file(f.read()), "/.posttrain/launcher.py",
                 "--file", _memory_file(json.dumps(inner)), "/.posttrain/spec.json"]
    args += ["--remount-ro", "/", "--clearenv", "--chdir", spec["cwd"], "--", spec["argv"][0], "-I", "-S",
             "/.posttrain/launcher.py", "/.posttrain/spec.json"]
    if as_root:
        _become(spec["outside_uid"], spec["outside_gid"])
    os.execv(spec["bwrap"], args)


def _staged_for_unprivileged_user(spec: dict) -> dict[str, str]:
    """As root, bubblewrap would run the program as host root (owner of root's files, exempt from
    the process limit), so it runs as the unprivileged host user instead; the paths it binds may
    lie where that user cannot search (a pyenv interpreter in root's home), so each is first bound,
    in a mount namespace of the launcher's own, under the spec's folder, which that user can
    reach. Returns {sandbox path: path to bind it from}."""
    _unshare(CLONE_NEWNS)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    staged = {}
    for index, path in enumerate(spec["read_only"]):
        target = os.path.join(spec["root"], str(index))
        _mount_point(target, os.path.isdir(path))
        _mount(path, target, None, MS_BIND | MS_REC)
        staged[path] = target
    return staged


def _setup(spec: dict, unshared: int, mapped: int) -> None:
    """In new namespaces, once the launcher has mapped our user, start the sandbox's PID 1."""
    _die_with_parent()
    _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    # Opened as the host user still (root's home, above a pyenv interpreter, is searchable only so)
    # and in the new mount namespace (a bind's source must be in it).
    sources = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in spec["read_only"]}
    os.write(unshared, b"u")
    if os.read(mapped, 1) != b"m":
        raise OSError("the launcher could not write the user namespace's maps")
    if os.getuid() != 0:  # host root, unmapped here: become the mapped unprivileged user, without root's groups
        _become(0, 0)
        _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")  # or /proc/self is root's
    init = os.fork()
    if init == 0:
        _guarded(spec, _init, sources)
    _, status = os.waitpid(init, 0)
    os._exit(_exit_status(status))


def _guarded(spec: dict, step, *args) -> None:
    """Run a step of a forked child; any failure is a sandbox that cannot start, said on the error
    channel (which the program never holds, so it cannot claim a failure of the sandbox)."""
    try:
        step(spec, *args)
    except BaseException as err:  # noqa: BLE001
        os.write(spec["errors_fd"], f"{err}\n".encode())
    os._exit(EXIT_SETUP_FAILED)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    os.set_inheritable(spec["errors_fd"], False)
    if spec["backend"] == "process":
        _write_files(spec["cwd"], spec["files"])
        _guarded(spec, _exec_program)
    if spec["backend"] == "bubblewrap":
        _guarded(spec, _exec_bubblewrap)
    unshared_read, unshared_write = os.pipe()
    mapped_read, mapped_write = os.pipe()
    setup = os.fork()
    if setup == 0:
        os.close(unshared_read)
        os.close(mapped_write)  # so that a launcher that fails to map us is seen as an end of file
        _guarded(spec, _setup, unshared_write, mapped_read)
    os.close(unshared_write)
    if os.read(unshared_read, 1) == b"u":  # else the child failed and said why
        try:
            outside = (spec["outside_uid"], spec["outside_gid"]) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
            _map_user(setup, *outside)
            os.write(mapped_write, b"m")
        except OSError as err:
            os.write(spec["errors_fd"], f"mapping the sandbox's user: {err}\n".encode())
    os.close(mapped_write)
    _, status = os.waitpid(setup, 0)
    sys.exit(_exit_status(status))


if __name__ == "__main__":
    main()
