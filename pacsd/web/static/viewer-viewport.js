// One viewport: a canvas showing one slice of a series, its overlays (text, orientation
// letters, the value under the cursor), the mouse and touch tools (window/level, zoom, pan,
// distance, angle, elliptical ROI, pinch, wheel), the measurements and the reference line.
// It knows the page only through `page` (see viewer.js): the current tool and layout, the
// study, the SeriesStore, and what to tell the page (active viewport, image changed, drawn).
// Drawing happens in requestAnimationFrame (page.scheduleRender), so a burst of wheel events
// draws once per display frame.

import { gray, lutFor, rangeOf, rgba, storedValue } from "./viewer-pixels.js";
import { sideLetters } from "./viewer-geometry.js";
import { drawMeasurement, drawReferenceLine, fmtValue, label, measure, pixelValue } from "./viewer-tools.js";

export class Viewport {
  constructor(n, page) {
    this.n = n;
    this.page = page;
    this.el = document.createElement("div");
    this.el.className = "viewport";
    this.el.id = "viewport-" + n;
    this.el.innerHTML = `<canvas></canvas><div class="ov tl"></div><div class="ov tr"></div>
      <div class="ov bl"></div><div class="ov br"></div><div class="ov msg"></div>
      <div class="ov side left"></div><div class="ov side right"></div>
      <div class="ov side top"></div><div class="ov side bottom"></div>
      <div class="progress"></div><div class="slider-wrap"><input class="slice" type="range" min="0" max="0" value="0" aria-label="Slice"></div>`;
    this.canvas = this.el.querySelector("canvas");
    this.ctx = this.canvas.getContext("2d");
    this.ov = {};
    for (const k of ["tl", "tr", "bl", "br", "msg", "left", "right", "top", "bottom"]) this.ov[k] = this.el.querySelector(".ov." + k);
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
    this.measurements = [];   // {kind, series, index, a, b | pts, text, ...figures} (viewer-tools.js)
    this.probe = null;        // the image point under the mouse: [x, y]
    this.refLine = null;      // where the other viewport's slice cuts this image: [[x, y], [x, y]]
    this.dirty = false;
    this.cssW = 0; this.cssH = 0;
    this.slider.addEventListener("input", () => this.setIndex(Number(this.slider.value)));
    this.el.addEventListener("pointerdown", () => page.setActive(this.n), true);
    attachPointer(this);
    this.el.addEventListener("dragover", (e) => { e.preventDefault(); this.el.classList.add("drop"); });
    this.el.addEventListener("dragleave", () => this.el.classList.remove("drop"));
    this.el.addEventListener("drop", (e) => {
      e.preventDefault(); this.el.classList.remove("drop");
      const uid = e.dataTransfer.getData("text/x-pacsd-series");
      if (uid) { page.setActive(this.n); page.showSeries(uid, this); }
    });
  }
  visible() { return this.n < this.page.layout; }
  get count() { return this.series ? this.series.count : 0; }
  get image() { return this.series ? this.series.imageAt(this.index) : undefined; }
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
    this.page.markThumbs();
    try { await s.ready; } catch (e) {
      if (this.series === s) this.ov.msg.textContent = "Cannot load the series: " + e.message;
      return;
    }
    if (this.series !== s) return;
    // The first slice in the reading direction (head first for axial; viewer-geometry.js),
    // which is where the preview was drawn (the lowest InstanceNumber) for most series.
    this.index = 0;
    for (const m of this.measurements) m.index = s.firstIndex;   // drawn on the preview's image
    this.ov.msg.textContent = s.count ? "" : "No images in this series";
    this.slider.max = Math.max(0, s.count - 1);
    this.slider.value = this.index;
    this.page.store.startLoading(s);
    this.invalidate();
    this.page.imageChanged(this);
  }
  setIndex(i) {
    if (!this.series || !this.count) return;
    i = Math.max(0, Math.min(this.count - 1, Math.round(i)));
    if (i === this.index) return;
    this.index = i;
    this.slider.value = i;
    this.invalidate();
    this.page.imageChanged(this);
  }
  defaultWindow() {
    const img = this.image;
    if (!img) return { center: 40, width: 400 };
    if (img.wc !== null && img.ww !== null && img.ww > 0) return { center: img.wc, width: img.ww };
    const px = this.series && this.series.pixelsAt(this.index);
    if (img.min === undefined && px && px.BYTES_PER_ELEMENT && !img.rendered) rangeOf(img, px);
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
    this.page.scheduleRender();
  }
  showProgress() {
    const s = this.series;
    if (!s || !s.count) { this.bar.style.transform = "scaleX(0)"; return; }
    this.bar.style.transform = `scaleX(${s.loaded / s.count})`;
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
    const data = s.pixelsAt(this.index);
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
    if (this.refLine) drawReferenceLine(ctx, (p) => this.toScreen(p), this.refLine);
    this.overlay();
    this.page.drawn(this);
  }
  paintGray(img, px) {
    if (this.off.width !== img.cols || this.off.height !== img.rows || !this.imageData) {
      this.off.width = img.cols; this.off.height = img.rows;
      this.imageData = this.offCtx.createImageData(img.cols, img.rows);
    }
    const out = new Uint32Array(this.imageData.data.buffer);
    const n = img.rows * img.cols;
    if (img.bitsAllocated <= 16) {   // the table, indexed by the bits as they came
      const { lut } = lutFor(img, this.window, this.invert);
      const raw = img.bitsAllocated === 8 ? new Uint8Array(px.buffer, px.byteOffset, n)
                                          : new Uint16Array(px.buffer, px.byteOffset, n);
      for (let i = 0; i < n; i++) out[i] = lut[raw[i]];
    } else {   // 32-bit: no table, computed per pixel
      const flip = (img.photometric === "MONOCHROME1") !== this.invert;
      for (let i = 0; i < n; i++) out[i] = rgba(gray(storedValue(img, px[i]), img, this.window, flip));
    }
    this.offCtx.putImageData(this.imageData, 0, 0);
    return this.off;
  }
  drawMeasurements() {
    for (const m of this.measurements) {
      if (m.series === this.series && m.index === this.index) drawMeasurement(this.ctx, (p) => this.toScreen(p), m);
    }
  }
  overlay() {
    const s = this.series, img = this.image, study = this.page.study;
    if (!s || !study) {
      for (const k of ["tl", "tr", "bl", "br", "left", "right", "top", "bottom"]) this.ov[k].textContent = "";
      return;
    }
    const sides = img ? sideLetters(img.iop) : null;
    for (const k of ["left", "right", "top", "bottom"]) this.ov[k].textContent = sides ? sides[k] : "";
    const info = s.info;
    this.ov.tl.textContent = [pacs.fmtName(study.patient_name), study.patient_id,
      [pacs.fmtDate(study.birth_date), study.sex].filter(Boolean).join(" ")].filter(Boolean).join("\n");
    this.ov.tr.textContent = [study.institution, study.description,
      [pacs.fmtDate(study.study_date), pacs.fmtTime(study.study_time)].filter(Boolean).join(" ")]
      .filter(Boolean).join("\n");
    const lines = [`Se: ${info.number == null ? "" : info.number} ${info.description || ""}`.trim()];
    if (img) {
      // Before the series is sorted (the preview) its place is not known yet.
      // Place in the stack, then the Instance Number (what reports and other viewers quote)
      // and the position along the normal (the table position of an axial CT).
      const at = s.sorted ? `${this.index + 1} / ${this.count}` : `– / ${info.instances}`;
      const pos = img.pos !== null && img.pos !== undefined ? ` · ${img.pos.toFixed(1)} mm` : "";
      lines.push(`Im: ${at} · #${img.number}${pos}` + (img.frames > 1 ? `  (frame ${img.frame}/${img.frames})` : ""));
    }
    const last = this.measurements.filter((m) => m.series === s && m.index === this.index).slice(-1)[0];
    if (last) lines.push(`${label(last)}: ${last.text}`);
    const v = this.probe && img && s.sorted ? pixelValue(img, s.pixelsAt(this.index), this.probe[0], this.probe[1]) : null;
    if (v) lines.push(`Val: ${fmtValue(v.value)}${v.units ? " " + v.units : ""}  (${v.col}, ${v.row})`);
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
      if (drag && drag.measure || pending) vp.measurements.pop();
      drag = null; pending = null;
      const [p, q] = [...pts.values()];
      pinch = { d: Math.hypot(p.x - q.x, p.y - q.y) || 1, mx: (p.x + q.x) / 2, my: (p.y + q.y) / 2,
                zoom: vp.zoom, pan: { ...vp.pan } };
      return;
    }
    if (pts.size > 2) return;
    const t = e.button === 1 ? "pan" : e.button === 2 ? "zoom" : vp.page.tool;
    drag = { tool: t, x0: x, y0: y, win: { ...vp.window }, zoom: vp.zoom, pan: { ...vp.pan },
             anchor: vp.toImage(x, y), moved: false };
    if (pending && (pending.kind !== KINDS[t] || pending.series !== vp.series || pending.index !== vp.index ||
                    !vp.measurements.includes(pending))) {
      vp.measurements = vp.measurements.filter((m) => m !== pending);   // left unfinished
      pending = null;
    }
    if (KINDS[t]) {
      const p = vp.toImage(x, y);
      if (pending) {   // the next click of a click-click measurement
        if (pending.kind === "angle" && pending.pts.length < 3) {   // the vertex: one arm more
          pending.pts[1] = p; pending.pts.push(p); finishMeasure(pending);
          drag = null; vp.invalidate();
          return;
        }
        setEnd(pending, p); pending = null; drag = null; vp.invalidate();
        return;
      }
      drag.measure = addMeasure(p, KINDS[t]);
    }
    e.preventDefault();
  });
  c.addEventListener("pointermove", (e) => {
    if (vp.image && e.pointerType !== "touch") { vp.probe = vp.toImage(...local(e)); vp.overlay(); }
    if (!pts.has(e.pointerId)) {
      if (pending && vp.image) { setEnd(pending, vp.toImage(...local(e))); vp.invalidate(); }   // rubber band
      return;
    }
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
    } else if (KINDS[drag.tool] && drag.measure) {
      setEnd(drag.measure, vp.toImage(x, y));
      vp.invalidate();
    }
  });
  const end = (e) => {
    if (!pts.has(e.pointerId)) return;
    pts.delete(e.pointerId);
    if (pinch) { if (pts.size < 2) pinch = null; drag = null; return; }
    const m = drag && KINDS[drag.tool] && drag.measure;
    if (m && m.kind === "angle" && m.pts.length < 3) {
      // the first arm drawn (dragged) or started (clicked): the next click ends the angle
      if (drag.moved) m.pts.push(m.pts[1]);
      pending = m;
    } else if (m && !drag.moved && m.kind !== "angle") pending = m;
    drag = null;
  };
  c.addEventListener("pointerup", end);
  c.addEventListener("pointerleave", () => { if (vp.probe) { vp.probe = null; vp.overlay(); } });
  c.addEventListener("pointercancel", end);

  function addMeasure(p, kind) {
    const m = kind === "angle"
      ? { kind, series: vp.series, index: vp.index, pts: [p, p], text: "" }
      : { kind, series: vp.series, index: vp.index, a: p, b: p, text: "", mm: null, px: 0 };
    vp.measurements.push(m);
    finishMeasure(m);
    return m;
  }
  // The point that follows the mouse: b, or the last point of an angle.
  function setEnd(m, p) {
    if (m.kind === "angle") m.pts[m.pts.length - 1] = p; else m.b = p;
    finishMeasure(m);
  }
  function finishMeasure(m) {
    if (vp.image) measure(m, vp.image, vp.series.pixelsAt(vp.index));
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
    // A turn the other way starts afresh: what was left of the last notches does not eat it.
    if ((vp.wheelAcc || 0) * e.deltaY < 0) vp.wheelAcc = 0;
    vp.wheelAcc = (vp.wheelAcc || 0) + e.deltaY * unit;
    const steps = vp.wheelAcc > 0 ? Math.floor(vp.wheelAcc) : Math.ceil(vp.wheelAcc);
    if (steps) { vp.wheelAcc -= steps; vp.setIndex(vp.index + Math.sign(steps) * Math.max(1, Math.abs(steps))); }
  }, { passive: false });
}

// The tools that draw a measurement, and its kind.
const KINDS = { measure: "distance", angle: "angle", ellipse: "ellipse" };

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
