"""Split a one-off pull over child `puller pull` processes, by tenant, to use more cores.

One puller process is bound by one core: fetching, parsing, validating and bookkeeping a
page all hold Python's GIL. A pull of many tenants goes faster on a machine with more
cores when each of several child processes pulls a share of the tenants. A tenant's scopes
stay together in one child, so its orders still wait for its customers and products, and
each child pulls its share exactly as a lone `puller pull` does: leases, one transaction
per page, checkpoints.

The parent opens the store first (creating or checking the schema once), deals the
tenants out, starts the children in their own process group, forwards SIGTERM/SIGINT to
them once, and merges their JSON summaries.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import orjson

JobKey = tuple[str, str]  # (tenant id, scope)


def shares(jobs: Sequence[JobKey], processes: int) -> list[list[JobKey]]:
    """The jobs dealt out by tenant, round-robin, into at most `processes` shares."""
    tenants: dict[str, list[JobKey]] = {}
    for job in jobs:
        tenants.setdefault(job[0], []).append(job)
    count = max(1, min(processes, len(tenants)))
    dealt: list[list[JobKey]] = [[] for _ in range(count)]
    for index, group in enumerate(tenants.values()):
        dealt[index % count].extend(group)
    return dealt


@dataclass
class Outcome:
    """What the children reported: their summary rows in the parent's job order."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    #: one line per child that ended without a summary (interrupted, crashed, refused)
    problems: list[str] = field(default_factory=list)
    interrupted: bool = False


def pull_in_processes(base_argv: Sequence[str], dealt: Sequence[Sequence[JobKey]],
                      order: Sequence[JobKey]) -> Outcome:
    """Run `base_argv` (a `puller … pull --json` command line) once per share and wait.

    Each child gets its share as hidden `--job TENANT:SCOPE` arguments.
    """
    children = _Children()
    previous = {sig: signal.signal(sig, children.forward)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for share in dealt:
            argv = [*base_argv]
            for tenant, scope in share:
                argv += ["--job", f"{tenant}:{scope}"]
            children.start(argv)
        outcome = children.collect(dealt)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        children.kill_left()
    position = {job: index for index, job in enumerate(order)}
    outcome.rows.sort(key=lambda row: position.get((row["tenant"], row["scope"]), len(order)))
    return outcome


class _Children:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.interrupted = False

    def start(self, argv: list[str]) -> None:
        # Own process group: a terminal's Ctrl-C reaches only the parent, which forwards it
        # once, instead of reaching every child twice.
        self.procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, process_group=0))
        if self.interrupted:  # a signal came while the children were being started
            self.procs[-1].send_signal(signal.SIGTERM)

    def forward(self, _signum: int, _frame: FrameType | None) -> None:
        if self.interrupted:
            return  # once: a second SIGTERM would cut a child's own clean-up short
        self.interrupted = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def collect(self, dealt: Sequence[Sequence[JobKey]]) -> Outcome:
        outcome = Outcome()
        for proc, share in zip(self.procs, dealt, strict=True):
            out, _ = proc.communicate()
            outcome.exit_codes.append(proc.returncode)
            if out.strip():
                outcome.rows += orjson.loads(out)
                continue
            tenants = ", ".join(dict.fromkeys(tenant for tenant, _ in share))
            outcome.problems.append(
                f"the pull process for {tenants} ended with exit code {proc.returncode} "
                "before its summary (its message is above; `puller runs` shows what it "
                "recorded)")
        outcome.interrupted = self.interrupted
        return outcome

    def kill_left(self) -> None:
        """Only after an error of the parent's own: no child outlives it."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def child_command(*, config: str, concurrency: int, log_level: str,
                  log_json: bool | None) -> list[str]:
    """The command line of one child: this Python, the same config, a JSON summary."""
    argv = [sys.executable, "-m", "puller", "--log-level", log_level]
    if log_json:
        argv.append("--log-json")
    return [*argv, "pull", "--config", config, "--concurrency", str(concurrency), "--json"]
