"""What a reload command prints is not the agent's to keep: a chatty or runaway command (hundreds
of MB on stdout and stderr before it fails) leaves the agent's memory as it was, and its failure
is still reported with the last line it wrote to stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

#: Writes 192 MiB to stdout and as much to stderr, then its last words, and fails.
CHATTY = (
    "import sys\n"
    "block = b'x' * (1 << 20) + b'\\n'\n"
    "for _ in range(192):\n"
    "    sys.stdout.buffer.write(block)\n"
    "    sys.stderr.buffer.write(block)\n"
    "sys.stderr.write('nginx: the last words\\n')\n"
    "sys.exit(1)\n"
)

#: The agent's side, in a process of its own so that its peak memory is its own: one run of the
#: hook, then what the hook reported and the process's peak resident size.
AGENT = """
import json, resource, sys, time
from meshid.agent.reload import ReloadHook

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with ReloadHook(command=[sys.executable, sys.argv[1]], timeout=60) as hook:
    hook.changed()
    deadline = time.monotonic() + 60
    while hook.stats.failed + hook.stats.ok == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kib": peak - before, "failed": hook.stats.failed, "error": hook.stats.last_error}))
"""


def test_a_command_printing_hundreds_of_megabytes_does_not_grow_the_agent(tmp_path: Path) -> None:
    chatty = tmp_path / "chatty.py"
    chatty.write_text(CHATTY)
    done = subprocess.run(
        [sys.executable, "-c", AGENT, str(chatty)], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["failed"] == 1, report
    assert "status 1" in report["error"] and "nginx: the last words" in report["error"], report
    assert report["grew_kib"] < 32 * 1024, f"the agent grew by {report['grew_kib'] // 1024} MiB running the hook"
