"""Running the model's Python code: a fresh interpreter per program, with limits.

Each program runs in `python -I` (isolated: no user site-packages, no PYTHON* variables) in an
empty temporary folder, with no stdin, a CPU-time and an address-space limit, and a wall-clock
timeout after which its whole process group is killed. That stops runaway and memory-hungry code;
it is not a security boundary against hostile code (the network and the file system stay
reachable), so run code environments where the model's programs can do no harm, such as a
container.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import EnvConfig

_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_OPENING_FENCE = re.compile(r"```(?:python|py)?[ \t]*(?:\n|$)")
# Sets the limits, then replaces itself with the program's interpreter, which keeps them (a
# preexec_fn would do the same in the forked child, but is unsafe while other threads run).
_LIMITED = ("import os, resource, sys; cpu, memory = int(sys.argv[2]), int(sys.argv[3]); "
            "resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu)); resource.setrlimit(resource.RLIMIT_AS, (memory, memory)); "
            "os.execv(sys.executable, [sys.executable, '-I', '-B', sys.argv[1]])")


@dataclass
class RunResult:
    passed: bool  # exited with status 0 within the limits
    output: str  # stdout then stderr, cut to the output limit
    timed_out: bool = False


def ends_in_open_code_block(text: str) -> bool:
    """Whether the text's last ``` fence opens a code block that never closes (a response cut at
    its token limit in the middle of a program)."""
    fences = [m.start() for m in re.finditer("```", text)]
    return len(fences) % 2 == 1 and _OPENING_FENCE.match(text, fences[-1]) is not None


def last_code_block(text: str) -> str | None:
    """The body of the last complete ```python (or bare ```) block, None if there is none."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else None


def run_python(code: str, timeout_s: float, memory_mb: int, max_output_chars: int) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as folder:
        program = Path(folder) / "program.py"
        program.write_text(code, encoding="utf-8")
        cpu_s = max(1, int(timeout_s) + 1)
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _LIMITED, str(program), str(cpu_s), str(memory_mb * 1024 * 1024)],
            cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONIOENCODING": "utf-8", "OPENBLAS_NUM_THREADS": "1"},
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the program and anything it started
            stdout, stderr = process.communicate()
            timed_out = True
    # Tracebacks name the program by its bare file name, not the temporary folder's path.
    output = (stdout + stderr).decode("utf-8", errors="replace").replace(str(program), program.name)
    if timed_out:
        output += f"\nTimeoutError: the program ran longer than {timeout_s:g} s"
    if len(output) > max_output_chars:
        output = output[:max_output_chars] + f"\n... ({len(output) - max_output_chars} more characters)"
    return RunResult(process.returncode == 0 and not timed_out, output, timed_out)


def run_many(programs: list[str], cfg: EnvConfig) -> list[RunResult]:
    """Run the programs `env.sandbox_parallel` at a time (each in its own process) with the
    `env.sandbox_*` limits, results in order."""
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.sandbox_parallel, len(programs)))) as pool:
        return list(pool.map(lambda code: run_python(code, cfg.sandbox_timeout_s, cfg.sandbox_memory_mb,
                                                     cfg.sandbox_max_output_chars), programs))
