"""TwinFlow quantization: quantize/dequantize pairs (`primitives`), the format registry (`formats`),
`QuantLinear` (`linear`), layer selection and swapping (`swap`), the accuracy report and
`quantize_denoiser` (`report`), quantized checkpoints incl. ComfyUI scaled fp8 (`checkpoint`)."""


def doctor_lines() -> list[str]:
    """One line per format: can it run here, and if not why (cheap, never raises)."""
    try:
        import torch

        from .formats import FORMATS

        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        lines = []
        for name, fmt in FORMATS.items():
            try:
                reason = fmt.unsupported_reason(device)
            except Exception as e:  # doctor must never raise; report the probe failure instead
                reason = f"probe failed: {type(e).__name__}: {e}"
            kind = "weight-only (memory)" if fmt.weight_only else "W8A8"
            if reason:
                lines.append(f"quant {name} [{kind}]: unavailable on {device}: {reason}")
            else:
                path = {"int8_dynamic": "torch._int_mm", "fp8_e4m3_dynamic": "torch._scaled_mm"}.get(
                    name, "dequantize + torch GEMM")
                lines.append(f"quant {name} [{kind}]: runs on {device} ({path})")
        return lines
    except Exception as e:  # the doctor reports, it does not crash
        return [f"quant: could not probe formats ({type(e).__name__}: {e})"]
