"""Workers that may hang (several processes, a process group): run them so that a hang fails or retries the test
with every process's stacks in its message instead of stalling the suite. Standard library only, so that a worker
imports it before anything slow."""

import time

STACKS_AT_ENV = "KTR_TEST_STACKS_AT"  # when (time.time()) the processes of a `run_in_own_session` attempt dump
STARTED_ENV = "KTR_TEST_STARTED"  # when that attempt started
_IMPORTED = time.time()  # a process run some other way counts from here


def run_in_own_session(cmd, timeout: float, what: str, retries: int = 0, **kwargs):
    """Run `cmd` (a worker that spawns processes) in a session of its own; `(returncode, stdout, stderr)`.

    A worker whose processes called `stacks_on_timeout` prints every thread's stack to stderr shortly before the
    timeout (at `STACKS_AT_ENV`, set per attempt in the environment they inherit), and again on the SIGUSR1 every
    process of the session is sent at the timeout, where that handler survived; then all are killed. With
    `retries` left the run is repeated and the hung attempt's stderr becomes a warning (the suite's summary shows
    it); otherwise the test fails with it, naming `what`."""
    import os
    import signal
    import subprocess
    import warnings

    import pytest

    env = dict(kwargs.pop("env", None) or os.environ)
    for attempt in range(retries + 1):
        start = time.time()
        env[STARTED_ENV] = str(start)
        env[STACKS_AT_ENV] = str(start + timeout - min(15.0, timeout / 4))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
            return proc.returncode, out, err
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGUSR1, 5), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:  # all gone: SIGUSR1 kills a process that lost its handler
                    break
                try:
                    proc.wait(timeout=wait)  # SIGUSR1: the dumps are written
                except subprocess.TimeoutExpired:
                    pass
            _, err = proc.communicate()
        message = f"{what} timed out after {timeout:.0f} s (attempt {attempt + 1}); its stderr ends:\n{err[-40000:]}"
        if attempt < retries:
            warnings.warn(message, stacklevel=2)
    pytest.fail(message)


def stacks_on_timeout() -> None:
    """In each process of a worker run by `run_in_own_session`: print every thread's Python stack to stderr
    shortly before the timeout, and on SIGUSR1.

    The timed dump runs on faulthandler's own watchdog thread, so no signal handler is involved. That matters
    because the SIGUSR1 handler does not survive Lightning: the end of every `Trainer.fit` re-installs each
    signal's Python-level handler (`_SignalConnector.teardown`), which for SIGUSR1 is the default, so faulthandler's
    C handler is dropped and SIGUSR1 then kills the process silently. That is why the first hang caught with
    SIGUSR1 alone printed no stacks."""
    import faulthandler
    import os
    import signal

    at = os.environ.get(STACKS_AT_ENV)
    if at is not None:
        faulthandler.dump_traceback_later(max(float(at) - time.time(), 0.5), exit=False)
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def progress(what: str) -> None:
    """In a worker run by `run_in_own_session`: one stderr line with this process and the seconds since the attempt
    started, so that a slow or hung attempt's message shows a timeline of every process."""
    import os
    import sys

    started = float(os.environ.get(STARTED_ENV, _IMPORTED))
    rank = os.environ.get("LOCAL_RANK", "0")
    print(f"[rank {rank} pid {os.getpid()} +{time.time() - started:.1f} s] {what}", file=sys.stderr, flush=True)
