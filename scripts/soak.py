"""Soak test of long training runs: kill mid-run, resume, continue.

For every family, a run of ``python -m fastflow train`` with frequent checkpoints is killed with
SIGKILL at a random moment, then resumed from its last checkpoint with ``--resume`` and trained
on. The script checks, per family:

* the run directory holds complete files after the kill: the checkpoint loads
  (``fastflow.checkpoint.load_checkpoint``) and ``history.json`` parses (a kill during a save
  can leave the save's temporary file beside them; the resumed run removes it);
* the resumed run exits 0, starts at the checkpoint's step and ends at the asked step;
* every loss of the whole history (before and after the kill) is finite, and every parameter
  of the final checkpoint is finite;
* the loss continues where it was: the mean of the first 10 losses after the resume is within
  ``max(3 x the spread of the last 10 before it, 0.5)`` of their mean (a resume that lost the
  model would restart near the initial loss).

It is not part of the test suite (it takes minutes); its result is a table, and the exit status
is 1 when any check fails.

Example (about 10 minutes on 2 CPU cores)::

    python scripts/soak.py --minutes 10 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import torch

FAMILIES = [
    ("realnvp", "moons"), ("maf", "pinwheel"), ("iaf", "8gaussians"), ("planar", "moons"),
    ("sylvester", "moons"), ("iresnet", "8gaussians"), ("resflow", "8gaussians"),
    ("ffjord", "8gaussians"), ("glow", "digits"),
]


def _train(model: str, data: str, out: str, steps: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "fastflow", "train", "--model", model, "--data", data,
           "--steps", str(steps), "--out", out, "--checkpoint-every", "5", "--eval-every", "50",
           "--no-plot", "--progress", "off", "--threads", "1", "--seed", "0"]
    return cmd + (["--resume", out] if resume else [])


def soak_one(model: str, data: str, out: str, seconds: float, rng: random.Random) -> dict:
    from fastflow.checkpoint import load_checkpoint

    result = {"model": model, "data": data, "ok": False}
    run = subprocess.Popen(_train(model, data, out, 100000, False), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    kill_at = seconds * rng.uniform(0.35, 0.55)
    time.sleep(kill_at)
    if run.poll() is not None:
        result["error"] = f"the run ended before the kill: {run.stderr.read()[-300:]}"
        return result
    run.send_signal(signal.SIGKILL)
    run.wait()
    # a kill during a save leaves the save's temporary (the checkpoint itself is replaced
    # atomically, so it is whole); the resumed run must remove it
    result["temporaries_after_kill"] = sum(
        1 for f in os.listdir(out) if f not in ("checkpoint.pt", "history.json")
    )
    try:
        state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
        with open(os.path.join(out, "history.json")) as f:
            json.load(f)
    except (OSError, ValueError, RuntimeError) as err:  # missing, truncated or corrupt
        result["error"] = f"after the kill at {kill_at:.1f} s: {type(err).__name__}: {err}"
        return result
    step0 = int(state["step"])
    before = list(state["history"]["loss"])
    result["killed_at_s"] = round(kill_at, 1)
    result["step_at_kill"] = step0
    # resume for the rest of the budget: measure the step rate of the first part
    rate = max(step0 / kill_at, 1.0)
    target = step0 + max(20, int(rate * (seconds - kill_at) * 0.6))
    t0 = time.perf_counter()
    done = subprocess.run(_train(model, data, out, target, True), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=seconds * 3 + 120)
    result["resumed_s"] = round(time.perf_counter() - t0, 1)
    if done.returncode != 0:
        result["error"] = f"resume exited {done.returncode}: {done.stderr[-300:]}"
        return result
    final = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    losses = list(final["history"]["loss"])
    result["final_step"] = int(final["step"])
    checks = {
        "resumed from the checkpoint": losses[:step0] == before,
        "reached the asked step": int(final["step"]) == target and len(losses) == target,
        "finite losses": all(math.isfinite(v) for v in losses),
        "finite parameters": all(bool(torch.isfinite(v).all()) for v in final["model"].values()
                                 if torch.is_tensor(v) and v.is_floating_point()),
        "no temporary files after the resume": sorted(os.listdir(out)) == ["checkpoint.pt", "history.json"],
    }
    last = torch.tensor(before[-10:], dtype=torch.float64)
    first = torch.tensor(losses[step0:step0 + 10], dtype=torch.float64)
    gap = abs(float(first.mean() - last.mean()))
    spread = float(last.std())
    result["loss_before"] = round(float(last.mean()), 4)
    result["loss_after"] = round(float(first.mean()), 4)
    result["loss_initial"] = round(losses[0], 4)
    checks["loss continues"] = gap <= max(3 * spread, 0.5)
    failed = [name for name, ok in checks.items() if not ok]
    result["ok"] = not failed
    if failed:
        result["error"] = "failed: " + ", ".join(failed)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/soak.py", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="total budget (default 10)")
    p.add_argument("--out", default="runs/soak", help="parent of the run directories")
    p.add_argument("--only", help="comma-separated families (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    families = FAMILIES
    if args.only:
        wanted = {s.strip() for s in args.only.split(",")}
        unknown = wanted - {m for m, _ in FAMILIES}
        if unknown:
            p.error(f"--only: unknown families {sorted(unknown)}")
        families = [f for f in FAMILIES if f[0] in wanted]
    rng = random.Random(args.seed)
    per = args.minutes * 60 / len(families)
    results = []
    for model, data in families:
        out = os.path.join(args.out, f"{model}-{data}")
        if os.path.exists(out):
            for name in os.listdir(out):
                os.unlink(os.path.join(out, name))
        os.makedirs(out, exist_ok=True)
        r = soak_one(model, data, out, per, rng)
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\n| family | data | killed at (s) | step at kill | final step | loss before kill | "
          "loss after resume | initial loss | result |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['model']} | {r['data']} | {r.get('killed_at_s', '-')} | "
              f"{r.get('step_at_kill', '-')} | {r.get('final_step', '-')} | "
              f"{r.get('loss_before', '-')} | {r.get('loss_after', '-')} | "
              f"{r.get('loss_initial', '-')} | {'ok' if r['ok'] else r.get('error')} |")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
