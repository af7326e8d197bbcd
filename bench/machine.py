"""One line naming what a benchmark ran on, printed above its table so that BENCHMARKS.md can
label every table with its own machine and date from the command's output."""
import os
import platform
import time


def describe(device: str = "cpu", threads: int | None = None) -> str:
    """'<CPU or GPU model>, <cores> cores, <threads> threads, torch <version>, <date>'."""
    import torch
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                name = next(line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name"))
        except (OSError, StopIteration):
            name = platform.processor() or platform.machine()
    threads = threads or torch.get_num_threads()
    return (f"{name}, {os.cpu_count()} cores, {threads} thread(s), torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")
