"""Run model-written Python and report whether it ran clean: the execution check of the code evals.

Code Llama scores infilling and completion by running the model's code against tests (pass@k,
Code Llama §3); the code a model writes is untrusted, so each program runs in its own Python
process:

- ``python -I -S``: isolated mode (no ``PYTHON*`` variables, no user site, not even the
  script's own directory on ``sys.path``) and no ``site`` (no third-party packages: the programs
  need only the standard library);
- a fresh temporary directory as working directory, ``HOME`` and ``TMPDIR``, deleted afterwards;
  an environment of nothing but ``PATH`` (no inherited variables, so no tokens or keys);
- no standard input; standard output and error go to a file of at most ``output_limit`` bytes
  (RLIMIT_FSIZE), so a program printing forever cannot fill the memory or the disk;
- a wall-clock limit: past it the whole process group is killed (children too); and, where the
  OS has them (POSIX), RLIMIT_AS (address space: a memory bomb raises MemoryError), RLIMIT_CPU
  and RLIMIT_NPROC (no fork bombs), set by the child itself before the program runs (a
  ``preexec_fn`` is unsafe in a process with threads, as torch's).

This is process isolation, not a security boundary: the program can still read what the user
can read and write outside its directory through absolute paths. It is meant for code written
by the models this package trains on synthetic tasks, not for code from strangers; run that in
a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

# Runs inside the sandboxed interpreter: set the limits, then run the program as __main__.
# A program that calls sys.exit(0) before its tests have run does not count as passing.
_LAUNCHER = """\
import runpy, sys
try:
    import resource
except ImportError:  # not POSIX: the wall-clock limit still holds
    resource = None
if resource is not None:
    memory, cpu, output = {memory}, {cpu}, {output}
    for name, value in (("RLIMIT_AS", memory), ("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", output),
                        ("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0)):
        limit = getattr(resource, name, None)
        if limit is None or value is None:
            continue
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass
try:
    runpy.run_path("program.py", run_name="__main__")
except SystemExit as e:
    if e.code in (None, 0):
        sys.stderr.write("EarlyExit: the program exited before it finished\\n")
        sys.exit(3)
    raise
"""


class Outcome(NamedTuple):
    """``passed``: the program ran to its end with exit status 0; ``reason``: "ok", or why not
    (a timeout, the exception's last line, a signal), with the tail of its output."""

    passed: bool
    reason: str


def run_python(source: str, time_limit: float = 5.0, memory_mb: int = 512, output_limit: int = 65536,
               reason_chars: int = 300) -> Outcome:
    """Run ``source`` as a Python program in a fresh process and directory (see the module
    docstring for the limits). ``time_limit`` is wall-clock seconds; ``memory_mb`` caps the address
    space (POSIX); ``reason_chars`` caps the output kept in ``reason``."""
    if not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit}")
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be > 0, got {memory_mb}")
    with tempfile.TemporaryDirectory(prefix="llama2-sandbox-") as tmp:
        root = Path(tmp)
        (root / "program.py").write_text(source, encoding="utf-8")
        cpu = int(time_limit) + 1  # CPU seconds: a backstop under the wall clock, which is the real limit
        (root / "launcher.py").write_text(
            _LAUNCHER.format(memory=memory_mb * 2**20, cpu=cpu, output=output_limit), encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp,
               "PYTHONIOENCODING": "utf-8"}
        posix = os.name == "posix"
        with open(root / "output.txt", "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "launcher.py"], cwd=tmp, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=posix)
            start = time.monotonic()
            try:
                rc = proc.wait(timeout=time_limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill the whole group: the program's own children must not outlive it.
                if posix:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                else:
                    proc.kill()
                proc.wait()
        elapsed = time.monotonic() - start
        data = (root / "output.txt").read_bytes()
    tail = _tail(data[-4 * reason_chars:].decode("utf-8", "replace"), reason_chars)
    if timed_out:
        return Outcome(False, f"timeout: still running after {time_limit:g} s")
    if rc == 0:
        return Outcome(True, "ok")
    if len(data) >= output_limit:
        return Outcome(False, f"output limit: the program wrote {output_limit} bytes or more")
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "output limit", "SIGKILL": "killed"}.get(name, name)
        return Outcome(False, f"{why} ({name}) after {elapsed:.1f} s" + (f": {tail}" if tail else ""))
    return Outcome(False, f"exit status {rc}: {tail}" if tail else f"exit status {rc}")


def _tail(text: str, chars: int) -> str:
    """The last line that says something (an exception's message), else the last ``chars`` characters."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1]
    return last if len(last) <= chars else "…" + last[-chars:]
