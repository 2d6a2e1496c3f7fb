"""TwinFlow kernels: fused CuPy RawKernels for the memory-bound glue ops of the Wan DiT and VAE,
each beside its torch reference. `ops` is the API the models call; see docs/kernels.md.

CuPy is optional and imported lazily: without it, or on the CPU, every op runs its reference.
"""
from .ops import MODES, OPS, get_mode, op_status, set_mode


def doctor_lines() -> list:
    """`twinflow doctor`: the kernel mode and each op's path and why (cheap, never raises)."""
    try:
        from .ops import doctor_lines as lines

        return lines()
    except Exception as exc:  # the doctor reports problems, it does not raise them
        return [f"fused kernels: doctor failed ({type(exc).__name__}: {exc})"]


__all__ = ["MODES", "OPS", "doctor_lines", "get_mode", "op_status", "set_mode"]
