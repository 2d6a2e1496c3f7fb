"""Media codecs: IMAGE/LATENT tensors <-> PNG, animated WebP, MP4/H.264 and `.latent` files.

A library module (never imports nodes/, runner/ or ComfyUI): `images` (PNG, WebP, image readers),
`video` (MP4 through PyAV, video readers), `latent` (ComfyUI's `.latent` layout). Pillow and PyAV are
imported lazily inside the functions that need them.
"""
