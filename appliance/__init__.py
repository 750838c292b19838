"""Face detection and recognition appliance: SCRFD + ArcFace behind an aiohttp API."""

__version__ = "0.1.0"
