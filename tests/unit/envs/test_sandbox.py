"""The namespace sandbox against hostile programs: each attack is contained, and the next program
still runs; the test harness cannot be fooled by exiting, patching or printing."""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from posttrain.config import SandboxConfig
from posttrain.envs.sandbox import SandboxUnavailable, check_sandbox, run_python, run_tests

BACKENDS = ["namespaces", pytest.param("bubblewrap", marks=pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (.ci/run installs it)"))]


@pytest.fixture(params=BACKENDS)
def cfg(request) -> SandboxConfig:
    """Each test runs under both builders of the sandbox: posttrain's own launcher and bubblewrap."""
    return SandboxConfig(backend=request.param, timeout_s=5.0)


def sandboxed(cfg: SandboxConfig, code: str, **limits) -> str:
    result = run_python(code, dataclasses.replace(cfg, **limits))
    assert result.sandbox_error is None, result.sandbox_error
    return result.output


def attempt(action: str) -> str:
    """A program that tries `action` (an expression) and prints what happened."""
    return (f"try:\n    outcome = {action}\n    print('DONE', outcome)\n"
            f"except BaseException as err:\n    print('STOPPED', type(err).__name__, err)\n")


@pytest.fixture(autouse=True)
def then_a_clean_program_runs(request):
    cfg = request.getfixturevalue("cfg") if "cfg" in request.fixturenames else None
    yield
    if cfg is not None:
        assert run_python("print(6 * 7)", cfg).output == "42\n"  # the sandbox goes on after each attack


def test_the_program_sees_only_the_interpreter_and_a_private_folder(cfg):
    out = sandboxed(cfg, "import os, sys\nprint(os.getuid(), os.getcwd(), os.listdir('.'))\nprint(sorted(os.listdir('/')))\n"
                    "print(sorted(os.environ))\nprint([p for p in sys.path if 'site-packages' in p])")
    who, top, environment, site = out.splitlines()
    assert who == "1000 /tmp ['program.py']"  # an ordinary user, in an empty folder of its own
    assert set(eval(top)) <= {"dev", "etc", "lib", "lib64", "lib32", "proc", "tmp", "usr", Path.home().parts[1],
                              Path(sys.base_prefix).parts[1],  # libraries, devices and the interpreter's path
                              ".posttrain"}  # bubblewrap's: the launcher that sets the limits inside
    assert environment == str(sorted(["PATH", "HOME", "LC_ALL", "PYTHONIOENCODING", "PYTHONUNBUFFERED",
                                      "OPENBLAS_NUM_THREADS"]))
    assert site == "[]"  # the standard library only


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd"])
def test_host_files_are_absent(cfg, path):
    assert sandboxed(cfg, attempt(f"open({path!r}).read()")).startswith("STOPPED FileNotFoundError")


def test_no_process_in_the_sandbox_holds_the_workers_environment(cfg, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "s3cret")  # as a token in the environment actor's environment
    out = sandboxed(cfg, "import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
                         "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n    except OSError as err:\n"
                         "        print(pid, type(err).__name__)")
    assert "s3cret" not in out and "POSTTRAIN_TEST_SECRET" not in out
    assert len(out.splitlines()) >= 2  # the program itself and the sandbox's PID 1 were looked at


def test_the_home_folder_project_checkpoints_and_ray_files_are_absent(cfg, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "rng.pt").write_bytes(b"state")
    token = tmp_path / "ray_token"
    token.write_text("secret")
    for path in (checkpoint / "rng.pt", token, Path.cwd() / "pyproject.toml", Path("/tmp/ray")):
        out = sandboxed(cfg, attempt(f"open({str(path)!r}).read()"))
        assert out.startswith("STOPPED FileNotFoundError"), (path, out)
    out = sandboxed(cfg, attempt(f"open({str(checkpoint / 'rng.pt')!r}, 'wb').write(b'planted')"))
    assert out.startswith("STOPPED")
    assert (checkpoint / "rng.pt").read_bytes() == b"state"
    home = sandboxed(cfg, f"import os\nprint(sorted(os.listdir({str(Path.home())!r})) if os.path.isdir({str(Path.home())!r}) "
                     "else 'absent')")
    interpreter_path = Path(os.path.realpath(sys.base_prefix))
    visible = ["absent"] if Path.home() not in interpreter_path.parents else [interpreter_path.relative_to(Path.home()).parts[0]]
    assert home.strip() in (str(visible), "absent")  # at most the folder leading to the interpreter


@pytest.mark.parametrize("target", ["/evil.py", "/usr/lib/evil.so", "/proc/sys/kernel/hostname"])
def test_nothing_outside_the_private_folder_is_writable(cfg, target):
    out = sandboxed(cfg, attempt(f"open({target!r}, 'w').write('x')"))
    assert out.startswith("STOPPED"), out
    assert "Read-only file system" in out or "Permission denied" in out or "No such file" in out


def test_no_socket_reaches_the_host_or_beyond(cfg):
    """The sandbox has a network of its own (bubblewrap brings its loopback up, posttrain's launcher
    leaves it down): nothing sent there reaches the host's 127.0.0.1, nor anything further."""
    listener, mailbox = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    mailbox.bind(("127.0.0.1", 0))
    tcp, udp = listener.getsockname()[1], mailbox.getsockname()[1]
    try:
        for action in (f"__import__('socket').create_connection(('127.0.0.1', {tcp}), timeout=1)",
                       "__import__('socket').create_connection(('10.0.0.1', 80), timeout=1)",
                       "__import__('socket').getaddrinfo('pypi.org', 443)"):
            out = sandboxed(cfg, attempt(action))
            assert out.startswith("STOPPED"), (action, out)
        sandboxed(cfg, attempt(f"__import__('socket').socket(2, 2).sendto(b'hello', ('127.0.0.1', {udp}))"))
        listener.setblocking(False)
        mailbox.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
        with pytest.raises(BlockingIOError):
            mailbox.recv(16)  # the datagram went to the sandbox's own loopback, if anywhere
    finally:
        listener.close()
        mailbox.close()


def test_a_fork_bomb_is_stopped_by_the_process_limit(cfg):
    start = time.monotonic()
    result = run_python("import os\nwhile True:\n    os.fork()", dataclasses.replace(cfg, timeout_s=2.0))
    assert not result.passed and time.monotonic() - start < 4
    assert "BlockingIOError" in result.output or result.timed_out


def test_processes_and_open_files_are_limited(cfg):
    forks = sandboxed(cfg, "import os, time\nforked = 0\ntry:\n    while forked < 50:\n        if os.fork() == 0:\n"
                           "            time.sleep(30)\n        forked += 1\nexcept BlockingIOError:\n    pass\nprint(forked)",
                      max_processes=8)
    assert int(forks) < 8  # the program and its init count too
    files = sandboxed(cfg, "opened = []\ntry:\n    while len(opened) < 100:\n        opened.append(open('/dev/null'))\n"
                           "except OSError as err:\n    print(err.strerror, len(opened))", max_open_files=16)
    reason, count = files.strip().rsplit(" ", 1)
    assert reason == "Too many open files" and int(count) < 16


def test_memory_is_limited(cfg):
    assert sandboxed(cfg, attempt("len(bytearray(10 * 1024 ** 3))")).startswith("STOPPED MemoryError")


@pytest.mark.parametrize("code", [
    "while True:\n    pass",
    "import time\ntime.sleep(10 ** 6)",
    # a daemon: fork, setsid, fork again, and the parent waits forever
    "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(10 ** 6)\n"
    "    os._exit(0)\ntime.sleep(10 ** 6)",
])
def test_the_wall_clock_limit_holds_to_a_second(cfg, code):
    start = time.monotonic()
    result = run_python(code, dataclasses.replace(cfg, timeout_s=1.0))
    assert result.timed_out and not result.passed and "longer than 1 s" in result.output
    assert time.monotonic() - start < 2.0


def test_nothing_the_program_started_outlives_it(cfg):
    marker = f"posttrain-daemon-{uuid.uuid4().hex}"
    result = run_python(f"import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
                        "    os._exit(0)\nprint('parent done')", cfg)
    assert result.passed and result.output == "parent done\n"
    time.sleep(0.2)
    survivors = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                survivors.append(pid)
        except OSError:
            pass
    assert survivors == []


@pytest.mark.parametrize("action", [
    "__import__('ctypes').CDLL(None).setuid(0)",  # -1: no privilege to become root
    "__import__('ctypes').CDLL(None).mount(b'none', b'/tmp', b'tmpfs', 0, None)",
    "__import__('ctypes').CDLL(None).sethostname(b'x', 1)",
])
def test_privileged_calls_through_ctypes_fail(cfg, action):
    assert sandboxed(cfg, attempt(action)).strip() == "DONE -1"


@pytest.mark.parametrize("action", ["__import__('subprocess').run(['/bin/sh', '-c', 'echo hi'])",
                                    "__import__('subprocess').run(['sh', '-c', 'echo hi'])",
                                    "__import__('os').system('echo hi') >> 8"])
def test_there_is_no_shell_to_spawn(cfg, action):
    out = sandboxed(cfg, attempt(action))
    assert out.startswith("STOPPED FileNotFoundError") or out.strip() == "DONE 127", out


def test_filling_the_disk_stops_at_the_folders_size(cfg):
    out = sandboxed(cfg, "import os\nwritten = 0\ntry:\n    for i in range(100):\n"
                    "        with open(f'f{i}', 'wb') as f:\n            f.write(b'x' * (8 << 20))\n"
                    "        written += 8\nexcept OSError as err:\n    print(err.strerror, written)",
                    disk_mb=32, max_file_mb=16)
    reason, written = out.strip().rsplit(" ", 1)
    assert reason == "No space left on device" and int(written) <= 32


def test_a_single_file_is_limited_in_size(cfg):
    out = sandboxed(cfg, attempt("open('big', 'wb').write(b'x' * (4 << 20))"), max_file_mb=1)
    assert out.startswith("STOPPED OSError") and "File too large" in out


def test_printing_a_gigabyte_costs_the_caller_no_memory(cfg):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python("import sys\nchunk = b'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.buffer.write(chunk)",
                        dataclasses.replace(cfg, timeout_s=30.0, max_output_chars=100))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert result.passed and result.output.startswith("x" * 100)
    assert result.output.endswith(f"({(1 << 30) - 100} more bytes)")  # all of it read, and dropped
    assert grown_mb < 50


def test_a_sandbox_that_cannot_start_is_named_at_start_up(cfg, monkeypatch):
    import posttrain.envs.sandbox as sandbox
    monkeypatch.setattr(sandbox, "_UNPRIVILEGED_HOST_ID", -5)  # a user the kernel refuses to map
    if os.geteuid() != 0:
        pytest.skip("the refused map is the root path's")
    with pytest.raises(SandboxUnavailable, match=rf"env.sandbox.backend={cfg.backend}: .*cannot start.*"
                                                 r"user namespaces.*env.sandbox.backend=process"):
        check_sandbox(cfg)


def test_the_process_backend_warns_and_keeps_the_limits(caplog):
    check_sandbox(SandboxConfig(backend="process"))
    assert "env.sandbox.backend=process is not a security boundary" in caplog.text
    cfg = SandboxConfig(backend="process", timeout_s=1.0)
    assert run_python("print(6 * 7)", cfg).output == "42\n"
    assert run_python("import time\ntime.sleep(60)", cfg).timed_out
    assert "MemoryError" in run_python("bytearray(10 * 1024 ** 3)", cfg).output


ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.mark.parametrize(("program", "passes"), [
    (ADD, True),
    ("def add(a, b):\n    return a - b\n", False),
    # each of these would pass a harness that trusts the exit status or the output
    ("import sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n", False),
    ("import os\ndef add(a, b):\n    os._exit(0)\n", False),
    ("import os\nos._exit(0)\n", False),
    ("import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\ndef add(a, b):\n    return 0\n", False),
    ("import unittest\nunittest.TestCase.assertEqual = lambda *a: None\ndef add(a, b):\n    return 0\n", False),
    ("def add(a, b):\n    return 0\nprint('OK: all tests passed')\nprint('PASSED')\n", False),
    ("class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()\n", False),
    ("class Five(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Five(5)\n", False),
])
def test_test_results_cannot_be_faked(cfg, program, passes):
    result = run_tests(program, TESTS, cfg)
    assert result.passed is passes, result.output


def test_a_program_cannot_pass_its_failure_off_as_the_sandboxs(cfg):
    """A sandbox failure makes a sample invalid (out of the loss); a failing program must stay a 0."""
    for code in ("import sys\nprint('posttrain sandbox: cannot start: no')\nsys.exit(125)",
                 "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'fake')\n    except OSError:\n"
                 "        pass\nraise SystemExit(125)"):
        result = run_python(code, cfg)
        assert result.sandbox_error is None and not result.passed
        tested = run_tests(code, TESTS, cfg)
        assert tested.sandbox_error is None and not tested.passed


def test_a_program_that_breaks_the_test_channel_fails_with_that_said(cfg):
    result = run_tests("import os\ndef add(a, b):\n    os.write(4, b'not json\\n')\n    return a + b\n", TESTS, cfg)
    assert not result.passed and result.sandbox_error is None
    assert result.output.endswith("Test stopped: assert add(2, 3) == 5\nthe program broke the test channel: "
                                  "Expecting value: line 1 column 1 (char 0)")


def test_tests_use_the_programs_objects_and_report_the_failing_statement(cfg):
    program = ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
               "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n"
               "    def __len__(self):\n        return len(self.items)\n"
               "def evens(n):\n    yield from range(0, n, 2)\ndef check(x):\n    if x < 0:\n        raise ValueError('negative')\n"
               "    return {'x': x, 'pair': (x, 1.5)}\nprint('loaded')\n")
    tests = ("s = Stack()\ns.push(1); s.push(2)\nassert len(s) == 2 and s.pop() == 2 and s.items == [1]\n"
             "assert isinstance(s, Stack) and not isinstance(3, Stack)\nassert list(evens(5)) == [0, 2, 4]\n"
             "assert check(2) == {'x': 2, 'pair': (2, 1.5)}\ntry:\n    check(-1)\n    raise AssertionError('no error')\n"
             "except ValueError as err:\n    assert 'negative' in str(err)\n"
             "assert all(check(i)['x'] == i for i in range(3))\n")
    result = run_tests(program, tests, cfg)
    assert result.passed, result.output
    assert result.output == "loaded\n"
    failed = run_tests(program, tests + "assert list(evens(3)) == [0, 2, 4]\n", cfg)
    assert not failed.passed
    assert failed.output == "loaded\nTest failed: assert list(evens(3)) == [0, 2, 4]\nAssertionError"


def test_a_program_that_hangs_during_the_tests_times_out(cfg):
    start = time.monotonic()
    result = run_tests("import time\ndef add(a, b):\n    time.sleep(60)\n", TESTS, dataclasses.replace(cfg, timeout_s=1.0))
    assert result.timed_out and not result.passed and time.monotonic() - start < 2.0
