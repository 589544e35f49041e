"""Whether the machine is quiet, and what a server's process group uses.

A benchmark on 2 shared cores means little if something else runs beside it: `wait_for_quiet`
measures the CPU time of every process that is not ours and waits until it is small.
`GroupMonitor` samples the resident memory and CPU time of a server started in its own process
group (`start_new_session=True`), so the Java front end and Python workers of the peer count as
much as our gunicorn master and worker.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

MIB = 1024 * 1024


# --- process groups ----------------------------------------------------------------------------


def group_processes(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid`."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def leader_pss_mib(pgid: int) -> tuple[float, float]:
    """PSS now of the group's leader (the process started, e.g. gunicorn's master) and of the
    rest of the group (its workers), MiB."""
    leader = rest = 0
    for process in group_processes(pgid):
        try:
            memory = process.memory_full_info()
        except psutil.Error:
            continue
        pss = getattr(memory, "pss", memory.rss)
        if process.pid == pgid:
            leader += pss
        else:
            rest += pss
    return leader / MIB, rest / MIB


def _cpu_seconds(processes: Iterable[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def _all_cpu_seconds() -> dict[int, float]:
    return _cpu_seconds(psutil.process_iter())


class OthersCpu:
    """CPU cores used by every process but `exclude` (and this one) since construction."""

    def __init__(self, exclude: Iterable[int] = ()) -> None:
        self.exclude = {*exclude, os.getpid()}
        self.started = time.perf_counter()
        self.at_start = _all_cpu_seconds()

    def cores(self, exclude: Iterable[int] = ()) -> float:
        """Average cores used since construction, also leaving out `exclude` (pids)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        skip = {*self.exclude, *exclude}
        # A process that started after construction spent all its CPU time since then.
        used = sum(
            seconds - self.at_start.get(pid, 0.0)
            for pid, seconds in _all_cpu_seconds().items()
            if pid not in skip
        )
        return used / elapsed


@dataclass(frozen=True)
class GroupUsage:
    """What a process group used over one measured window."""

    peak_rss_mib: float
    """Largest sum of the group's resident set sizes seen (shared pages count in each process)."""
    peak_pss_mib: float
    """Largest sum of the group's proportional set sizes seen: each shared page split between
    the processes that map it, so the sum is what the group costs the machine."""
    cpu_cores: float
    """CPU seconds the group used per wall second (2.0 = both cores of this machine busy)."""
    machine_cpu_percent: float
    """Whole-machine CPU use over the window, clients and other processes included."""
    others_cpu_cores: float
    """CPU seconds per wall second of every process outside the group and this one (the load
    generator): anything above a few hundredths means someone else ran during the window."""


class GroupMonitor:
    """Samples a process group's summed RSS and PSS in a thread; `window()` measures its CPU use.

    Membership is re-read every `rescan_s` (the peer's workers start late). RSS is read every
    `every_s` from `/proc/<pid>/statm`, which costs microseconds. PSS is not: the kernel walks
    every page table entry to sum `smaps_rollup`, about 14 ms of CPU per GB mapped, and at 5
    reads a second that stretched the p90 of a 25 ms model step to 41 ms on 2 cores. So PSS is
    read every `pss_every_s`, whenever the group's RSS has grown by `pss_on_growth_mib` since the
    last PSS read (PSS cannot grow more than RSS does), and once as each window closes.
    """

    def __init__(
        self,
        pgid: int,
        every_s: float = 0.2,
        rescan_s: float = 2.0,
        pss_every_s: float = 5.0,
        pss_on_growth_mib: float = 16.0,
    ) -> None:
        self.pgid = pgid
        self.every_s = every_s
        self.rescan_s = rescan_s
        self.pss_every_s = pss_every_s
        self.pss_on_growth = pss_on_growth_mib * MIB
        self._peak_rss = 0
        self._peak_pss = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="group-monitor", daemon=True)
        self._processes: list[psutil.Process] = []

    def __enter__(self) -> GroupMonitor:
        self._processes = group_processes(self.pgid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _rss(self) -> int:
        total = 0
        for process in self._processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
        return total

    def sample_pss(self) -> None:
        """Read the group's summed PSS now and keep it if it is the largest seen."""
        total = 0
        for process in list(self._processes):
            try:
                memory = process.memory_full_info()
            except psutil.Error:
                continue
            total += getattr(memory, "pss", memory.rss)
        with self._lock:
            self._peak_pss = max(self._peak_pss, total)

    def _sample(self) -> None:
        last_scan = last_pss = time.monotonic()
        rss_at_pss = 0
        while not self._stop.wait(self.every_s):
            now = time.monotonic()
            if now - last_scan > self.rescan_s:
                self._processes = group_processes(self.pgid)
                last_scan = now
            rss = self._rss()
            with self._lock:
                self._peak_rss = max(self._peak_rss, rss)
            if now - last_pss >= self.pss_every_s or rss - rss_at_pss >= self.pss_on_growth:
                self.sample_pss()
                last_pss, rss_at_pss = time.monotonic(), rss

    def start_window(self) -> Window:
        """Begin a measured window: the peak memory restarts from zero, CPU times from now."""
        with self._lock:
            self._peak_rss = self._peak_pss = 0
        group = group_processes(self.pgid)
        psutil.cpu_percent()
        return Window(self, time.perf_counter(), _cpu_seconds(group), OthersCpu())

    def peak_rss(self) -> int:
        with self._lock:
            return self._peak_rss

    def peak_pss(self) -> int:
        with self._lock:
            return self._peak_pss


@dataclass
class Window:
    monitor: GroupMonitor
    started: float
    group_at_start: dict[int, float]
    """CPU seconds of the group's processes when the window opened."""
    others: OthersCpu

    def finish(self) -> GroupUsage:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.monitor.sample_pss()
        machine_percent = psutil.cpu_percent()
        group = _cpu_seconds(group_processes(self.monitor.pgid))
        used = sum(seconds - self.group_at_start.get(pid, 0.0) for pid, seconds in group.items())
        return GroupUsage(
            peak_rss_mib=self.monitor.peak_rss() / MIB,
            peak_pss_mib=self.monitor.peak_pss() / MIB,
            cpu_cores=used / elapsed,
            machine_cpu_percent=machine_percent,
            others_cpu_cores=self.others.cores(exclude=group),
        )


# --- is the machine quiet? ---------------------------------------------------------------------


@dataclass(frozen=True)
class Quiet:
    """The outcome of `wait_for_quiet`: how busy the rest of the machine was when we started."""

    quiet: bool
    other_cpu_cores: float
    """CPU seconds per second used by processes that are not ours, over the last probe."""
    waited_s: float
    load_average_1m: float
    busiest: list[str]
    """The other processes that used the most CPU over the last probe: `name pid cores`."""


def other_cpu_use(ours: set[int], probe_s: float) -> tuple[float, list[str]]:
    """CPU cores used over `probe_s` by every process outside `ours` (pids)."""
    before = {p.pid: p for p in psutil.process_iter(["name"])}
    start = _cpu_seconds(before.values())
    time.sleep(probe_s)
    end = _cpu_seconds(before.values())
    use = {
        pid: (end[pid] - start[pid]) / probe_s
        for pid in end
        if pid in start and pid not in ours and pid != os.getpid()
    }
    busiest = sorted(use, key=use.get, reverse=True)[:3]
    names = [f"{before[pid].info['name']} {pid} {use[pid]:.2f}" for pid in busiest if use[pid]]
    return sum(use.values()), names


def wait_for_quiet(
    ours: set[int], threshold_cores: float, timeout_s: float, probe_s: float = 2.0
) -> Quiet:
    """Wait until processes other than `ours` use less than `threshold_cores`, at most
    `timeout_s`; return the last probe whether it was quiet or not."""
    started = time.monotonic()
    while True:
        cores, busiest = other_cpu_use(ours, probe_s)
        waited = time.monotonic() - started
        if cores < threshold_cores or waited >= timeout_s:
            return Quiet(
                quiet=cores < threshold_cores,
                other_cpu_cores=round(cores, 3),
                waited_s=round(waited, 1),
                load_average_1m=os.getloadavg()[0],
                busiest=busiest,
            )
