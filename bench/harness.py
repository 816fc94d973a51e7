"""The timing loop of ``python -m bench``: groups, round-robin repeats, records and the table.

A *group* is one (case, pass): the same work done by several implementations (``native``,
``reference``, ``reference-compiled``, a peer library). Each implementation is given as a
*factory* that builds its inputs and state (a compiled function is compiled here, outside the
timing) and returns the zero-argument callable that is timed.

Timing, for each group:

1. every factory is called; a factory that raises :class:`Skip` drops its implementation with
   the reason printed (a peer library that is not installed, no native kernel for the device);
2. every callable is run ``warmup`` times (at least once), and the number of calls per timed
   sample (``inner``) is chosen so that one sample lasts about ``min_sample_ms``: short calls
   are averaged over several runs so that the timer and one-off interruptions weigh less;
3. ``repeat`` samples are taken *round-robin*: in each round every implementation takes one
   sample, and the order rotates from round to round. The machine's noise (another process, a
   frequency change) then falls on every implementation alike, and the ratios, which come from
   the same run, are fairer than those of back-to-back runs.

On CUDA every sample is bracketed by ``torch.cuda.synchronize()``, and the peak memory of a
sample is ``torch.cuda.max_memory_allocated()`` (reset before the sample) less the memory
allocated just before it, i.e. what the call itself needed on top of what already lived (the
inputs and, for a train step, the model and optimiser state).

On other devices (the CPU) the peak is measured for the groups that ask for it
(``Group.memory``, or ``run_group(..., memory=True)`` for every group): after the timed samples,
each implementation makes ONE extra, untimed call under
:func:`fastflow.memory.track_peak_allocations`, which reads the CPU allocator's events through the
profiler: every allocation counts, the temporaries inside native operators included (baseline:
what lived before the call, as on CUDA; fastflow/memory.py says what it counts, and why the
lighter :func:`~fastflow.memory.track_peak_memory` would flatter the native operators, whose
internal tensors it cannot see). Timing is never taken under the tracker. The
record says which way the peak was measured (``peak_mem_method``); for other groups on the CPU
``peak_mem_mb`` is null.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "COMPILED",
    "Group",
    "Record",
    "REFERENCE",
    "Skip",
    "format_table",
    "machine_info",
    "run_group",
    "run_groups",
    "select",
    "write_json",
]

REFERENCE = "reference"
COMPILED = "reference-compiled"


class Skip(Exception):
    """Raised by an implementation's factory when it cannot run here; the message says why."""


@dataclasses.dataclass
class Group:
    """One (case, pass) measured across implementations.

    Attributes:
        case: the case's name (``--filter`` matches it), e.g. ``affine_coupling/exp/4096x64``.
        pass_: what is timed: ``fwd``, ``fwd+bwd``, ``inverse``, ``train-step``.
        impls: implementation name -> factory; the factory returns the callable to time.
        repeat: the number of timed samples per implementation (before ``--repeat`` overrides).
        warmup: untimed calls per implementation before timing (before ``--warmup``).
        params: facts about the workload recorded with every record (shape, activation, ...).
        memory: off CUDA, also measure each implementation's peak memory, in one extra untimed
            call under :func:`fastflow.memory.track_peak_allocations` (on CUDA it is always
            measured).
    """

    case: str
    pass_: str
    impls: dict[str, Callable[[], Callable[[], Any]]]
    repeat: int = 25
    warmup: int = 3
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory: bool = False


@dataclasses.dataclass
class Record:
    """One row of the results: a (case, pass, impl) with its timing summary in milliseconds."""

    case: str
    impl: str
    pass_: str
    device: str
    dtype: str
    median_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    peak_mem_mb: float | None
    repeat: int
    warmup: int
    inner: int
    speedup_vs_reference: float | None = None
    speedup_vs_compiled: float | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    # how peak_mem_mb was measured: "cuda.max_memory_allocated" (every sample, the largest),
    # "track_peak_allocations" (one untimed call), or None (not measured)
    peak_mem_method: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pass"] = out.pop("pass_")
        return out


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (written beside the records in the JSON file)."""
    import fastflow

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastflow": getattr(fastflow, "__version__", None),
        "native_available": list(fastflow.native_available()),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "loadavg_1min_at_start": _loadavg(),
        "command": " ".join(["python", "-m", "bench", *sys.argv[1:]]),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], Any], inner: int, device: torch.device) -> tuple[float, float | None]:
    """Seconds per call averaged over ``inner`` calls, and the peak extra memory (MiB) on CUDA."""
    peak = None
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return elapsed / inner, peak


def _tracked_peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """The peak MiB that one untimed call of ``fn`` allocates on ``device`` (what already lived
    counts zero), by :func:`fastflow.memory.track_peak_allocations`."""
    from fastflow.memory import track_peak_allocations

    gc.collect()
    with track_peak_allocations(device=device.type) as mem:
        out = fn()
        del out
    return mem.peak_bytes / 2**20


def _choose_inner(fn: Callable[[], Any], device: torch.device, min_sample_ms: float) -> int:
    """Calls per sample so that a sample lasts about ``min_sample_ms`` (one call if longer)."""
    if min_sample_ms <= 0:
        return 1
    per_call, _ = _time_once(fn, 1, device)
    if per_call * 1e3 >= min_sample_ms:
        return 1
    # A second estimate over several calls: the first one alone is too coarse for tiny calls.
    probe = max(1, min(1000, int(min_sample_ms / 1e3 / max(per_call, 1e-7))))
    per_call, _ = _time_once(fn, probe, device)
    return max(1, min(10_000, math.ceil(min_sample_ms / 1e3 / max(per_call, 1e-9))))


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def run_group(
    group: Group,
    device: torch.device,
    dtype: torch.dtype,
    *,
    repeat: int | None = None,
    warmup: int | None = None,
    min_sample_ms: float = 5.0,
    impls: Iterable[str] | None = None,
    log: Callable[[str], None] = print,
    notes: list[str] | None = None,
    memory: bool | None = None,
) -> list[Record]:
    """Times one group round-robin and returns one record per implementation that ran.

    Args:
        group: the workload and its implementations.
        device, dtype: recorded with the results (the factories already use them).
        repeat, warmup: override the group's defaults when given.
        min_sample_ms: a timed sample repeats short calls until it lasts about this long;
            0 times single calls.
        impls: only these implementation names (all when None).
        log: where progress and skip notes go.
        notes: when given, every skip ("skipped ...") and failure ("FAILED ...") is appended.
        memory: off CUDA, measure the peak memory (one extra untimed call per implementation
            under :func:`fastflow.memory.track_peak_allocations`, after the timed samples); None
            follows ``group.memory``. On CUDA the peak is always taken from every sample.
    """
    repeat = group.repeat if repeat is None else repeat
    warmup = group.warmup if warmup is None else warmup
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    wanted = None if impls is None else set(impls)
    fns: dict[str, Callable[[], Any]] = {}
    for name, factory in group.impls.items():
        if wanted is not None and name not in wanted:
            continue
        try:
            fns[name] = factory()
        except Skip as why:
            note = f"skipped {group.case} [{group.pass_}] {name}: {why}"
            log("  " + note)
            if notes is not None:
                notes.append(note)
        except Exception as exc:  # one broken implementation must not end the whole run
            note = f"FAILED {group.case} [{group.pass_}] {name}: {type(exc).__name__}: {exc}"
            log("  " + note)
            if notes is not None:
                notes.append(note)
    if not fns:
        return []
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(max(1, warmup)):
            fn()
        _sync(device)
        inner[name] = _choose_inner(fn, device, min_sample_ms)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one sample would be charged to whichever impl it hit
    try:
        for r in range(repeat):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                seconds, peak = _time_once(fns[name], inner[name], device)
                times[name].append(seconds * 1e3)
                if peak is not None:
                    peaks[name].append(peak)
    finally:
        if gc_was_enabled:
            gc.enable()
    method = "cuda.max_memory_allocated" if device.type == "cuda" else None
    if device.type != "cuda" and (group.memory if memory is None else memory):
        method = "track_peak_allocations"
        for name in names:
            peaks[name] = [_tracked_peak_mib(fns[name], device)]
    records = []
    for name in names:
        values = times[name]
        q1, q3 = _quartiles(values)
        records.append(
            Record(
                case=group.case,
                impl=name,
                pass_=group.pass_,
                device=str(device),
                dtype=str(dtype).replace("torch.", ""),
                median_ms=statistics.median(values),
                min_ms=min(values),
                max_ms=max(values),
                q1_ms=q1,
                q3_ms=q3,
                peak_mem_mb=max(peaks[name]) if peaks[name] else None,
                repeat=repeat,
                warmup=max(1, warmup),
                inner=inner[name],
                params=dict(group.params),
                peak_mem_method=method if peaks[name] else None,
            )
        )
    _add_ratios(records)
    return records


def _add_ratios(records: list[Record]) -> None:
    by_impl = {r.impl: r for r in records}
    ref = by_impl.get(REFERENCE)
    comp = by_impl.get(COMPILED)
    for r in records:
        if ref is not None:
            r.speedup_vs_reference = ref.median_ms / r.median_ms
        if comp is not None:
            r.speedup_vs_compiled = comp.median_ms / r.median_ms


def select(groups: Iterable[Group], pattern: str | None) -> list[Group]:
    """The groups whose case name matches ``pattern`` (a regular expression, searched, so a
    plain substring works too), or all of them."""
    if not pattern:
        return list(groups)
    rx = re.compile(pattern)
    return [g for g in groups if rx.search(g.case)]


def run_groups(
    groups: Sequence[Group],
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
    **kwargs: Any,
) -> list[Record]:
    """Runs :func:`run_group` over ``groups``, printing one progress line per group."""
    records: list[Record] = []
    for i, group in enumerate(groups, 1):
        start = time.perf_counter()
        got = run_group(group, device, dtype, log=log, **kwargs)
        records.extend(got)
        summary = ", ".join(f"{r.impl} {r.median_ms:.3f} ms" for r in got) or "nothing ran"
        log(
            f"[{i}/{len(groups)}] {group.case} [{group.pass_}]: {summary} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    return records


def _fmt_ms(v: float) -> str:
    if v >= 100:
        return f"{v:.1f}"
    if v >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(records: Sequence[Record], markdown: bool = False) -> str:
    """One row per (case, pass, impl): median, min-max, and the speed-ups
    ``reference median / this median`` and ``reference-compiled median / this median``
    (above 1: faster than that baseline)."""
    show_mem = any(r.peak_mem_mb is not None for r in records)
    header = ["case", "pass", "impl", "median ms", "min-max ms", "vs ref", "vs compiled"]
    if show_mem:
        header.append("peak MiB")
    rows = []
    for r in records:
        row = [
            r.case,
            r.pass_,
            r.impl,
            _fmt_ms(r.median_ms),
            f"{_fmt_ms(r.min_ms)}-{_fmt_ms(r.max_ms)}",
            _fmt_ratio(r.speedup_vs_reference),
            _fmt_ratio(r.speedup_vs_compiled),
        ]
        if show_mem:
            row.append("-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}")
        rows.append(row)
    numeric = {3, 4, 5, 6, 7}
    if markdown:
        lines = ["| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---:" if i in numeric else "---" for i in range(len(header))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for r, row in zip(records, rows):
        key = (r.case, r.pass_)
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(line(row))
    return "\n".join(out)


def write_json(path: str, records: Sequence[Record], info: dict[str, Any] | None = None) -> None:
    """Writes the records as a JSON list; every record carries the machine facts under
    ``"machine"`` so that a record read on its own still says where it was measured."""
    info = machine_info() if info is None else info
    data = [dict(r.to_json(), machine=info) for r in records]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
