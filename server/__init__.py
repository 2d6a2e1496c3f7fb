"""`twinflow serve`: ComfyUI's HTTP + WebSocket API over the headless runner (a host, like runner/).

Needs the `serve` extra (aiohttp), imported only by `server.app`; see docs/serve.md.
"""
