"""The harness side of a test run: the row's tests run here, outside the sandbox, against the
program's objects inside it (posttrain/envs/sandbox_server.py serves them).

Each top-level statement of the tests runs in turn with the program's top-level names bound to
`_Remote` handles (or to their values, for plain data): calling one, reading an attribute, `len`,
iteration, indexing, `in`, `isinstance` and truth are asked of the program, and the answers come
back as plain data. Comparisons, `assert` and everything else happen here, in the harness's own
interpreter, so nothing the program does (exiting, patching, printing) can make a test pass. A
program's objects compare only with its own objects; with plain data they are never equal.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import select
from collections.abc import Callable
from typing import Any

from posttrain.envs.sandbox_server import MAX_MESSAGE_BYTES, decode, encode


class _ProgramGone(Exception):
    """The program stopped answering (it exited, crashed, broke the channel or ran out of time)."""


class ProgramError(Exception):
    """An exception of the program's own type (not a built-in one), raised in one of its calls."""


class _Channel:
    """Requests to the program, replies from it, each within the program's deadline."""

    def __init__(self, requests_fd: int, replies_fd: int, left_s: Callable[[], float]):
        self.requests_fd, self.replies_fd, self.left_s = requests_fd, replies_fd, left_s
        self.pending = b""
        os.set_blocking(requests_fd, False)

    def _wait(self, fd: int, for_writing: bool) -> None:
        left = self.left_s()
        ready = select.select([], [fd], [], max(0.0, left)) if for_writing else select.select([fd], [], [], max(0.0, left))
        if left <= 0 or not any(ready):
            raise _ProgramGone("the program ran out of time")

    def receive(self) -> dict:
        while b"\n" not in self.pending:
            if len(self.pending) > MAX_MESSAGE_BYTES:
                raise _ProgramGone(f"the program's reply is over {MAX_MESSAGE_BYTES} bytes")
            self._wait(self.replies_fd, for_writing=False)
            chunk = os.read(self.replies_fd, 1 << 16)
            if not chunk:
                raise _ProgramGone("the program exited")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise _ProgramGone(f"the program broke the test channel: {err}") from None
        if not isinstance(message, dict):
            raise _ProgramGone("the program broke the test channel")
        return message

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode() + b"\n"
        while data:
            self._wait(self.requests_fd, for_writing=True)
            try:
                data = data[os.write(self.requests_fd, data):]
            except BrokenPipeError:
                raise _ProgramGone("the program exited") from None

    def ask(self, op: str, ref: int, *args: Any, **fields: Any) -> Any:
        self.send({"op": op, "ref": ref, "args": [encode(a, _reference_of) for a in args], **fields})
        reply = self.receive()
        if "raise" in reply:
            name, message = reply["raise"]
            raise _program_exception(str(name), str(message))
        try:
            return decode(reply["value"], lambda number: _Remote(self, number))
        except (KeyError, ValueError, TypeError, RecursionError) as err:
            raise _ProgramGone(f"the program broke the test channel: {err}") from None


def _reference_of(value: Any) -> dict:
    """Only the program's own objects and plain data can be passed to the program."""
    if isinstance(value, _Remote):
        return {"r": object.__getattribute__(value, "_number")}
    raise TypeError(f"the tests pass a {type(value).__name__} to the program; only plain data and the "
                    "program's own objects cross the sandbox")


def _program_exception(name: str, message: str) -> BaseException:
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(message)
    return ProgramError(f"{name}: {message}")


class _Remote:
    """One of the program's objects, as the tests see it."""

    def __init__(self, channel: _Channel, number: int):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_number", number)

    def _ask(self, op: str, *args: Any, **fields: Any) -> Any:
        return object.__getattribute__(self, "_channel").ask(op, object.__getattribute__(self, "_number"),
                                                             *args, **fields)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ask("call", *args, kwargs={k: encode(v, _reference_of) for k, v in kwargs.items()})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._ask("setattr", name, value)

    def _typed(self, op: str, kind: type, *args: Any) -> Any:
        result = self._ask(op, *args)
        if type(result) is not kind:
            raise TypeError(f"the program's {op}() returned {type(result).__name__}, not {kind.__name__}")
        return result

    def __len__(self) -> int:
        return self._typed("len", int)

    def __bool__(self) -> bool:
        return self._typed("bool", bool)

    def __str__(self) -> str:
        return self._typed("str", str)

    def __repr__(self) -> str:
        return self._typed("repr", str)

    def __hash__(self) -> int:
        return self._typed("hash", int)

    def __contains__(self, item: Any) -> bool:
        return self._typed("contains", bool, item)

    def __instancecheck__(self, instance: Any) -> bool:  # isinstance(x, the program's class)
        return self._typed("has_instance", bool, instance)

    def __iter__(self) -> _Remote:
        return self._ask("iter")

    def __next__(self) -> Any:
        return self._ask("next")

    def __getitem__(self, key: Any) -> Any:
        return self._ask("getitem", key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._ask("setitem", key, value)

    def __delitem__(self, key: Any) -> None:
        self._ask("delitem", key)

    def _compare(self, op: str, other: Any) -> Any:
        return self._ask(op, other) if isinstance(other, _Remote) else NotImplemented

    __eq__ = lambda self, other: self._compare("eq", other)  # noqa: E731
    __ne__ = lambda self, other: self._compare("ne", other)  # noqa: E731
    __lt__ = lambda self, other: self._compare("lt", other)  # noqa: E731
    __le__ = lambda self, other: self._compare("le", other)  # noqa: E731
    __gt__ = lambda self, other: self._compare("gt", other)  # noqa: E731
    __ge__ = lambda self, other: self._compare("ge", other)  # noqa: E731


def run_test_statements(tests: str, requests_fd: int, replies_fd: int, left_s: Callable[[], float]) -> str:
    """Run `tests` against the program at the other end of the two fds; "" when every statement
    passed, else what failed (the program's own traceback, if any, is in its output)."""
    try:
        statements = ast.parse(tests).body
        channel = _Channel(requests_fd, replies_fd, left_s)
        hello = channel.receive()
        if "failed" in hello:
            return f"The program raised {hello['failed']} before the tests ran."
        names = {str(k): decode(v, lambda number: _Remote(channel, number)) for k, v in hello["names"].items()}
        scope = {"__builtins__": builtins, "__name__": "__tests__"} | names
        for statement in statements:
            source = ast.get_source_segment(tests, statement) or ast.unparse(statement)
            try:
                exec(compile(ast.Module([statement], type_ignores=[]), "tests", "exec"), scope)
            except _ProgramGone as err:
                return f"Test stopped: {source}\n{err}"
            except (Exception, SystemExit) as err:  # noqa: BLE001 - the test's verdict
                detail = f": {err}" if str(err) else ""
                return f"Test failed: {source}\n{type(err).__name__}{detail}"
        return ""
    except _ProgramGone as err:
        return f"No test ran: {err}"
    except (KeyError, ValueError, TypeError, RecursionError) as err:
        return f"No test ran: the program broke the test channel ({type(err).__name__})"
    finally:
        os.close(requests_fd)
        os.close(replies_fd)
