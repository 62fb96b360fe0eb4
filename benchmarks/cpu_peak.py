"""This CPU's arithmetic peaks per core: how many 512-bit multiply-adds of each kind one core retires a second.

    python benchmarks/cpu_peak.py

The decode kernels are bound by memory at one row and by these instructions at many rows; their peaks bound what
batching can gain (docs/performance.md uses them). Each loop runs 12 independent accumulator chains of one
instruction (more than its latency needs), compiled here with the system's C compiler (`cc -march=native`):

  vpdpbusd     int8 x uint8 dot products, 64 multiply-adds (the -a8 quantized kernels, AVX512-VNNI)
  vdpbf16ps    bfloat16 pair dot products, 32 multiply-adds (bfloat16 weights, AVX512-BF16)
  vfmadd231ps  float32 FMA, 16 multiply-adds (float32 weights, and the W8A16/W4A16 kernels after widening)
  vpaddd       a one-cycle integer op, for the clock: most cores retire two 512-bit ones a cycle

An instruction the CPU lacks is reported as such. Ends with one JSON line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

INSTRUCTIONS = {"vpdpbusd": 64, "vdpbf16ps": 32, "vfmadd231ps": 16, "vpaddd": 0}
LOOPS = 100_000_000  # iterations of 12 instructions: about 0.3 s each

SOURCE = r"""
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define OP(r) INSN " %%zmm12, %%zmm13, %%zmm" #r "\n"
int main(void) {
  long n = LOOPS;
  double t = now();
  __asm__ volatile("vpxord %%zmm12, %%zmm12, %%zmm12\n vpxord %%zmm13, %%zmm13, %%zmm13\n 1:\n"
                   OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)
                   "dec %0\n jnz 1b\n"
                   : "+r"(n) :: "zmm0", "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9",
                      "zmm10", "zmm11", "zmm12", "zmm13");
  printf("%.6f\n", now() - t);
  return 0;
}
"""


def measure(insn: str, workdir: Path) -> float | None:
    """Instructions a second on one core, or None when this CPU (or compiler) cannot run it."""
    exe = workdir / insn
    src = workdir / f"{insn}.c"
    src.write_text(SOURCE)
    built = subprocess.run(["cc", "-O2", "-march=native", f'-DINSN="{insn}"', f"-DLOOPS={LOOPS}L", str(src),
                            "-o", str(exe)], capture_output=True, text=True, check=False)
    if built.returncode != 0:
        return None
    best = None
    for _ in range(3):  # the best of three: another process may share the core for a moment
        run = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
        if run.returncode != 0:  # SIGILL: assembled, but not this CPU's
            return None
        seconds = float(run.stdout)
        best = seconds if best is None else min(best, seconds)
    return 12 * LOOPS / best


def main() -> None:
    if shutil.which("cc") is None:
        raise SystemExit("cpu_peak.py needs a C compiler on PATH as cc (e.g. apt-get install gcc)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for insn, macs in INSTRUCTIONS.items():
            rate = measure(insn, Path(tmp))
            results[insn] = None if rate is None else {"instructions_per_s": rate, "macs_per_s": rate * macs}
            if rate is None:
                print(f"{insn:<12} not available on this CPU", file=sys.stderr)
            elif macs:
                print(f"{insn:<12} {rate / 1e9:6.2f} G/s per core = {rate * macs / 1e9:7.1f} G multiply-adds/s")
            else:
                print(f"{insn:<12} {rate / 1e9:6.2f} G/s per core (a one-cycle op: about twice the clock)")
    print(json.dumps({"per_core": results}))


if __name__ == "__main__":
    main()
