"""The chat page: static files served by Parley at `/` (no build step, nothing from a CDN)."""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
