"""Run model-written Python in a separate, limited process: `run_python(code)` -> SandboxResult.

Used to check generated code (HumanEval). The child is a fresh `python -I -S` (no user site, no site-packages,
no PYTHON* environment) in an empty temporary directory with an empty environment, and:
- time: CPU seconds capped with RLIMIT_CPU and wall-clock seconds by the parent, which kills the child's whole
  process group when the time is up (a program that sleeps uses no CPU but still ends);
- memory: address space capped with RLIMIT_AS (an allocation beyond it raises MemoryError in the child);
- files: RLIMIT_FSIZE caps what it may write, RLIMIT_CORE = 0 (no core dumps);
- network and processes: before the code runs, a guard replaces socket connect / bind / send, name lookups,
  subprocess, os.system / fork / exec* / spawn* / kill with functions that raise PermissionError.

This keeps accidents of a small model's code (endless loops, huge lists, stray `os.system`) from hurting the
evaluation or the machine. It is not a security boundary against code written to escape (Python code can undo
the guard); run untrusted models' code in a container or VM.
"""

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 1024
MAX_FILE_BYTES = 16 * 1024 * 1024
OUTPUT_TAIL_CHARS = 2000

# Runs in the child before the checked code: set the limits (soft = hard, so the code cannot raise them again),
# then make every way to reach the network or start a process raise.
GUARD = '''
import resource as _resource
for _limit, _value in {limits!r}:
    _resource.setrlimit(getattr(_resource, _limit), (_value, _value))

def _blocked(*args, **kwargs):
    raise PermissionError("the sandbox allows no network access and no new processes")

import os as _os, socket as _socket, subprocess as _subprocess
for _name in ("connect", "connect_ex", "bind", "listen", "sendto", "sendmsg"):
    setattr(_socket.socket, _name, _blocked)
for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex"):
    setattr(_socket, _name, _blocked)
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(_subprocess, _name, _blocked)
for _name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe",
              "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp",
              "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg"):
    if hasattr(_os, _name):
        setattr(_os, _name, _blocked)
del _os, _socket, _subprocess, _name, _resource, _limit, _value
'''


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (non-zero exit), "timeout"
    returncode: int | None
    output: str  # the last OUTPUT_TAIL_CHARS characters of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(code: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB) -> SandboxResult:
    """Run `code` as a program in a limited child process; passed = it exited with status 0 in time."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"need timeout_s > 0 and memory_mb > 0, got {timeout_s}, {memory_mb}")
    cpu_s = max(1, int(timeout_s + 0.999))
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        limits = [("RLIMIT_CPU", cpu_s), ("RLIMIT_AS", memory_mb * 1024 * 1024), ("RLIMIT_FSIZE", MAX_FILE_BYTES),
                  ("RLIMIT_CORE", 0)]
        with open(path, "w", encoding="utf-8") as f:
            f.write(GUARD.format(limits=limits) + "\n" + code)
        # process_group=0: the child leads its own group, so a timeout kills everything it started
        proc = subprocess.Popen([sys.executable, "-I", "-S", path], cwd=workdir, env={}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return SandboxResult("timeout", None, _tail(out))
    if proc.returncode == -signal.SIGXCPU or proc.returncode == -signal.SIGKILL:
        return SandboxResult("timeout", proc.returncode, _tail(out))
    return SandboxResult("passed" if proc.returncode == 0 else "failed", proc.returncode, _tail(out))


def _tail(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")[-OUTPUT_TAIL_CHARS:]
