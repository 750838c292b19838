"""Coverage-guided fuzz target (atheris, libFuzzer) for the image decoder and the URL guard.

    FUZZ_TARGET=images python -m tests.fuzz_target -dict=tests/corpus/images.dict NEW_DIR tests/corpus/images
    FUZZ_TARGET=urls   python -m tests.fuzz_target -max_total_time=600 tests/corpus/urls

libFuzzer grows the first corpus directory with inputs that reach new code; the oracles are
the hypothesis tests' (tests/fuzz_oracles.py): an input that breaks the contract raises, and
libFuzzer saves it under -artifact_prefix. Its default malloc limit (the RSS limit, 2 GB)
also turns any decoder allocation past that into a reported crash. `make fuzz` runs both
targets for longer; tests/test_fuzz_atheris.py runs a bounded number of inputs in CI.
"""

from __future__ import annotations

import os
import sys
import warnings

import atheris
import cv2

# yarl parses the URLs callers send; its parser is where the url target found a crash.
with atheris.instrument_imports(include=["appliance", "yarl"]):
    from tests.fuzz_oracles import check_header_pair, check_image, check_url_text, make_decoders

TARGET = os.environ.get("FUZZ_TARGET", "images")
DECODERS = make_decoders()


def fuzz_images(data: bytes) -> None:
    for decoder in DECODERS:
        check_image(decoder, data)


def fuzz_urls(data: bytes) -> None:
    # Readable corpus files: "URL" on the first line, then "Name: value" for img_req_headers.
    text = data.decode("utf-8", errors="replace")
    url, _, header = text.partition("\n")
    name, _, value = header.partition(": ")
    check_url_text(url)
    check_header_pair(name, value)


def main() -> None:
    # libjpeg's and OpenCV's "corrupt data" notices are expected on fuzzed input, not findings.
    warnings.simplefilter("ignore")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    target = {"images": fuzz_images, "urls": fuzz_urls}[TARGET]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
