"""Where an export's threads spend their time: wall and thread CPU seconds inside the prune
kernel, the key histograms, the output hash and the O_DIRECT writes (the functions wrapped
below), per thread, in one 0.5 export of a synthetic 7B-shaped checkpoint in this process.

    python benchmarks/s25/main_thread_waits.py /tmp/llm-prune-bench/synthetic-16

Run it twice: the first run over a checkpoint hashes it and makes its key tables (first contact),
the second takes both from the cache. The wrapped functions record the thread they ran on.
"""

import shutil
import sys
import threading
import time

from llm_prune import PruneConfig, Sparsity, prune_checkpoint
from llm_prune import fingerprint as F
from llm_prune import writer as W
from llm_prune.kernels import magnitude as K

acc: dict = {}


def wrap(module, name):
    f = getattr(module, name)

    def timed(*a, **k):
        t, c = time.perf_counter(), time.thread_time()
        try:
            return f(*a, **k)
        finally:
            key = (name, threading.current_thread().name.split("_")[0])
            x = acc.setdefault(key, [0.0, 0.0, 0])
            x[0] += time.perf_counter() - t
            x[1] += time.thread_time() - c
            x[2] += 1
    setattr(module, name, timed)


wrap(K, "prune_below_")
wrap(K, "key_histogram")
wrap(W, "_pwrite_all")
if hasattr(W, "digest_of_bytes"):  # before session 25: the staged shard hashed whole on the main thread
    wrap(W, "digest_of_bytes")
if hasattr(F, "Hasher"):  # session 25: hashed piece by piece on the stage's thread
    wrap(F.Hasher, "update")
out = "/tmp/main-thread-waits-out"
shutil.rmtree(out, ignore_errors=True)
t = time.perf_counter()
prune_checkpoint(sys.argv[1], PruneConfig(sparsity=Sparsity(0.5)), out, progress=False)
print(f"export {time.perf_counter() - t:.2f} s")
for (name, thread), (wall, cpu, calls) in sorted(acc.items()):
    print(f"  {name:16s} on {thread:24s} wall {wall:6.2f} s  CPU {cpu:6.2f} s  calls {calls}")
shutil.rmtree(out, ignore_errors=True)
