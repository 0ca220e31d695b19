"""Scoring a cohort: one command per scan against ``brain-uad score … --out-dir`` with 1 and N workers.

Run by hand:
    NAPARI_BRAIN_UAD_DATA=/work/shared/data .venv/bin/python benchmarks/bench_cohort.py \\
        [--subjects 8] [--workers 1 2] [--model NAME|PATH] [--json results.json]

The cohort is the first ``--subjects`` healthy IXI T1 scans (120x120x90, 2 mm, skull on) with
their brain masks given, so no brain extraction runs and every way does the same work: the
anomaly map, reconstruction, mask at the model's default threshold and brain mask of each scan.

- **one command per scan**: ``brain-uad score SCAN --brain-mask MASK --out-…`` in a new process
  for each scan, one after another (Python, torch and the model loaded every time): what a shell
  loop over the single-scan command does;
- **cohort, W workers**: ``brain-uad score LIST.csv --out-dir DIR --workers W``, one process
  (W = 1: the next scan read while the network runs) or W worker processes that each load the
  model once.

Each is a separate command, timed from its start to its end, into an empty folder. Memory is
the peak resident memory of the command's processes added together (psutil, sampled every
0.1 s) and of its largest process; without psutil only the largest process is known
(``getrusage``). A warm-up command runs first so every way finds the files in the page cache.
Times need an otherwise idle machine: another process on the cores slows torch a lot.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_BRAIN_UAD_DATA", REPOSITORY.parent / "shared" / "data"))
BRAIN_UAD = [sys.executable, "-m", "napari_brain_uad.cli"]


def subjects(count: int) -> list[tuple[Path, Path]]:
    """The first ``count`` IXI subjects (by name) that have a brain mask."""
    folder = DATA / "ixi_t1"
    found = []
    for scan in sorted(folder.glob("*_T1.nii.gz")):
        mask = folder / "brainmask" / scan.name.replace("_T1.nii.gz", "_brainmask.nii.gz")
        if mask.is_file():
            found.append((scan, mask))
        if len(found) == count:
            return found
    raise SystemExit(f"only {len(found)} IXI scans with brain masks in {folder}; {count} asked for")


class PeakMemory:
    """Peak resident memory of this process's children (all together, and the largest one),
    sampled in a thread while a command runs."""

    def __init__(self):
        try:
            import psutil
        except ImportError:
            psutil = None
        self._psutil = psutil
        self.total_mb = self.largest_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._usage_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._psutil is None:  # only the largest child ever waited for is known (kB on Linux)
            self.largest_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            self.total_mb = float("nan")

    def _sample(self):
        if self._psutil is None:
            return
        me = self._psutil.Process()
        while not self._stop.wait(0.1):
            sizes = []
            for child in me.children(recursive=True):
                try:
                    sizes.append(child.memory_info().rss / 2**20)
                except self._psutil.Error:  # it ended meanwhile
                    pass
            if sizes:
                self.total_mb = max(self.total_mb, sum(sizes))
                self.largest_mb = max(self.largest_mb, max(sizes))


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")


def model_arguments(model: str | None) -> list[str]:
    return ["--model", model] if model else []


def one_command_per_scan(cohort, folder: Path, model: str | None) -> None:
    for scan, mask in cohort:
        stem = scan.name.replace(".nii.gz", "")
        run([*BRAIN_UAD, "score", str(scan), "--brain-mask", str(mask), "--quiet", *model_arguments(model),
             "--out-map", str(folder / f"{stem}_anomaly_map.nii.gz"),
             "--out-recon", str(folder / f"{stem}_reconstruction.nii.gz"),
             "--out-mask", str(folder / f"{stem}_mask.nii.gz"),
             "--out-brain-mask", str(folder / f"{stem}_brain_mask.nii.gz")])


def cohort_command(listing: Path, folder: Path, workers: int, model: str | None) -> None:
    run([*BRAIN_UAD, "score", str(listing), "--out-dir", str(folder), "--workers", str(workers), "--quiet",
         *model_arguments(model)])
    with open(folder / "summary.csv", newline="") as handle:
        statuses = {row["status"] for row in csv.DictReader(handle)}
    if statuses != {"done"}:
        raise SystemExit(f"{folder}: not every scan was done ({statuses})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", help="model name or checkpoint (default: the bundled model)")
    parser.add_argument("--json", help="also write the results here")
    arguments = parser.parse_args()

    cohort = subjects(arguments.subjects)
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_cohort.") as temporary:
        work = Path(temporary)
        listing = work / "cohort.csv"
        with open(listing, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["scan", "brain_mask"])
            writer.writerows([[str(scan), str(mask)] for scan, mask in cohort])
        (work / "warm-up").mkdir()
        one_command_per_scan(cohort[:1], work / "warm-up", arguments.model)

        ways = [("one command per scan", 1, lambda folder: one_command_per_scan(cohort, folder, arguments.model))]
        for workers in arguments.workers:
            ways.append((f"cohort, {workers} worker{'s' if workers > 1 else ''}", workers,
                         lambda folder, workers=workers: cohort_command(listing, folder, workers, arguments.model)))
        for name, processes, way in ways:
            folder = work / f"out-{len(results)}"
            folder.mkdir()
            with PeakMemory() as memory:
                start = time.perf_counter()
                way(folder)
                seconds = time.perf_counter() - start
            results.append({"way": name, "processes": processes, "seconds": round(seconds, 1),
                            "scans_per_minute": round(60 * len(cohort) / seconds, 2),
                            "peak_memory_mb": round(memory.total_mb), "largest_process_mb": round(memory.largest_mb)})
            print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)

    print(f"{len(cohort)} IXI T1 scans (brain masks given), {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}, load average before {load_before:.1f}")
    print()
    print("| way | processes scoring | seconds | scans per minute | peak memory, all processes (MB) "
          "| largest process (MB) |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['way']} | {row['processes']} | {row['seconds']} | {row['scans_per_minute']} | "
              f"{row['peak_memory_mb']} | {row['largest_process_mb']} |")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"scans": len(cohort), "results": results}, indent=2))


if __name__ == "__main__":
    main()
