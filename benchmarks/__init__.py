"""TwinFlow benchmarks."""
import os
import platform


def cpu_name() -> str:
    """The CPU as lscpu names it: model name, family and model numbers, core count (else platform's guess).
    Benchmark figures are named with it: speed ratios differ between CPU families."""
    info: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                info.setdefault(key.strip().lower(), val.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']} model {info['model']})"
    return f"{name}, {os.cpu_count()} cores"
