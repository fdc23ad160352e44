"""Run function calls in a bounded child process: hard timeout, memory cap, captured stderr.

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


def _serve(conn: Any, memory_mb: int | None) -> None:
    """The child's loop: run each (fn, args, kwargs, log path) it is sent, reply with the outcome; end on None/EOF."""
    os.setsid()
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        fn, args, kwargs, stderr_path = request
        # C-level output (Blender, trimesh's C deps) goes to fd 1/2: send both to this call's file, read back after.
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            reply = ("ok", fn(*args, **kwargs))
        except MemoryError:
            reply = ("out_of_memory", "MemoryError")
        except BaseException as e:  # noqa: BLE001 - every failure must come back as data
            reply = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
        conn.send(reply)


class ChildWorker:
    """One child process that runs calls in turn, each bounded as if it had the child to itself.

    What is expensive to start (a Blender session: process, `bpy` import) is paid once for many calls, while a
    call that hangs past its timeout, dies (segfault, OOM kill) or raises still fails alone with its reason: the
    child and its whole process group are killed and the next call starts a fresh child. `max_calls` starts a
    fresh child after that many calls (0 = never), bounding what a long session accumulates; the memory limit
    applies to the child as a whole. Close it (or use it as a context manager) to end the child.
    """

    def __init__(self, memory_mb: int | None = None, max_calls: int = 0) -> None:
        self.memory_mb, self.max_calls = memory_mb, max_calls
        self._proc: Any = None
        self._conn: Any = None
        self._calls = 0

    def _start(self) -> None:
        ctx = _context()
        ours, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_serve, args=(theirs, self.memory_mb), daemon=True)
        try:
            proc.start()
        finally:
            theirs.close()
        self._proc, self._conn, self._calls = proc, ours, 0

    def call(self, fn: Callable, *args: Any, timeout_s: float, **kwargs: Any) -> Isolated:
        """`fn(*args, **kwargs)` in the child; `fn` must be importable (module level), its result picklable.

        Never raises for what happens inside the child: the outcome is an `Isolated` with a reason code."""
        t0 = time.perf_counter()
        with tempfile.NamedTemporaryFile(prefix="flux3d-child-", suffix=".log", delete=False) as tmp:
            stderr_path = tmp.name
        outcome: tuple[str, Any] | None = None
        try:
            if self._proc is not None and not self._proc.is_alive():  # died while idle (OOM killer): not this call's
                self._stop(grace_s=0)
            if self._proc is None:
                self._start()
            self._conn.send((fn, args, kwargs, stderr_path))
            if self._conn.poll(timeout_s):
                try:
                    outcome = self._conn.recv()
                except EOFError:  # the child died before replying (segfault, kill -9, OOM killer)
                    outcome = None
            else:
                outcome = ("timeout", f"no result after {timeout_s:.0f} s; process group killed")
        except (BrokenPipeError, ConnectionResetError):  # it died as the request went out
            outcome = None
        finally:
            stderr_tail = _tail(stderr_path)
        exitcode = None
        self._calls += 1
        if outcome is None or outcome[0] == "timeout":
            exitcode = self._stop(grace_s=0)
        elif self.max_calls and self._calls >= self.max_calls:
            self.close()
        seconds = time.perf_counter() - t0
        if outcome is None:
            sig = -exitcode if exitcode is not None and exitcode < 0 else None
            reason = "out_of_memory" if sig == signal.SIGKILL else "crashed"
            detail = (f"child died with signal {signal.Signals(sig).name}" if sig
                      else f"child exited with code {exitcode}")
            return Isolated(False, reason=reason, message=_join(detail, stderr_tail), seconds=seconds)
        kind, value = outcome
        if kind == "ok":
            return Isolated(True, value=value, seconds=seconds)
        return Isolated(False, reason=kind, message=_join(str(value), stderr_tail), seconds=seconds)

    def _stop(self, grace_s: float) -> int | None:
        """End the child and everything in its process group; returns its exit code."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is None:
            return None
        if grace_s and proc.is_alive():
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(timeout=grace_s)
        conn.close()
        if proc.is_alive():
            # Kill the child itself first: if it is stopped before its `os.setsid()` (still importing what its
            # function needs), it leads no group yet and killpg alone would miss it, leaving join() to wait forever.
            proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it spawned (a Blender helper) goes with it
        proc.join()
        return proc.exitcode

    def close(self) -> None:
        self._stop(grace_s=1.0)

    def __enter__(self) -> ChildWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_isolated(fn: Callable, *args: Any, timeout_s: float, memory_mb: int | None = None, **kwargs: Any) -> Isolated:
    """Call `fn(*args, **kwargs)` in a child process of its own (see `ChildWorker`, which this starts and ends)."""
    with ChildWorker(memory_mb) as worker:
        return worker.call(fn, *args, timeout_s=timeout_s, **kwargs)


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - STDERR_TAIL))
            return f.read().decode("utf-8", "replace")
    finally:
        os.unlink(path)


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
