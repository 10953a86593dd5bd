"""The service's page in a real browser: headless Chromium from the distribution's package
(`apt-get install chromium chromium-driver`), driven by Selenium, against the tiny run.

The test uploads a photo (scikit-image's astronaut, which holds a face), a WebM video panning
over it and a tiny frame in which no face is found, reads each score from the page and
compares it with the API's answer for the same bytes, checks the verdict band, the per-frame
timeline, the explanation and the CSV export, and saves a screenshot (README's
docs/serve_page.png is this screenshot: FMSD_SCREENSHOT=docs/serve_page.png writes it there).

Where Chromium or its driver is missing the test is skipped, except under CI=true, where that
is a broken CI image and fails.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import serve_cfg
from PIL import Image

from fmsd_jax.serve import server
from fmsd_jax.serve.service import Service

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not shutil.which(p)]
    if missing:
        why = (f"{', '.join(missing)} missing: `apt-get install -y chromium chromium-driver` "
               "(.ci/run installs them)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1500", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    # The driver's own path: Selenium Manager would otherwise try to download one.
    return webdriver.Chrome(service=DriverService(executable_path=DRIVER), options=options)


def write_inputs(folder: Path, bench: Path) -> list[Path]:
    import av
    import skimage.data

    photo = skimage.data.astronaut()  # 512 x 512, a face in the upper middle
    paths = [folder / "astronaut.png", folder / "pan.webm", folder / "tiny_frame.png"]
    Image.fromarray(photo).save(paths[0])
    with av.open(str(paths[1]), "w") as out:
        stream = out.add_stream("libvpx", rate=8)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(12):  # a slow pan over the photo
            frame = np.ascontiguousarray(photo[20 + 4 * i: 260 + 4 * i, 90 + 6 * i: 410 + 6 * i])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    shutil.copy(sorted((bench / "SynBlend" / "fake" / "frames").rglob("*.png"))[0], paths[2])
    return paths


def test_the_page_scores_uploads_as_the_api_does(served_run, tiny_clip_checkpoint,
                                                 tiny_benchmark, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    svc = Service(serve_cfg(tiny_clip_checkpoint, tiny_benchmark), served_run)
    running = server.start_in_thread(svc)
    try:
        paths = write_inputs(tmp_path, tiny_benchmark)
        api = {p.name: httpx.post(f"{running.url}/v1/score", params={"explain": "true"},
                                  files={"file": (p.name, p.read_bytes())}, timeout=60).json()
               for p in paths}
        want_heat = {name: a["explain"]["heatmap_png_base64"] for name, a in api.items()}
        driver.get(running.url + "/")
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.ID, "model").get_attribute("data-ready") == "1")
        identity = driver.find_element(By.ID, "model").text
        assert "best checkpoint, step 4" in identity and "operating point eer" in identity
        assert api[paths[0].name]["model"]["commit"][:12] in identity
        driver.find_element(By.ID, "explain").click()
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))
        WebDriverWait(driver, 120).until(lambda d: len(d.find_elements(
            By.CSS_SELECTOR, ".result[data-status=done]")) == 3)
        cards = {c.find_element(By.CLASS_NAME, "name").text: c
                 for c in driver.find_elements(By.CLASS_NAME, "result")}
        assert set(cards) == {p.name for p in paths}
        for name, card in cards.items():
            want = api[name]
            # The score the page shows is the API's for the same bytes (to float32 rounding:
            # the page's three uploads share batches, whose padded size changes XLA's sums).
            assert float(card.get_attribute("data-prob")) == pytest.approx(want["prob_fake"],
                                                                           abs=1e-6)
            assert card.find_element(By.CLASS_NAME, "prob").text == \
                f"P(fake) {want['prob_fake']:.3f}"
            assert card.find_element(By.CLASS_NAME, "verdict").text.lower() == want["verdict"]
            marker = card.find_element(By.CLASS_NAME, "marker").get_attribute("style")
            left = float(re.search(r"left: ([0-9.e-]+)%", marker).group(1))
            assert left == pytest.approx(100 * want["prob_fake"], abs=1e-3)
            face = card.find_element(By.CLASS_NAME, "face").text
            assert ("No face found" in face) == want["faces"]["no_face_found"], (name, face)
            bars = card.find_elements(By.CSS_SELECTOR, ".explain .bar")
            assert len(bars) == 4 and card.find_element(By.CLASS_NAME, "heat").is_displayed()
            assert card.find_element(By.CLASS_NAME, "heat").get_attribute("src").endswith(
                want_heat[name][-40:])
        assert api["tiny_frame.png"]["faces"]["no_face_found"]
        timeline = cards["pan.webm"].find_elements(By.CSS_SELECTOR, "rect.frame-bar")
        assert len(timeline) == len(api["pan.webm"]["frames"]) == 6
        assert not cards["astronaut.png"].find_elements(By.CSS_SELECTOR, "rect.frame-bar")
        rows = list(csv.DictReader(io.StringIO(driver.execute_script(
            "return window.fmsdExportCsv()"))))
        assert len(rows) == 1 + 6 + 1  # one row per scored frame
        for row in rows:
            assert float(row["prob_fake"]) == pytest.approx(api[row["file"]]["prob_fake"])
        shot = tmp_path / "serve_page.png"
        driver.set_window_size(1280, driver.execute_script(
            "return document.body.scrollHeight") + 40)
        assert driver.save_screenshot(str(shot))
        image = Image.open(shot)
        assert image.size[0] == 1280 and image.size[1] > 900
        assert len(np.unique(np.asarray(image.convert("L")))) > 50  # a page, not a blank
        if os.environ.get("FMSD_SCREENSHOT"):
            shutil.copy(shot, os.environ["FMSD_SCREENSHOT"])
    finally:
        driver.quit()
        running.stop()
