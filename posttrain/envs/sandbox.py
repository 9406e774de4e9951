"""Running the model's Python code: a fresh interpreter per program, in a sandbox, with limits.

Each program runs in fresh Linux namespaces (user, PID, mount, network, IPC, UTS), built by
bubblewrap (`env.sandbox.backend=bubblewrap`; `auto`, the default, takes it where it is installed)
or by posttrain's own launcher with the kernel's calls (`namespaces`; see sandbox_launcher.py).
Both give the same sandbox, and the tests attack each. What it protects against:
- The network: the program has a network of its own with only a loopback device (down, or up
  under bubblewrap), so no TCP or UDP socket reaches the host (127.0.0.1 and the Ray cluster
  included) or anything beyond.
- Files: its file system holds the interpreter and its standard library (no site-packages), the
  system's shared libraries, read-only, four harmless devices, its own /proc, and a private
  writable /tmp of `disk_mb` in memory. The home folder, the project, checkpoints, Ray's
  files and tokens, /etc and every shell or other program are absent, and no process in the
  sandbox holds the environment (variables, tokens) of the worker that started it.
- Privilege: it runs as an ordinary user of a nested user namespace, with no capabilities, no new
  privileges (no setuid), and, when posttrain runs as root, as the unprivileged host user 65534.
- Resources: rlimits on CPU time, address space per process, processes, open files and file size;
  output beyond `max_output_chars` is read and dropped as it streams.
- Escape by time: the program's namespace has its own PID 1; when the program ends or its
  wall-clock limit passes, that init is killed and the kernel kills everything left in the
  namespace, daemons that called setsid included.
What it does not: kernel bugs reachable from an unprivileged process (no seccomp filter); the
CPU and memory a program takes from its neighbours within its limits (no cgroup: the processes
limit times the memory limit, plus /tmp, bounds its memory); reading the system's shared
libraries, which hold no secrets. It needs unprivileged user namespaces; where a host forbids
them, the start-up error names the setting. `backend=process` runs a plain child process
with the same rlimits: no boundary, for trusted programs only, and a warning says so.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import ConfigError, SandboxConfig

logger = logging.getLogger(__name__)

_LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
_SERVER = Path(__file__).with_name("sandbox_server.py")
_UNPRIVILEGED_HOST_ID = 65534  # who the program is on the host when posttrain runs as root
_WORK = "/tmp"  # the program's folder inside the sandbox
_ENVIRONMENT = {"PATH": "/nonexistent", "HOME": _WORK, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
                "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}


_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_OPENING_FENCE = re.compile(r"```(?:python|py)?[ \t]*(?:\n|$)")


class SandboxUnavailable(ConfigError):
    """The sandbox cannot start on this host; the message names what is missing and the fix."""


@dataclass
class RunResult:
    passed: bool  # the program ran within its limits and (with tests) every test passed
    output: str  # what it printed (stdout and stderr, in order), cut; then any test failure
    timed_out: bool = False
    sandbox_error: str | None = None  # the sandbox itself failed; the program's result is unknown


@dataclass
class _Process:
    """A started program: its process, the reader of its output, when its time is up, and the
    host folder of its launch (with backend=process, the program's own folder), and the channel on
    which the launcher says why the sandbox could not start (the program never holds it)."""
    popen: subprocess.Popen
    output: _OutputReader
    deadline: float
    folder: tempfile.TemporaryDirectory
    errors_fd: int
    backend: str

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def kill(self) -> None:
        """Kill the launcher's process group; its death takes the sandbox's PID namespace with it."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self) -> tuple[bool, str]:
        """Wait for the exit within the deadline (else kill); (timed out, why the sandbox could not
        start or "")."""
        # Waited for without reaping, so that the launcher's process group id cannot be reused
        # by an unrelated process before the kill below.
        exited = os.WEXITED | os.WNOHANG | os.WNOWAIT
        while (ended := os.waitid(os.P_PID, self.popen.pid, exited)) is None and self.left_s() > 0:
            time.sleep(0.005)
        timed_out = ended is None
        self.kill()  # whatever is left in its group (with backend=process, no namespace does it)
        self.popen.wait()
        self.output.join(timeout=1.0)  # a setsid'd child of backend=process may hold the pipe open
        self.folder.cleanup()
        with open(self.errors_fd, "rb") as errors:  # every holder is dead: this reads to its end
            lines = errors.read(4096).decode("utf-8", errors="replace").splitlines()
        # Bubblewrap reports on this channel as JSON, "child-pid" once the sandbox is up; the
        # launchers' own failures are plain text.
        started = any(line.startswith("{") and "child-pid" in line for line in lines)
        setup_error = "; ".join(line for line in lines if line and not line.startswith("{"))
        if self.backend == "bubblewrap" and not started and not timed_out:
            setup_error = setup_error or "bubblewrap exited before starting the program (its message is in the output)"
        return timed_out, setup_error


class _OutputReader(threading.Thread):
    """Reads a program's output as it comes, keeping the first `limit` bytes and dropping the rest,
    so a program printing gigabytes costs its reader no memory."""

    def __init__(self, fd: int, limit: int):
        super().__init__(daemon=True)
        self.fd, self.limit, self.kept, self.dropped = fd, limit, bytearray(), 0

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 1 << 16):
                room = self.limit - len(self.kept)
                self.kept += chunk[:room]
                self.dropped += max(0, len(chunk) - room)
        finally:
            os.close(self.fd)

    def text(self, max_chars: int) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        if len(text) <= max_chars and not self.dropped:
            return text
        shown = text[:max_chars]
        more = len(self.kept) + self.dropped - len(shown.encode("utf-8", errors="replace"))
        return f"{shown}\n... ({more} more bytes)"


def ends_in_open_code_block(text: str) -> bool:
    """Whether the text's last ``` fence opens a code block that never closes (a response cut at
    its token limit in the middle of a program)."""
    fences = [m.start() for m in re.finditer("```", text)]
    return len(fences) % 2 == 1 and _OPENING_FENCE.match(text, fences[-1]) is not None


def last_code_block(text: str) -> str | None:
    """The body of the last complete ```python (or bare ```) block, None if there is none."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


@functools.cache
def _interpreter_view() -> tuple[str, list[str], dict[str, str]]:
    """(the interpreter, the host paths the sandbox shows read-only, its symbolic links): the
    interpreter and standard library, not site-packages; the shared libraries they load."""
    interpreter = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    bases = {"base": sys.base_prefix, "installed_base": sys.base_prefix, "platbase": sys.base_exec_prefix,
             "installed_platbase": sys.base_exec_prefix}  # not a virtual environment's
    library = sysconfig.get_paths(vars=bases)
    paths = {interpreter, library["stdlib"], library["platstdlib"]}
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        paths.add(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")))
    links = {}
    for folder in ("/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32"):
        if os.path.islink(folder):
            links[folder] = os.readlink(folder)
        elif os.path.isdir(folder):
            paths.add(folder)
    if os.path.isfile("/etc/ld.so.cache"):
        paths.add("/etc/ld.so.cache")
    # A path inside another one shown already would be bound twice.
    paths = sorted(p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths))
    return interpreter, paths, links


@functools.cache
def _bubblewrap() -> str | None:
    """bubblewrap's executable, if installed; looked up once, not for every program."""
    return shutil.which("bwrap")


@functools.cache
def _server_source() -> str:
    return _SERVER.read_text(encoding="utf-8")


def resolve_backend(cfg: SandboxConfig) -> str:
    """`auto`: bubblewrap where it is installed, else namespaces built by posttrain's own launcher."""
    if cfg.backend != "auto":
        return cfg.backend
    return "bubblewrap" if _bubblewrap() else "namespaces"


def _start(files: dict[str, str], script: str, cfg: SandboxConfig, pass_fds: tuple[int, ...] = ()) -> _Process:
    """Start `python -I -S -B script` (a name in `files`, all written into the program's folder)
    under the sandbox of `cfg`; the program's fds 3, 4, ... are `pass_fds`."""
    interpreter, read_only, links = _interpreter_view()
    backend = resolve_backend(cfg)
    folder = tempfile.TemporaryDirectory(prefix="posttrain-sandbox-")
    # Holds the launcher's spec (read before it drops privileges) and the mount point of the new
    # root, which the unprivileged host user must reach but not list.
    os.chmod(folder.name, 0o711)
    work = folder.name if backend == "process" else _WORK
    spec = {
        "backend": backend, "bwrap": _bubblewrap(), "root": os.path.join(folder.name, "root"),
        "read_only": read_only,
        "links": links, "outside_uid": _UNPRIVILEGED_HOST_ID, "outside_gid": _UNPRIVILEGED_HOST_ID,
        "files": files, "cwd": work, "pass_fds": list(pass_fds), "env": _ENVIRONMENT | {"HOME": work},
        "argv": [interpreter, "-I", "-S", "-B", os.path.join(work, script)],
        "limits": {"cpu_s": max(1, int(cfg.timeout_s) + 1), "memory_bytes": cfg.memory_mb << 20,
                   "processes": cfg.max_processes, "open_files": cfg.max_open_files,
                   "file_bytes": cfg.max_file_mb << 20, "disk_mb": cfg.disk_mb},
    }
    os.mkdir(spec["root"])
    spec_path = os.path.join(folder.name, "spec.json")
    read_end, write_end = os.pipe()
    errors_read, spec["errors_fd"] = os.pipe()
    try:
        with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT, 0o600), "w", encoding="utf-8") as f:
            json.dump(spec, f)
        # The launcher gets no environment: its processes stay in the sandbox (bubblewrap's PID 1),
        # where the program could read the environment of the worker that started it.
        popen = subprocess.Popen([sys.executable, "-I", "-S", str(_LAUNCHER), spec_path], stdin=subprocess.DEVNULL,
                                 stdout=write_end, stderr=write_end, pass_fds=(*pass_fds, spec["errors_fd"]),
                                 start_new_session=True, env={})
    except BaseException:
        os.close(read_end)
        os.close(errors_read)
        folder.cleanup()
        raise
    finally:
        os.close(write_end)
        os.close(spec["errors_fd"])
    reader = _OutputReader(read_end, limit=4 * cfg.max_output_chars + 4)
    reader.start()
    return _Process(popen, reader, time.monotonic() + cfg.timeout_s, folder, errors_read, backend)


def _result(process: _Process, cfg: SandboxConfig, passed: Callable[[int], bool], failure: str = "") -> RunResult:
    """Wait for the program and describe how it went; `passed(exit status)` decides a clean run."""
    timed_out, setup_error = process.finish()
    output = process.output.text(cfg.max_output_chars)
    if setup_error:
        return RunResult(False, output, sandbox_error=f"the sandbox could not start: {setup_error}")
    if timed_out:
        output += f"\nTimeoutError: the program ran longer than {cfg.timeout_s:g} s"
    elif failure:
        output = f"{output.rstrip()}\n{failure}".lstrip("\n")
    return RunResult(passed(process.popen.returncode) and not timed_out and not failure, output, timed_out)


def run_python(code: str, cfg: SandboxConfig) -> RunResult:
    """Run a program; it passes when it exits with status 0 within its limits."""
    return _result(_start({"program.py": code}, "program.py", cfg), cfg, lambda status: status == 0)


def run_tests(code: str, tests: str, cfg: SandboxConfig) -> RunResult:
    """Run a program, then its tests against it from outside the sandbox (program_tests.py):
    it passes when every test statement ran without an exception, whatever the program does."""
    from posttrain.envs.program_tests import run_test_statements
    requests_read, requests_write = os.pipe()
    replies_read, replies_write = os.pipe()
    try:
        process = _start({"program.py": code, "serve.py": _server_source()}, "serve.py", cfg,
                         pass_fds=(requests_read, replies_write))
    finally:
        os.close(requests_read)
        os.close(replies_write)
    failure = run_test_statements(tests, requests_write, replies_read, process.left_s)
    return _result(process, cfg, lambda status: True, failure)


def run_many(programs: list[str], cfg: SandboxConfig, tests: list[str] | None = None) -> list[RunResult]:
    """Run the programs (each against its tests, if given) `cfg.parallel` at a time, results in order."""
    if not programs:
        return []
    run = (lambda i: run_python(programs[i], cfg)) if tests is None else (lambda i: run_tests(programs[i], tests[i], cfg))
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.parallel, len(programs)))) as pool:
        return list(pool.map(run, range(len(programs))))


def check_sandbox(cfg: SandboxConfig, key: str = "env.sandbox") -> None:
    """At an environment's start: the sandbox must start here, else a SandboxUnavailable that says
    why and what to change; `backend=process` is allowed with a warning."""
    if cfg.backend == "process":
        logger.warning("%s.backend=process is not a security boundary: the model's programs run as plain "
                       "processes of this user, with rlimits but no namespaces, so they can reach the network "
                       "and your files; use it only for trusted code or inside a disposable container", key)
        return
    result = run_python("print('ready')", cfg)
    if result.output.strip() != "ready":
        raise SandboxUnavailable(
            f"{key}.backend={resolve_backend(cfg)}: the sandbox for the model's programs cannot start on this host "
            f"({result.sandbox_error or result.output.strip()[-300:]}). It needs unprivileged user namespaces: "
            "sysctl user.max_user_namespaces > 0 and, where they exist, kernel.unprivileged_userns_clone=1 "
            "and kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu 24.04); in a container, a seccomp "
            f"profile that allows unshare and mount. Or set {key}.backend=process to run them unconfined "
            "(no security boundary).")
