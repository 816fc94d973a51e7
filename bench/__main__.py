"""``python -m bench``: fastflow's native operators against the reference, eager and compiled.

Examples::

    python -m bench                                  # every case on the CPU, float32
    python -m bench --filter 'affine_coupling/exp'   # cases whose name matches (regex search)
    python -m bench --filter realnvp --json out/realnvp.json
    python -m bench --device cuda --dtype bfloat16
    python -m bench --list                           # the case names, nothing timed

The table has one row per (case, pass, impl): the median time of one call in milliseconds, the
fastest and slowest sample, and two speed-ups, ``reference median / this median`` ("vs ref")
and ``reference-compiled median / this median`` ("vs compiled"); "native 2.30x" in "vs ref"
reads "native is 2.3 times as fast as the eager reference". See bench/harness.py for how the
samples are taken (round-robin across implementations, short calls averaged).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time fastflow's native operators and models against the pure-PyTorch "
        "reference (eager and torch.compile) and peer libraries.",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument(
        "--filter",
        metavar="REGEX",
        help="only cases whose name matches (re.search: a plain substring works)",
    )
    p.add_argument(
        "--impl",
        metavar="NAMES",
        help="comma-separated implementations to run (default all), e.g. native,reference",
    )
    p.add_argument("--repeat", type=int, help="timed samples per implementation (default: per case, 30 for ops, 10 for train steps)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default: per case)")
    p.add_argument(
        "--min-sample-ms",
        type=float,
        default=5.0,
        help="a sample repeats a short call until it lasts about this long, and reports the "
        "time per call (default 5.0; 0 times single calls)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the records as a JSON list")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny workloads (checks that everything runs; the figures mean nothing)",
    )
    return p


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise SystemExit(
                f"python -m bench: --device {name}: CUDA is not available here "
                f"(torch {torch.__version__} is {build}; no GPU visible)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(
                f"python -m bench: --device {name}: only {torch.cuda.device_count()} CUDA device(s)"
            )
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"python -m bench: --device must be cpu or cuda, got {name!r}")
    return device


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = _device(args.device)
    dtype = _DTYPES[args.dtype]
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        print(
            f"note: the native CPU kernel takes float32/float64; native rows for {args.dtype} "
            "on the CPU will be skipped",
            file=sys.stderr,
        )
    if args.threads:
        torch.set_num_threads(args.threads)

    import fastflow
    from bench import harness
    from bench.cases import all_groups

    groups = harness.select(all_groups(device, dtype, quick=args.quick), args.filter)
    if args.list:
        for g in groups:
            print(f"{g.case}  [{g.pass_}]  impls: {', '.join(g.impls)}")
        return 0
    if not groups:
        print(f"python -m bench: no case matches --filter {args.filter!r} (see --list)", file=sys.stderr)
        return 2
    impls = None if not args.impl else [s.strip() for s in args.impl.split(",") if s.strip()]
    info = harness.machine_info()
    native = ", ".join(info["native_available"]) or f"none ({fastflow.native_load_error()})"
    print(
        f"fastflow {info['fastflow']}, torch {info['torch']}, native: {native}; "
        f"device {device}, {args.dtype}, {info['torch_threads']} threads, "
        f"CPU capability {info['cpu_capability']}"
    )
    load = info["loadavg_1min_at_start"]
    if load is not None and info["cpu_count"] and load > 0.5 * info["cpu_count"]:
        print(
            f"warning: load average {load:.1f} on {info['cpu_count']} CPUs: other work is "
            "running, timings will be noisy (CPU threads that wait on each other suffer most; "
            "--threads 1 is steadier on a busy machine)"
        )
    start = time.perf_counter()
    notes: list[str] = []
    records = harness.run_groups(
        groups,
        device,
        dtype,
        repeat=args.repeat,
        warmup=args.warmup,
        min_sample_ms=args.min_sample_ms,
        impls=impls,
        notes=notes,
    )
    print()
    print(harness.format_table(records, markdown=args.markdown))
    print()
    print(
        "vs ref = reference (eager) median / this median; vs compiled = reference-compiled "
        "median / this median (above 1: faster). min-max over the samples."
    )
    for note in notes:
        print(note)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        harness.write_json(args.json, records, info)
        print(f"wrote {len(records)} records to {args.json}")
    return 1 if any(n.startswith("FAILED") for n in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
