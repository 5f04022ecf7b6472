"""Wrap an external simulator program as an oracle (JSON lines over stdin/stdout).

The program is started once (per process that uses the oracle: each worker of a
:class:`~zoblackbox.schedule.ProcessPoolScheduler` or Dask cluster starts its own copy on its
first query) and then answers one query per line, so its start-up cost is paid once.

Protocol (version 1), one JSON object per line, UTF-8:

* request, written by zoblackbox to the program's **stdin**::

      {"id": 17, "x": [0.25, -1.5, 3.0]}

* response, written by the program to its **stdout** (and flushed)::

      {"id": 17, "loss": 0.0123}
      {"id": 17, "error": "solver diverged at t=3.2"}      # a failed query

``loss`` is a JSON number (``NaN`` / ``Infinity`` as written by Python's ``json`` are accepted
and go to the oracle's failure policy as non-finite values); ``id`` must echo the request's.
The program must write nothing else to stdout (logs go to stderr, whose last lines are quoted
in error messages) and exit when its stdin is closed. Anything else (a line that is not JSON, a
wrong ``id``, a missing or non-numeric ``loss``, extra output, an answer line of more than
1 MiB = 1,048,576 bytes not counting its newline) is a :class:`ProtocolError` that names the
offending line; the program is then restarted, since its stream can no longer be trusted. A query
that takes longer than ``timeout`` seconds kills the program (``TimeoutError``, a ``"timeout"``
failure for the oracle's policy); a program that exits (or closes its stdout) mid-query raises
:class:`ProgramCrashError` with its real exit code (or the signal that killed it) and the last
lines of its stderr. In both cases the next query starts a fresh copy. A command whose program does
not exist or is not executable is a :class:`~zoblackbox.errors.ConfigError` when the oracle is
built, before any query is counted.

The command is a list of strings run without a shell (``subprocess.Popen(list)``): nothing in
it is interpreted, so parameters and paths cannot inject commands.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import torch

from zoblackbox.errors import ConfigError, ZOError
from zoblackbox.oracle import Oracle

__all__ = ["PROTOCOL_VERSION", "ProcessOracle", "ProgramCrashError", "ProtocolError", "serve"]

PROTOCOL_VERSION = 1
_MAX_LINE = 1 << 20  # a response line of more than 1 MiB (not counting its newline) is refused
_REAP_GRACE = 2.0  # seconds a program whose stdout closed mid-query gets to exit before it is killed
_DRAIN_LIMIT = 16 << 20  # bytes of an over-long line read (and discarded) to report its size
_DRAIN_TIME = 0.5  # seconds spent at most on that


class ProtocolError(ZOError, ValueError):
    """The program's output broke the JSON-lines protocol."""


class ProgramCrashError(ZOError, RuntimeError):
    """The program exited (or could not start) while a query was pending."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _check_program(command: list[str], cwd: str | None, env: Mapping[str, str] | None) -> None:
    """Refuse a program that does not exist or is not executable (as ``Popen`` would find it)."""
    program = command[0]
    if os.sep in program or (os.altsep and os.altsep in program):
        path = Path(program) if cwd is None or os.path.isabs(program) else Path(cwd) / program
        where = "" if os.path.isabs(program) or cwd is None else f" (relative to cwd {cwd!r})"
        if not path.exists():
            raise ConfigError(f"program {program!r}{where} of command {command!r} does not exist")
        if path.is_dir():
            raise ConfigError(f"program {program!r}{where} of command {command!r} is a directory")
        if not os.access(path, os.X_OK):
            raise ConfigError(f"program {program!r}{where} of command {command!r} is not executable "
                              f"(chmod +x it, or run it through its interpreter, e.g. [sys.executable, {program!r}])")
        return
    search = os.get_exec_path({**os.environ, **env} if env is not None else None)
    if shutil.which(program, path=os.pathsep.join(search)) is None:
        raise ConfigError(f"program {program!r} of command {command!r} was not found as an executable on PATH")


def _kill(proc: subprocess.Popen | None, grace: float = 1.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=grace)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass


class ProcessOracle(Oracle):
    """An oracle whose loss is computed by an external program (see the module docstring).

    Args:
        command: the program and its arguments as a list of strings (never a shell string),
            e.g. ``[sys.executable, "sim.py", "--config", "a.toml"]``.
        dim: length of the parameter vector.
        timeout: seconds a single query may take (``None``: no limit). The program is killed
            and restarted when it is exceeded.
        startup_timeout: extra seconds allowed for the first query of a freshly started program.
        cwd: working directory of the program.
        env: environment variables *added* to the current environment.
        **kwargs: ``budget``, ``on_failure``, ``dtype``, ``device`` as in :class:`~zoblackbox.Oracle`.

    Attributes:
        starts: how many times the program was started in this process.
        restarts: starts after the first (crashes, timeouts, protocol errors).

    Example:
        >>> oracle = ProcessOracle([sys.executable, "docs/examples/ode_sim.py"], dim=4,
        ...                        timeout=30, on_failure="retry")          # doctest: +SKIP
        >>> with oracle:                                                    # doctest: +SKIP
        ...     result = minimize(oracle, x0, budget=2000)
    """

    def __init__(self, command: Sequence[str], dim: int, *, timeout: float | None = 60.0,
                 startup_timeout: float = 30.0, cwd: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, **kwargs):
        if isinstance(command, (str, bytes)) or not isinstance(command, Sequence) or not command:
            raise ConfigError(f"command must be a non-empty list of strings (no shell is used), got {command!r}")
        if not all(isinstance(c, (str, os.PathLike)) for c in command):
            raise ConfigError(f"every item of command must be a string or path, got {command!r}")
        for name, value, allow_none in (("timeout", timeout, True), ("startup_timeout", startup_timeout, False)):
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(env).items()):
            raise ConfigError(f"env must map strings to strings, got {env!r}")
        if cwd is not None and not Path(cwd).is_dir():
            raise ConfigError(f"cwd {str(cwd)!r} is not a directory")
        _check_program([os.fspath(c) for c in command], None if cwd is None else os.fspath(cwd), env)
        super().__init__(dim, **kwargs)
        self.command = [os.fspath(c) for c in command]
        self.timeout = None if timeout is None else float(timeout)
        self.startup_timeout = float(startup_timeout)
        self.cwd = None if cwd is None else os.fspath(cwd)
        self.env = dict(env) if env is not None else None
        self.starts = 0
        self._init_runtime()

    # ------------------------------------------------------------------ process lifecycle
    def _init_runtime(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None
        self._buffer = b""
        self._next_id = 0
        self._fresh = False
        self._finalizer: weakref.finalize | None = None

    @property
    def _name(self) -> str:
        text = shlex.join(self.command)
        return repr(text if len(text) <= 120 else text[:117] + "...")

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        self._stop()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the program
        env = None if self.env is None else {**os.environ, **self.env}
        try:
            self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._stderr, cwd=self.cwd, env=env, shell=False,
                                          start_new_session=True)
        except OSError as exc:
            raise ProgramCrashError(f"cannot start {self.command!r}: {exc}") from exc
        self.starts += 1
        self._buffer = b""
        self._fresh = True
        self._finalizer = weakref.finalize(self, _kill, self._proc)

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        _kill(self._proc)
        self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        """Stop the program (it is restarted by the next query)."""
        self._stop()

    def __enter__(self) -> ProcessOracle:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_proc", "_stderr", "_buffer", "_next_id", "_fresh", "_finalizer"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def stderr_tail(self, lines: int = 10) -> str:
        """The last lines the program wrote to stderr (for error messages)."""
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - 4096))
        text = self._stderr.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def _running(self) -> subprocess.Popen:
        """The program's process; only queries call this, after ``_start`` (an internal error otherwise)."""
        if self._proc is None:
            raise RuntimeError("internal error: the program is not running (a query before _start or after close)")
        return self._proc

    @staticmethod
    def _pipe(stream, name: str):
        if stream is None:  # _start opens both with PIPE
            raise RuntimeError(f"internal error: the program's {name} is not a pipe")
        return stream

    def _crash(self, qid: int) -> ProgramCrashError:
        """The program's stdout closed (or its stdin broke) mid-query: reap it for its real exit status."""
        proc, what = self._running(), f"exited while answering query id {qid}"
        try:
            code = proc.wait(timeout=_REAP_GRACE)
        except subprocess.TimeoutExpired:
            what = (f"closed its stdout while answering query id {qid} and was still running "
                    f"{_REAP_GRACE:g} s later, so it was killed")
            proc.kill()
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
                code = None
        tail = self.stderr_tail()  # complete: the program has exited and its stderr is a file
        msg = (f"{self._name} {what} ({_describe_exit(code)}); "
               + (f"its stderr ends with:\n{tail}" if tail else "it wrote nothing to stderr"))
        self._stop()
        return ProgramCrashError(msg)

    def _too_long(self, qid: int, fd: int, deadline: float | None) -> ProtocolError:
        """An answer line passed the limit: measure it (reading and discarding, bounded), then refuse it."""
        shown = self._buffer[:80].decode("utf-8", "replace").rstrip()
        size = len(self._buffer)
        end = time.monotonic() + _DRAIN_TIME
        if deadline is not None:
            end = min(end, deadline)
        complete = False
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while size <= _DRAIN_LIMIT:
                wait = end - time.monotonic()
                if wait <= 0 or not sel.select(wait):
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    complete = True
                    break
                newline = chunk.find(b"\n")
                if newline >= 0:
                    size += newline
                    complete = True
                    break
                size += len(chunk)
        self._stop()
        length = f"{size} bytes" if complete else f"at least {size} bytes"
        return ProtocolError(f"{self._name} answered query id {qid} with a line of {length} (starting {shown!r}...): "
                             f"longer than the protocol's limit of 1 MiB = {_MAX_LINE} bytes per line; "
                             "the program will be restarted")

    # ------------------------------------------------------------------ one query
    def _read_line(self, qid: int, deadline: float | None) -> bytes:
        """One answer line (without its newline); never holds more than the limit + 1 bytes of it."""
        fd = self._pipe(self._running().stdout, "stdout").fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                if len(self._buffer) > _MAX_LINE:  # limit + 1 bytes and no newline yet
                    raise self._too_long(qid, fd, deadline)
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise TimeoutError
                if not sel.select(wait):
                    continue
                # read no further than one byte past the limit: enough to tell a line of exactly
                # the limit (its newline comes next) from a longer one
                chunk = os.read(fd, min(65536, _MAX_LINE + 1 - len(self._buffer)))
                if not chunk:
                    raise EOFError
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _evaluate_one(self, x: torch.Tensor) -> float:
        if not self.running:
            self._start()  # first query, or the program exited since the last one
        qid = self._next_id
        self._next_id += 1
        request = json.dumps({"id": qid, "x": [float(v) for v in x.detach().cpu().double().tolist()]}) + "\n"
        limit = None
        if self.timeout is not None:
            limit = self.timeout + (self.startup_timeout if self._fresh else 0.0)
        started = time.monotonic()
        stdin = self._pipe(self._running().stdin, "stdin")
        try:
            stdin.write(request.encode())
            stdin.flush()
            line = self._read_line(qid, None if limit is None else started + limit)
        except TimeoutError:
            self._stop()
            raise TimeoutError(f"{self._name} did not answer query id {qid} within {limit:g} s; "
                               "it was killed and will be restarted") from None
        except (BrokenPipeError, EOFError):
            raise self._crash(qid) from None
        self._fresh = False
        return self._parse(line, qid)

    def _parse(self, line: bytes, qid: int) -> float:
        shown = line[:200].decode("utf-8", "replace") + ("..." if len(line) > 200 else "")

        def bad(why: str) -> ProtocolError:
            self._stop()
            return ProtocolError(f"{self._name} answered query id {qid} with {shown!r}: {why} "
                                 f"(expected {{\"id\": {qid}, \"loss\": <number>}}); the program will be restarted")

        try:
            msg = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("not a JSON line") from None
        if not isinstance(msg, dict):
            raise bad("not a JSON object")
        if msg.get("id") != qid:
            raise bad(f"wrong id {msg.get('id')!r}")
        if "error" in msg:
            raise RuntimeError(f"{self._name} reported an error for query id {qid}: {msg['error']}")
        loss = msg.get("loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise bad(f"'loss' must be a number, got {loss!r}")
        return float(loss)

    def __repr__(self) -> str:
        return (f"ProcessOracle({self.command!r}, dim={self.dim}, timeout={self.timeout}, nfev={self.nfev}, "
                f"starts={self.starts})")


def serve(loss, *, stdin=None, stdout=None) -> None:
    """Run the protocol's program side: answer each request line with ``loss(x)``.

    For simulators written in Python: ``if __name__ == "__main__": serve(my_loss)``. ``loss``
    receives a list of floats; an exception becomes an ``{"id", "error"}`` response.
    """
    import sys

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    for line in stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            out = {"id": req["id"], "loss": float(loss(req["x"]))}
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which applies its policy
            out = {"id": req.get("id"), "error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(out) + "\n")
        stdout.flush()
