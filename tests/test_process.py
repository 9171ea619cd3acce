"""Real child processes: what only a real kernel can show."""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mcptwist.child.supervisor import ChildState, Supervisor
from mcptwist.config.model import RestartPolicy, ServerConfig

from .support.children import Owner

# Forks a grandchild that leaves the process group (setsid) while holding the
# child's stdout, reports the grandchild's pid on stderr, then exits with 3.
ESCAPER = """
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()
    time.sleep(60)
    os._exit(0)
sys.stderr.write(f"grandchild {pid}\\n")
sys.stderr.flush()
os._exit(3)
"""


class EscapedGrandchildTests(TestCase):
    timeout = 20

    async def test_exit_is_seen_although_a_grandchild_holds_the_pipes(self) -> None:
        """The supervisor notices the exit and restarts; stopping does not wait for the grandchild."""
        server = ServerConfig(
            name="escaper",
            command=sys.executable,
            args=("-c", ESCAPER),
            restart=RestartPolicy(initial_delay=30, crash_limit=10),
        )
        owner = Owner()
        supervisor = Supervisor(server, owner, reactor, dict(os.environ))
        supervisor.startService()
        self.addCleanup(self._kill_grandchildren, supervisor)
        await owner.lost_once
        self.assertEqual(owner.lost, ["exited with code 3"])
        self.assertEqual(supervisor.state, ChildState.RESTARTING)
        started = reactor.seconds()
        await supervisor.stopService()
        self.assertLess(reactor.seconds() - started, 5)

    def _kill_grandchildren(self, supervisor: Supervisor) -> None:
        for line in supervisor.stderr:
            if line.startswith("grandchild "):
                try:
                    os.kill(int(line.split()[1]), signal.SIGKILL)
                except ProcessLookupError:
                    pass


class StopSequenceTests(TestCase):
    timeout = 20

    async def test_a_child_ignoring_term_is_killed_with_its_group(self) -> None:
        script = "import signal, time, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsys.stdin.close()\ntime.sleep(60)\n"
        server = ServerConfig(
            name="stubborn",
            command=sys.executable,
            args=("-c", script),
            term_after=0.2,
            kill_after=0.3,
        )
        owner = Owner()
        supervisor = Supervisor(server, owner, reactor, dict(os.environ))
        supervisor.startService()
        await deferLater(reactor, 0.5, lambda: None)
        child = supervisor.child
        assert child is not None and child.pid is not None
        self.assertEqual(
            os.getpgid(child.pid), child.pid, "the child leads a process group of its own"
        )
        started = reactor.seconds()
        await supervisor.stopService()
        self.assertLess(reactor.seconds() - started, 3)
        assert child.exit_reason is not None
        self.assertEqual(child.exit_reason.value.signal, signal.SIGKILL)  # type: ignore[attr-defined]
        self.assertFalse(os.path.exists(f"/proc/{child.pid}"), "no zombie is left")
