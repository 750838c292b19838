"""Face detection and recognition appliance: SCRFD + ArcFace behind an aiohttp API."""

import os

__version__ = "0.1.0"

# OpenCV reads its decoder limits once, when the library loads (static initialisers in
# imgcodecs/loadsave.cpp), so they must be in the environment before anything imports cv2;
# this package's modules all import it after this file runs. 40 M pixels is MAX_IMAGE_PIXELS's
# default; our header check refuses larger images first, this catches a header OpenCV reads
# differently. An operator who raises MAX_IMAGE_PIXELS sets OPENCV_IO_MAX_IMAGE_PIXELS too.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "40000000")
