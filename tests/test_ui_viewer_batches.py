"""The viewer's pixels come in batches (issue 19, item 10), in a real headless Chromium against a
real in-process pacsd: a 120-slice series loads through a handful of requests (counted on the
server, by a spy that wraps the route's function), every slice holds exactly the stored pixels,
scrolling works while batches are still on their way, and a memory cap drops the slices
farthest from the screen and fetches them again when the user comes back. The multipart cutter
the pixel worker uses is fed every way a body can be split into chunks, and slices whose bits
above BitsStored carry garbage are drawn and read as their clean twins (the viewer masks them
where it reads a value, not in a pass over every slice).

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
from data import ct_slice, uid, write_series
from test_ui_viewer import canvas, js, no_errors, open_viewer, wait

pytestmark = pytest.mark.timeout(180)

SLICES = 120
SIZE = 64
SLICE_BYTES = SIZE * SIZE * 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pacsd import config
    from pacsd.daemon.server import Server
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


# --- the multipart cutter (viewer-multipart.js), every way a body can arrive ----------------------

CUT = r"""
const done = arguments[arguments.length - 1];
(async () => {
  const { cutter } = await import(new URL("static/viewer-multipart.js", location.href).href);
  const enc = (t) => new TextEncoder().encode(t);
  const B = "pacsd-b0undary";
  // Parts: empty, one byte, bodies holding the delimiter itself (cut by their length), a body
  // without Content-Length (cut at the delimiter), a big one; a preamble before the first.
  let seed = 7;
  const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
  const specs = [[0, true], [1, true], [300, true], [5000, true], [37, false], [70000, true],
                 [2, false], [4097, true]];
  const pieces = [enc("a preamble to skip\r\n--" + B)], want = [];
  specs.forEach(([size, withLength], k) => {
    const body = new Uint8Array(size);
    for (let i = 0; i < size; i++) body[i] = Math.floor(rnd() * 256);
    if (withLength && size > 40) body.set(enc("\r\n--" + B + "\r\n\r\n"), 10);
    if (!withLength) body.fill(65);
    const head = "\r\nContent-Type: application/octet-stream\r\n" +
      `Content-Location: http://h/dicom-web/studies/1/series/2/instances/1.2.${k}/frames/${k + 1}` +
      (withLength ? `\r\nContent-Length: ${size}` : "") + "\r\n\r\n";
    pieces.push(enc(head), body, enc("\r\n--" + B));
    want.push({ sop: "1.2." + k, n: k + 1, body });
  });
  pieces.push(enc("--\r\n"));
  const total = pieces.reduce((a, p) => a + p.length, 0), whole = new Uint8Array(total);
  let at = 0;
  for (const p of pieces) { whole.set(p, at); at += p.length; }
  const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
  const run = (sizes) => {
    const got = [];
    const cut = cutter(B, (part, buffer) => got.push({ sop: part.sop, n: part.n, body: new Uint8Array(buffer) }));
    let i = 0, k = 0;
    while (i < whole.length && !cut.ended) {
      const n = sizes[k++ % sizes.length];
      cut.feed(whole.slice(i, i + n));   // a chunk of its own, as a stream gives it
      i += n;
    }
    const ok = cut.ended && got.length === want.length &&
      got.every((g, j) => g.sop === want[j].sop && g.n === want[j].n && same(g.body, want[j].body));
    return ok ? null : { sizes: sizes.slice(0, 4), parts: got.length, ended: cut.ended };
  };
  const failures = [];
  for (let n = 1; n <= 70; n++) { const f = run([n]); if (f) failures.push(f); }
  for (const n of [4095, 4096, 4097, 65536, 65537, total]) { const f = run([n]); if (f) failures.push(f); }
  for (let r = 0; r < 40; r++) {
    const sizes = Array.from({ length: 50 }, () => 1 + Math.floor(rnd() * (r % 2 ? 9000 : 40)));
    const f = run(sizes); if (f) failures.push(f);
  }
  // What is not a batch is refused, not cut wrong: a part longer than its Content-Length, and
  // part headers that never end.
  const refused = [];
  for (const bad of [
      "--" + B + "\r\nContent-Length: 3\r\n\r\nabcdef\r\n--" + B + "--",
      "--" + B + "\r\n" + "X-Padding: y\r\n".repeat(6000)]) {
    try { cutter(B, () => {}).feed(enc(bad)); refused.push(null); }
    catch (e) { refused.push(String(e.message)); }
  }
  done({ failures, refused, runs: 70 + 6 + 40 });
})().catch((e) => done({ error: String(e) }));
"""


def test_the_multipart_cutter_cuts_every_split_of_a_body_exactly(browser, env):
    open_viewer(browser, env, env.study, timeout=60)
    got = browser.execute_async_script(CUT)
    assert "error" not in got, got
    assert got["runs"] == 116 and got["failures"] == [], got["failures"][:3]
    assert got["refused"][0] and "Content-Length" in got["refused"][0], got["refused"]
    assert got["refused"][1] and "headers" in got["refused"][1], got["refused"]


# --- bits above BitsStored ---------------------------------------------------------------------

def _twins(folder, signed: bool) -> tuple[list, list]:
    """Six 48x48 slices twice, the same pixels: clean, and with garbage in the 4 bits above
    BitsStored (12), as overlays in the high bits once were. No window in the header: the
    default one comes from the slice's range, which must ignore the garbage too."""
    rng = np.random.default_rng(23)
    clean_files, dirty_files = [], []
    for n in range(1, 7):
        v = None
        for dirty, files in ((False, clean_files), (True, dirty_files)):
            ds = ct_slice(seed=190 + signed, patient=1 + dirty, study=1, series=1, number=n,
                          size=48)
            del ds.WindowCenter, ds.WindowWidth
            if v is None:   # the clean twin's stored values
                v = np.frombuffer(ds.PixelData, np.uint16).astype(np.int32)
                if signed:
                    v = np.clip(v - 2048, -2048, 2047)
            if signed:
                ds.PixelRepresentation = 1
                ds.RescaleIntercept = 0
            raw = v.astype(np.int16).view(np.uint16) if signed else v.astype(np.uint16)
            if dirty:
                garbage = rng.integers(0, 16, raw.shape, dtype=np.uint16) << 12
                raw = (raw & 0x0FFF) | garbage
            ds.PixelData = raw.astype(np.uint16).tobytes()
            path = folder / f"{'dirty' if dirty else 'clean'}{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return clean_files, dirty_files


SHOWN = r"""
const done = arguments[arguments.length - 1], [i] = arguments;
(async () => {
  const { pixelValue } = await import(new URL("static/viewer-tools.js", location.href).href);
  const v = pacsViewer.viewports[0];
  v.setIndex(i); pacsViewer.renderNow();
  const px = v.series.pixelsAt(i), img = v.image;
  const values = [[3, 4], [20, 20], [40, 11], [47, 47]].map(([x, y]) => pixelValue(img, px, x + 0.5, y + 0.5).value);
  const c = document.querySelector(".viewport canvas");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let h = 2166136261;
  for (let k = 0; k < d.length; k += 4) h = Math.imul(h ^ d[k], 16777619) >>> 0;
  done({ hash: h, values, window: v.window, sop: img.sop });
})().catch((e) => done({ error: String(e) }));
"""


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_garbage_above_bits_stored_is_drawn_and_read_as_its_clean_twin(browser, env, tmp_path,
                                                                      signed):
    clean, dirty = _twins(tmp_path, signed)
    assert store_files(env.dicom_port, clean + dirty) == [0] * 12
    shown = {}
    for name, files in (("clean", clean), ("dirty", dirty)):
        study = str(dcmread(files[0]).StudyInstanceUID)
        open_viewer(browser, env, study, timeout=60)
        wait(browser, "pacsViewer.total === 6 && pacsViewer.loaded === 6", 60)
        # Slice 0 came alone (the first image); the others in a batch through the worker.
        shown[name] = [browser.execute_async_script(SHOWN, i) for i in (0, 3, 5)]
        assert all("error" not in s for s in shown[name]), shown[name]
    for c, d in zip(shown["clean"], shown["dirty"]):
        assert d["window"] == c["window"]
        assert d["values"] == c["values"]
        assert d["hash"] == c["hash"]
    # The values are the clean stored ones: the test would pass on two blank canvases otherwise.
    by_sop = {str(x.SOPInstanceUID): x for x in map(dcmread, clean)}
    for c in shown["clean"]:
        ds = by_sop[c["sop"]]
        arr = np.frombuffer(ds.PixelData, np.int16 if signed else np.uint16).reshape(48, 48)
        assert c["values"][1] == float(arr[20, 20]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert len({c["hash"] for c in shown["clean"]}) == 3
    no_errors(browser)
