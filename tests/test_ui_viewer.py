"""The study viewer page in a real headless Chromium, against a real pacsd on port 0.

One server for the module (generated CT studies, pydicom's compressed and colour samples, a
node that is a pynetdicom Storage SCP); a fresh browser per test (the conftest fixture).
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image
from pydicom import dcmread
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import LOCAL, browser_errors, store_files, write_config
from data import sample, uid, write_series
from pagejs import js, wait

pytestmark = pytest.mark.timeout(120)

IMAGES = 12      # slices per generated series
SIZE = 128


class Scp:
    """A Storage SCP on 127.0.0.1, port 0, counting what it receives."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.ae = AE(ae_title="WS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)

        def on_store(event):
            with self.lock:
                self.received.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000
        self.server = self.ae.start_server((LOCAL, 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.socket.getsockname()[1]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("viewer")
    scp = Scp()
    # No DICOM query/retrieve here, and the page lists the nodes: without the test clients.
    cfg = config.load(write_config(tmp / "c.toml", tmp / "data", qr_clients=False, nodes=[
        {"name": "ws", "aet": "WS", "host": LOCAL, "port": scp.port}]), env={})
    server = Server(cfg).start()
    main = write_series(tmp / "main", seed=7, series=2, images=IMAGES, size=SIZE)
    doomed = write_series(tmp / "doomed", seed=8, images=3, size=32)
    # InstanceNumber 1 is the most superior slice (z = -1), as a scanner numbers a head-first
    # CT: the first instance is the first slice (before issue 19 it sorted to the end).
    reversed_ = write_series(tmp / "reversed", seed=9, images=5, size=32)
    for path in reversed_:
        ds = dcmread(path)
        ds.ImagePositionPatient = [0, 0, -float(ds.InstanceNumber)]
        ds.save_as(path)
    samples = [sample("MR_small_jpeg_ls_lossless.dcm"), sample("SC_rgb_rle_2frame.dcm")]
    files = main + doomed + reversed_ + samples
    assert store_files(server.dicom_port, files) == [0] * len(files)
    server.study = uid(7, 1, 1, "study")
    server.series = [uid(7, 1, 1, se, "series") for se in (1, 2)]
    server.doomed = uid(8, 1, 1, "study")
    server.reversed = uid(9, 1, 1, "study")
    server.jls = dcmread(samples[0])
    server.rgb = dcmread(samples[1], stop_before_pixels=True)
    server.scp = scp
    yield server
    server.stop()
    scp.stop()


# --- helpers ----------------------------------------------------------------------------------

def open_viewer(browser, env, study: str, timeout: float = 30) -> None:
    browser.get(f"{env.http_url}/app/viewer?study={study}")
    wait(browser, "window.pacsViewer && window.pacsViewer.ready", timeout)


def all_loaded(browser) -> None:
    wait(browser, "pacsViewer.total > 0 && pacsViewer.loaded === pacsViewer.total")


CANVAS_STATS = """
const c = document.querySelectorAll('.viewport canvas')[arguments[0]];
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let s = 0, s2 = 0, h = 2166136261, n = 0;
for (let i = 0; i < d.length; i += 4) {
  const g = d[i]; s += g; s2 += g * g; n++;
  h = Math.imul(h ^ d[i] ^ (d[i + 1] << 8) ^ (d[i + 2] << 16), 16777619) >>> 0;
}
const mean = s / n;
return {mean: mean, std: Math.sqrt(Math.max(0, s2 / n - mean * mean)), hash: h, w: c.width, h: c.height};
"""


def canvas(browser, n: int = 0) -> dict:
    js(browser, "pacsViewer.renderNow()")
    return browser.execute_script(CANVAS_STATS, n)


def screenshot(browser) -> tuple[bytes, float]:
    """The page as PNG bytes, and the grey-level spread of the viewport area."""
    png = browser.get_screenshot_as_png()
    rect = browser.find_element(By.CSS_SELECTOR, "#viewport-0").rect
    img = Image.open(io.BytesIO(png)).convert("L")
    box = (int(rect["x"]), int(rect["y"]), int(rect["x"] + rect["width"]),
           int(rect["y"] + rect["height"]))
    return png, float(np.asarray(img.crop(box)).std())


def drag(browser, element, dx: int, dy: int, start: tuple[int, int] = (0, 0)) -> None:
    """A mouse drag from `start` (offset from the element's centre) by (dx, dy), in steps."""
    chain = ActionChains(browser, duration=20)
    chain.move_to_element_with_offset(element, *start).click_and_hold()
    for k in range(1, 6):
        chain.move_by_offset(dx // 5, dy // 5)
    chain.release().perform()


def no_errors(browser) -> None:
    errors = browser_errors(browser)
    assert not errors, errors


# --- tests ------------------------------------------------------------------------------------

def test_opens_a_study_and_draws_the_first_image(browser, env):
    open_viewer(browser, env, env.study)
    # The first image drawn may be the preview (the lowest Instance Number); once the series is
    # sorted, slice 1 of the reading direction replaces it, drawn when its batch arrives.
    deadline, stats = time.monotonic() + 20, canvas(browser)
    while stats["std"] <= 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = canvas(browser)
    assert stats["std"] > 5, stats          # not blank: the body disc on black air
    all_loaded(browser)
    assert js(browser, "pacsViewer.total") == IMAGES
    vp = js(browser, "{i: pacsViewer.viewports[0].index, n: pacsViewer.viewports[0].count,"
                     " w: pacsViewer.viewports[0].window}")
    assert vp == {"i": 0, "n": IMAGES, "w": {"center": 40, "width": 400}}
    t = js(browser, "pacsViewer.timings")
    # Both recorded; in no set order: a series whose every slice arrives before the first frame
    # is painted (a quick server, a busy page) has allLoadedMs below firstImageMs.
    assert t["firstImageMs"] > 0 and t["allLoadedMs"] > 0
    overlay = browser.find_element(By.CSS_SELECTOR, "#viewport-0 .ov.tl").text
    assert "Test, Patient001" in overlay and "PID7-001" in overlay
    assert f"Im: 1 / {IMAGES}" in browser.find_element(By.CSS_SELECTOR, "#viewport-0 .ov.bl").text
    assert "W: 400 L: 40" in browser.find_element(By.CSS_SELECTOR, "#viewport-0 .ov.br").text
    # One thumbnail per series, each an image the server rendered.
    thumbs = browser.find_elements(By.CSS_SELECTOR, ".series-thumb img")
    assert len(thumbs) == 2
    wait(browser, "[...document.querySelectorAll('.series-thumb img')]"
                  ".every(i => i.complete && i.naturalWidth > 0)")
    no_errors(browser)


def test_scrolls_with_wheel_keys_and_slider(browser, env):
    open_viewer(browser, env, env.study)
    all_loaded(browser)
    cv = browser.find_element(By.CSS_SELECTOR, "#viewport-0 canvas")
    before = canvas(browser)["hash"]
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(cv), 0, 120).perform()
    index = wait(browser, "pacsViewer.viewports[0].index > 0 && pacsViewer.viewports[0].index")
    after = canvas(browser)
    assert after["hash"] != before and after["std"] > 5
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(cv), 0, -120).perform()
    wait(browser, f"pacsViewer.viewports[0].index < {index}")
    cv.click()
    ActionChains(browser).send_keys(Keys.END).perform()
    wait(browser, f"pacsViewer.viewports[0].index === {IMAGES - 1}")
    assert f"Im: {IMAGES} / {IMAGES}" in browser.find_element(
        By.CSS_SELECTOR, "#viewport-0 .ov.bl").text
    ActionChains(browser).send_keys(Keys.HOME).perform()
    wait(browser, "pacsViewer.viewports[0].index === 0")
    ActionChains(browser).send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN).perform()
    wait(browser, "pacsViewer.viewports[0].index === 2")
    ActionChains(browser).send_keys(Keys.PAGE_DOWN).perform()
    wait(browser, "pacsViewer.viewports[0].index === 3")   # a tenth of 12, at least 1
    ActionChains(browser).send_keys(Keys.ARROW_UP).perform()
    wait(browser, "pacsViewer.viewports[0].index === 2")
    js(browser, "pacsViewer.setSlice(5)")
    assert js(browser, "document.querySelector('#viewport-0 input.slice').value") == "5"
    # Slices are in ImagePositionPatient order, head first (z = InstanceNumber here, so the
    # highest InstanceNumber is the most superior slice and comes first).
    assert js(browser, "pacsViewer.viewports[0].series.images.map(i => i.pos)") == [
        float(n) for n in range(IMAGES, 0, -1)]
    no_errors(browser)


def test_window_level_drag_and_presets(browser, env):
    open_viewer(browser, env, env.study)
    all_loaded(browser)
    cv = browser.find_element(By.CSS_SELECTOR, "#viewport-0 canvas")
    shot0, _ = screenshot(browser)
    browser.find_element(By.ID, "tool-wl").click()
    drag(browser, cv, 150, 100)
    w = js(browser, "pacsViewer.viewports[0].window")
    assert w["width"] > 400 and w["center"] > 40, w
    shot1, spread1 = screenshot(browser)
    assert shot1 != shot0 and spread1 > 5
    text = browser.find_element(By.CSS_SELECTOR, "#viewport-0 .ov.br").text
    assert text.startswith("W: ") and "W: 400 L: 40" not in text
    browser.find_element(By.ID, "preset-lung").click()
    assert js(browser, "pacsViewer.viewports[0].window") == {"center": -600, "width": 1500}
    shot2, spread2 = screenshot(browser)
    assert shot2 not in (shot0, shot1) and spread2 > 5
    browser.find_element(By.ID, "preset-default").click()
    wait(browser, "pacsViewer.viewports[0].window.width === 400")
    # Invert, then reset: back to the first picture.
    first = canvas(browser)["hash"]
    browser.find_element(By.ID, "btn-invert").click()
    assert canvas(browser)["hash"] != first
    browser.find_element(By.ID, "btn-reset").click()
    assert canvas(browser)["hash"] == first
    no_errors(browser)


def test_zoom_pan_fit_and_cine(browser, env):
    open_viewer(browser, env, env.study)
    all_loaded(browser)
    cv = browser.find_element(By.CSS_SELECTOR, "#viewport-0 canvas")
    fit = js(browser, "pacsViewer.viewports[0].zoom")
    browser.find_element(By.ID, "tool-zoom").click()
    drag(browser, cv, 0, -100)
    assert js(browser, "pacsViewer.viewports[0].zoom") > fit * 1.5
    browser.find_element(By.ID, "tool-pan").click()
    drag(browser, cv, 50, 30)
    pan = js(browser, "pacsViewer.viewports[0].pan")
    assert abs(pan["x"]) > 10
    browser.find_element(By.ID, "btn-1to1").click()
    js(browser, "pacsViewer.renderNow()")
    assert "Zoom: 100%" in browser.find_element(By.CSS_SELECTOR, "#viewport-0 .ov.br").text
    browser.find_element(By.ID, "btn-fit").click()
    js(browser, "pacsViewer.renderNow()")
    assert js(browser, "pacsViewer.viewports[0].zoom") == pytest.approx(fit)
    browser.find_element(By.ID, "cine-fps").send_keys("50")
    browser.find_element(By.ID, "cine").click()
    wait(browser, "pacsViewer.viewports[0].index >= 3", 10)
    browser.find_element(By.ID, "cine").click()
    # Paused: the slice stays put over the next 15 display frames (3 cine steps at 50 fps).
    moved = browser.execute_async_script("""
        const done = arguments[arguments.length - 1], v = pacsViewer.viewports[0], i = v.index;
        let n = 0;
        const tick = () => (++n < 15 ? requestAnimationFrame(tick) : done(v.index !== i));
        requestAnimationFrame(tick);""")
    assert moved is False
    no_errors(browser)


PINCH = """
const c = document.querySelector('#viewport-0 canvas'), r = c.getBoundingClientRect();
const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
const ev = (type, id, x, y) => c.dispatchEvent(new PointerEvent(type, {pointerId: id,
  pointerType: 'touch', isPrimary: id === 1, clientX: x, clientY: y, bubbles: true, button: 0}));
ev('pointerdown', 1, cx - 40, cy); ev('pointerdown', 2, cx + 40, cy);
for (let k = 1; k <= 5; k++) ev('pointermove', 2, cx + 40 + 24 * k, cy);
ev('pointerup', 2, cx + 160, cy); ev('pointerup', 1, cx - 40, cy);
"""


def test_touch_pinch_zooms_and_one_finger_uses_the_tool(browser, env):
    open_viewer(browser, env, env.study)
    all_loaded(browser)
    fit = js(browser, "pacsViewer.viewports[0].zoom")
    browser.execute_script(PINCH)
    assert js(browser, "pacsViewer.viewports[0].zoom") == pytest.approx(fit * 200 / 80, rel=0.02)
    assert js(browser, "pacsViewer.viewports[0].window") == {"center": 40, "width": 400}
    browser.execute_script("""
        const c = document.querySelector('#viewport-0 canvas'), r = c.getBoundingClientRect();
        const ev = (type, x, y) => c.dispatchEvent(new PointerEvent(type, {pointerId: 7,
          pointerType: 'touch', isPrimary: true, clientX: x, clientY: y, bubbles: true}));
        ev('pointerdown', r.left + 100, r.top + 100); ev('pointermove', r.left + 160, r.top + 100);
        ev('pointerup', r.left + 160, r.top + 100);""")
    assert js(browser, "pacsViewer.viewports[0].window.width") > 400   # W/L, the current tool
    no_errors(browser)


def test_two_viewports(browser, env):
    open_viewer(browser, env, env.study)
    browser.find_element(By.ID, "layout-2").click()
    wait(browser, "pacsViewer.viewports[1].count === 12 && pacsViewer.viewports[1].series.loaded === 12")
    assert js(browser, "pacsViewer.viewports[1].seriesUid") == env.series[1]
    assert canvas(browser, 1)["std"] > 5
    # The active viewport is the one clicked; a thumbnail click loads into it.
    browser.find_element(By.CSS_SELECTOR, "#viewport-1 canvas").click()
    assert js(browser, "pacsViewer.active") == 1
    assert "active" in browser.find_element(By.ID, "viewport-1").get_attribute("class")
    browser.find_element(By.CSS_SELECTOR, f'.series-thumb[data-uid="{env.series[0]}"]').click()
    wait(browser, f"pacsViewer.viewports[1].seriesUid === '{env.series[0]}'")
    # Keys scroll the active viewport only.
    wait(browser, "pacsViewer.viewports[1].series.loaded === 12")
    ActionChains(browser).send_keys(Keys.END).perform()
    wait(browser, f"pacsViewer.viewports[1].index === {IMAGES - 1}")
    assert js(browser, "pacsViewer.viewports[0].index") == 0
    browser.find_element(By.ID, "layout-1").click()
    assert js(browser, "pacsViewer.active") == 0
    no_errors(browser)


def test_measures_a_distance_in_mm(browser, env):
    open_viewer(browser, env, env.study)
    all_loaded(browser)
    cv = browser.find_element(By.CSS_SELECTOR, "#viewport-0 canvas")
    browser.find_element(By.ID, "tool-measure").click()
    drag(browser, cv, 200, 0, start=(-100, 0))
    m = js(browser, "pacsViewer.viewports[0].measurements.map(m => ({mm: m.mm, text: m.text}))")
    assert len(m) == 1 and m[0]["text"].endswith(" mm")
    zoom = js(browser, "pacsViewer.viewports[0].zoom")
    assert m[0]["mm"] == pytest.approx(200 / zoom * 0.7, rel=0.05)   # PixelSpacing 0.7 mm
    assert m[0]["text"] in browser.find_element(By.CSS_SELECTOR, "#viewport-0 .ov.bl").text
    no_errors(browser)


def test_tag_panel(browser, env):
    open_viewer(browser, env, env.study)
    browser.find_element(By.ID, "tags-toggle").click()
    panel = browser.find_element(By.ID, "tags-panel")
    WebDriverWait(browser, 20).until(lambda d: "Test^Patient001" in panel.text)
    assert "Patient's Name" in panel.text and "(0010,0010)" in panel.text
    browser.find_element(By.ID, "tags-filter").send_keys("patientname")
    WebDriverWait(browser, 5).until(lambda d: "Rows" not in panel.text)
    assert "Test^Patient001" in panel.text
    no_errors(browser)


def test_series_zip_download(browser, env):
    open_viewer(browser, env, env.study)
    browser.find_element(By.ID, "btn-zip-series").click()
    downloads: Path = browser.downloads

    def done(_):
        files = [p for p in downloads.iterdir() if p.suffix == ".zip"]
        return files[0] if files and not list(downloads.glob("*.crdownload")) else None
    path = WebDriverWait(browser, 30, poll_frequency=0.1).until(done)
    with zipfile.ZipFile(path) as z:
        dicoms = [n for n in z.namelist() if n.startswith("DICOM/")]
    assert len(dicoms) == IMAGES


def test_sends_the_study_to_a_node(browser, env):
    open_viewer(browser, env, env.study)
    WebDriverWait(browser, 10).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#send-node option")) == 2)
    from selenium.webdriver.support.select import Select
    Select(browser.find_element(By.ID, "send-node")).select_by_value("ws")
    browser.find_element(By.ID, "btn-send").click()
    status = browser.find_element(By.ID, "send-status")
    WebDriverWait(browser, 60).until(lambda d: "Sent" in status.text or "error" in
                                     status.get_attribute("class"))
    assert status.text == f"Sent {2 * IMAGES} image(s) to ws"
    assert len(set(env.scp.received)) == 2 * IMAGES


def test_admin_deletes_a_study(browser, env):
    open_viewer(browser, env, env.doomed)
    button = browser.find_element(By.ID, "btn-delete-study")
    WebDriverWait(browser, 10).until(lambda d: button.is_displayed())   # open access: admin
    button.click()
    browser.find_element(By.ID, "confirm-ok").click()
    # Back to the study list once deleted.
    WebDriverWait(browser, 20).until(lambda d: urlparse(d.current_url).path == "/app/")
    r = requests.get(f"{env.http_url}/api/studies/{env.doomed}", timeout=10)
    assert r.status_code == 404


def test_admin_corrects_a_study_from_the_viewer(browser, env):
    open_viewer(browser, env, env.reversed)
    button = browser.find_element(By.ID, "btn-edit-study")
    WebDriverWait(browser, 10).until(lambda d: button.is_displayed())   # open access: admin
    button.click()
    for field, value in (("e-description", "Corrected head"), ("e-name", "FIXED^NAME"),
                         ("e-date", "2024-01-01")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "edit-save").click()
    # A bad date: said in the dialog, nothing changed.
    WebDriverWait(browser, 20).until(
        lambda d: "YYYYMMDD" in d.find_element(By.ID, "edit-error").text)
    before = requests.get(f"{env.http_url}/api/studies/{env.reversed}", timeout=10).json()
    assert before["description"] != "Corrected head"
    box = browser.find_element(By.ID, "e-date")
    box.clear()
    box.send_keys(before["study_date"] or "20240101")
    browser.find_element(By.ID, "edit-save").click()
    WebDriverWait(browser, 30).until(lambda d: requests.get(
        f"{env.http_url}/api/studies/{env.reversed}", timeout=10).json()["patient_name"]
        == "FIXED^NAME")
    after = requests.get(f"{env.http_url}/api/studies/{env.reversed}", timeout=10).json()
    assert after["description"] == "Corrected head"
    assert (after["instances"], after["series"]) == (before["instances"], before["series"])
    actions = [h.action for h in env.index.history(env.reversed)]
    assert "study update" in actions


def test_compressed_grayscale_is_exact(browser, env):
    """JPEG-LS lossless frames, decoded by the server to raw pixels, are the pixels pydicom
    decodes, and are drawn."""
    open_viewer(browser, env, env.jls.StudyInstanceUID)
    all_loaded(browser)
    assert canvas(browser)["std"] > 5
    got = js(browser, "Array.from(pacsViewer.viewports[0].series.pixels[0])")
    assert np.array_equal(np.array(got, dtype=np.int16).reshape(64, 64), env.jls.pixel_array)
    assert js(browser, "pacsViewer.viewports[0].series.images[0].rendered") is None
    no_errors(browser)


def test_colour_multiframe_is_drawn(browser, env):
    open_viewer(browser, env, env.rgb.StudyInstanceUID)
    all_loaded(browser)
    assert js(browser, "pacsViewer.total") == 2   # each frame is an image
    first = canvas(browser)
    assert first["std"] > 5
    js(browser, "pacsViewer.setSlice(1)")
    assert canvas(browser)["hash"] != first["hash"]
    assert "frame 2/2" in browser.find_element(By.CSS_SELECTOR, "#viewport-0 .ov.bl").text
    no_errors(browser)


def test_first_image_before_the_series_metadata_stays_in_place(browser, env):
    """The series' first instance (lowest InstanceNumber) is drawn from its own metadata and
    frame; once the series is sorted the viewport shows it at its place, here the first (the
    most superior, as a head-first CT is numbered), and its frame is not fetched again."""
    open_viewer(browser, env, env.reversed)
    all_loaded(browser)
    first = js(browser, "pacsViewer.study().series[0].first_sop")
    assert js(browser, "pacsViewer.viewports[0].index") == 0
    assert js(browser, "pacsViewer.viewports[0].sop") == first
    assert js(browser, "document.querySelector('#viewport-0 input.slice').value") == "0"
    assert "Im: 1 / 5 · #1 · -1.0 mm" in browser.find_element(
        By.CSS_SELECTOR, "#viewport-0 .ov.bl").text
    assert canvas(browser)["std"] > 5
    requests = js(browser, "performance.getEntriesByType('resource').map(e => e.name)")
    assert sum(r.endswith(f"/instances/{first}/frames/1") for r in requests) == 1
    assert sum(r.endswith(f"/instances/{first}/metadata") for r in requests) == 1
    # The other four came in one pixel batch (issue 19), which did not name the first again.
    assert sum(r.endswith("/frames/1") for r in requests) == 1
    assert js(browser, "pacsViewer.loading.batchRequests") == 1
    no_errors(browser)

