"""Benchmark: sparse query codebook vs the authors' dense Linear(65536 -> 512) over 3400 tokens.

Both paths start from the same `SparseCodes` (what saekit's encoder emits) and produce the
same (3400, 512) per-token codebook vectors at the paper's threshold |h| >= 2:

- sparse: drop |h| < 2, `embedding_bag(sum, per_sample_weights=h)` over the survivors;
- dense (upstream): densify to (3400, 65536), zero |h| < 2, Linear(65536 -> 512, no bias).

Codes are ReLU-SAE-like: 50-100 active atoms per token, h ~ Exponential(mean 1.2), so about
a fifth of them (~14 per token) pass the threshold.

Time: median wall time of 10 runs after a warm-up for the sparse path; the dense path takes
seconds per call (mostly fresh pages for its (3400, 65536) buffers, paid on every call), so
it is timed once, after the parity run warmed it up. torch's default CPU threads.
Peak memory, in a fresh subprocess: the process's resident-set high-water mark (Linux VmHWM) above the resident
size just before the run, the mark reset through /proc/self/clear_refs. Before measuring,
glibc's mmap threshold is fixed at 64 KiB (mallopt), so every tensor buffer is its own
mapping, counted when touched and returned when freed: freed memory cannot be silently
reused and hide a peak. This counts everything the process touches (kernel temporaries
included), not only tensor storages. Backward is w.r.t. the codebook C only (the SAE and the
layers feeding it are frozen in training); both paths then allocate the same dense
(65536, 512) gradient of C, which is included.

Prints one JSON object with a `targets` map. Runs in well under 2 minutes on 2 cores.
"""

from __future__ import annotations

import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.sparse import SparseCodes  # noqa: E402
from segcompass.modeling.query_codebook import QueryCodebook  # noqa: E402

N_TOKENS, D_SAE, D_C, THRESHOLD = 3400, 65536, 512, 2.0
ACTIVE_RANGE, MEAN_ACTIVATION = (50, 100), 1.2
REPEATS_SPARSE, REPEATS_DENSE = 10, 1


def make_codes(seed: int = 0) -> SparseCodes:
    """CSR codes with 50-100 distinct atoms per token, ascending within a token."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = ACTIVE_RANGE
    candidates = torch.randint(0, D_SAE, (N_TOKENS, hi), generator=g)
    wanted = torch.randint(lo, hi + 1, (N_TOKENS, 1), generator=g)
    keep = torch.arange(hi)[None, :] < wanted
    atoms, _ = torch.where(keep, candidates, D_SAE).sort(dim=1)  # D_SAE marks "dropped"
    duplicate = torch.zeros_like(keep)
    duplicate[:, 1:] = atoms[:, 1:] == atoms[:, :-1]
    valid = (atoms < D_SAE) & ~duplicate
    counts = valid.sum(1)
    offsets = torch.zeros(N_TOKENS + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    values = torch.empty(int(counts.sum())).exponential_(1 / MEAN_ACTIVATION, generator=g)
    return SparseCodes(atoms[valid], values, offsets, D_SAE)


def timed(fn, prepare, repeats: int, warm_up: bool = True) -> float:
    """Median wall time of fn() over `repeats` runs (after a warm-up); prepare() is not timed."""
    if warm_up:
        prepare()
        fn()
    times = []
    for _ in range(repeats):
        prepare()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mib(fn, prepare) -> float:
    """Resident high-water mark during fn() above the resident size before it, in MiB."""
    prepare()
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def fix_malloc_mmap_threshold() -> bool:
    """Every allocation >= 64 KiB becomes its own mmap (see the module docstring).

    Must run before the process allocates: free heap chunks left from earlier would still
    be reused (resident, so uncounted).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 0))  # M_MMAP_THRESHOLD, M_TRIM
    except OSError:
        return False


class Setup:
    """The codes, the codebook, and one run of either path."""

    def __init__(self):
        torch.manual_seed(0)
        self.codes = make_codes()
        self.codebook = QueryCodebook(d_sae=D_SAE, d_c=D_C, threshold=THRESHOLD)
        self.upstream_grad = torch.randn(N_TOKENS, D_C)

    def clear_grad(self) -> None:
        self.codebook.weight.grad = None

    def run(self, path: str, backward: bool):
        def fn():
            with torch.set_grad_enabled(backward):
                if path == "sparse":
                    out = self.codebook.token_vectors(self.codes)
                else:
                    out = self.codebook.dense_reference(self.codes)
                if backward:
                    out.backward(self.upstream_grad)
            return out.detach()
        return fn


def measure_memory() -> dict:
    """Run in a fresh process (`--memory`): the malloc setting must precede every allocation."""
    mallopt_ok = fix_malloc_mmap_threshold()
    setup = Setup()
    # Warm-up on a small slice: thread pools and BLAS buffers exist before any baseline.
    small = Setup.__new__(Setup)
    small.codebook, small.upstream_grad = setup.codebook, setup.upstream_grad[:64]
    end = int(setup.codes.offsets[64])
    small.codes = SparseCodes(setup.codes.indices[:end], setup.codes.values[:end], setup.codes.offsets[:65], D_SAE)
    for path in ("sparse", "dense"):
        small.run(path, True)()
    peaks = {f"{p}_{'fb' if b else 'f'}": peak_mib(setup.run(p, b), setup.clear_grad)
             for p in ("sparse", "dense") for b in (False, True)}
    return {"peaks": peaks, "mallopt": mallopt_ok}


def main() -> dict:
    setup = Setup()
    # Parity first: outputs and gradients w.r.t. C.
    setup.clear_grad()
    sparse_out = setup.run("sparse", True)()
    sparse_grad = setup.codebook.weight.grad.clone()
    setup.clear_grad()
    dense_out = setup.run("dense", True)()
    max_diff_out = float((sparse_out - dense_out).abs().max())
    max_diff_grad = float((sparse_grad - setup.codebook.weight.grad).abs().max())
    del sparse_out, dense_out, sparse_grad
    # The dense path is seconds per call and its cost is fresh pages every call: the parity
    # run above is its warm-up.
    times = {(p, b): timed(setup.run(p, b), setup.clear_grad,
                           REPEATS_SPARSE if p == "sparse" else REPEATS_DENSE, warm_up=p == "sparse")
             for p in ("sparse", "dense") for b in (False, True)}
    child = subprocess.run([sys.executable, __file__, "--memory"], capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"memory measurement failed:\n{child.stderr}")
    memory = json.loads(child.stdout)
    peaks = {(p, b): memory["peaks"][f"{p}_{'fb' if b else 'f'}"] for p in ("sparse", "dense") for b in (False, True)}
    survivors = int((setup.codes.values.abs() >= THRESHOLD).sum())
    return report(times, peaks, max_diff_out, max_diff_grad, survivors, setup.codes, memory["mallopt"])


def report(times, peaks, max_diff_out, max_diff_grad, survivors, codes, mallopt_ok) -> dict:
    def side(path):
        return {"forward_s": round(times[path, False], 5), "forward_backward_s": round(times[path, True], 5),
                "forward_peak_mib": round(peaks[path, False], 1),
                "forward_backward_peak_mib": round(peaks[path, True], 1)}

    def ratio(num, den):
        return round(num / max(den, 1e-9), 2)

    speed_fb = ratio(times["dense", True], times["sparse", True])
    mem_fb = ratio(peaks["dense", True], max(peaks["sparse", True], 1e-3))
    return {
        "benchmark": "codebook",
        "setup": {"n_tokens": N_TOKENS, "d_sae": D_SAE, "d_c": D_C, "threshold": THRESHOLD,
                  "active_atoms_per_token": round(codes.values.numel() / N_TOKENS, 1),
                  "surviving_atoms_per_token": round(survivors / N_TOKENS, 1),
                  "dtype": "float32", "device": "cpu", "torch_threads": torch.get_num_threads(),
                  "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
        "memory_method": "peak RSS (VmHWM reset via /proc/self/clear_refs) above RSS before the run; "
                         f"glibc mmap threshold fixed at 64 KiB: {mallopt_ok}",
        "sparse": side("sparse"),
        "dense": side("dense"),
        "speedup_forward": ratio(times["dense", False], times["sparse", False]),
        "memory_reduction_forward": ratio(peaks["dense", False], max(peaks["sparse", False], 1e-3)),
        "max_abs_diff_output": max_diff_out,
        "max_abs_diff_grad_codebook": max_diff_grad,
        "targets": {
            "speedup_forward_backward": {"value": speed_fb, "target": 5.0, "higher_is_better": True},
            "memory_reduction_forward_backward": {"value": mem_fb, "target": 10.0, "higher_is_better": True},
            "max_abs_diff_output": {"value": max_diff_out, "target": 1e-5, "higher_is_better": False},
        },
    }


if __name__ == "__main__":
    print(json.dumps(measure_memory() if "--memory" in sys.argv[1:] else main(), indent=2))
