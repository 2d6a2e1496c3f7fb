"""TwinFlow compiled: one torch.export path -> eager | inductor | tensorrt, artifact cache, profiles (the
workflow compile plan that uses them is the runner's: runner/plan.py)."""


def doctor_lines() -> list:
    """Backend availability and the cache location/size. Cheap; never raises."""
    try:
        from . import probe
        from .cache import ArtifactCache

        lines = probe.doctor_lines()
        cache = ArtifactCache()
        entries = cache.entries()
        lines.append(f"cache {cache.root} ({len(entries)} entries, "
                     f"{sum(e['bytes'] for e in entries) / 1e6:.1f} MB)")
        return lines
    except Exception as exc:  # doctor must never raise
        return [f"probe failed: {type(exc).__name__}: {exc}"]
