"""The viewer's slice order and reading tools in a real headless Chromium, against a real pacsd
on port 0 holding a CT volume of known geometry (tests/data_volume.py) stored by C-STORE:
head-first opening and wheel direction, the Instance Number shown, orientation letters, the
value under the cursor in HU, the elliptical ROI and the angle, linked scrolling and reference
lines in 1x2, and the link to an image. Expected figures are computed here in plain Python
from the stored datasets, not by the page's code.
"""

from __future__ import annotations

import math
import struct
from urllib.parse import parse_qs, urlparse

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By

from conftest import LOCAL, browser_errors, store_files, write_config
from data_volume import SLICES, XY, Z, Z_TOP, Volume, write_volume
from pagejs import js, wait

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pacsd import config
    from pacsd.daemon.server import Server
    tmp = tmp_path_factory.mktemp("viewer-tools")
    cfg = config.load(write_config(tmp / "c.toml", tmp / "data", qr_clients=False), env={})
    server = Server(cfg).start()
    vol = write_volume(tmp / "vol")
    assert store_files(server.dicom_port, vol.files) == [0] * len(vol.files)
    server.vol = vol
    yield server
    server.stop()


# --- helpers ----------------------------------------------------------------------------------

def open_series(browser, env, name: str, extra: str = "") -> None:
    vol: Volume = env.vol
    browser.get(f"{env.http_url}/app/viewer?study={vol.study}&series={vol.series[name]}{extra}")
    wait(browser, "window.pacsViewer && pacsViewer.ready && pacsViewer.total > 0 && "
                  "pacsViewer.loaded === pacsViewer.total", 30)


def text(browser, selector: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, selector).text


def no_errors(browser) -> None:
    errors = browser_errors(browser)
    assert not errors, errors


def hu(ds) -> list[float]:
    """The modality values of a stored slice, row by row, without numpy (PS3.3 C.11.1.1.2)."""
    n = ds.Rows * ds.Columns
    raw = struct.unpack(f"<{n}H", ds.PixelData[:2 * n])
    mask = (1 << ds.BitsStored) - 1
    return [(v & mask) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in raw]


def stored(env, name: str, browser, n: int = 0):
    """The dataset shown in viewport n, found by its SOP Instance UID."""
    sop = js(browser, f"pacsViewer.viewports[{n}].sop")
    return next(ds for ds in env.vol.stored[name] if ds.SOPInstanceUID == sop)


def canvas_offset(browser, x: float, y: float, n: int = 0) -> tuple[int, int]:
    """The offset from viewport n's canvas centre (what Selenium moves to) of image point x, y."""
    sx, sy = js(browser, f"pacsViewer.viewports[{n}].toScreen([{x}, {y}])")
    w, h = js(browser, f"[pacsViewer.viewports[{n}].cssW, pacsViewer.viewports[{n}].cssH]")
    return round(sx - w / 2), round(sy - h / 2)


def wheel(browser, notches: int, n: int = 0) -> None:
    cv = browser.find_element(By.CSS_SELECTOR, f"#viewport-{n} canvas")
    for _ in range(abs(notches)):
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(cv), 0,
                                                 120 if notches > 0 else -120).perform()


# --- item 8: slices as radiologists number and scroll them -------------------------------------

def test_an_axial_ct_opens_at_the_head_and_the_wheel_goes_to_the_feet(browser, env):
    open_series(browser, env, "axial")
    bl = "#viewport-0 .ov.bl"
    assert js(browser, "pacsViewer.viewports[0].index") == 0
    # The most superior slice (highest z), which the scanner numbered 1.
    assert js(browser, "pacsViewer.viewports[0].image.pos") == Z_TOP
    assert stored(env, "axial", browser).InstanceNumber == 1
    assert f"Im: 1 / {SLICES} · #1 · {Z_TOP:.1f} mm" in text(browser, bl)
    wheel(browser, 1)   # one notch down: one slice towards the feet
    wait(browser, "pacsViewer.viewports[0].index === 1")
    assert js(browser, "pacsViewer.viewports[0].image.pos") == Z_TOP - Z
    assert f"Im: 2 / {SLICES} · #2 · {Z_TOP - Z:.1f} mm" in text(browser, bl)
    wheel(browser, 3)
    wait(browser, "pacsViewer.viewports[0].index === 4")
    # Im and the Instance Number agree all the way (Im 101 was instance 100).
    assert stored(env, "axial", browser).InstanceNumber == 5
    assert f"Im: 5 / {SLICES} · #5 · " in text(browser, bl)
    wheel(browser, -1)   # up: towards the head
    wait(browser, "pacsViewer.viewports[0].index === 3")
    no_errors(browser)


def test_sagittal_opens_at_the_right_and_coronal_at_the_front(browser, env):
    """Sagittal stacks read from the patient's right to the left, coronal from anterior to
    posterior, whatever their Instance Numbers (the sagittal's run the other way)."""
    open_series(browser, env, "sagittal")
    xs = [float(ds.ImagePositionPatient[0]) for ds in env.vol.stored["sagittal"]]
    assert js(browser, "pacsViewer.viewports[0].series.images.map(i => i.ipp[0])") == sorted(xs)
    assert js(browser, "pacsViewer.viewports[0].image.pos") == min(xs)   # most right (-x)
    assert stored(env, "sagittal", browser).InstanceNumber == len(xs)
    wheel(browser, 1)
    wait(browser, "pacsViewer.viewports[0].index === 1")
    assert js(browser, "pacsViewer.viewports[0].image.pos") == sorted(xs)[1]   # to the left
    open_series(browser, env, "coronal")
    ys = [float(ds.ImagePositionPatient[1]) for ds in env.vol.stored["coronal"]]
    assert js(browser, "pacsViewer.viewports[0].series.images.map(i => i.ipp[1])") == sorted(ys)
    no_errors(browser)


# --- item 9: everyday tools ---------------------------------------------------------------------

def letters(browser, n: int = 0) -> dict[str, str]:
    return {side: text(browser, f"#viewport-{n} .ov.{side}")
            for side in ("left", "right", "top", "bottom")}


def test_orientation_letters(browser, env):
    open_series(browser, env, "axial")
    assert letters(browser) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    open_series(browser, env, "sagittal")
    assert letters(browser) == {"left": "A", "right": "P", "top": "H", "bottom": "F"}
    open_series(browser, env, "coronal")
    assert letters(browser) == {"left": "R", "right": "L", "top": "H", "bottom": "F"}
    # Obliques get two letters, the larger component first: an axial tilted 30° about x, and a
    # coronal turned 20° about z; a 5° tilt keeps one letter.
    c30, s30 = math.cos(math.radians(30)), math.sin(math.radians(30))
    c20, s20 = math.cos(math.radians(20)), math.sin(math.radians(20))
    c5, s5 = math.cos(math.radians(5)), math.sin(math.radians(5))
    got = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('./static/viewer-geometry.js').then((g) => done(arguments[0].map(g.sideLetters)));
    """, [[1, 0, 0, 0, c30, -s30], [c20, s20, 0, 0, 0, -1], [1, 0, 0, 0, c5, -s5]])
    assert got == [
        {"left": "R", "right": "L", "top": "AH", "bottom": "PF"},
        {"left": "RA", "right": "LP", "top": "H", "bottom": "F"},
        {"left": "R", "right": "L", "top": "A", "bottom": "P"},
    ]
    no_errors(browser)


def hover_value(browser, env, name: str, col: int, row: int) -> tuple[str, float]:
    cv = browser.find_element(By.CSS_SELECTOR, "#viewport-0 canvas")
    ActionChains(browser).move_to_element_with_offset(
        cv, *canvas_offset(browser, col + 0.5, row + 0.5)).perform()
    wait(browser, f"(pacsViewer.viewports[0].probe || [])[0] >= {col} && "
                  f"pacsViewer.viewports[0].probe[0] < {col + 1} && "
                  f"pacsViewer.viewports[0].probe[1] >= {row} && "
                  f"pacsViewer.viewports[0].probe[1] < {row + 1}")
    ds = stored(env, name, browser)
    return text(browser, "#viewport-0 .ov.bl"), hu(ds)[row * ds.Columns + col]


def test_pixel_value_under_the_cursor_in_hounsfield_units(browser, env):
    open_series(browser, env, "axial")
    js(browser, "pacsViewer.setSlice(20)")
    shown, value = hover_value(browser, env, "axial", 30, 47)   # in the right lung
    assert value < -500
    assert f"Val: {value:.0f} HU  (30, 47)" in shown
    # The coronal series is stored with RescaleSlope 2, Intercept -2048.
    open_series(browser, env, "coronal")
    js(browser, "pacsViewer.setSlice(8)")
    shown, value = hover_value(browser, env, "coronal", 48, 20)
    assert stored(env, "coronal", browser).RescaleSlope == 2
    assert f"Val: {value:.0f} HU  (48, 20)" in shown
    no_errors(browser)


def drag(browser, n: int, start: tuple[int, int], end: tuple[int, int]) -> None:
    cv = browser.find_element(By.CSS_SELECTOR, f"#viewport-{n} canvas")
    chain = ActionChains(browser, duration=20).move_to_element_with_offset(cv, *start)
    chain.click_and_hold()
    for k in range(1, 6):
        chain.move_to_element_with_offset(cv, start[0] + (end[0] - start[0]) * k // 5,
                                          start[1] + (end[1] - start[1]) * k // 5)
    chain.release().perform()


def test_elliptical_roi_mean_sd_and_area(browser, env):
    open_series(browser, env, "axial")
    js(browser, "pacsViewer.setSlice(12)")
    browser.find_element(By.ID, "tool-ellipse").click()
    drag(browser, 0, canvas_offset(browser, 20.2, 30.7), canvas_offset(browser, 41.6, 58.3))
    m = js(browser, "pacsViewer.viewports[0].measurements.map(m => "
                    "({kind: m.kind, a: m.a, b: m.b, stats: m.stats, text: m.text}))")
    assert len(m) == 1 and m[0]["kind"] == "ellipse"
    (ax, ay), (bx, by) = m[0]["a"], m[0]["b"]
    # Pixels whose centres lie inside the ellipse, in plain Python.
    ds = stored(env, "axial", browser)
    values = hu(ds)
    cx, cy, rx, ry = (ax + bx) / 2, (ay + by) / 2, abs(bx - ax) / 2, abs(by - ay) / 2
    inside = [values[r * ds.Columns + c] for r in range(ds.Rows) for c in range(ds.Columns)
              if ((c + 0.5 - cx) / rx) ** 2 + ((r + 0.5 - cy) / ry) ** 2 <= 1]
    mean = sum(inside) / len(inside)
    sd = math.sqrt(sum((v - mean) ** 2 for v in inside) / len(inside))
    area = math.pi * rx * ry * XY * XY
    stats = m[0]["stats"]
    assert stats["n"] == len(inside) > 100
    assert stats["mean"] == pytest.approx(mean, abs=1e-6)
    assert stats["sd"] == pytest.approx(sd, abs=1e-6)
    assert stats["area"] == pytest.approx(area, rel=1e-9)
    assert area == pytest.approx(math.pi * 10.7 * 13.8 * 4, rel=0.05)   # the box drawn, in mm²
    shown = f"ROI: {mean:.1f} ± {sd:.1f} HU · {area:.1f} mm²"
    assert shown in text(browser, "#viewport-0 .ov.bl")
    no_errors(browser)


def test_angle_tool(browser, env):
    open_series(browser, env, "axial")
    browser.find_element(By.ID, "tool-angle").click()
    cv = browser.find_element(By.CSS_SELECTOR, "#viewport-0 canvas")
    # Click, click (the vertex), click: a right angle.
    for point in ((-150, 0), (0, 0), (0, -150)):
        ActionChains(browser, duration=20).move_to_element_with_offset(cv, *point).click().perform()
    # Drag the first arm, then click the end of the second: 45°.
    drag(browser, 0, (-150, 100), (0, 100))
    ActionChains(browser, duration=20).move_to_element_with_offset(cv, 150, -50).click().perform()
    m = js(browser, "pacsViewer.viewports[0].measurements.map(m => "
                    "({kind: m.kind, pts: m.pts, degrees: m.degrees, text: m.text}))")
    assert [x["kind"] for x in m] == ["angle", "angle"]

    def angle(pts):   # at pts[1], in mm (square pixels here, XY both ways)
        u = [(pts[0][0] - pts[1][0]) * XY, (pts[0][1] - pts[1][1]) * XY]
        v = [(pts[2][0] - pts[1][0]) * XY, (pts[2][1] - pts[1][1]) * XY]
        return math.degrees(math.acos((u[0] * v[0] + u[1] * v[1]) /
                                      (math.hypot(*u) * math.hypot(*v))))
    for got, drawn in zip(m, (90, 180 - 45)):
        assert len(got["pts"]) == 3
        assert got["degrees"] == pytest.approx(angle(got["pts"]), abs=1e-6)
        assert got["degrees"] == pytest.approx(drawn, abs=1.5)
    assert f"Angle: {m[1]['degrees']:.1f}°" in text(browser, "#viewport-0 .ov.bl")
    no_errors(browser)


def test_linked_scrolling_and_reference_lines_in_1x2(browser, env):
    vol: Volume = env.vol
    open_series(browser, env, "axial")
    browser.find_element(By.ID, "layout-2").click()   # the next series: the 5 mm axial one
    wait(browser, f"pacsViewer.viewports[1].seriesUid === '{vol.series['thick']}' && "
                  "pacsViewer.viewports[1].series.loaded === 20")
    # Not linked at first: the other viewport stays.
    wheel(browser, 2)
    wait(browser, "pacsViewer.viewports[0].index === 2")
    assert js(browser, "pacsViewer.viewports[1].index") == 0
    browser.find_element(By.ID, "btn-link").click()
    assert js(browser, "pacsViewer.linked") is True
    wheel(browser, 2)   # z 50 - 4 * 2.5 = 40: the 5 mm series' third slice
    wait(browser, "pacsViewer.viewports[0].index === 4")
    wait(browser, "pacsViewer.viewports[1].image.pos === 40")
    wheel(browser, 1, n=1)   # and the other way: 35 mm in the thick series, 35 mm in the thin
    wait(browser, "pacsViewer.viewports[1].image.pos === 35")
    wait(browser, "pacsViewer.viewports[0].image.pos === 35")
    # Parallel planes: no reference line.
    assert js(browser, "pacsViewer.viewports[1].refLine") is None
    # Axial beside coronal: the planes cross; the coronal does not scroll, each shows a line.
    js(browser, f"pacsViewer.showSeries('{vol.series['coronal']}', 1)")
    wait(browser, "pacsViewer.viewports[1].series.loaded === pacsViewer.viewports[1].count && "
                  "pacsViewer.viewports[1].count === 16 && pacsViewer.viewports[1].refLine")
    z = js(browser, "pacsViewer.viewports[0].image.pos")
    row = (Z_TOP - z) / Z + 0.5   # coronal rows run down from Z_TOP, Z apart (pixel centres)
    line = js(browser, "pacsViewer.viewports[1].refLine")
    assert sorted(line) == [[0, pytest.approx(row)], [96, pytest.approx(row)]]
    coronal_y = float(stored(env, "coronal", browser, n=1).ImagePositionPatient[1])
    line0 = js(browser, "pacsViewer.viewports[0].refLine")
    axial_row = (coronal_y - (-96.0)) / XY + 0.5
    assert sorted(line0) == [[0, pytest.approx(axial_row)], [96, pytest.approx(axial_row)]]
    before = js(browser, "pacsViewer.viewports[1].index")
    wheel(browser, 2)
    wait(browser, f"pacsViewer.viewports[0].image.pos < {z}")
    row = (Z_TOP - js(browser, "pacsViewer.viewports[0].image.pos")) / Z + 0.5
    wait(browser, f"Math.abs(pacsViewer.viewports[1].refLine[0][1] - {row}) < 1e-6")
    assert js(browser, "pacsViewer.viewports[1].index") == before
    # The line is drawn: cyan pixels along it on the coronal canvas.
    js(browser, "pacsViewer.renderNow()")
    cyan = browser.execute_script("""
        const v = pacsViewer.viewports[1], c = v.canvas, d = v.dpr;
        let hits = 0;
        for (let x = 2; x < 94; x += 1) {
          const [sx, sy] = v.toScreen([x, v.refLine[0][1]]);
          const p = c.getContext('2d').getImageData(Math.round(sx * d), Math.round(sy * d), 1, 1).data;
          if (p[2] > 180 && p[0] < 150) hits++;
        }
        return hits;""")
    assert cyan > 30
    browser.find_element(By.ID, "layout-1").click()
    assert js(browser, "pacsViewer.viewports[0].refLine") is None
    no_errors(browser)


def test_copy_link_to_this_image(browser, env):
    vol: Volume = env.vol
    open_series(browser, env, "sagittal")
    js(browser, "pacsViewer.setSlice(5)")
    sop = js(browser, "pacsViewer.viewports[0].sop")
    browser.find_element(By.ID, "btn-copy-link").click()
    link = wait(browser, "pacsViewer.lastLink")
    url = urlparse(link)
    assert f"{url.scheme}://{url.netloc}" == env.http_url and url.path == "/app/viewer"
    assert parse_qs(url.query) == {"study": [vol.study], "series": [vol.series["sagittal"]],
                                   "instance": [sop]}
    # Loopback is a secure context: the clipboard takes it (after the click, a user gesture).
    wait(browser, f"document.getElementById('toast').textContent === {'Link copied: ' + link!r}")
    # A fresh browser page at that address shows that image.
    browser.get(link)
    wait(browser, f"window.pacsViewer && pacsViewer.ready && pacsViewer.viewports[0].sop === '{sop}'")
    assert js(browser, "pacsViewer.viewports[0].index") == 5
    assert "Im: 6 / 16" in text(browser, "#viewport-0 .ov.bl")
    no_errors(browser)


def test_a_link_to_an_unknown_image_opens_the_series(browser, env):
    """Attack: the instance parameter is free text in the address; it is only compared."""
    vol: Volume = env.vol
    bad = "1.2.3'\"><img src=x onerror=alert(1)>"
    open_series(browser, env, "axial", "&instance=" + bad.replace("&", "%26") + "&frame=-7")
    wait(browser, "document.getElementById('toast').textContent.includes('not in this series')")
    assert js(browser, "pacsViewer.viewports[0].index") == 0
    assert not browser.find_elements(By.CSS_SELECTOR, "#toast img")
    assert js(browser, "pacsViewer.viewports[0].seriesUid") == vol.series["axial"]
    assert browser.current_url.startswith(f"http://{LOCAL}") or "localhost" in browser.current_url
    no_errors(browser)
