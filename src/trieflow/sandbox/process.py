"""Subprocesses with deadlines: agents and tests are untrusted, so each runs in its own
process group that is killed as a whole on timeout, cancellation, or once it exits (no
stray grandchildren outlive an episode), and only a bounded tail of its output is kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

OUTPUT_TAIL_BYTES = 16 << 10


@dataclass(frozen=True, slots=True)
class ProcessResult:
    exit_code: int | None  # None: it did not exit by itself (timeout) or never started
    timed_out: bool
    output: str  # the tail of stdout and stderr, interleaved
    seconds: float
    error: str = ""  # why it could not start

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _drain(stream: asyncio.StreamReader, tail: bytearray) -> None:
    while chunk := await stream.read(1 << 14):
        tail.extend(chunk)
        del tail[:-OUTPUT_TAIL_BYTES]


async def _stop(process: asyncio.subprocess.Process, term_grace: float) -> None:
    """SIGTERM the group, then SIGKILL it after ``term_grace`` seconds (0: at once)."""
    if process.returncode is None and term_grace > 0:
        _signal_group(process.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), term_grace)
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


async def run_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    term_grace: float = 0.0,
) -> ProcessResult:
    """Runs ``argv`` to completion or for at most ``timeout`` seconds.

    If the awaiting task is cancelled, the process group is stopped (SIGTERM, then SIGKILL
    after ``term_grace``) before the cancellation propagates.
    """
    started = time.monotonic()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return ProcessResult(None, False, "", time.monotonic() - started, f"cannot run: {exc}")
    tail = bytearray()
    assert process.stdout is not None
    reader = asyncio.create_task(_drain(process.stdout, tail))
    timed_out = False
    try:
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            timed_out = True
    finally:
        # Always: stop what is left of the group, so the pipe closes and nothing lingers.
        exited = process.returncode is not None
        await asyncio.shield(_stop(process, 0.0 if exited else term_grace))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), 2.0)
        reader.cancel()
    code = None if timed_out else process.returncode
    output = tail.decode("utf-8", errors="replace")
    return ProcessResult(code, timed_out, output, time.monotonic() - started)
