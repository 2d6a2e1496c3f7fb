"""`twinflow serve` / `twinflow batch`: ComfyUI's HTTP + WebSocket API over the runner's executor, a batch
runner, and Ray actors. Part of runner/ (an app). aiohttp (the `serve` extra) is imported only by `app.py`,
ray (the `ray` extra) only inside `ray_pool.py`'s functions; see docs/serve.md.
"""
