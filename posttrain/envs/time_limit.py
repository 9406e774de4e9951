"""Calls of a user's function (a reward function, a tool) that can be abandoned when they hang.

A thread that overruns cannot be stopped, so each function runs in a child interpreter of its
own, started once (this file run as a script: stdlib imports only, so it starts in a fraction of a
second) and fed one call at a time over a pipe. A call that takes longer than its limit is abandoned: the child is killed,
`CallTimeout` raised, and the next call starts a fresh child. The child imports the function by
its path (so it needs no pickling), from the same import path as the environment actor, writes
results to a descriptor of its own, and its stdout goes to stderr, so that a function that prints
cannot garble them. What a call takes and returns must pickle.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Any

_STARTUP_S = 300  # importing the function's module (it may import torch or a model)


class CallTimeout(TimeoutError):
    """A call ran past its limit and was abandoned."""


class TimeLimitedFunction:
    """`spec` ("package.module:function") called in a child process, each call within `timeout_s`."""

    def __init__(self, spec: str, timeout_s: float):
        self.spec, self.timeout_s = spec, timeout_s
        self.process: subprocess.Popen | None = None
        self.connection: Connection | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.process is None or self.process.poll() is not None:
            self._start()
        self.connection.send((args, kwargs))
        if not self.connection.poll(self.timeout_s):
            self.close()
            raise CallTimeout(f"{self.spec} ran longer than {self.timeout_s:g} s (env.reward_timeout_s) and was stopped")
        try:
            ok, value = self.connection.recv()
        except EOFError:  # the child died in the call (it exited, or was killed)
            code = self.process.wait()
            self.close()
            raise RuntimeError(f"{self.spec} ended its process (exit status {code}) instead of returning") from None
        if not ok:
            raise value
        return value

    def _start(self) -> None:
        self.close()
        reader, child_writer = os.pipe()
        child_reader, writer = os.pipe()
        # The child imports from exactly this process's path (Ray adds the driver's folder to its
        # workers' sys.path, not to PYTHONPATH); -P: not also this file's folder, whose modules
        # would shadow the user's.
        path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
        self.process = subprocess.Popen(
            [sys.executable, "-P", __file__, self.spec, str(child_reader), str(child_writer)],
            pass_fds=(child_reader, child_writer), stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": path})
        os.close(child_reader)
        os.close(child_writer)
        self.connection = _Duplex(reader, writer)
        # The import is not the call: the limit starts once the child has the function.
        if not self.connection.poll(_STARTUP_S):
            self.close()
            raise CallTimeout(f"{self.spec} did not import within {_STARTUP_S} s in its child process")
        try:
            ok, error = self.connection.recv()
        except EOFError:
            code = self.process.wait()
            self.close()
            raise RuntimeError(f"the child process of {self.spec} ended (exit status {code}) before it was "
                               "ready") from None
        if not ok:
            self.close()
            raise error

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.connection is not None:
            self.connection.close()
        self.process = self.connection = None

    def __getstate__(self) -> dict:  # an environment is pickled into its actor: the child is not
        return {"spec": self.spec, "timeout_s": self.timeout_s, "process": None, "connection": None}

    def __del__(self) -> None:
        self.close()


class _Duplex:
    """Two one-way pipe ends as one connection: pickled messages out on one, in on the other."""

    def __init__(self, read_fd: int, write_fd: int):
        self.incoming, self.outgoing = Connection(read_fd, writable=False), Connection(write_fd, readable=False)

    def send(self, value: Any) -> None:
        self.outgoing.send(value)

    def poll(self, timeout: float) -> bool:
        return self.incoming.poll(timeout)

    def recv(self) -> Any:
        return self.incoming.recv()

    def close(self) -> None:
        self.incoming.close()
        self.outgoing.close()


def _serve(spec: str, read_fd: int, write_fd: int) -> None:
    incoming, outgoing = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:  # noqa: BLE001 - the caller raises it
        outgoing.send((False, RuntimeError(f"{spec} cannot be imported in its child process: {exc!r}")))
        return
    outgoing.send((True, None))  # ready
    while True:
        try:
            args, kwargs = incoming.recv()
        except EOFError:  # the environment closed its end
            return
        try:
            outgoing.send((True, fn(*args, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - the caller re-raises it as its own
            try:
                outgoing.send((False, exc))
            except Exception:  # noqa: BLE001 - an exception that does not pickle goes as text
                outgoing.send((False, RuntimeError(repr(exc))))


if __name__ == "__main__":
    os.dup2(2, 1)  # what the function prints goes to stderr, never into the results
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
