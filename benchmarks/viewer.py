"""The built-in viewer in headless Chromium: time to the first image and to the whole series
loaded for a 1,000-slice 512x512 16-bit CT, slices/s, peak JS heap, and how fast slices are
drawn when stepping through it; side by side with another commit's pacsd (--compare-with, the
one-request-per-frame viewer before the batches) and with OHIF against pacsd (--ohif).

    python benchmarks/viewer.py [--images 1000] [--size 512] [--runs 3]
                                [--compare-with 62d75c5] [--ohif DIST] [--cache DIR]
                                [--screenshots]

pacsd runs as a subprocess on 127.0.0.1 (ports 0); Chromium is Debian's, as in the tests, on the
same cores as the server, a fresh one for each pacsd and for OHIF. The series is generated here (pydicom + numpy, deterministic), never
committed; --cache keeps it between runs. Figures come from the page itself
(performance.now()): `firstImageMs` (first pixels drawn) and `allLoadedMs` count from the start
of navigation (the page, its scripts and the API calls included). Requests are counted from the
page's counters (pacsViewer.loading: batch requests made by its workers) plus the page's own
resource timing entries (frames fetched one at a time). The JS heap is Chromium's
performance.memory (the page's heap; a worker's is its own and not counted), sampled every
50 ms while loading. The scroll rate is measured twice: drawing each slice at once (`setSlice`
+ `renderNow`) and paced by requestAnimationFrame (one slice per display frame).

OHIF: --ohif DIST serves a built OHIF v3 (the `dist` folder of the npm package @ohif/app,
`npm pack @ohif/app`) from a local static server with a data source pointing at this pacsd
(CORS allowed for it) and opens the same series; its figures come from resource timing: first
and last frame responses (OHIF's own loader fetches one frame per request). Without --ohif the
script says that OHIF was not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import LOCAL, REPO, pacsd, store

from data import ct_slice, uid

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
SEED = 42
CAVEAT = ("the machine may be shared: quote the ratios of one run, not absolute times; "
          "the browser runs on the same cores as pacsd")


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
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--enable-precise-memory-info",
                 # A page left for about:blank is not kept alive (and working) in the
                 # back-forward cache while the next run is measured.
                 "--disable-features=BackForwardCache",
                 f"--window-size={width},{height}",
                 f"--user-data-dir={workdir / 'chromium-profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    # The page itself exactly width x height (a headless window's size includes its frame).
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    # Resource timing keeps 250 entries unless told otherwise; OHIF makes one per frame.
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "performance.setResourceTimingBufferSize(100000);"
        "window.__heap = 0; setInterval(() => { const m = performance.memory;"
        " if (m) window.__heap = Math.max(window.__heap, m.usedJSHeapSize); }, 50);")})
    drv.set_page_load_timeout(120)
    drv.set_script_timeout(300)
    return drv


@contextlib.contextmanager
def browser(work: Path):
    """A fresh Chromium (its own profile folder), quit on the way out."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=work))
    drv = chromium(profile)
    try:
        yield drv
    finally:
        drv.quit()


def wait(drv, expression: str, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:   # bounded
        value = drv.execute_script(f"return ({expression});")
        if value:
            return value
        time.sleep(0.02)
    raise SystemExit(f"{expression} still false after {timeout:.0f} s")


def write_series(folder: Path, images: int, size: int) -> list[Path]:
    """The CT series: a disc of soft tissue in air with noise, one file per slice, along z."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(1, images + 1):
        path = folder / f"i{n:04d}.dcm"
        if not path.exists():
            ds = ct_slice(seed=SEED, patient=1, study=1, series=1, number=n, size=size,
                          patient_name="Bench^Viewer")
            ds.ImagePositionPatient = [0, 0, -float(n)]
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


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

REQUESTS = """
const frames = performance.getEntriesByType('resource')
  .filter(e => /\\/frames\\/\\d+$/.test(e.name)).length;
const l = pacsViewer.loading || {batchRequests: 0};
return {frames: frames, batches: l.batchRequests, evicted: l.evicted || 0, heap: window.__heap,
        metadata: l.metadataMs};
"""


def pacsd_viewer(drv, url: str, images: int, runs: int, label: str) -> list[dict]:
    out = []
    for run in range(1, runs + 1):
        drv.get("about:blank")
        drv.get(url)
        wait(drv, "window.pacsViewer && pacsViewer.ready", 120)
        wait(drv, "pacsViewer.total > 0 && pacsViewer.loaded === pacsViewer.total", 600)
        timing = drv.execute_script("return pacsViewer.timings")
        req = drv.execute_script(REQUESTS)
        fig = {"first": timing["firstImageMs"], "all": timing["allLoadedMs"],
               "requests": req["frames"] + req["batches"], "heap": req["heap"],
               "metadata": req.get("metadata")}
        fig["rate"] = images / max(fig["all"], 1) * 1000
        out.append(fig)
        sorted_at = (f", series metadata in at {fig['metadata']} ms"
                     if fig["metadata"] is not None else "")
        print(f"{label} run {run}: first image {fig['first']} ms{sorted_at}, all {images} loaded "
              f"{fig['all']} ms ({fig['rate']:.0f} slices/s), {fig['requests']} pixel requests, "
              f"peak JS heap {fig['heap'] / 2**20:.0f} MiB", flush=True)
    return out


def scroll(drv) -> None:
    sync = drv.execute_script(SYNC_SCROLL)
    print(f"  scroll, each slice drawn at once: {sync['slices'] / sync['ms'] * 1000:.0f} "
          f"slices/s ({sync['ms'] / sync['slices']:.2f} ms per slice)")
    paced = drv.execute_async_script(RAF_SCROLL)
    print(f"  scroll, one slice per animation frame: "
          f"{paced['slices'] / paced['ms'] * 1000:.0f} slices/s "
          f"({paced['draws']} draws for {paced['slices']} slices)")


def checkout(commit: str, where: Path) -> Path:
    """The source tree of `commit` (git archive), to run its pacsd."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "pacsd"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


# --- OHIF ---------------------------------------------------------------------------------------

OHIF_CONFIG = """window.config = {
  routerBasename: '/', showStudyList: false, extensions: [], modes: [],
  maxNumberOfWebWorkers: 2, showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false, strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'pacsd',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'pacsd',
    configuration: {
      friendlyName: 'pacsd', name: 'pacsd',
      wadoUriRoot: '%(dw)s', qidoRoot: '%(dw)s', wadoRoot: '%(dw)s',
      qidoSupportsIncludeField: true, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      staticWado: false, singlepart: false, omitQuotationForMultipartRequest: true,
      bulkDataURI: {enabled: true},
    },
  }],
};
"""


class OhifHandler(http.server.SimpleHTTPRequestHandler):
    """OHIF's files; any other path is its single page (index.html), as its _redirects says."""

    def log_message(self, *args) -> None:   # quiet
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        path = Path(self.translate_path(self.path))
        if not path.exists():
            self.path = "/index.html"
        return super().send_head()


def serve_ohif(dist: Path, work: Path) -> tuple[Path, http.server.HTTPServer]:
    """OHIF's built files (a folder, or the npm tarball unpacked) on a local port."""
    root = dist
    if not dist.is_dir():
        with tarfile.open(dist) as tar:
            tar.extractall(work / "ohif-pkg", filter="data")
        root = work / "ohif-pkg" / "package" / "dist"
    httpd = http.server.ThreadingHTTPServer(
        (LOCAL, 0), functools.partial(OhifHandler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return root, httpd


OHIF_PROGRESS = """
const fr = performance.getEntriesByType('resource').filter(e => /\\/frames\\/\\d+/.test(e.name));
const ends = fr.map(e => e.responseEnd).sort((a, b) => a - b);
return {n: fr.length, first: ends.length ? ends[0] : null,
        last: ends.length ? ends[ends.length - 1] : null,
        heap: window.__heap};
"""


def ohif(drv, base: str, study: str, images: int, runs: int) -> None:
    for run in range(1, runs + 1):
        drv.get("about:blank")
        drv.get(f"{base}/viewer?StudyInstanceUIDs={study}")
        deadline, last, still = time.monotonic() + 180, -1, 0
        p = {"n": 0}
        while time.monotonic() < deadline:   # until every frame arrived, or 5 s without one
            p = drv.execute_script(OHIF_PROGRESS)
            if p["n"] >= images:
                break
            still = still + 1 if p["n"] == last else 0
            last = p["n"]
            if p["n"] and still > 100:
                break
            time.sleep(0.05)
        if not p["n"]:
            print(f"OHIF run {run}: no frame requested within 180 s (OHIF did not open the "
                  "series against pacsd here)")
            return
        print(f"OHIF run {run}: first frame received {p['first']:.0f} ms, {p['n']} of {images} "
              f"frames received at {p['last']:.0f} ms "
              f"({p['n'] / max(p['last'], 1) * 1000:.0f} slices/s), {p['n']} pixel requests, "
              f"peak JS heap {p['heap'] / 2**20:.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3,
                    help="page loads (cold server cache on the first)")
    ap.add_argument("--compare-with", metavar="COMMIT",
                    help="also run this commit's pacsd on the same series (e.g. 62d75c5)")
    ap.add_argument("--ohif", type=Path, metavar="DIST",
                    help="OHIF v3 built: the @ohif/app npm tarball or its dist folder")
    ap.add_argument("--cache", type=Path, help="keep the generated series in this folder")
    ap.add_argument("--screenshots", action="store_true", help="write docs/viewer.png")
    args = ap.parse_args()
    print(f"note: {CAVEAT}")
    with tempfile.TemporaryDirectory(prefix="pacsd-bench-viewer-") as tmp:
        work = Path(tmp)
        t = time.monotonic()
        files = write_series(args.cache or work / "in", args.images, args.size)
        print(f"{len(files)} slices {args.size}x{args.size} ready in {time.monotonic() - t:.1f} s")
        study = uid(SEED, 1, 1, "study")
        trees = [("after", REPO)]
        if args.compare_with:
            trees.insert(0, (f"before ({args.compare_with})",
                             checkout(args.compare_with, work / "before")))
        for label, src in trees:
            # A browser of its own for each pacsd (and for OHIF): the pages of an earlier phase,
            # kept alive by the browser, must not take CPU from the next one's figures.
            ohif_server = root = None
            if args.ohif and src == REPO:   # its origin allowed by pacsd (CORS)
                root, ohif_server = serve_ohif(args.ohif, work)
                os.environ["PACSD_HTTP_CORS_ORIGINS"] = _base(ohif_server)
            (work / label.split()[0]).mkdir(exist_ok=True)
            with pacsd(work / label.split()[0], src=src) as srv:
                os.environ.pop("PACSD_HTTP_CORS_ORIGINS", None)
                t = time.monotonic()
                store(srv.dicom_port, files)
                print(f"{label}: stored in {time.monotonic() - t:.1f} s")
                # What pacsd does once a study is stable ([storage] warm_metadata): the
                # series metadata cached, as when a radiologist opens it minutes later.
                t = time.monotonic()
                warm = urllib.request.Request(
                    f"{srv.http_url}/dicom-web/studies/{study}/series/"
                    f"{uid(SEED, 1, 1, 1, 'series')}/metadata",
                    headers={"Accept": "application/dicom+json"})
                with urllib.request.urlopen(warm, timeout=600) as r:
                    r.read()
                print(f"{label}: series metadata warmed in {time.monotonic() - t:.1f} s")
                with browser(work) as drv:
                    pacsd_viewer(drv, f"{srv.http_url}/app/viewer?study={study}", args.images,
                                 args.runs, f"pacsd {label}")
                    scroll(drv)
                if src != REPO:
                    continue
                if ohif_server is not None and root is not None:
                    (root / "app-config.js").write_text(
                        OHIF_CONFIG % {"dw": f"{srv.http_url}/dicom-web"})
                    with browser(work) as drv:
                        ohif(drv, _base(ohif_server), study, args.images, args.runs)
                    ohif_server.shutdown()
                else:
                    print("OHIF: not measured (give --ohif with the built OHIF, the "
                          "tarball `npm pack @ohif/app@3.13.2` writes; pacsd does not ship it)")
                if args.screenshots:
                    with browser(work) as drv:
                        screenshots(drv, srv.http_url, study)
    print(f"note: {CAVEAT}")


def _base(httpd: http.server.HTTPServer) -> str:
    return f"http://{LOCAL}:{httpd.server_address[1]}"


def screenshots(drv, http_url: str, study: str) -> None:
    out = REPO / "docs" / "viewer.png"
    out.parent.mkdir(exist_ok=True)
    drv.get(f"{http_url}/app/viewer?study={study}")
    wait(drv, "pacsViewer.total > 0 && pacsViewer.loaded === pacsViewer.total", 300)
    drv.execute_script("""
        pacsViewer.setSlice(Math.floor(pacsViewer.total / 2), 0);
        pacsViewer.setLayout(2);
        pacsViewer.renderNow();""")
    drv.save_screenshot(str(out))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
