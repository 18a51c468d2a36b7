// The viewer's pixels: DICOM JSON metadata, slice order, frame fetching, windowing LUTs and
// the cache of series. No DOM here; the page tells a SeriesStore what is on screen (hooks).
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
// Every image of a series is fetched in the background, nearest to the slice on screen first:
// grayscale single-frame images in batches (pacsd's .../series/{uid}/pixels, many instances'
// frames in one multipart answer), fetched and cut by Web Workers (viewer-batch.js) that hand
// each slice over as a transferred ArrayBuffer, so the page only draws (see "batches" below);
// anything else one request per frame, 6 at a time (the browser's per-host limit).

import { dot, frameOf, readingSign, stackPosition } from "./viewer-geometry.js";

export const DW = "../dicom-web/";
const RAW_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1';
const CONCURRENCY = 6;
// Decoded pixels kept for series not on screen: 1.5 GB on a desktop, less where memory is
// scarce (a tablet's browser closes a tab that grows much beyond a gigabyte).
const MB = 1024 * 1024;
const CACHE_BYTES = (() => {
  const gb = navigator.deviceMemory;                 // Chromium only; coarse (0.25 .. 8)
  if (gb) return Math.min(1536, Math.max(256, gb * 128)) * MB;
  return (navigator.maxTouchPoints > 1 ? 512 : 1536) * MB;   // Safari and Firefox: guess
})();

// Batches (SeriesStore.startBatches): instances per request, the first one small.
const BATCH_FIRST = 8, BATCH_SIZE = 100, BATCHES_IN_FLIGHT = 2, BATCH_WORKERS = 2;
// Decoded slices of one series kept at most (SeriesStore.makeRoom): the cache's size
// (window.pacsdSeriesBytes, set before the page loads, overrides it: tests and benchmarks).
const seriesBytes = () => window.pacsdSeriesBytes || CACHE_BYTES;

// ---- DICOM JSON (PS3.18 F.2) helpers ---------------------------------------------------------
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

// ---- multipart/related: one part (PS3.18 8.6.1.2) ---------------------------------------------
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

// ---- images: what one slice is and where it goes ---------------------------------------------
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

// Slices in the usual reading direction along the stack's normal (ImageOrientationPatient x
// ImagePositionPatient; head first for axial, see viewer-geometry.js), else by InstanceNumber;
// the frames of a multi-frame instance in order. `pos` is the position along the normal, as
// the patient coordinate of its axis (z for axial: the table position).
function sortImages(metas) {
  const first = metas.length ? frameOf(vals(metas[0], "00200037").map(Number)) : null;
  const key = metas.map((m) => {
    const iop = vals(m, "00200037").map(Number), ipp = vals(m, "00200032").map(Number);
    const f = frameOf(iop);
    const pos = f && ipp.length === 3 && ipp.every(Number.isFinite) ? stackPosition(f.normal, ipp) : null;
    // One stack: every normal (nearly) the same as the first's.
    const parallel = f !== null && first !== null && dot(f.normal, first.normal) > 0.99;
    return { m, pos, parallel, iop: f ? iop : null, ipp: pos === null ? null : ipp,
             number: num(m, "00200013", 0), frames: Math.max(1, num(m, "00280008", 1)) };
  });
  const byPosition = key.every((k) => k.pos !== null && k.parallel && k.frames === 1) &&
    new Set(key.map((k) => k.pos.toFixed(3))).size === key.length;
  const sign = byPosition ? readingSign(first.normal) : 1;
  key.sort((a, b) => (byPosition ? sign * (a.pos - b.pos) : 0) || a.number - b.number);
  const images = [];
  for (const k of key) {
    const d = describe(k.m);
    for (let f = 1; f <= k.frames; f++) {
      images.push(Object.assign({ meta: k.m, sop: str(k.m, "00080018"), frame: f,
                                  frames: k.frames, number: k.number, pos: k.pos,
                                  iop: k.iop, ipp: k.ipp, frameOfReference: str(k.m, "00200052"),
                                  modality: str(k.m, "00080060").toUpperCase(),
                                  rescaleType: str(k.m, "00281054") }, d));
    }
  }
  return images;
}

// ---- one frame's pixels ------------------------------------------------------------------------
// A slice is kept as its bytes came (a typed array over them): the bits above BitsStored, which
// may carry anything (overlays, garbage), are masked where a value is read (storedValue, the
// lookup table of lutFor) rather than in a pass over every slice as it arrives, and a slice's
// range (min/max, for a default window when the header has none) is found when it is drawn.
function typedArray(img, buffer) {
  const n = img.rows * img.cols;
  if (img.bitsAllocated === 8) return img.signed ? new Int8Array(buffer, 0, n) : new Uint8Array(buffer, 0, n);
  if (img.bitsAllocated === 16) return img.signed ? new Int16Array(buffer, 0, n) : new Uint16Array(buffer, 0, n);
  return img.signed ? new Int32Array(buffer, 0, n) : new Uint32Array(buffer, 0, n);
}

// The stored value of a pixel read from its typed array: BitsStored bits, sign-extended when
// Pixel Representation says signed (PS3.5 8.1.1).
export function storedValue(img, v) {
  const bs = img.bitsStored, ba = img.bitsAllocated;
  if (bs >= ba || ba > 16) return v;
  if (img.signed) { const sh = 32 - bs; return (v << sh) >> sh; }
  return v & ((1 << bs) - 1);
}

// min/max of a slice's stored values, kept on the image.
export function rangeOf(img, px) {
  if (img.min !== undefined) return img;
  let lo = Infinity, hi = -Infinity;
  const n = Math.min(px.length, img.rows * img.cols);
  if (img.bitsStored < img.bitsAllocated && img.bitsAllocated <= 16) {
    for (let i = 0; i < n; i++) { const v = storedValue(img, px[i]); if (v < lo) lo = v; if (v > hi) hi = v; }
  } else {
    for (let i = 0; i < n; i++) { const v = px[i]; if (v < lo) lo = v; if (v > hi) hi = v; }
  }
  img.min = lo; img.max = hi;
  return img;
}

// ---- series and their cache ------------------------------------------------------------------
let cacheTick = 0;

export class Series {
  constructor(info) {
    this.uid = info.series_uid;
    this.info = info;
    this.images = [];       // [{inst, sop, frame, meta, ...pixel description}]
    this.pixels = [];       // per image: typed array | ImageBitmap/HTMLImageElement | null
    this.state = [];        // per image: 0 not asked, 1 loading, 2 loaded, 3 failed
    this.loaded = 0;
    this.bytes = 0;
    this.ready = null;      // Promise: metadata read
    this.preview = null;    // the first instance, fetched alongside the metadata (below)
    this.firstIndex = 0;    // where that instance is once the series is sorted
    this.sorted = false;    // images/pixels/state are the series' (metadata read)
    this.startedMs = 0;
    this.metadataMs = null; // when the series metadata had come (performance.now())
    this.allLoadedMs = null;
    this.used = ++cacheTick;
    this.active = 0;        // workers running
    this.dropped = false;
    this.batches = 0;       // batch requests in flight
    this.inflight = 0;      // bytes those batches are to bring (counted against the cap)
    this.batchesSent = 0;
    this.misses = new Map(); // image -> batches that did not bring it
    this.single = new Set(); // images left to the one-request-per-frame path
    this.evicted = 0;       // slices dropped by the memory cap (fetched again when near)
  }
  get count() { return this.images.length; }
  // Image i and its pixels; until the metadata is read, the preview's (whatever i is).
  imageAt(i) { return this.sorted ? this.images[i] : (this.preview && this.preview.img) || undefined; }
  pixelsAt(i) { return this.sorted ? this.pixels[i] : (this.preview && this.preview.data) || null; }
}

// The series of one study, their pixels fetched in the background. `hooks` is the page:
//   centres(s) -> indices of s shown in visible viewports (loading starts nearest to them)
//   shown() -> the Series on screen (never evicted)
//   previewed(s) -> s.preview has its image, drawable before the series metadata is read
//   loaded(s, i) -> image i of s has arrived (or failed)
//
// Time to the first image: the series metadata (every instance's, to sort the slices) takes
// the server about a millisecond per instance, so a 300-slice CT would show nothing for a
// third of a second. The study's API entry names each series' first instance (lowest
// InstanceNumber), so that instance's own metadata and its frame 1 are fetched at the same
// time as the series metadata and drawn as soon as they arrive (s.preview, s.count still 0);
// once the series is sorted the viewport moves to that instance's place (s.firstIndex) and
// its pixels become that image's, so nothing is fetched twice and the picture does not change.
export class SeriesStore {
  constructor(studyUid, hooks) {
    this.studyUid = studyUid;
    this.hooks = hooks;
    this.cache = new Map();   // series uid -> Series
  }

  get(info) {
    let s = this.cache.get(info.series_uid);
    if (s && !s.dropped) { s.used = ++cacheTick; return s; }
    s = new Series(info);
    this.cache.set(s.uid, s);
    s.startedMs = performance.now();
    if (info.first_sop) s.preview = this.preview(s, info.first_sop);
    s.ready = (async () => {
      const metas = await this.metadata(`${DW}studies/${this.studyUid}/series/${s.uid}/metadata`);
      s.metadataMs = performance.now();
      s.images = sortImages(metas);
      s.pixels = new Array(s.count).fill(null);
      s.state = new Array(s.count).fill(0);
      s.sorted = true;
      this.adoptPreview(s);
      return s;
    })();
    s.ready.catch(() => { s.preview = null; });   // the viewport says why; no stale picture
    return s;
  }

  async metadata(url) {
    const rsp = await fetch(url, { headers: { Accept: "application/dicom+json" }, credentials: "same-origin" });
    if (rsp.status === 401) { pacs.toLogin(); throw new Error("login required"); }
    if (!rsp.ok) throw new Error(`metadata: ${rsp.status} ${rsp.statusText}`);
    return rsp.json();
  }

  // {sop, img, data, failed, done}: frame 1 of instance `sop`, its metadata and its pixels
  // requested together. The pixels are asked for raw (what almost every series needs); if the
  // metadata then says colour, that answer is dropped and the rendered frame fetched instead.
  preview(s, sop) {
    const p = { sop, img: null, data: null, failed: false, done: null };
    const base = `${DW}studies/${this.studyUid}/series/${s.uid}/instances/${sop}`;
    const raw = fetch(base + "/frames/1", { headers: { Accept: RAW_ACCEPT }, credentials: "same-origin" });
    raw.catch(() => {});   // awaited below only for grayscale
    p.done = (async () => {
      const img = sortImages(await this.metadata(base + "/metadata"))[0];
      if (!img) throw new Error("no metadata");
      let data;
      if (img.gray) {
        data = await this.decodeRaw(s, img, await raw);
      } else {
        raw.then((rsp) => rsp.body && rsp.body.cancel()).catch(() => {});
        data = await this.loadRendered(s, img);
      }
      if (s.dropped) return;
      p.img = img; p.data = data;
      if (!s.sorted) this.hooks.previewed(s);
    })().catch((e) => {
      p.failed = true;
      console.warn("first image of series", s.uid, e.message);
    });
    return p;
  }

  // Once sorted: the preview's pixels are image s.firstIndex's, now or when they arrive.
  adoptPreview(s) {
    const p = s.preview;
    const i = p ? s.images.findIndex((im) => im.sop === p.sop && im.frame === 1) : -1;
    s.firstIndex = Math.max(0, i);
    if (i < 0) return;
    const take = () => {
      if (s.dropped || s.state[i] === 2) return;
      if (!p.data) { s.state[i] = 0; this.startLoading(s); return; }   // failed: fetch it again
      const img = s.images[i];
      if (p.img.rendered) img.rendered = true;
      this.stored(s, i, p.data);
    };
    if (p.img || p.failed) { take(); return; }
    s.state[i] = 1;   // on its way: the workers leave it
    const im = s.images[i], pending = im.gray ? im.rows * im.cols * im.bitsAllocated / 8 : 0;
    s.inflight += pending;   // counted against the memory cap (makeRoom) until it is here
    p.done.then(() => { s.inflight -= pending; take(); });
  }

  stored(s, i, data) {
    s.pixels[i] = data;
    s.state[i] = data ? 2 : 3;
    s.loaded++;
    if (data && data.byteLength) s.bytes += data.byteLength;
    if (s.loaded === s.count) s.allLoadedMs = performance.now();
    this.hooks.loaded(s, i);
  }

  drop(s) {
    s.dropped = true;
    this.cache.delete(s.uid);
  }

  evict() {
    let total = 0;
    for (const s of this.cache.values()) total += s.bytes;
    const shown = new Set(this.hooks.shown());
    const victims = [...this.cache.values()].filter((s) => !shown.has(s)).sort((a, b) => a.used - b.used);
    for (const s of victims) {
      if (total <= CACHE_BYTES) break;
      total -= s.bytes;
      this.drop(s);
    }
  }

  frameUrl(s, img) {
    return `${DW}studies/${this.studyUid}/series/${s.uid}/instances/${img.sop}/frames/${img.frame}`;
  }

  async loadRendered(s, img) {
    const rsp = await fetch(this.frameUrl(s, img) + "/rendered?accept=image/png", { credentials: "same-origin" });
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

  async loadImage(s, i) {
    const img = s.images[i];
    if (!img.gray) return this.loadRendered(s, img);
    const rsp = await fetch(this.frameUrl(s, img), { headers: { Accept: RAW_ACCEPT }, credentials: "same-origin" });
    return this.decodeRaw(s, img, rsp);
  }

  async decodeRaw(s, img, rsp) {
    if (rsp.status === 406) return this.loadRendered(s, img);   // no raw frames for this one
    if (!rsp.ok) throw new Error(`frame: ${rsp.status} ${rsp.statusText}`);
    const body = firstPart(await rsp.arrayBuffer(), rsp.headers.get("Content-Type"));
    const need = img.rows * img.cols * img.bitsAllocated / 8;
    if (body.byteLength < need) throw new Error(`frame: ${body.byteLength} bytes, ${need} expected`);
    return typedArray(img, body);
  }

  // The next image to fetch: the one nearest to what a viewport shows of this series.
  nextToLoad(s, batched = false, centres = this.centresOf(s)) {
    let best = -1, bestD = Infinity;
    for (let i = 0; i < s.count; i++) {
      if (s.state[i] !== 0 || this.batchable(s, i) !== batched) continue;
      let d = Infinity;
      for (const c of centres) d = Math.min(d, i >= c ? i - c : (c - i) + 0.5);   // ahead first
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }

  centresOf(s) {
    const centres = this.hooks.centres(s);
    if (!centres.length) centres.push(0);
    return centres;
  }

  startLoading(s) {
    if (s.dropped || !s.sorted) return;
    this.startBatches(s);
    const worker = async () => {
      s.active++;
      try {
        for (let guard = 0; guard < s.count * 2 + 10 && !s.dropped; guard++) {
          const i = this.nextToLoad(s);
          if (i < 0 || !this.makeRoom(s, i)) break;
          s.state[i] = 1;
          let data = null;
          for (let attempt = 0; attempt < 2 && !data; attempt++) {
            try { data = await this.loadImage(s, i); } catch (e) {
              if (attempt === 1) { console.warn("image", i + 1, "of series", s.uid, e.message); }
            }
          }
          if (s.dropped) break;
          this.stored(s, i, data);
        }
      } finally { s.active--; }
    };
    if (this.nextToLoad(s) < 0) return;
    const n = Math.min(CONCURRENCY, s.count) - s.active;
    for (let k = 0; k < n; k++) worker();
  }

  // ---- batches ---------------------------------------------------------------------------------
  // Grayscale single-frame images come BATCH_SIZE at a time from .../series/{uid}/pixels, two
  // batches in flight (one is being cut while the server reads the next), the first one small
  // (the slices around the one on screen, there quickly), nearest to the slice on screen first.
  // Each batch goes to a Web Worker (viewer-batch.js): it fetches, cuts the multipart body as it
  // streams in, masks each frame to BitsStored and finds its min/max, and transfers the frame's
  // ArrayBuffer here, where it is drawn if it is on screen. An image a batch leaves out (a bound
  // reached on the server, an unreadable file) is asked for again; after two misses it goes the
  // one-request-per-frame way, which says why it cannot be had.
  //
  // Memory: the decoded slices of one series are held to seriesBytes() (a 1,000-slice 512x512
  // 16-bit CT is 500 MB; the cap is the cache's, 1.5 GB on a desktop). Beyond it, slices
  // farthest from those on screen are dropped to make room for nearer ones, and fetched again
  // when the user scrolls back to them (the page calls startLoading when the slice changes).
  batchable(s, i) {
    const img = s.images[i];
    return !!(img && img.gray && img.frames === 1 && !s.single.has(i) && this.workers() !== null);
  }

  workers() {
    if (this.pool !== undefined) return this.pool;
    this.pool = null;
    if (!window.Worker) return null;
    try {
      const pool = [];
      for (let k = 0; k < BATCH_WORKERS; k++) {
        const w = new Worker(new URL("./viewer-batch.js", import.meta.url), { type: "module" });
        w.onmessage = (e) => this.fromWorker(e.data);
        w.onerror = (e) => this.workersFailed(e);
        pool.push(w);
      }
      this.pool = pool;
    } catch (e) {
      console.warn("no Web Worker; one request per frame:", e.message);
    }
    return this.pool;
  }

  // A worker that cannot run (its script not loaded, an engine without streams): no batches
  // any more; what they were bringing goes the one-request-per-frame way.
  workersFailed(e) {
    console.warn("pixel worker failed; one request per frame:", e && e.message);
    const pool = this.pool;
    this.pool = null;
    if (pool) for (const w of pool) w.terminate();
    for (const id of [...(this.batchesOut || new Map()).keys()]) {
      this.fromWorker({ id, error: "worker failed", status: 0 });
    }
  }

  distance(s, i, centres) {
    let d = Infinity;
    for (const c of centres) d = Math.min(d, Math.abs(i - c));
    return d;
  }

  // Room for image i within seriesBytes(): drop the loaded slices farthest from the screen, if
  // they are farther than i. False: no room (i waits until the user comes nearer).
  makeRoom(s, i, centres = this.centresOf(s), planned = 0) {
    const img = s.images[i];
    const cap = seriesBytes(), need = img.rows * img.cols * img.samples * img.bitsAllocated / 8;
    const over = () => s.bytes + s.inflight + planned + need > cap;
    if (!over()) return true;
    const far = [];
    for (let k = 0; k < s.count; k++) {
      if (s.state[k] === 2 && s.pixels[k] && s.pixels[k].byteLength) far.push(k);
    }
    far.sort((a, b) => this.distance(s, b, centres) - this.distance(s, a, centres));
    const mine = this.distance(s, i, centres);
    for (const k of far) {
      if (!over() || this.distance(s, k, centres) <= mine + 1) break;
      s.bytes -= s.pixels[k].byteLength;
      s.pixels[k] = null;
      s.state[k] = 0;
      s.loaded--;
      s.evicted++;
    }
    return !over();
  }

  startBatches(s) {
    if (!this.workers()) return;
    this.batchesOut = this.batchesOut || new Map();
    while (s.batches < BATCHES_IN_FLIGHT && !s.dropped) {
      const centres = this.centresOf(s);
      const size = s.batchesSent === 0 ? BATCH_FIRST : BATCH_SIZE;
      const pick = [];
      let planned = 0;
      while (pick.length < size) {
        const i = this.nextToLoad(s, true, centres);
        if (i < 0) break;
        const img = s.images[i];
        if (!this.makeRoom(s, i, centres, planned)) break;   // room for the whole batch
        planned += img.rows * img.cols * img.bitsAllocated / 8;
        s.state[i] = 1;
        pick.push(i);
      }
      if (!pick.length) return;
      this.sendBatch(s, pick);
    }
  }

  sendBatch(s, pick) {
    const id = this.batchSeq = (this.batchSeq || 0) + 1;
    const bySop = new Map();
    for (const i of pick) bySop.set(s.images[i].sop, i);
    const url = new URL(`${DW}studies/${this.studyUid}/series/${s.uid}/pixels?instances=` +
                        [...bySop.keys()].join(","), location.href).href;
    let bytes = 0;
    for (const i of pick) bytes += s.images[i].rows * s.images[i].cols * s.images[i].bitsAllocated / 8;
    s.inflight += bytes;   // counted against the cap until the batch has ended
    this.batchesOut.set(id, { s, pick, bySop, got: new Set(), bytes });
    s.batches++;
    s.batchesSent++;
    this.batchRequests = (this.batchRequests || 0) + 1;
    this.pool[id % this.pool.length].postMessage({ id, url, accept: RAW_ACCEPT });
  }

  fromWorker(msg) {
    const b = this.batchesOut.get(msg.id);
    if (!b) return;
    const s = b.s;
    if (msg.frame) {
      const i = b.bySop.get(msg.frame.sop);
      if (i === undefined || msg.frame.n !== 1 || s.dropped || s.state[i] !== 1) return;
      const img = s.images[i];
      if (msg.frame.buffer.byteLength < img.rows * img.cols * img.bitsAllocated / 8) return;
      b.got.add(i);
      const data = typedArray(img, msg.frame.buffer);
      s.inflight -= data.byteLength;   // now in s.bytes
      b.bytes -= data.byteLength;
      this.stored(s, i, data);
      return;
    }
    this.batchesOut.delete(msg.id);
    s.batches--;
    s.inflight -= b.bytes;
    if (msg.error) {
      if (msg.status === 401) { pacs.toLogin(); return; }
      console.warn("pixel batch of series", s.uid, msg.error);
    }
    for (const i of b.pick) {
      if (b.got.has(i) || s.state[i] !== 1) continue;
      s.state[i] = 0;
      const n = (s.misses.get(i) || 0) + 1;
      s.misses.set(i, n);
      // Refused outright (the batch resource is not there: an older server, a proxy), or
      // missed twice: one request per frame.
      if (n >= 2 || (msg.error && msg.status >= 400 && msg.status !== 503)) s.single.add(i);
    }
    if (!s.dropped) this.startLoading(s);
  }
}

// ---- windowing: one LUT per (image description, window, invert) -------------------------------
// Indexed by a pixel's bits as they came (8 or 16 of them: 256 or 65,536 entries), so that the
// masking and sign extension of storedValue are folded into the table with Rescale and the
// window: drawing a slice is one lookup per pixel (paintGray reads an unsigned view). The last
// few tables are kept (two viewports with two windows do not rebuild them every frame).
const luts = [];
export function lutFor(img, win, invert) {
  const key = [img.bitsAllocated, img.bitsStored, img.signed, img.slope, img.intercept,
               win.center, win.width, invert, img.photometric].join(",");
  const hit = luts.find((l) => l.key === key);
  if (hit) return hit;
  const size = img.bitsAllocated === 8 ? 256 : 65536;
  const entry = luts.length >= 4 ? luts.pop() : { key: "", lut: null };
  if (!entry.lut || entry.lut.length !== size) entry.lut = new Uint32Array(size);
  fillLut(entry.lut, img, win, invert);
  entry.key = key;
  luts.unshift(entry);
  return entry;
}
// PS3.3 C.11.2.1.2.1 (LINEAR): y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; as RGBA words.
export function gray(value, img, win, flip) {
  const m = value * img.slope + img.intercept;
  let y = (m - (win.center - 0.5)) / Math.max(win.width - 1, 1e-6) + 0.5;
  y = y <= 0 ? 0 : y >= 1 ? 1 : y;
  let g = Math.round(y * 255);
  if (flip) g = 255 - g;
  return g;
}
const littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
export const rgba = (g) => (littleEndian ? (0xff000000 | (g << 16) | (g << 8) | g) >>> 0 : ((g << 24) | (g << 16) | (g << 8) | 0xff) >>> 0);
function fillLut(lut, img, win, invert) {
  const flip = (img.photometric === "MONOCHROME1") !== invert;
  // The raw pattern as the typed array would read it (signed: two's complement of its width).
  const width = img.bitsAllocated === 8 ? 8 : 16, half = 1 << (width - 1);
  for (let i = 0; i < lut.length; i++) {
    const raw = img.signed && i >= half ? i - lut.length : i;
    lut[i] = rgba(gray(storedValue(img, raw), img, win, flip));
  }
}
