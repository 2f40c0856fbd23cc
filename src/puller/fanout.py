"""Split a one-off pull over forked child processes, by tenant, to use more cores.

One puller process is bound by one core: fetching, parsing, validating and bookkeeping a
page all hold Python's GIL. A pull of many tenants goes faster on a machine with more
cores when each of several child processes pulls a share of the tenants. A tenant's scopes
stay together in one child, so its orders still wait for its customers and products, and
each child pulls its share exactly as a lone `puller pull` does: leases, one transaction
per page, checkpoints.

The parent opens the store first (creating or checking the schema once) and closes it,
then forks: a child starts with everything imported (a fresh interpreter took 0.4-2 s
here) and no thread, connection or event loop of the parent's. Each child is in its own
process group; the parent forwards SIGTERM/SIGINT to each once and merges the summary
rows the children send back through a pipe. POSIX only (os.fork).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
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


#: pulls one share in the child: its exit code and its summary rows
RunShare = Callable[[Sequence[JobKey]], tuple[int, list[dict[str, Any]]]]


def pull_in_processes(dealt: Sequence[Sequence[JobKey]], order: Sequence[JobKey],
                      run_share: RunShare) -> Outcome:
    """Fork a child per share that calls `run_share(share)`, and wait for them all."""
    children = _Children()
    previous = {sig: signal.signal(sig, children.forward)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for share in dealt:
            children.start(share, run_share)
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
        self.parent = os.getpid()
        self.procs: list[tuple[int, int]] = []  # (pid, read end of its pipe)
        self.done: set[int] = set()
        self.interrupted = False

    def start(self, share: Sequence[JobKey], run_share: RunShare) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read)
            _child(share, run_share, write)
        os.close(write)
        self.procs.append((pid, read))
        if self.interrupted:  # a signal came while the children were being started
            os.kill(pid, signal.SIGTERM)

    def forward(self, _signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self.parent or self.interrupted:
            return  # once: a second SIGTERM would cut a child's own clean-up short
        self.interrupted = True
        for pid, _ in self.procs:
            if pid not in self.done:
                os.kill(pid, signal.SIGTERM)

    def collect(self, dealt: Sequence[Sequence[JobKey]]) -> Outcome:
        outcome = Outcome()
        for (pid, read), share in zip(self.procs, dealt, strict=True):
            with os.fdopen(read, "rb") as pipe:
                sent = pipe.read()
            _, status = os.waitpid(pid, 0)
            self.done.add(pid)
            code = os.waitstatus_to_exitcode(status)
            outcome.exit_codes.append(code)
            if sent:
                outcome.rows += orjson.loads(sent)
                continue
            tenants = ", ".join(dict.fromkeys(tenant for tenant, _ in share))
            outcome.problems.append(
                f"the pull process for {tenants} ended with exit code {code} before its "
                "summary (its message is above; `puller runs` shows what it recorded)")
        outcome.interrupted = self.interrupted
        return outcome

    def kill_left(self) -> None:
        """Only after an error of the parent's own: no child outlives it."""
        for pid, _ in self.procs:
            if pid not in self.done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def _child(share: Sequence[JobKey], run_share: RunShare, write: int) -> None:
    # Own process group: a terminal's Ctrl-C reaches only the parent, which forwards it
    # once, instead of reaching every child twice.
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    try:
        code, rows = run_share(share)
        if rows:
            with os.fdopen(write, "wb") as pipe:
                pipe.write(orjson.dumps(rows))
    except BaseException:  # whatever happens, the child must reach os._exit
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
