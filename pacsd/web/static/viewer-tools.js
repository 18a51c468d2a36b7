// The everyday reading tools of a viewport, as pure functions of an image and its pixels:
// the value under the cursor in modality units, the distance / angle / elliptical region
// measurements (computed and drawn), and the reference line and linked scrolling between two
// viewports. viewer-viewport.js calls them; nothing here touches the page's DOM.

import { nearestSlice, referenceLine } from "./viewer-geometry.js";
import { storedValue } from "./viewer-pixels.js";

export { referenceLine };

/**
 * The units of an image's modality values (after Rescale Slope/Intercept, PS3.3 C.11.1.1.2):
 * RescaleType when given, "HU" for CT (C.8.2.1.1.5: CT images are rescaled to Hounsfield
 * units), else none (MR and the like have arbitrary units).
 * @param {any} img
 */
export function units(img) {
  const t = (img.rescaleType || "").trim();
  if (t && t !== "US") return t;   // "US": unspecified
  return img.modality === "CT" ? "HU" : "";
}

/**
 * The modality value at image coordinates (x, y): {col, row, value, units}, or null outside
 * the image or without raw pixels (a colour or rendered frame).
 * @param {any} img @param {any} px @param {number} x @param {number} y
 */
export function pixelValue(img, px, x, y) {
  if (!img || !px || !px.BYTES_PER_ELEMENT || img.rendered) return null;
  const col = Math.floor(x), row = Math.floor(y);
  if (col < 0 || row < 0 || col >= img.cols || row >= img.rows) return null;
  const value = storedValue(img, px[row * img.cols + col]) * img.slope + img.intercept;
  return { col, row, value, units: units(img) };
}

/** @param {number} v */
export const fmtValue = (v) => (Math.abs(v - Math.round(v)) < 1e-6 ? String(Math.round(v)) : v.toFixed(1));

/**
 * Mean, standard deviation (of the population: divided by N), pixel count and area of the
 * ellipse inscribed in the box from a to b (image coordinates). A pixel counts when its centre
 * lies inside the ellipse; the area is the ellipse's own (pi * a * b, in mm² with PixelSpacing,
 * else in pixels²), so it does not depend on how pixels fall on the edge.
 * @param {any} img @param {any} px @param {number[]} a @param {number[]} b
 */
export function ellipseStats(img, px, a, b) {
  const cx = (a[0] + b[0]) / 2, cy = (a[1] + b[1]) / 2;
  const rx = Math.abs(b[0] - a[0]) / 2, ry = Math.abs(b[1] - a[1]) / 2;
  const sp = img.spacing;
  const area = Math.PI * rx * ry * (sp ? sp[0] * sp[1] : 1);
  let n = 0, sum = 0, sum2 = 0;
  if (rx > 0 && ry > 0 && px && px.BYTES_PER_ELEMENT && !img.rendered) {
    const c0 = Math.max(0, Math.floor(cx - rx)), c1 = Math.min(img.cols - 1, Math.ceil(cx + rx));
    const r0 = Math.max(0, Math.floor(cy - ry)), r1 = Math.min(img.rows - 1, Math.ceil(cy + ry));
    for (let r = r0; r <= r1; r++) {
      const dy = (r + 0.5 - cy) / ry;
      for (let c = c0; c <= c1; c++) {
        const dx = (c + 0.5 - cx) / rx;
        if (dx * dx + dy * dy > 1) continue;
        const v = storedValue(img, px[r * img.cols + c]) * img.slope + img.intercept;
        n++; sum += v; sum2 += v * v;
      }
    }
  }
  const mean = n ? sum / n : NaN;
  const sd = n ? Math.sqrt(Math.max(0, sum2 / n - mean * mean)) : NaN;
  return { n, mean, sd, area, areaUnits: sp ? "mm²" : "px²" };
}

/**
 * The angle at pts[1] between the arms to pts[0] and pts[2], in degrees, measured in the
 * patient's millimetres (PixelSpacing: a non-square pixel does not bend it).
 * @param {any} img @param {number[][]} pts
 */
export function angleDegrees(img, pts) {
  const sp = img.spacing || [1, 1];
  const u = [(pts[0][0] - pts[1][0]) * sp[1], (pts[0][1] - pts[1][1]) * sp[0]];
  const v = [(pts[2][0] - pts[1][0]) * sp[1], (pts[2][1] - pts[1][1]) * sp[0]];
  const nu = Math.hypot(u[0], u[1]), nv = Math.hypot(v[0], v[1]);
  if (!nu || !nv) return 0;
  const c = Math.max(-1, Math.min(1, (u[0] * v[0] + u[1] * v[1]) / (nu * nv)));
  return Math.acos(c) * 180 / Math.PI;
}

/**
 * Fill in m.text (and the figures) of a measurement:
 *   {kind: "distance", a, b}  -> m.mm (or m.px)
 *   {kind: "angle", pts}      -> m.degrees
 *   {kind: "ellipse", a, b}   -> m.stats (mean, sd, n, area)
 * @param {any} m @param {any} img @param {any} px
 */
export function measure(m, img, px) {
  if (m.kind === "angle") {
    m.degrees = m.pts.length === 3 ? angleDegrees(img, m.pts) : 0;
    m.text = `${m.degrees.toFixed(1)}°`;
  } else if (m.kind === "ellipse") {
    const s = ellipseStats(img, px, m.a, m.b);
    m.stats = s;
    const u = units(img);
    const area = `${s.area.toFixed(1)} ${s.areaUnits}`;
    m.text = s.n ? `${fmtValue(s.mean)} ± ${fmtValue(s.sd)}${u ? " " + u : ""} · ${area}` : area;
  } else {
    const dx = m.b[0] - m.a[0], dy = m.b[1] - m.a[1];
    m.px = Math.hypot(dx, dy);
    if (img.spacing) {
      m.mm = Math.hypot(dx * img.spacing[1], dy * img.spacing[0]);
      m.text = `${m.mm.toFixed(1)} mm`;
    } else {
      m.text = `${m.px.toFixed(1)} px`;
    }
  }
}

/** The overlay's name of a measurement kind. @param {any} m */
export const label = (m) => (m.kind === "angle" ? "Angle" : m.kind === "ellipse" ? "ROI" : "Dist");

const YELLOW = "#ffd400";

/**
 * Draw a measurement on the viewport's canvas (CSS pixel transform already set).
 * @param {CanvasRenderingContext2D} ctx @param {(p: number[]) => number[]} toScreen @param {any} m
 */
export function drawMeasurement(ctx, toScreen, m) {
  ctx.strokeStyle = YELLOW; ctx.fillStyle = YELLOW; ctx.lineWidth = 1.5;
  let at;
  if (m.kind === "ellipse") {
    const a = toScreen(m.a), b = toScreen(m.b);
    const rx = Math.abs(b[0] - a[0]) / 2, ry = Math.abs(b[1] - a[1]) / 2;
    ctx.beginPath();
    ctx.ellipse((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, rx, ry, 0, 0, 2 * Math.PI);
    ctx.stroke();
    at = [Math.max(a[0], b[0]) + 6, Math.min(a[1], b[1]) - 4];
  } else {
    const pts = (m.kind === "angle" ? m.pts : [m.a, m.b]).map(toScreen);
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(p[0], p[1]) : ctx.moveTo(p[0], p[1])));
    ctx.stroke();
    for (const p of pts) { ctx.beginPath(); ctx.arc(p[0], p[1], 3, 0, 2 * Math.PI); ctx.fill(); }
    const last = pts[m.kind === "angle" ? 1 : pts.length - 1];
    at = [last[0] + 8, last[1] - 6];
  }
  ctx.font = "13px sans-serif";
  ctx.shadowColor = "#000"; ctx.shadowBlur = 3;
  ctx.fillText(m.text, at[0], at[1]);
  ctx.shadowBlur = 0;
}

/**
 * Draw a reference line (two points in image coordinates) across the image.
 * @param {CanvasRenderingContext2D} ctx @param {(p: number[]) => number[]} toScreen
 * @param {number[][]} line
 */
export function drawReferenceLine(ctx, toScreen, line) {
  const a = toScreen(line[0]), b = toScreen(line[1]);
  ctx.strokeStyle = "#4fd1ff"; ctx.lineWidth = 1; ctx.setLineDash([6, 4]);
  ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
  ctx.setLineDash([]);
}

/**
 * Where a linked viewport goes when `from` moved from slice `before` to its current slice:
 * the slice nearest in the patient (parallel stacks of one Frame of Reference), or, without
 * an anatomical match for two stacks of the same orientation, the same number of slices on.
 * Stacks that cross (axial beside sagittal) do not move: the reference line shows where.
 * @param {any} from the viewport scrolled @param {any} to the linked one @param {number} before
 * @returns {number | null} the new index of `to`, or null to leave it
 */
export function linkedIndex(from, to, before) {
  const src = from.image, s = to.series;
  if (!src || !s || !s.sorted || !s.count) return null;
  const i = nearestSlice(src, s.images);
  if (i >= 0) return i;
  const dst = to.image;
  if (src.iop && dst && dst.iop && referenceLine(src, dst)) return null;   // crossing planes
  return to.index + (from.index - before);
}
