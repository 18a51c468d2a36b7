"""The viewer's pixels come in batches (issue 19, item 10), in a real headless Chromium against a
real in-process pacsd: a 120-slice series loads through a handful of requests (counted on the
server, by a spy that wraps the route's function), every slice holds exactly the stored pixels,
scrolling works while batches are still on their way, and a memory cap drops the slices
farthest from the screen and fetches them again when the user comes back.

Speed is not asserted here (benchmarks/viewer.py measures it).
"""

from __future__ import annotations

import threading

import bottle
import numpy as np
import pytest
from pydicom import dcmread
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from conftest import LOCAL, store_files, write_config
from data import uid, write_series
from test_ui_viewer import canvas, js, no_errors, open_viewer, wait

pytestmark = pytest.mark.timeout(180)

SLICES = 120
SIZE = 64
SLICE_BYTES = SIZE * SIZE * 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pacsd import config
    from pacsd.daemon import Server
    tmp = tmp_path_factory.mktemp("batches")
    cfg = config.load(write_config(tmp / "c.toml", tmp / "data", qr_clients=False), env={})
    server = Server(cfg).start()
    files = write_series(tmp / "ct", seed=19, images=SLICES, size=SIZE)
    assert store_files(server.dicom_port, files) == [0] * SLICES
    server.study = uid(19, 1, 1, "study")
    # What each slice must hold: the stored pixels, keyed by SOP Instance UID.
    server.pixels = {str(d.SOPInstanceUID): d.pixel_array for d in map(dcmread, files)}
    yield server
    server.stop()


class Spy:
    """Counts the pixel requests pacsd answers (batches and single frames); with `hold`, holds
    batches of more than `hold` instances until `release()`."""

    def __init__(self, monkeypatch, hold: int | None = None) -> None:
        from pacsd.web import wado_batch, wado_rs
        self.batches: list[list[str]] = []
        self.frames = 0
        self.hold = hold
        self.gate = threading.Event()
        if hold is None:
            self.gate.set()
        real_pixels, real_frames = wado_batch.pixels, wado_rs.frames

        def pixels(rt, study, series):
            named = (bottle.request.query.get("instances") or "").split(",")
            self.batches.append(named)
            if self.hold is not None and len(named) > self.hold:
                self.gate.wait(60)
            return real_pixels(rt, study, series)

        def frames(rt, inst, numbers):
            self.frames += 1
            return real_frames(rt, inst, numbers)
        monkeypatch.setattr(wado_batch, "pixels", pixels)
        monkeypatch.setattr(wado_rs, "frames", frames)

    def release(self) -> None:
        self.gate.set()

    @property
    def named(self) -> list[str]:
        return [u for b in self.batches for u in b]


def slice_pixels(browser, i: int) -> tuple[str, np.ndarray | None]:
    sop, values = browser.execute_script(
        "const s = pacsViewer.viewports[0].series, p = s.pixels[arguments[0]];"
        "return [s.images[arguments[0]].sop, p ? Array.from(p) : null];", i)
    return sop, None if values is None else np.array(values).reshape(SIZE, SIZE)


def test_a_series_loads_in_a_few_batches_with_exact_pixels(browser, env, monkeypatch):
    spy = Spy(monkeypatch)
    open_viewer(browser, env, env.study, timeout=60)
    wait(browser, f"pacsViewer.total === {SLICES} && pacsViewer.loaded === {SLICES}", 90)
    # One frame request (the first image, drawn before the series metadata is read) and a
    # few batches for the other 119, none named twice.
    assert spy.frames == 1
    assert 2 <= len(spy.batches) <= 4, [len(b) for b in spy.batches]
    assert len(spy.named) == len(set(spy.named)) == SLICES - 1
    assert min(map(len, spy.batches)) <= 10   # a small first batch: the slices on screen first
    assert js(browser, "pacsViewer.loading.batchRequests") == len(spy.batches)
    for i in (0, 1, 37, 64, SLICES - 1):
        sop, got = slice_pixels(browser, i)
        assert got is not None and np.array_equal(got, env.pixels[sop]), i
    assert canvas(browser)["std"] > 5
    no_errors(browser)


def test_scrolling_works_while_batches_are_on_their_way(browser, env, monkeypatch):
    spy = Spy(monkeypatch, hold=10)   # the small first batch comes, the big ones wait
    try:
        open_viewer(browser, env, env.study, timeout=60)
        wait(browser, f"pacsViewer.total === {SLICES} && pacsViewer.loaded > 1", 60)
        wait(browser, "pacsViewer.viewports[0].series.batches > 0", 30)   # held on the server
        loaded = js(browser, "pacsViewer.loaded")
        assert 1 < loaded < SLICES
        states = js(browser, "pacsViewer.viewports[0].series.state")
        index = js(browser, "pacsViewer.viewports[0].index")
        # To a loaded neighbour with the keys: it is drawn at once.
        step = 1 if index + 1 < SLICES and states[index + 1] == 2 else -1
        assert states[index + step] == 2
        before = canvas(browser)["hash"]
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.ARROW_DOWN if step == 1 else Keys.ARROW_UP)
        wait(browser, f"pacsViewer.viewports[0].index === {index + step}")
        assert canvas(browser)["hash"] != before
        # To a slice still on its way: the viewport says so, and draws it once it comes.
        far = next(i for i in range(SLICES) if states[i] != 2 and abs(i - index) > 20)
        js(browser, f"pacsViewer.setSlice({far})")
        js(browser, "pacsViewer.renderNow()")
        assert "Loading" in browser.find_element(By.CSS_SELECTOR, "#viewport-0 .msg").text
        assert js(browser, "pacsViewer.loaded") < SLICES
    finally:
        spy.release()
    wait(browser, f"pacsViewer.loaded === {SLICES}", 90)
    js(browser, "pacsViewer.renderNow()")
    assert browser.find_element(By.CSS_SELECTOR, "#viewport-0 .msg").text == ""
    sop, got = slice_pixels(browser, far)
    assert np.array_equal(got, env.pixels[sop])
    assert canvas(browser)["std"] > 5
    no_errors(browser)


def test_a_memory_cap_drops_far_slices_and_fetches_them_again(browser, env, monkeypatch):
    cap = 30 * SLICE_BYTES
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": f"window.pacsdSeriesBytes = {cap};"})
    spy = Spy(monkeypatch)
    open_viewer(browser, env, env.study, timeout=60)
    # Loading stops at the cap, near the slice on screen.
    wait(browser, "pacsViewer.total > 0 && pacsViewer.loaded >= 29 && "
                  "pacsViewer.viewports[0].series.batches === 0", 60)
    assert js(browser, "pacsViewer.loaded") <= 30
    start = js(browser, "pacsViewer.viewports[0].index")
    far = SLICES - 1 if start < SLICES // 2 else 0
    # To the other end: the slices there come, those near the start are dropped.
    js(browser, f"pacsViewer.setSlice({far})")
    wait(browser, f"pacsViewer.viewports[0].series.state[{far}] === 2", 60)
    wait(browser, "pacsViewer.viewports[0].series.batches === 0", 60)
    stats = js(browser, "pacsViewer.loading")
    assert stats["evicted"] > 0 and stats["bytes"] <= cap
    assert js(browser, f"pacsViewer.viewports[0].series.pixels[{start}]") is None
    sop, got = slice_pixels(browser, far)
    assert np.array_equal(got, env.pixels[sop])
    # And back: fetched again, the same pixels.
    js(browser, f"pacsViewer.setSlice({start})")
    wait(browser, f"pacsViewer.viewports[0].series.state[{start}] === 2", 60)
    sop, got = slice_pixels(browser, start)
    assert np.array_equal(got, env.pixels[sop])
    assert js(browser, "pacsViewer.loading.bytes") <= cap
    assert len(spy.named) > SLICES - 1 - 60   # some slices were asked for twice, by design
    no_errors(browser)
