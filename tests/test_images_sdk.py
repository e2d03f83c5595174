"""The real atoma-sdk 0.1.3 (`confidential_images.generate`, its own venv through
tests/atoma_driver.py) against `tee-node serve` with the tiny diffusers pipeline."""

from __future__ import annotations

import base64
import io
import json

import pytest
from atoma import run_driver
from image_support import IMAGE_MODEL
from PIL import Image

pytestmark = pytest.mark.usefixtures("atoma_sdk")

DATA_URL_PREFIX = "data:image/png;base64,"


@pytest.mark.parametrize("mode", [[], ["--async"]])
def test_sdk_generates_a_png_of_the_asked_size(image_node, mode):
    out = run_driver(
        ["images", "--url", image_node.url, "--model", IMAGE_MODEL, "--prompt", "a red cat", "--size", "32x48", "--n", "2", *mode],
        timeout=120,
    )
    assert out["ok"], out
    data = out["response"]["data"]
    assert len(data) == 2
    for item in data:
        assert item["url"].startswith(DATA_URL_PREFIX)
        image = Image.open(io.BytesIO(base64.b64decode(item["url"][len(DATA_URL_PREFIX):], validate=True)))
        assert (image.format, image.size) == ("PNG", (32, 48))


def test_sdk_default_size_and_an_unknown_format(image_node):
    out = run_driver(["images", "--url", image_node.url, "--model", IMAGE_MODEL, "--prompt", "a dog"], timeout=120)
    assert out["ok"], out
    (item,) = out["response"]["data"]
    image = Image.open(io.BytesIO(base64.b64decode(item["url"][len(DATA_URL_PREFIX):])))
    assert image.size == (64, 64)
    out = run_driver(
        ["images", "--url", image_node.url, "--model", IMAGE_MODEL, "--prompt", "a dog", "--response-format", "webp"],
        timeout=120,
    )
    assert not out["ok"] and out["status_code"] == 400, out
    assert json.loads(out["body"])["error"]["code"] == "INVALID_BODY"
    out = run_driver(["images", "--url", image_node.url, "--model", IMAGE_MODEL, "--size", "1x1"], timeout=120)
    assert not out["ok"] and json.loads(out["body"])["error"]["code"] == "UNSUPPORTED_IMAGE_SIZE", out
