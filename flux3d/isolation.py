"""Run one function call in a bounded child process: hard timeout, memory cap, captured stderr.

Assets come from the internet. A parser can hang, allocate without end or segfault (Blender importers do all
three), so per-asset work that opens an asset runs here: a crash becomes a reason code, never a dead batch.

The child starts from a `forkserver` (clean, single-threaded, modules preloaded once), so starting one costs
milliseconds and is safe from a parent that runs threads (download pools, Ray, Prefect). The child makes itself a
process-group leader; on timeout the parent kills the whole group, so nothing a Blender importer spawned survives.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_CTX: mp.context.BaseContext | None = None
STDERR_TAIL = 4000


@dataclass(slots=True)
class Isolated:
    ok: bool
    value: Any = None
    reason: str = ""
    """timeout | out_of_memory | crashed | error (the function raised)."""
    message: str = ""
    """Exception text or signal, then the tail of the child's stderr."""
    seconds: float = 0.0


def _context() -> mp.context.BaseContext:
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        # Heavy imports paid once in the server instead of once per child.
        ctx.set_forkserver_preload(["numpy", "trimesh", "flux3d.stages.inspect"])
        _CTX = ctx
    return _CTX


def _child(conn: Any, fn: Callable, args: tuple, kwargs: dict, memory_mb: int | None, stderr_path: str) -> None:
    os.setsid()
    # C-level output (Blender, trimesh's C deps) goes to fd 1/2: send both to a file the parent reads back.
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except MemoryError:
        conn.send(("out_of_memory", "MemoryError"))
    except BaseException as e:  # noqa: BLE001 - every failure must come back as data
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
    finally:
        conn.close()


def run_isolated(fn: Callable, *args: Any, timeout_s: float, memory_mb: int | None = None, **kwargs: Any) -> Isolated:
    """Call `fn(*args, **kwargs)` in a child process. `fn` must be importable (module level) and its result picklable.

    Never raises for what happens inside the child: the outcome is an `Isolated` with a reason code.
    """
    ctx = _context()
    t0 = time.perf_counter()
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile(prefix="flux3d-child-", suffix=".log", delete=False) as tmp:
        stderr_path = tmp.name
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs, memory_mb, stderr_path), daemon=True)
    proc.start()
    send.close()
    outcome: tuple[str, Any] | None = None
    try:
        if recv.poll(timeout_s):
            try:
                outcome = recv.recv()
            except EOFError:  # the child died before sending (segfault, kill -9, OOM killer)
                outcome = None
        else:
            outcome = ("timeout", f"no result after {timeout_s:.0f} s; process group killed")
        if proc.is_alive():
            proc.join(timeout=1.0 if outcome and outcome[0] != "timeout" else 0)
        if proc.is_alive():
            # Kill the child itself first: if it timed out before its `os.setsid()` (still importing what its
            # function needs), it leads no group yet and killpg alone would miss it, leaving join() to wait forever.
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.join()
    finally:
        recv.close()
        try:
            with open(stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - STDERR_TAIL))
                stderr_tail = f.read().decode("utf-8", "replace")
        finally:
            os.unlink(stderr_path)
    seconds = time.perf_counter() - t0
    if outcome is None:
        code = proc.exitcode
        sig = -code if code is not None and code < 0 else None
        reason = "out_of_memory" if sig == signal.SIGKILL else "crashed"
        detail = f"child died with signal {signal.Signals(sig).name}" if sig else f"child exited with code {code}"
        return Isolated(False, reason=reason, message=_join(detail, stderr_tail), seconds=seconds)
    kind, value = outcome
    if kind == "ok":
        return Isolated(True, value=value, seconds=seconds)
    return Isolated(False, reason=kind, message=_join(str(value), stderr_tail), seconds=seconds)


def _join(message: str, stderr_tail: str) -> str:
    tail = stderr_tail.strip()
    return f"{message}\n--- stderr ---\n{tail}" if tail else message


def stop_process_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """End a child started with `start_new_session=True` and everything in its process group (servers, Ray nodes
    and their workers), and nothing else: SIGTERM, then SIGKILL for what is left after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:  # members other than the leader may take longer to go
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
