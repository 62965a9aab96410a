"""Run a client program (pg_dump, mariadb-dump, ...) as a stream of bytes.

Output is read in bounded chunks as the consumer takes them, so a dump flows from the
database client to S3 without ever being whole in memory or on disk; input is written
with back-pressure. A non-zero exit becomes a function error carrying the tail of stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import zlib
from collections.abc import AsyncGenerator, AsyncIterable, Mapping, Sequence

from functions.sdk import PermanentError, RetryableError

CHUNK = 256 * 1024
STDERR_TAIL = 4096
MIB = 1024 * 1024
READ_AHEAD = 8 * MIB  # output buffered while a part uploads, so the program never waits
PIPE_SIZE = MIB  # Linux's default ceiling for unprivileged processes (fs.pipe-max-size)
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, spelled out: typeshed lacks it before 3.12


class ProcessFailed(RetryableError):
    """The program exited non-zero; ``stderr`` is its last output."""

    def __init__(self, program: str, code: int, stderr: str) -> None:
        super().__init__(f"{program} exited with {code}: {stderr.strip()[-600:]}")
        self.code = code
        self.stderr = stderr


async def _start(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    *,
    stdin: bool,
    stdout: int = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError:
        raise PermanentError(f"{argv[0]} is not installed (not found on PATH)") from None


async def _tail(stream: asyncio.StreamReader | None) -> str:
    """Keep only the end of stderr: enough to explain a failure, bounded in memory."""
    if stream is None:
        return ""
    kept = b""
    while chunk := await stream.read(CHUNK):
        kept = (kept + chunk)[-STDERR_TAIL:]
    return kept.decode("utf-8", "replace")


async def _finish(process: asyncio.subprocess.Process, program: str, stderr: str) -> None:
    code = await process.wait()
    if code != 0:
        raise ProcessFailed(program, code, stderr)


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def read_process(
    argv: Sequence[str], env: Mapping[str, str] | None = None, *, chunk_size: int = CHUNK
) -> AsyncGenerator[bytes, None]:
    """Yield the program's stdout; raise :class:`ProcessFailed` if it exits non-zero.

    The program writes into a pipe of our own rather than the subprocess transport's:
    * widened to PIPE_SIZE, so a dump program keeps writing while the event loop is busy
      hashing and sending a part, instead of stalling after the default 64 KiB;
    * read by a StreamReader that buffers up to READ_AHEAD while a part uploads;
    * stopping early cannot hang: on Python 3.11 ``Process.wait()`` returns only once the
      transport's pipes are closed, which a reader paused by back-pressure never notices.
    """
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # a smaller pipe is slower, not wrong
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
    try:
        process = await _start(argv, env, stdin=False, stdout=write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the program has its copy; EOF comes when it exits
    stdout = asyncio.StreamReader(limit=READ_AHEAD // 2)  # reading pauses at twice the limit
    pipe, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(read_end, "rb", buffering=0)
    )
    errors = asyncio.create_task(_tail(process.stderr))
    try:
        while chunk := await stdout.read(chunk_size):
            yield chunk
        await _finish(process, argv[0], await errors)
    finally:
        pipe.close()
        await _kill(process)
        errors.cancel()


async def write_process(
    argv: Sequence[str], chunks: AsyncIterable[bytes], env: Mapping[str, str] | None = None
) -> str:
    """Feed ``chunks`` to the program's stdin; returns its stdout (bounded) on success."""
    try:
        process = await _start(argv, env, stdin=True)
    except BaseException:
        await _close_input(chunks)
        raise
    errors = asyncio.create_task(_tail(process.stderr))
    output = asyncio.create_task(_tail(process.stdout))
    try:
        assert process.stdin is not None
        async for chunk in chunks:
            process.stdin.write(chunk)
            await process.stdin.drain()  # back-pressure: never buffer the whole dump
        process.stdin.close()
        await process.stdin.wait_closed()
        await _finish(process, argv[0], await errors)
        return await output
    except (BrokenPipeError, ConnectionResetError):
        # The program quit early; its exit code and stderr say why.
        await _finish(process, argv[0], await errors)
        raise
    finally:
        await _close_input(chunks)  # stops a producer (e.g. a dump program) we no longer read
        await _kill(process)
        errors.cancel()
        output.cancel()


async def _close_input(chunks: AsyncIterable[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def gzip_stream(chunks: AsyncIterable[bytes], level: int = 6) -> AsyncGenerator[bytes, None]:
    """Compress a stream into gzip format as it flows."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    async for chunk in chunks:
        if out := compressor.compress(chunk):
            yield out
    yield compressor.flush()


async def gunzip_stream(chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """Decompress a gzip stream as it flows (memory bounded by the chunk size)."""
    decompressor = zlib.decompressobj(31)
    async for chunk in chunks:
        if out := decompressor.decompress(chunk, CHUNK * 4):
            yield out
        while decompressor.unconsumed_tail:
            yield decompressor.decompress(decompressor.unconsumed_tail, CHUNK * 4)
    if tail := decompressor.flush():
        yield tail
    if not decompressor.eof:
        # A cut-off object must not restore as a silently partial database.
        raise PermanentError("the gzip stream is truncated (the object is incomplete)")
