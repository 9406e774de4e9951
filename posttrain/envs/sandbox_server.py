"""The program's side of a test run, and the wire format both sides share (standard library only).

A program under test never sees its tests, and cannot report its own result. In the sandbox this
file runs the program, then serves the test harness (posttrain/envs/program_tests.py, outside the
sandbox): each request (call this, get that attribute, len, iter, ...) on one of the program's
objects is answered with the result. Results cross as plain data (None, bool, int, float,
complex, str, bytes, and lists, tuples, sets, frozensets and dicts of them); anything else crosses
as a reference the harness can use in further requests. The harness compares and asserts on its
side, so exiting early, patching `assert` or `unittest`, printing a success marker, or returning
an object whose `__eq__` always says yes scores nothing.

Messages are one JSON object per line: requests on fd 3, replies on fd 4.
"""

import builtins
import json
import operator
import os
import sys
import traceback

REQUESTS_FD, REPLIES_FD = 3, 4
MAX_MESSAGE_BYTES = 4 << 20
_SEQUENCES = {list: "l", tuple: "t", set: "s", frozenset: "fs"}
_FROM_TAG = {tag: kind for kind, tag in _SEQUENCES.items()}
# What the harness may ask of an object besides calls and attributes; comparisons are only asked
# between two of the program's own objects.
SPECIAL = {"len": len, "iter": iter, "next": next, "bool": bool, "str": str, "repr": repr, "hash": hash,
           "getitem": operator.getitem, "setitem": operator.setitem, "delitem": operator.delitem,
           "contains": operator.contains, "has_instance": lambda kind, value: isinstance(value, kind),
           "setattr": setattr,
           "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
           "ge": operator.ge}


def encode(value, reference):
    """`value` as JSON: plain data tagged by type, anything else as `reference(value)`. Subclasses
    of the plain types (a namedtuple, a defaultdict, an int with its own `__eq__`) cross as their
    plain values, read through the base type's own methods."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return {"i": int.__repr__(value)}
    if isinstance(value, float):
        return {"f": float.__repr__(value)}
    if isinstance(value, complex):
        return {"c": [float.__repr__(complex.real.__get__(value)), float.__repr__(complex.imag.__get__(value))]}
    if isinstance(value, bytes):
        return {"b": bytes.hex(value)}
    for kind, tag in _SEQUENCES.items():
        if isinstance(value, kind):
            return {tag: [encode(item, reference) for item in kind.__iter__(value)]}
    if isinstance(value, dict):
        return {"d": [[encode(k, reference), encode(v, reference)] for k, v in dict.items(value)]}
    return reference(value)


def decode(message, dereference):
    """The inverse of `encode`, strict: anything but the tagged forms above is a ValueError."""
    if message is None or type(message) in (bool, str):
        return message
    if type(message) is not dict or len(message) != 1:
        raise ValueError(f"not a value: {str(message)[:100]}")
    (tag, body), = message.items()
    if tag == "r" and type(body) is int:
        return dereference(body)
    if tag in ("i", "f", "b") and type(body) is str:
        return {"i": int, "f": float, "b": bytes.fromhex}[tag](body)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(part) is str for part in body):
        return complex(float(body[0]), float(body[1]))
    if tag in _FROM_TAG and type(body) is list:
        return _FROM_TAG[tag](decode(item, dereference) for item in body)
    if tag == "d" and type(body) is list and all(type(pair) is list and len(pair) == 2 for pair in body):
        return {decode(k, dereference): decode(v, dereference) for k, v in body}
    raise ValueError(f"not a value: {str(message)[:100]}")


class _Objects:
    """The program's objects the harness holds references to, by number."""

    def __init__(self):
        self.by_id = {}

    def reference(self, value):
        self.by_id[id(value)] = value
        return {"r": id(value)}

    def dereference(self, number):
        if number not in self.by_id:
            raise ValueError(f"no object #{number}")
        return self.by_id[number]


def _answer(request, objects):
    args = [decode(a, objects.dereference) for a in request.get("args", [])]
    kwargs = {k: decode(v, objects.dereference) for k, v in request.get("kwargs", {}).items()}
    target = objects.dereference(request["ref"])
    op = request["op"]
    if op == "call":
        return target(*args, **kwargs)
    if op == "getattr":
        return getattr(target, request["name"])
    return SPECIAL[op](target, *args)


def main():
    requests, replies = os.fdopen(REQUESTS_FD, "rb"), os.fdopen(REPLIES_FD, "wb")
    objects = _Objects()

    def reply(message):
        replies.write(json.dumps(message).encode() + b"\n")
        replies.flush()

    with open("program.py", encoding="utf-8") as f:  # in its own folder, beside this file
        source = f.read()
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    sys.argv = ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as err:  # noqa: BLE001 - the program's own failure, shown to the model
        traceback.print_exception(type(err), err, err.__traceback__.tb_next)
        reply({"failed": type(err).__name__})
        return
    sys.stdout.flush()
    reply({"names": {name: encode(value, objects.reference) for name, value in namespace.items()
                     if not name.startswith("__")}})
    for line in requests:
        try:
            result = _answer(json.loads(line), objects)
            reply({"value": encode(result, objects.reference)})
        except BaseException as err:  # noqa: BLE001 - the program's exception, raised again in the harness
            reply({"raise": [type(err).__name__, str(err)[:1000]]})


if __name__ == "__main__":
    main()
