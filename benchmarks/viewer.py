"""The built-in viewer in headless Chromium: time to the first image and to the whole series
loaded for a 300-slice 512x512 CT, and how fast slices are drawn when stepping through it.

    python benchmarks/viewer.py [--images 300] [--size 512] [--screenshots]

pacsd runs as a subprocess on 127.0.0.1 (ports 0); Chromium is Debian's, as in the tests.
Figures come from the page itself (performance.now()): `firstImageMs` (first pixels drawn) and
`allLoadedMs` count from the start of navigation (the page, its scripts and the API calls
included); the scroll rate is measured twice: drawing each slice at once
(`setSlice` + `renderNow`: the cost of windowing and drawing one slice) and paced by
requestAnimationFrame (one slice per display frame: what a user holding a key sees).
With --screenshots, docs/viewer.png (1400x900) shows the viewer: two viewports on a
chest-like phantom, soft tissue and lung windows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, pacsd, store

from data import uid, write_series

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def chromium(workdir: Path, width: int = 1400, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary = next((p for p in CHROMIUM if Path(p).exists()), None)
    driver = next((p for p in CHROMEDRIVER if Path(p).exists()), None)
    if not binary or not driver:
        raise SystemExit("needs Chromium and ChromeDriver "
                         "(apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions",
                 "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={width},{height}",
                 f"--user-data-dir={workdir / 'chromium-profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    # The page itself exactly width x height (a headless window's size includes its frame).
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(300)
    return drv


def wait(drv, expression: str, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:   # bounded
        value = drv.execute_script(f"return ({expression});")
        if value:
            return value
        time.sleep(0.02)
    raise SystemExit(f"{expression} still false after {timeout:.0f} s")


SYNC_SCROLL = """
const v = pacsViewer, n = v.total;
v.setSlice(0); v.renderNow();
const t = performance.now();
for (let i = 1; i < n; i++) { v.setSlice(i); v.renderNow(); }
return {slices: n - 1, ms: performance.now() - t};
"""

RAF_SCROLL = """
const done = arguments[arguments.length - 1], v = pacsViewer, n = v.total;
v.setSlice(0);
requestAnimationFrame(() => {
  const t = performance.now(), d0 = v.draws;
  let i = 1;
  const step = () => {
    if (i >= n) { done({slices: n - 1, draws: v.draws - d0, ms: performance.now() - t}); return; }
    v.setSlice(i++);
    requestAnimationFrame(step);
  };
  step();
});
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3,
                    help="page loads (cold server cache on the first)")
    ap.add_argument("--screenshots", action="store_true", help="write docs/viewer.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsd-bench-viewer-") as tmp:
        work = Path(tmp)
        t = time.monotonic()
        files = write_series(work / "in", seed=42, images=args.images, size=args.size,
                             patient_name="Bench^Viewer", anatomy=args.images)
        print(f"wrote {len(files)} slices {args.size}x{args.size} in {time.monotonic() - t:.1f} s")
        with pacsd(work) as server:
            t = time.monotonic()
            store(server.dicom_port, files)
            print(f"stored in {time.monotonic() - t:.1f} s")
            study = uid(42, 1, 1, "study")
            url = f"{server.http_url}/app/viewer?study={study}"
            drv = chromium(work)
            try:
                for run in range(1, args.runs + 1):
                    drv.get("about:blank")
                    drv.get(url)
                    wait(drv, "window.pacsViewer && pacsViewer.ready", 60)
                    wait(drv, "pacsViewer.total > 0 && pacsViewer.loaded === pacsViewer.total", 300)
                    timing = drv.execute_script("return pacsViewer.timings")
                    print(f"run {run}: first image {timing['firstImageMs']} ms, all "
                          f"{args.images} loaded {timing['allLoadedMs']} ms "
                          f"({args.images / max(timing['allLoadedMs'], 1) * 1000:.0f} slices/s)")
                sync = drv.execute_script(SYNC_SCROLL)
                print(f"scroll, each slice drawn at once: {sync['slices'] / sync['ms'] * 1000:.0f} "
                      f"slices/s ({sync['ms'] / sync['slices']:.2f} ms per slice)")
                paced = drv.execute_async_script(RAF_SCROLL)
                print(f"scroll, one slice per animation frame: "
                      f"{paced['slices'] / paced['ms'] * 1000:.0f} slices/s "
                      f"({paced['draws']} draws for {paced['slices']} slices)")
                if args.screenshots:
                    out = REPO / "docs" / "viewer.png"
                    out.parent.mkdir(exist_ok=True)
                    # Two viewports on the series: soft tissue and, lower down, the lung window.
                    drv.execute_script("""
                        pacsViewer.setSlice(Math.floor(pacsViewer.total / 2), 0);
                        pacsViewer.setLayout(2);
                        pacsViewer.setActive(1);
                        pacsViewer.showSeries(pacsViewer.viewports[0].seriesUid, 1);""")
                    wait(drv, "pacsViewer.viewports[1].series && "
                              "pacsViewer.viewports[1].series.loaded === pacsViewer.total", 60)
                    drv.execute_script("""
                        pacsViewer.setSlice(Math.floor(pacsViewer.total * 0.3), 1);
                        pacsViewer.setPreset('lung');
                        pacsViewer.renderNow();""")
                    drv.save_screenshot(str(out))
                    print(f"wrote {out.relative_to(REPO)}")
            finally:
                drv.quit()


if __name__ == "__main__":
    sys.exit(main())
