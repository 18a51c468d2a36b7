// The study viewer (/app/viewer?study=UID[&series=UID]). Plain ES2017, no framework, no build.
//
// Pixel path, and why:
// * Grayscale (MONOCHROME1/2; 8, 16 or 32 bits; signed or unsigned) comes as raw frames:
//   WADO-RS .../frames/{n} with Accept multipart/related; type="application/octet-stream";
//   transfer-syntax=1.2.840.10008.1.2.1, so native little endian pixels (the server decodes
//   JPEG, JPEG-LS, JPEG 2000 and RLE frames for us). The browser keeps each slice as a typed
//   array (Int16Array, Uint16Array...) and windows it itself: Rescale Slope/Intercept and the
//   window (PS3.3 C.11.2.1.2.1, LINEAR) are folded into one lookup table indexed by the stored
//   value, MONOCHROME1 and "invert" flip it, and a slice is drawn as lut[pixel] into an
//   ImageData. That is exact on 12/16-bit data (a rendered 8-bit JPEG/PNG has already thrown
//   away what lies outside its window), makes window/level dragging instant (a new 64 K LUT,
//   no request), and a 512x512 slice costs about a millisecond to draw, so scrolling a loaded
//   500-slice CT is immediate.
// * Colour (RGB, YBR_*, PALETTE COLOR) has no window to play with, so it comes as
//   .../frames/{n}/rendered?accept=image/png (the server converts YBR and applies palettes,
//   which would be a lot of code here for little gain), decoded by the browser.
//   A grayscale frame the server cannot give raw (406) falls back to that path too.
// Every image of a series is fetched in the background, 6 requests at a time (the browser's
// per-host limit), nearest to the slice on screen first. Drawing happens in
// requestAnimationFrame, so a burst of wheel events draws once per display frame.
"use strict";

(() => {
  const DW = "../dicom-web/";
  const RAW_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1';
  const CONCURRENCY = 6;
  const CACHE_BYTES = 1536 * 1024 * 1024;   // decoded pixels kept for series not on screen
  const PRESETS = {
    lung: { center: -600, width: 1500 }, bone: { center: 400, width: 1800 },
    brain: { center: 40, width: 80 }, abdomen: { center: 40, width: 400 },
  };
  const PRESET_KEYS = { 1: "default", 2: "lung", 3: "bone", 4: "brain", 5: "abdomen" };
  const $ = (id) => document.getElementById(id);
  const t0 = performance.now();

  // ---- DICOM JSON (PS3.18 F.2) helpers -------------------------------------------------------
  const val = (ds, tag, i = 0) => {
    const e = ds && ds[tag];
    if (!e || !e.Value || e.Value.length <= i) return undefined;
    const v = e.Value[i];
    return v && typeof v === "object" && "Alphabetic" in v ? v.Alphabetic : v;
  };
  const vals = (ds, tag) => ((ds && ds[tag] && ds[tag].Value) || []);
  const num = (ds, tag, dflt, i = 0) => {
    const v = Number(val(ds, tag, i));
    return Number.isFinite(v) && val(ds, tag, i) !== undefined && val(ds, tag, i) !== "" ? v : dflt;
  };
  const str = (ds, tag) => { const v = val(ds, tag); return v == null ? "" : String(v); };

  // ---- multipart/related: one part (PS3.18 8.6.1.2) -------------------------------------------
  function indexOfBytes(hay, needle, from) {
    const n0 = needle[0];
    outer: for (let i = from; i <= hay.length - needle.length; i++) {
      if (hay[i] !== n0) continue;
      for (let j = 1; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
      return i;
    }
    return -1;
  }
  function lastIndexOfBytes(hay, needle) {
    outer: for (let i = hay.length - needle.length; i >= 0; i--) {
      for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
      return i;
    }
    return -1;
  }
  const ascii = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));
  // The body of the first part as an ArrayBuffer of its own (so typed arrays are aligned).
  function firstPart(buffer, contentType) {
    const m = /boundary="?([^";,]+)"?/i.exec(contentType || "");
    if (!m) throw new Error("no multipart boundary in " + contentType);
    const bytes = new Uint8Array(buffer);
    const start = indexOfBytes(bytes, ascii("--" + m[1]), 0);
    if (start < 0) throw new Error("multipart boundary not found");
    const headEnd = indexOfBytes(bytes, ascii("\r\n\r\n"), start);
    if (headEnd < 0) throw new Error("multipart part has no header end");
    const bodyStart = headEnd + 4;
    // One frame per request: the part ends at the last delimiter (searched from the end,
    // so a 500 KB body is not scanned).
    let end = lastIndexOfBytes(bytes.subarray(bodyStart), ascii("\r\n--" + m[1]));
    end = end < 0 ? bytes.length : bodyStart + end;
    return buffer.slice(bodyStart, end);
  }

  // ---- the study and its series ---------------------------------------------------------------
  const params = new URLSearchParams(location.search);
  const studyUid = params.get("study") || "";
  let study = null;             // /api/studies/<uid>
  const seriesCache = new Map();  // series uid -> Series
  let cacheTick = 0;

  class Series {
    constructor(info) {
      this.uid = info.series_uid;
      this.info = info;
      this.images = [];       // [{inst, sop, frame, meta, ...pixel description}]
      this.pixels = [];       // per image: typed array | ImageBitmap/HTMLImageElement | null
      this.state = [];        // per image: 0 not asked, 1 loading, 2 loaded, 3 failed
      this.loaded = 0;
      this.bytes = 0;
      this.ready = null;      // Promise: metadata read
      this.startedMs = 0;
      this.allLoadedMs = null;
      this.used = ++cacheTick;
      this.active = 0;        // workers running
      this.dropped = false;
    }
    get count() { return this.images.length; }
  }

  function describe(meta) {
    const photometric = str(meta, "00280004").trim().toUpperCase() || "MONOCHROME2";
    const samples = num(meta, "00280002", 1);
    const bitsAllocated = num(meta, "00280100", 16);
    const ps = vals(meta, "00280030").length ? vals(meta, "00280030") : vals(meta, "00181164");
    return {
      rows: num(meta, "00280010", 0), cols: num(meta, "00280011", 0),
      photometric, samples, bitsAllocated,
      bitsStored: num(meta, "00280101", bitsAllocated),
      signed: num(meta, "00280103", 0) === 1,
      slope: num(meta, "00281053", 1), intercept: num(meta, "00281052", 0),
      wc: num(meta, "00281050", null), ww: num(meta, "00281051", null),
      spacing: ps.length >= 2 ? [Number(ps[0]), Number(ps[1])] : null,   // [row, column] mm
      gray: samples === 1 && (photometric === "MONOCHROME1" || photometric === "MONOCHROME2")
            && [8, 16, 32].includes(bitsAllocated),
    };
  }

  // Slices by position along the slice normal (ImageOrientationPatient x ImagePositionPatient),
  // else InstanceNumber; the frames of a multi-frame instance in order.
  function sortImages(metas) {
    const key = metas.map((m) => {
      const iop = vals(m, "00200037").map(Number), ipp = vals(m, "00200032").map(Number);
      let pos = null;
      if (iop.length === 6 && ipp.length === 3 && iop.concat(ipp).every(Number.isFinite)) {
        const n = [iop[1] * iop[5] - iop[2] * iop[4], iop[2] * iop[3] - iop[0] * iop[5],
                   iop[0] * iop[4] - iop[1] * iop[3]];
        pos = n[0] * ipp[0] + n[1] * ipp[1] + n[2] * ipp[2];
      }
      return { m, pos, number: num(m, "00200013", 0), frames: Math.max(1, num(m, "00280008", 1)) };
    });
    const byPosition = key.every((k) => k.pos !== null && k.frames === 1) &&
      new Set(key.map((k) => k.pos.toFixed(3))).size === key.length;
    key.sort((a, b) => (byPosition ? a.pos - b.pos : 0) || a.number - b.number);
    const images = [];
    for (const k of key) {
      const d = describe(k.m);
      for (let f = 1; f <= k.frames; f++) {
        images.push(Object.assign({ meta: k.m, sop: str(k.m, "00080018"), frame: f,
                                    frames: k.frames, number: k.number, pos: k.pos }, d));
      }
    }
    return images;
  }

  function getSeries(info) {
    let s = seriesCache.get(info.series_uid);
    if (s && !s.dropped) { s.used = ++cacheTick; return s; }
    s = new Series(info);
    seriesCache.set(s.uid, s);
    s.startedMs = performance.now();
    s.ready = (async () => {
      const url = `${DW}studies/${studyUid}/series/${s.uid}/metadata`;
      const rsp = await fetch(url, { headers: { Accept: "application/dicom+json" }, credentials: "same-origin" });
      if (rsp.status === 401) { pacs.toLogin(); throw new Error("login required"); }
      if (!rsp.ok) throw new Error(`metadata: ${rsp.status} ${rsp.statusText}`);
      s.images = sortImages(await rsp.json());
      s.pixels = new Array(s.count).fill(null);
      s.state = new Array(s.count).fill(0);
      return s;
    })();
    return s;
  }

  function evictCache() {
    let total = 0;
    for (const s of seriesCache.values()) total += s.bytes;
    const shown = new Set(viewports.map((v) => v.series));
    const victims = [...seriesCache.values()].filter((s) => !shown.has(s)).sort((a, b) => a.used - b.used);
    for (const s of victims) {
      if (total <= CACHE_BYTES) break;
      total -= s.bytes;
      s.dropped = true;
      seriesCache.delete(s.uid);
    }
  }

  // ---- loading pixels ------------------------------------------------------------------------
  function typedArray(img, buffer) {
    const n = img.rows * img.cols;
    let a;
    if (img.bitsAllocated === 8) a = img.signed ? new Int8Array(buffer, 0, n) : new Uint8Array(buffer, 0, n);
    else if (img.bitsAllocated === 16) a = img.signed ? new Int16Array(buffer, 0, n) : new Uint16Array(buffer, 0, n);
    else a = img.signed ? new Int32Array(buffer, 0, n) : new Uint32Array(buffer, 0, n);
    // Bits above BitsStored may carry anything (overlays, garbage): mask / sign-extend them.
    const bs = img.bitsStored, ba = img.bitsAllocated;
    if (bs < ba && ba <= 16) {
      if (img.signed) {
        const sh = 32 - bs;
        for (let i = 0; i < n; i++) a[i] = (a[i] << sh) >> sh;
      } else {
        const mask = (1 << bs) - 1;
        for (let i = 0; i < n; i++) a[i] &= mask;
      }
    }
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < n; i++) { const v = a[i]; if (v < lo) lo = v; if (v > hi) hi = v; }
    img.min = lo; img.max = hi;
    return a;
  }

  function frameUrl(s, img) {
    return `${DW}studies/${studyUid}/series/${s.uid}/instances/${img.sop}/frames/${img.frame}`;
  }

  async function loadRendered(s, img) {
    const rsp = await fetch(frameUrl(s, img) + "/rendered?accept=image/png", { credentials: "same-origin" });
    if (!rsp.ok) throw new Error(`rendered frame: ${rsp.status}`);
    const blob = await rsp.blob();
    img.rendered = true;
    if (window.createImageBitmap) {
      try { return await createImageBitmap(blob); } catch (e) { /* Safari < 15: below */ }
    }
    const el = new Image();
    el.src = URL.createObjectURL(blob);
    await el.decode();
    return el;
  }

  async function loadImage(s, i) {
    const img = s.images[i];
    if (!img.gray) return loadRendered(s, img);
    const rsp = await fetch(frameUrl(s, img), { headers: { Accept: RAW_ACCEPT }, credentials: "same-origin" });
    if (rsp.status === 406) return loadRendered(s, img);   // no raw frames for this one
    if (!rsp.ok) throw new Error(`frame: ${rsp.status} ${rsp.statusText}`);
    const body = firstPart(await rsp.arrayBuffer(), rsp.headers.get("Content-Type"));
    const need = img.rows * img.cols * img.bitsAllocated / 8;
    if (body.byteLength < need) throw new Error(`frame: ${body.byteLength} bytes, ${need} expected`);
    return typedArray(img, body);
  }

  // The next image to fetch: the one nearest to what a viewport shows of this series.
  function nextToLoad(s) {
    const centres = viewports.filter((v) => v.series === s && v.visible()).map((v) => v.index);
    if (!centres.length) centres.push(0);
    let best = -1, bestD = Infinity;
    for (let i = 0; i < s.count; i++) {
      if (s.state[i] !== 0) continue;
      let d = Infinity;
      for (const c of centres) d = Math.min(d, i >= c ? i - c : (c - i) + 0.5);   // ahead first
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }

  function startLoading(s) {
    const worker = async () => {
      s.active++;
      try {
        for (let guard = 0; guard < s.count * 2 + 10 && !s.dropped; guard++) {
          const i = nextToLoad(s);
          if (i < 0) break;
          s.state[i] = 1;
          let data = null;
          for (let attempt = 0; attempt < 2 && !data; attempt++) {
            try { data = await loadImage(s, i); } catch (e) {
              if (attempt === 1) { console.warn("image", i + 1, "of series", s.uid, e.message); }
            }
          }
          if (s.dropped) break;
          s.pixels[i] = data;
          s.state[i] = data ? 2 : 3;
          s.loaded++;
          if (data && data.byteLength) s.bytes += data.byteLength;
          if (s.loaded === s.count) {
            s.allLoadedMs = performance.now();
            if (timings.allLoadedMs === null && s === firstSeries) timings.allLoadedMs = Math.round(s.allLoadedMs - t0);
          }
          for (const v of viewports) if (v.series === s && (v.index === i || s.loaded === s.count)) v.invalidate();
          progress(s);
        }
      } finally { s.active--; }
    };
    const n = Math.min(CONCURRENCY, s.count) - s.active;
    for (let k = 0; k < n; k++) worker();
  }

  let progressQueued = false;
  function progress(s) {
    if (progressQueued) return;
    progressQueued = true;
    requestAnimationFrame(() => {
      progressQueued = false;
      for (const x of seriesCache.values()) {
        const bar = document.querySelector(`.series-thumb[data-uid="${x.uid}"] .bar > span`);
        if (bar) bar.style.width = (x.count ? (100 * x.loaded / x.count) : 0) + "%";
      }
      for (const v of viewports) v.showProgress();
    });
  }

  // ---- windowing: one LUT per (image description, window, invert) -----------------------------
  const lutCache = { key: "", lut: null, offset: 0 };
  function lutFor(img, win, invert) {
    const signed = img.signed, bs = Math.min(img.bitsStored, 16);
    const key = [bs, signed, img.slope, img.intercept, win.center, win.width, invert, img.photometric].join(",");
    if (key === lutCache.key) return lutCache;
    const size = 1 << bs, offset = signed ? size >> 1 : 0;
    const lut = lutCache.lut && lutCache.lut.length === size ? lutCache.lut : new Uint32Array(size);
    fillLut(lut, offset, img, win, invert);
    Object.assign(lutCache, { key, lut, offset });
    return lutCache;
  }
  // PS3.3 C.11.2.1.2.1 (LINEAR): y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; as RGBA words.
  function gray(value, img, win, flip) {
    const m = value * img.slope + img.intercept;
    let y = (m - (win.center - 0.5)) / Math.max(win.width - 1, 1e-6) + 0.5;
    y = y <= 0 ? 0 : y >= 1 ? 1 : y;
    let g = Math.round(y * 255);
    if (flip) g = 255 - g;
    return g;
  }
  const littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
  const rgba = (g) => (littleEndian ? (0xff000000 | (g << 16) | (g << 8) | g) >>> 0 : ((g << 24) | (g << 16) | (g << 8) | 0xff) >>> 0);
  function fillLut(lut, offset, img, win, invert) {
    const flip = (img.photometric === "MONOCHROME1") !== invert;
    for (let i = 0; i < lut.length; i++) lut[i] = rgba(gray(i - offset, img, win, flip));
  }

  // ---- viewports -----------------------------------------------------------------------------
  const viewports = [];
  let active = 0;
  let layout = 1;
  let tool = "wl";
  let firstSeries = null;
  const timings = { firstImageMs: null, allLoadedMs: null };
  let drawCount = 0;

  class Viewport {
    constructor(n) {
      this.n = n;
      this.el = document.createElement("div");
      this.el.className = "viewport";
      this.el.id = "viewport-" + n;
      this.el.innerHTML = `<canvas></canvas><div class="ov tl"></div><div class="ov tr"></div>
        <div class="ov bl"></div><div class="ov br"></div><div class="ov msg"></div>
        <div class="progress"></div><div class="slider-wrap"><input class="slice" type="range" min="0" max="0" value="0" aria-label="Slice"></div>`;
      this.canvas = this.el.querySelector("canvas");
      this.ctx = this.canvas.getContext("2d");
      this.ov = {};
      for (const k of ["tl", "tr", "bl", "br", "msg"]) this.ov[k] = this.el.querySelector(".ov." + k);
      this.bar = this.el.querySelector(".progress");
      this.slider = this.el.querySelector("input.slice");
      this.off = document.createElement("canvas");   // the slice at image size
      this.offCtx = this.off.getContext("2d");
      this.imageData = null;
      this.series = null;
      this.index = 0;
      this.window = { center: 40, width: 400 };
      this.windowSet = false;   // false: follow each image's default window
      this.zoom = 1; this.pan = { x: 0, y: 0 }; this.fit = true;
      this.invert = false;
      this.measurements = [];   // {series, index, a: [x,y], b: [x,y], text, mm}
      this.dirty = false;
      this.cssW = 0; this.cssH = 0;
      this.slider.addEventListener("input", () => this.setIndex(Number(this.slider.value)));
      this.el.addEventListener("pointerdown", () => setActive(this.n), true);
      attachPointer(this);
      this.el.addEventListener("dragover", (e) => { e.preventDefault(); this.el.classList.add("drop"); });
      this.el.addEventListener("dragleave", () => this.el.classList.remove("drop"));
      this.el.addEventListener("drop", (e) => {
        e.preventDefault(); this.el.classList.remove("drop");
        const uid = e.dataTransfer.getData("text/x-pacsd-series");
        if (uid) { setActive(this.n); showSeries(uid, this); }
      });
    }
    visible() { return this.n < layout; }
    get count() { return this.series ? this.series.count : 0; }
    get image() { return this.series && this.series.images[this.index]; }
    get sop() { const im = this.image; return im ? im.sop : null; }
    get seriesUid() { return this.series ? this.series.uid : null; }
    // Screen (device) pixels per image pixel, so that "1:1" reads 100% on any display.
    get zoomPercent() { return Math.round(this.zoom * (window.devicePixelRatio || 1) * 100); }

    async load(s) {
      this.series = s;
      this.index = 0;
      this.measurements = [];
      this.windowSet = false;
      this.fit = true;
      this.ov.msg.textContent = "Loading…";
      this.invalidate();
      markThumbs();
      try { await s.ready; } catch (e) {
        if (this.series === s) this.ov.msg.textContent = "Cannot load the series: " + e.message;
        return;
      }
      if (this.series !== s) return;
      this.ov.msg.textContent = s.count ? "" : "No images in this series";
      this.slider.max = Math.max(0, s.count - 1);
      this.slider.value = 0;
      startLoading(s);
      this.invalidate();
      onImageChange(this);
    }
    setIndex(i) {
      if (!this.series || !this.count) return;
      i = Math.max(0, Math.min(this.count - 1, Math.round(i)));
      if (i === this.index) return;
      this.index = i;
      this.slider.value = i;
      this.invalidate();
      onImageChange(this);
    }
    defaultWindow() {
      const img = this.image;
      if (!img) return { center: 40, width: 400 };
      if (img.wc !== null && img.ww !== null && img.ww > 0) return { center: img.wc, width: img.ww };
      if (img.min !== undefined) {
        const a = img.min * img.slope + img.intercept, b = img.max * img.slope + img.intercept;
        const lo = Math.min(a, b), hi = Math.max(a, b);
        return { center: (lo + hi) / 2, width: Math.max(1, hi - lo) };
      }
      return { center: 2 ** (img.bitsStored - 1), width: 2 ** img.bitsStored };
    }
    setWindow(w) {
      this.window = { center: Math.round(w.center * 100) / 100, width: Math.max(1, Math.round(w.width * 100) / 100) };
      this.windowSet = true;
      this.invalidate();
    }
    resetView() {
      this.windowSet = false; this.invert = false; this.fit = true; this.pan = { x: 0, y: 0 };
      this.measurements = [];
      this.invalidate();
    }
    invalidate() {
      this.dirty = true;
      scheduleRender();
    }
    showProgress() {
      const s = this.series;
      if (!s || !s.count) { this.bar.style.width = "0"; return; }
      this.bar.style.width = (100 * s.loaded / s.count) + "%";
      this.bar.classList.toggle("done", s.loaded === s.count);
    }
    // Canvas backing store at device resolution.
    resize() {
      const r = this.el.getBoundingClientRect();
      const dpr = window.devicePixelRatio || 1;
      const w = Math.max(1, Math.round(r.width * dpr)), h = Math.max(1, Math.round(r.height * dpr));
      if (this.canvas.width !== w || this.canvas.height !== h) {
        this.canvas.width = w; this.canvas.height = h; this.dirty = true;
      }
      this.cssW = r.width; this.cssH = r.height; this.dpr = dpr;
    }
    aspect(img) {   // displayed height per row / width per column
      return img && img.spacing && img.spacing[1] > 0 ? img.spacing[0] / img.spacing[1] : 1;
    }
    fitZoom(img) {
      img = img || this.image;
      if (!img || !img.cols) return 1;
      return Math.min(this.cssW / img.cols, this.cssH / (img.rows * this.aspect(img))) * 0.98;
    }
    // screen (CSS px, relative to the canvas) <-> image pixel coordinates
    toImage(x, y) {
      const img = this.image;
      return [(x - this.cssW / 2 - this.pan.x) / this.zoom + img.cols / 2,
              (y - this.cssH / 2 - this.pan.y) / (this.zoom * this.aspect(img)) + img.rows / 2];
    }
    toScreen(p) {
      const img = this.image;
      return [(p[0] - img.cols / 2) * this.zoom + this.cssW / 2 + this.pan.x,
              (p[1] - img.rows / 2) * this.zoom * this.aspect(img) + this.cssH / 2 + this.pan.y];
    }

    render() {
      this.dirty = false;
      if (!this.visible()) return;
      this.resize();
      const ctx = this.ctx, dpr = this.dpr;
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
      const s = this.series, img = this.image;
      if (!s || !img) { this.overlay(); return; }
      if (this.fit) this.zoom = this.fitZoom(img);
      if (!this.windowSet) this.window = this.defaultWindow();
      const data = s.pixels[this.index];
      if (!data) {
        this.ov.msg.textContent = s.state[this.index] === 3 ? "This image cannot be loaded" : "Loading…";
        this.overlay();
        return;
      }
      this.ov.msg.textContent = "";
      let source;
      if (data.BYTES_PER_ELEMENT) {
        source = this.paintGray(img, data);
      } else {
        source = data;   // ImageBitmap / HTMLImageElement
      }
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.imageSmoothingEnabled = this.zoom < 3;
      const w = img.cols * this.zoom, h = img.rows * this.zoom * this.aspect(img);
      const x = this.cssW / 2 + this.pan.x - w / 2, y = this.cssH / 2 + this.pan.y - h / 2;
      ctx.drawImage(source, x, y, w, h);
      if (!data.BYTES_PER_ELEMENT && this.invert) {
        ctx.globalCompositeOperation = "difference";
        ctx.fillStyle = "#fff";
        ctx.fillRect(x, y, w, h);
        ctx.globalCompositeOperation = "source-over";
      }
      this.drawMeasurements();
      this.overlay();
      drawCount++;
      if (timings.firstImageMs === null && s === firstSeries) {
        timings.firstImageMs = Math.round(performance.now() - t0);
        api.ready = true;
      }
    }
    paintGray(img, px) {
      if (this.off.width !== img.cols || this.off.height !== img.rows || !this.imageData) {
        this.off.width = img.cols; this.off.height = img.rows;
        this.imageData = this.offCtx.createImageData(img.cols, img.rows);
      }
      const out = new Uint32Array(this.imageData.data.buffer);
      const n = img.rows * img.cols;
      if (img.bitsStored <= 16) {
        const { lut, offset } = lutFor(img, this.window, this.invert);
        if (offset) for (let i = 0; i < n; i++) out[i] = lut[px[i] + offset];
        else for (let i = 0; i < n; i++) out[i] = lut[px[i]];
      } else {   // 32-bit: no table, computed per pixel
        const flip = (img.photometric === "MONOCHROME1") !== this.invert;
        for (let i = 0; i < n; i++) out[i] = rgba(gray(px[i], img, this.window, flip));
      }
      this.offCtx.putImageData(this.imageData, 0, 0);
      return this.off;
    }
    drawMeasurements() {
      const ctx = this.ctx;
      for (const m of this.measurements) {
        if (m.series !== this.series || m.index !== this.index) continue;
        const a = this.toScreen(m.a), b = this.toScreen(m.b);
        ctx.strokeStyle = "#ffd400"; ctx.fillStyle = "#ffd400"; ctx.lineWidth = 1.5;
        ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
        for (const p of [a, b]) { ctx.beginPath(); ctx.arc(p[0], p[1], 3, 0, 2 * Math.PI); ctx.fill(); }
        ctx.font = "13px sans-serif";
        ctx.shadowColor = "#000"; ctx.shadowBlur = 3;
        ctx.fillText(m.text, b[0] + 8, b[1] - 6);
        ctx.shadowBlur = 0;
      }
    }
    overlay() {
      const s = this.series, img = this.image;
      if (!s || !study) { for (const k of ["tl", "tr", "bl", "br"]) this.ov[k].textContent = ""; return; }
      const info = s.info;
      this.ov.tl.textContent = [pacs.fmtName(study.patient_name), study.patient_id,
        [pacs.fmtDate(study.birth_date), study.sex].filter(Boolean).join(" ")].filter(Boolean).join("\n");
      this.ov.tr.textContent = [study.institution, study.description,
        [pacs.fmtDate(study.study_date), pacs.fmtTime(study.study_time)].filter(Boolean).join(" ")]
        .filter(Boolean).join("\n");
      const lines = [`Se: ${info.number == null ? "" : info.number} ${info.description || ""}`.trim()];
      if (img) {
        lines.push(`Im: ${this.index + 1} / ${this.count}` + (img.frames > 1 ? `  (frame ${img.frame}/${img.frames})` : ""));
        if (img.pos !== null && img.pos !== undefined) lines.push(`Pos: ${img.pos.toFixed(1)} mm`);
      }
      const last = this.measurements.filter((m) => m.series === s && m.index === this.index).slice(-1)[0];
      if (last) lines.push(`Dist: ${last.text}`);
      this.ov.bl.textContent = lines.join("\n");
      const br = [];
      if (img && img.gray && !img.rendered) br.push(`W: ${fmtNum(this.window.width)} L: ${fmtNum(this.window.center)}`);
      br.push(`Zoom: ${this.zoomPercent}%`);
      if (this.invert) br.push("Inverted");
      if (img) br.push(`${img.cols} × ${img.rows}`);
      this.ov.br.textContent = br.join("\n");
    }
  }
  const fmtNum = (x) => (Math.abs(x - Math.round(x)) < 1e-6 ? String(Math.round(x)) : x.toFixed(1));

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(renderNow);
  }
  function renderNow() {
    renderQueued = false;
    for (const v of viewports) if (v.dirty) v.render();
  }

  function setActive(n) {
    if (n === active && viewports[n].el.classList.contains("active")) return;
    active = n;
    viewports.forEach((v) => v.el.classList.toggle("active", v.n === n));
    markThumbs();
    onImageChange(viewports[n]);
  }
  const activeVp = () => viewports[active];

  function setLayout(n) {
    layout = n;
    $("viewports").className = "layout-" + n;
    $("layout-1").classList.toggle("active", n === 1);
    $("layout-2").classList.toggle("active", n === 2);
    if (active >= n) setActive(0);
    if (n === 2 && !viewports[1].series && study) {
      // The second viewport gets the next series (or the same one when there is only one).
      const list = study.series.filter((x) => x.instances > 0);
      const cur = list.findIndex((x) => x.series_uid === viewports[0].seriesUid);
      const next = list[(cur + 1) % list.length] || list[0];
      if (next) showSeries(next.series_uid, viewports[1]);
    }
    viewports.forEach((v) => v.invalidate());
    markThumbs();
  }

  function showSeries(uid, vp) {
    const info = study && study.series.find((x) => x.series_uid === uid);
    if (!info) { pacs.toast("No such series in this study", true); return; }
    const s = getSeries(info);
    evictCache();
    return vp.load(s);
  }

  function setTool(t) {
    tool = t;
    document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("active", b.dataset.tool === t));
    viewports.forEach((v) => { v.el.className = v.el.className.replace(/\btool-\w+/g, "").trim() + " tool-" + t; });
  }

  function setPreset(name, vp = activeVp()) {
    if (name === "default") { vp.windowSet = false; vp.invalidate(); return; }
    const p = PRESETS[name];
    if (p) vp.setWindow(p);
  }

  // ---- pointer input: one finger / mouse = the tool, two fingers = pinch zoom + pan ----------
  function attachPointer(vp) {
    const c = vp.canvas;
    const pts = new Map();   // pointerId -> {x, y}
    let drag = null;         // {tool, x0, y0, win, zoom, pan, anchor}
    let pinch = null;
    let pending = null;      // measurement waiting for its second click
    const local = (e) => { const r = c.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };

    c.addEventListener("contextmenu", (e) => e.preventDefault());
    c.addEventListener("pointerdown", (e) => {
      if (!vp.image) return;
      try { c.setPointerCapture(e.pointerId); } catch (err) { /* pointer already gone */ }
      const [x, y] = local(e);
      pts.set(e.pointerId, { x, y });
      if (pts.size === 2) {   // second finger: pinch replaces the one-finger tool
        if (drag && drag.measure) vp.measurements.pop();
        drag = null; pending = null;
        const [p, q] = [...pts.values()];
        pinch = { d: Math.hypot(p.x - q.x, p.y - q.y) || 1, mx: (p.x + q.x) / 2, my: (p.y + q.y) / 2,
                  zoom: vp.zoom, pan: { ...vp.pan } };
        return;
      }
      if (pts.size > 2) return;
      const t = e.button === 1 ? "pan" : e.button === 2 ? "zoom" : tool;
      drag = { tool: t, x0: x, y0: y, win: { ...vp.window }, zoom: vp.zoom, pan: { ...vp.pan },
               anchor: vp.toImage(x, y), moved: false };
      if (t === "measure") {
        const p = vp.toImage(x, y);
        if (pending) {   // second click of a click-click measurement
          pending.b = p; finishMeasure(pending); pending = null; drag = null; vp.invalidate();
          return;
        }
        drag.measure = addMeasure(p);
      }
      e.preventDefault();
    });
    c.addEventListener("pointermove", (e) => {
      if (!pts.has(e.pointerId)) return;
      const [x, y] = local(e);
      pts.set(e.pointerId, { x, y });
      if (pinch && pts.size >= 2) {
        const [p, q] = [...pts.values()];
        const d = Math.hypot(p.x - q.x, p.y - q.y) || 1, mx = (p.x + q.x) / 2, my = (p.y + q.y) / 2;
        vp.zoom = pinch.zoom; vp.pan = { ...pinch.pan };   // from the state at the start
        zoomAbout(vp, pinch.zoom * d / pinch.d, pinch.mx, pinch.my);
        vp.pan.x += mx - pinch.mx; vp.pan.y += my - pinch.my;
        vp.invalidate();
        return;
      }
      if (!drag) return;
      const dx = x - drag.x0, dy = y - drag.y0;
      if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
      if (drag.tool === "wl") {
        const k = Math.max(drag.win.width / 300, 0.1);
        vp.setWindow({ center: drag.win.center + dy * k, width: Math.max(1, drag.win.width + dx * k) });
      } else if (drag.tool === "zoom") {
        zoomAbout(vp, drag.zoom * Math.exp(-dy / 150), drag.x0, drag.y0);
        vp.invalidate();
      } else if (drag.tool === "pan") {
        vp.pan = { x: drag.pan.x + dx, y: drag.pan.y + dy };
        vp.invalidate();
      } else if (drag.tool === "measure" && drag.measure) {
        drag.measure.b = vp.toImage(x, y);
        finishMeasure(drag.measure);
        vp.invalidate();
      }
    });
    const end = (e) => {
      if (!pts.has(e.pointerId)) return;
      pts.delete(e.pointerId);
      if (pinch) { if (pts.size < 2) pinch = null; drag = null; return; }
      if (drag && drag.tool === "measure" && drag.measure && !drag.moved) pending = drag.measure;
      drag = null;
    };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);

    function addMeasure(p) {
      const m = { series: vp.series, index: vp.index, a: p, b: p, text: "", mm: null, px: 0 };
      vp.measurements.push(m);
      finishMeasure(m);
      return m;
    }
    function finishMeasure(m) {
      const img = vp.image;
      const dx = m.b[0] - m.a[0], dy = m.b[1] - m.a[1];
      m.px = Math.hypot(dx, dy);
      if (img.spacing) {
        m.mm = Math.hypot(dx * img.spacing[1], dy * img.spacing[0]);
        m.text = `${m.mm.toFixed(1)} mm`;
      } else {
        m.text = `${m.px.toFixed(1)} px`;
      }
    }

    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      if (!vp.series) return;
      if (e.ctrlKey) {   // trackpad pinch arrives as ctrl+wheel
        const [x, y] = local(e);
        zoomAbout(vp, vp.zoom * Math.exp(-e.deltaY / 200), x, y);
        vp.invalidate();
        return;
      }
      // One slice per mouse-wheel notch (100 px in Chromium/Safari, 3 lines in Firefox);
      // trackpads send many small deltas, summed here.
      const unit = e.deltaMode === 1 ? 1 / 3 : e.deltaMode === 2 ? 10 : 1 / 100;
      vp.wheelAcc = (vp.wheelAcc || 0) + e.deltaY * unit;
      const steps = vp.wheelAcc > 0 ? Math.floor(vp.wheelAcc) : Math.ceil(vp.wheelAcc);
      if (steps) { vp.wheelAcc -= steps; vp.setIndex(vp.index + Math.sign(steps) * Math.max(1, Math.abs(steps))); }
    }, { passive: false });
  }

  // Zoom to `z`, keeping the image point under (x, y) where it is.
  function zoomAbout(vp, z, x, y) {
    z = Math.max(0.02, Math.min(64, z));
    const z0 = vp.zoom;
    vp.fit = false;
    // image point under (x, y) with the current zoom/pan, then solve pan so it stays there
    const px = (x - vp.cssW / 2 - vp.pan.x) / z0, py = (y - vp.cssH / 2 - vp.pan.y) / z0;
    vp.zoom = z;
    vp.pan = { x: x - vp.cssW / 2 - px * z, y: y - vp.cssH / 2 - py * z };
  }

  // ---- keyboard ------------------------------------------------------------------------------
  document.addEventListener("keydown", (e) => {
    const tag = (e.target && e.target.tagName) || "";
    if (tag === "INPUT" && e.target.type !== "range" || tag === "SELECT" || tag === "TEXTAREA") return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const vp = activeVp();
    const page = Math.max(1, Math.round(vp.count / 10));
    const k = e.key;
    let handled = true;
    if (k === "ArrowDown" || k === "ArrowRight") vp.setIndex(vp.index + 1);
    else if (k === "ArrowUp" || k === "ArrowLeft") vp.setIndex(vp.index - 1);
    else if (k === "PageDown") vp.setIndex(vp.index + page);
    else if (k === "PageUp") vp.setIndex(vp.index - page);
    else if (k === "Home") vp.setIndex(0);
    else if (k === "End") vp.setIndex(vp.count - 1);
    else if (PRESET_KEYS[k]) setPreset(PRESET_KEYS[k]);
    else if (k === "w" || k === "W") setTool("wl");
    else if (k === "z" || k === "Z") setTool("zoom");
    else if (k === "p" || k === "P") setTool("pan");
    else if (k === "m" || k === "M") setTool("measure");
    else if (k === "f" || k === "F") { vp.fit = true; vp.pan = { x: 0, y: 0 }; vp.invalidate(); }
    else if (k === "i" || k === "I") { vp.invert = !vp.invert; vp.invalidate(); }
    else if (k === "r" || k === "R") vp.resetView();
    else if (k === " ") toggleCine();
    else if (k === "t" || k === "T") toggleTags();
    else handled = false;
    if (handled) e.preventDefault();
  });

  // ---- cine ----------------------------------------------------------------------------------
  let cine = null;
  function toggleCine(on) {
    on = on === undefined ? !cine : on;
    const b = $("cine");
    if (!on) { cine = null; b.classList.remove("active"); b.textContent = "▶ Cine"; return; }
    b.classList.add("active"); b.textContent = "❚❚ Cine";
    const run = { last: performance.now() };
    cine = run;
    const step = (now) => {
      if (cine !== run) return;
      const vp = activeVp();
      const fps = Number($("cine-fps").value) || 10;
      if (now - run.last >= 1000 / fps && vp.count > 1) {
        run.last = now;
        vp.setIndex((vp.index + 1) % vp.count);
      }
      requestAnimationFrame(step);
    };
    requestAnimationFrame(step);
  }

  // ---- series panel --------------------------------------------------------------------------
  function renderSeriesPanel() {
    const st = study;
    $("study-info").innerHTML = `<b>${pacs.esc(pacs.fmtName(st.patient_name))}</b><br>${pacs.esc(st.patient_id)}<br>` +
      `${pacs.esc(pacs.fmtDate(st.study_date))} ${pacs.esc(st.description || "")}`;
    const list = $("series-list");
    list.innerHTML = "";
    for (const se of st.series) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "series-thumb";
      b.dataset.uid = se.series_uid;
      b.draggable = true;
      b.title = "Click to show in the active viewport; drag onto a viewport";
      const thumb = se.instances > 0
        ? `<img alt="" loading="lazy" draggable="false" src="${DW}studies/${encodeURIComponent(studyUid)}/series/${encodeURIComponent(se.series_uid)}/thumbnail">`
        : `<div class="noimg"></div>`;
      b.innerHTML = `${thumb}<div class="label">${pacs.esc(se.modality || "")} #${pacs.esc(se.number == null ? "" : se.number)} · ${se.instances} im<br>${pacs.esc(se.description || "")}</div><div class="bar"><span></span></div>`;
      b.addEventListener("click", () => showSeries(se.series_uid, activeVp()));
      b.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/x-pacsd-series", se.series_uid); e.dataTransfer.effectAllowed = "copy"; });
      list.appendChild(b);
    }
    markThumbs();
  }
  function markThumbs() {
    document.querySelectorAll(".series-thumb").forEach((b) => {
      b.classList.toggle("active", activeVp() && activeVp().seriesUid === b.dataset.uid);
      b.classList.toggle("shown", viewports.some((v) => v.visible() && v.seriesUid === b.dataset.uid));
    });
  }

  // ---- tag panel -----------------------------------------------------------------------------
  let tagsSop = null, tagsData = null, tagsTimer = null;
  function toggleTags(on) {
    const panel = $("tags-panel");
    on = on === undefined ? panel.classList.contains("hidden") : on;
    panel.classList.toggle("hidden", !on);
    $("tags-toggle").classList.toggle("active", on);
    viewports.forEach((v) => v.invalidate());
    if (on) loadTags();
  }
  function onImageChange(vp) {
    if (vp !== activeVp()) return;
    if ($("tags-panel").classList.contains("hidden")) return;
    clearTimeout(tagsTimer);
    tagsTimer = setTimeout(loadTags, 150);   // not for every slice of a fast scroll
  }
  async function loadTags() {
    const sop = activeVp().sop;
    if (!sop) { $("tags-body").textContent = ""; return; }
    if (sop === tagsSop && tagsData) return;
    tagsSop = sop;
    $("tags-title").textContent = "Image " + (activeVp().index + 1) + " · " + sop;
    try {
      const data = await pacs.api("GET", "instances/" + encodeURIComponent(sop) + "/tags");
      if (tagsSop !== sop) return;
      tagsData = data;
      renderTags();
    } catch (e) {
      tagsData = null;
      $("tags-body").textContent = "Cannot read the tags: " + e.message;
    }
  }
  function renderTags() {
    const q = $("tags-filter").value.trim().toLowerCase();
    const match = (t) => !q || [t.tag, t.name, t.keyword, t.value].some((x) => String(x || "").toLowerCase().includes(q));
    const html = (list) => list.map((t) => {
      const kids = (t.items || []).map((item, i) => {
        const inner = html(item);
        return inner ? `<details${q ? " open" : ""}><summary>Item ${i + 1}</summary>${inner}</details>` : "";
      }).join("");
      if (!match(t) && !kids) return "";
      const value = t.vr === "SQ" ? `${(t.items || []).length} item(s)` : t.value;
      return `<div class="tag" data-keyword="${pacs.esc(t.keyword)}"><span class="t">${pacs.esc(t.tag)}</span>` +
        `<span><span class="n">${pacs.esc(t.name || t.keyword || "")}</span><span class="vr">${pacs.esc(t.vr || "")}</span>` +
        `<span class="v">${pacs.esc(value)}</span></span>` +
        (t.items && t.items.length ? `<div class="items"><details${q ? " open" : ""}><summary>${t.items.length} item(s)</summary>${kids}</details></div>` : "") +
        `</div>`;
    }).join("");
    $("tags-body").innerHTML = html(tagsData || []) || '<div class="muted">No match</div>';
  }

  // ---- actions: ZIP, send, delete ------------------------------------------------------------
  function download(url) {
    const a = document.createElement("a");
    a.href = url; a.download = ""; a.rel = "noopener";
    document.body.appendChild(a); a.click(); a.remove();
  }
  function confirmDialog(text, okLabel) {
    const d = $("confirm");
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    if (!d.showModal) return Promise.resolve(window.confirm(text));
    return new Promise((resolve) => {
      d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
      d.returnValue = "";
      d.showModal();
    });
  }
  async function setupActions() {
    $("btn-zip-study").onclick = () => download(`../api/studies/${encodeURIComponent(studyUid)}/zip`);
    $("btn-zip-series").onclick = () => {
      const uid = activeVp().seriesUid;
      if (uid) download(`../api/series/${encodeURIComponent(uid)}/zip`);
    };
    const sel = $("send-node");
    sel.onchange = () => { $("btn-send").disabled = !sel.value; };
    $("btn-send").onclick = async () => {
      const node = sel.value, status = $("send-status");
      if (!node) return;
      $("btn-send").disabled = true;
      status.className = "small"; status.textContent = "Queued…";
      try {
        const { job } = await pacs.api("POST", `studies/${encodeURIComponent(studyUid)}/send`, { node });
        const end = await pacs.watchJob(job, (j) => {
          status.textContent = `${j.state}: ${j.done}${j.total != null ? " / " + j.total : ""}` + (j.failed ? `, ${j.failed} failed` : "");
        });
        status.textContent = end.state === "done" && !end.failed
          ? `Sent ${end.done} image(s) to ${node}` : `${end.state}: ${end.message || ""} (${end.done} sent, ${end.failed} failed)`;
        status.className = end.state === "done" && !end.failed ? "small sent" : "small error";
      } catch (e) {
        status.textContent = "Send failed: " + e.message; status.className = "small error";
      } finally { $("btn-send").disabled = !sel.value; }
    };
    $("btn-delete-study").onclick = async () => {
      if (!await confirmDialog(`Delete the whole study of ${pacs.fmtName(study.patient_name)} (${study.instances} images)? This cannot be undone.`, "Delete study")) return;
      try {
        const r = await pacs.api("DELETE", `studies/${encodeURIComponent(studyUid)}`);
        pacs.toast(`Deleted ${r && r.deleted} image(s)`);
        location.href = "./";
      } catch (e) { pacs.toast("Delete failed: " + e.message, true); }
    };
    $("btn-delete-series").onclick = async () => {
      const vp = activeVp(), s = vp.series;
      if (!s) return;
      if (!await confirmDialog(`Delete series ${s.info.number} ${s.info.description || ""} (${s.info.instances} images)? This cannot be undone.`, "Delete series")) return;
      try {
        const r = await pacs.api("DELETE", `series/${encodeURIComponent(s.uid)}`);
        pacs.toast(`Deleted ${r && r.deleted} image(s)`);
        study.series = study.series.filter((x) => x.series_uid !== s.uid);
        s.dropped = true; seriesCache.delete(s.uid);
        for (const v of viewports) if (v.series === s) { v.series = null; v.invalidate(); }
        renderSeriesPanel();
        const next = study.series.find((x) => x.instances > 0);
        if (next) showSeries(next.series_uid, vp);
      } catch (e) { pacs.toast("Delete failed: " + e.message, true); }
    };
    try {
      const nodes = await pacs.api("GET", "nodes");
      for (const n of nodes || []) {
        const o = document.createElement("option");
        o.value = n.name; o.textContent = `${n.name} (${n.aet}@${n.host}:${n.port})`;
        sel.appendChild(o);
      }
    } catch (e) { sel.disabled = true; sel.title = "Nodes unavailable: " + e.message; }
    try {
      const m = await pacs.me();
      if (m && m.admin) { $("btn-delete-study").classList.remove("hidden"); $("btn-delete-series").classList.remove("hidden"); }
    } catch (e) { /* not logged in: redirected */ }
  }

  // ---- wiring --------------------------------------------------------------------------------
  function wire() {
    $("layout-1").onclick = () => setLayout(1);
    $("layout-2").onclick = () => setLayout(2);
    document.querySelectorAll("[data-tool]").forEach((b) => { b.onclick = () => setTool(b.dataset.tool); });
    document.querySelectorAll("[data-preset]").forEach((b) => { b.onclick = () => setPreset(b.dataset.preset); });
    $("btn-fit").onclick = () => { const v = activeVp(); v.fit = true; v.pan = { x: 0, y: 0 }; v.invalidate(); };
    $("btn-1to1").onclick = () => { const v = activeVp(); v.fit = false; v.zoom = 1 / (window.devicePixelRatio || 1); v.pan = { x: 0, y: 0 }; v.invalidate(); };
    $("btn-invert").onclick = () => { const v = activeVp(); v.invert = !v.invert; v.invalidate(); };
    $("btn-reset").onclick = () => activeVp().resetView();
    $("cine").onclick = () => toggleCine();
    $("tags-toggle").onclick = () => toggleTags();
    $("tags-close").onclick = () => toggleTags(false);
    $("tags-filter").addEventListener("input", renderTags);
    // Buttons keep no focus, so the arrow keys keep scrolling.
    document.querySelectorAll(".vtoolbar button").forEach((b) => b.addEventListener("mouseup", () => b.blur()));
    const box = $("viewports");
    for (let n = 0; n < 2; n++) { const v = new Viewport(n); viewports.push(v); box.appendChild(v.el); }
    if (window.ResizeObserver) new ResizeObserver(() => viewports.forEach((v) => v.invalidate())).observe(box);
    window.addEventListener("resize", () => viewports.forEach((v) => v.invalidate()));
    setTool("wl");
    setLayout(1);
    setActive(0);
  }

  async function main() {
    pacs.header("studies");
    wire();
    if (!studyUid) { viewports[0].ov.msg.textContent = "No study given (?study=UID)"; return; }
    try {
      study = await pacs.api("GET", "studies/" + encodeURIComponent(studyUid));
    } catch (e) {
      viewports[0].ov.msg.textContent = "Cannot open the study: " + e.message;
      return;
    }
    document.title = `${pacs.fmtName(study.patient_name) || "Viewer"} – pacsd`;
    renderSeriesPanel();
    setupActions();
    const wanted = params.get("series");
    const first = study.series.find((x) => x.series_uid === wanted) || study.series.find((x) => x.instances > 0);
    if (!first) { viewports[0].ov.msg.textContent = "This study has no images"; return; }
    firstSeries = getSeries(first);
    showSeries(first.series_uid, viewports[0]);
  }

  // ---- for tests and benchmarks --------------------------------------------------------------
  const api = {
    ready: false,
    timings,
    viewports,
    get active() { return active; },
    get layout() { return layout; },
    get tool() { return tool; },
    get loaded() { const s = activeVp() && activeVp().series; return s ? s.loaded : 0; },
    get total() { const s = activeVp() && activeVp().series; return s ? s.count : 0; },
    get draws() { return drawCount; },
    setSlice(i, n = active) { viewports[n].setIndex(i); },
    renderNow() { renderNow(); },       // draw what is pending now, not at the next frame
    setLayout, setTool, setPreset, setActive, showSeries: (uid, n = active) => showSeries(uid, viewports[n]),
    study: () => study,
  };
  window.pacsViewer = api;
  main();
})();
