"""torch.profiler around scripts/bench_calibrated.py prune ... (its arguments follow)."""
import runpy, sys
from torch.profiler import profile, ProfilerActivity
sys.argv = ["bench_calibrated.py"] + sys.argv[1:]
with profile(activities=[ProfilerActivity.CPU]) as prof:
    try:
        runpy.run_path("/work/main/scripts/bench_calibrated.py", run_name="__main__")
    except SystemExit:
        pass
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=40))
