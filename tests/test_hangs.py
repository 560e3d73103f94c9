"""A hung multi-process worker shows where it waits (`tests/hangs.py`), also after Lightning's `Trainer.fit` has
re-installed every signal's Python-level handler, which drops faulthandler's SIGUSR1 handler."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hangs import run_in_own_session

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import signal, sys, time
sys.path.insert(0, {root!r})
from tests.hangs import stacks_on_timeout
stacks_on_timeout()
{after}
def hang_here():
    time.sleep(600)
hang_here()
"""

# What `lightning.pytorch.trainer.connectors.signal_connector._SignalConnector.teardown` does at the end of every
# `Trainer.fit` (Lightning 2.6): each signal gets back the handler `signal.getsignal` reported at the start.
LIGHTNING_TEARDOWN = "for s in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:\n" \
                     "    h = signal.getsignal(s)\n" \
                     "    if h is not None:\n" \
                     "        signal.signal(s, h)"


@pytest.mark.parametrize("after_fit", [False, True], ids=["plain", "after-lightning-teardown"])
def test_a_hung_worker_prints_where_it_waits(tmp_path, after_fit):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), after=LIGHTNING_TEARDOWN if after_fit else ""))
    with pytest.raises(pytest.fail.Exception) as failed:
        run_in_own_session([sys.executable, str(script)], 8, "the sleeping worker")
    message = str(failed.value)
    assert "the sleeping worker timed out after 8 s" in message
    assert "in hang_here" in message, message  # faulthandler's frame line: File "...", line N in hang_here


def test_lightnings_teardown_drops_faulthandlers_sigusr1_handler(tmp_path):
    """Why the timed dump exists, with Lightning's own teardown: after it, SIGUSR1 kills the worker without a word
    (if this ever prints stacks, Lightning or faulthandler changed, and the reasoning in `stacks_on_timeout` is
    stale)."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import faulthandler, os, signal, time\n"
        "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
        "from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector\n"
        "connector = _SignalConnector(None)\n"
        "connector._original_handlers = connector._get_current_signal_handlers()  # as at the start of fit\n"
        "connector.teardown()  # as at its end\n"
        "def hang_here():\n    time.sleep(600)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\nhang_here()\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGUSR1 and "hang_here" not in proc.stderr
