"""The pages in the other two browser engines: Firefox (Gecko) and WebKit (Safari's engine,
as WebKitGTK). The full page tests run in Chromium; here one path through every page runs in
each engine: search the study list, open the viewer, see an image, scroll, change the
window, open the admin page."""

from __future__ import annotations

from io import BytesIO

import pytest
from PIL import Image, ImageStat

from conftest import store_files
from data import write_series

# Mean, spread and a hash of the first viewport's canvas, read in the page.
CANVAS = """
const c = document.querySelector('.viewport canvas');
if (!c || !c.width) return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let s = 0, s2 = 0, h = 0;
for (let i = 0; i < d.length; i += 4) { s += d[i]; s2 += d[i] * d[i]; h = (h * 31 + d[i]) | 0; }
const n = d.length / 4;
return [s / n, Math.sqrt(Math.max(0, s2 / n - (s / n) ** 2)), h];
"""


@pytest.fixture
def studies(make_server, tmp_path):
    server = make_server()
    files = write_series(tmp_path / "in", seed=61, patients=2, images=12, size=128)
    assert store_files(server.dicom_port, files) == [0] * len(files)
    return server


@pytest.mark.parametrize("engine", ["firefox", "webkit"])
def test_one_path_through_the_pages(engine, request, studies):
    page = request.getfixturevalue(engine)
    url = studies.http_url
    page.get(url + "/app/")
    page.wait("return document.querySelectorAll('#studies tbody tr[data-uid]').length === 2",
              message="two studies listed")
    page.type("#f-patient", "patient002")
    page.click("#search-btn")
    page.wait("return document.querySelectorAll('#studies tbody tr[data-uid]').length === 1",
              message="the search leaves one study")
    page.click("#studies tbody tr[data-uid] td.patient a")
    page.wait("return location.pathname.endsWith('/app/viewer')", message="the viewer opens")

    page.wait("return window.pacsViewer && window.pacsViewer.ready && "
              "window.pacsViewer.loaded === window.pacsViewer.total && "
              "window.pacsViewer.total === 12", message="the series loaded")
    # Through the pixel batches and their Web Workers (issue 19), in this engine too.
    assert page.js("return window.pacsViewer.loading.batchRequests") >= 1, engine
    mean, spread, first = page.wait(CANVAS, message="the canvas has an image")
    assert spread > 5, f"{engine}: the first image is blank (mean {mean}, spread {spread})"
    # Orientation letters of an axial image (left, right, top, bottom), from its geometry.
    assert page.js("return [...document.querySelectorAll('#viewport-0 .ov.side')]"
                   ".map((e) => e.textContent)") == ["R", "L", "A", "P"]

    # The wheel scrolls (the viewer's own handler, in this engine's event model).
    before = page.js("return window.pacsViewer.viewports[0].index")
    page.js("""document.querySelector('.viewport canvas').dispatchEvent(new WheelEvent('wheel',
               {deltaY: 300, deltaMode: 0, bubbles: true, cancelable: true}));""")
    page.wait(f"return window.pacsViewer.viewports[0].index > {before}",
              message="the wheel moved to another slice")
    page.wait(f"const v = (function() {{ {CANVAS} }})(); return v && v[2] !== {first}",
              message="another slice is drawn")

    # A window preset, clicked.
    shown = page.js(CANVAS)[2]
    page.click("#preset-lung")
    page.wait("const w = window.pacsViewer.viewports[0].window; "
              "return w && w.center === -600 && w.width === 1500", message="lung window set")
    page.wait(f"const v = (function() {{ {CANVAS} }})(); return v && v[2] !== {shown}",
              message="the lung window changes the pixels")
    image = Image.open(BytesIO(page.png())).convert("L")
    assert ImageStat.Stat(image).stddev[0] > 5, f"{engine}: the screenshot is blank"

    page.get(url + "/app/admin")
    page.wait("const el = document.getElementById('stat-instances'); "
              "return el && el.textContent.includes('24')",
              message="the admin page shows the instance count")
