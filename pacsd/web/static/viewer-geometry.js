// Patient geometry of a slice (PS3.3 C.7.6.2.1.1): which way a stack is read, the orientation
// letters on each side of the image, and where one slice's plane cuts another image (the
// reference line). Pure functions, no DOM; used by viewer-pixels.js (slice order) and the
// viewports (letters, reference lines, linked scrolling).
//
// Patient coordinates are LPS: +x towards the patient's Left, +y Posterior, +z Head.
// ImageOrientationPatient holds the row direction (along which the column index grows, i.e.
// towards the image's right side) and the column direction (towards the image's bottom).

/** @typedef {[number, number, number]} Vec */

/** @param {Vec} a @param {Vec} b @returns {number} */
export const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
/** @param {Vec} a @param {Vec} b @returns {Vec} */
export const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2],
  a[0] * b[1] - a[1] * b[0]];

/**
 * Row and column directions, and the stack normal (row x column), of an ImageOrientationPatient
 * value; null when it is missing or not two unit-ish vectors.
 * @param {number[] | null | undefined} iop
 * @returns {{row: Vec, col: Vec, normal: Vec} | null}
 */
export function frameOf(iop) {
  if (!iop || iop.length !== 6 || !iop.every(Number.isFinite)) return null;
  const row = /** @type {Vec} */ (iop.slice(0, 3)), col = /** @type {Vec} */ (iop.slice(3, 6));
  const normal = cross(row, col);
  if (Math.hypot(...normal) < 0.5) return null;   // parallel or zero vectors: no plane
  return { row, col, normal };
}

// The usual reading direction of a stack, in LPS, by the axis its normal is closest to:
//   axial (normal ~ z)     head first, going down the body towards the feet: -z
//   sagittal (normal ~ x)  from the patient's right to the left:              +x
//   coronal (normal ~ y)   from anterior (front) to posterior (back):          +y
// So slice 1 of an axial CT is the most superior and scrolling down goes to the feet.
const READ = [1, 1, -1];

/** The patient axis (0 x, 1 y, 2 z) a normal is closest to. @param {Vec} normal */
export function axisOf(normal) {
  const a = normal.map(Math.abs);
  return a[0] >= a[1] && a[0] >= a[2] ? 0 : a[1] >= a[2] ? 1 : 2;
}

/**
 * Where a slice lies in its stack, in mm: ImagePositionPatient along the normal, signed so that
 * it reads as the patient coordinate of the normal's nearest axis (z for axial, x for sagittal,
 * y for coronal), whichever way the row and column vectors make the normal point.
 * @param {Vec} normal @param {number[]} ipp
 */
export function stackPosition(normal, ipp) {
  return dot(normal, /** @type {Vec} */ (ipp)) * (Math.sign(normal[axisOf(normal)]) || 1);
}

/**
 * +1 or -1: the slices of a stack are read in the order of reading sign * stackPosition.
 * @param {Vec} normal
 */
export function readingSign(normal) {
  return READ[axisOf(normal)];
}

/** "axial", "sagittal" or "coronal": the plane a normal is closest to. @param {Vec} normal */
export function planeName(normal) {
  const a = normal.map(Math.abs);
  return a[2] >= a[0] && a[2] >= a[1] ? "axial" : a[0] >= a[1] ? "sagittal" : "coronal";
}

// A second letter for an oblique direction when its component is at least this (about 14°):
// small tilts keep one letter, as most viewers show them.
const OBLIQUE = 0.25;
const LETTERS = [["R", "L"], ["A", "P"], ["F", "H"]];   // [negative, positive] along x, y, z

/**
 * The patient direction a vector points to, as one letter, or two for an oblique one (the
 * larger component first): [1,0,0] -> "L", [0,0.87,-0.5] -> "PF".
 * @param {number[]} v
 */
export function directionLetters(v) {
  const parts = [0, 1, 2].map((i) => ({ a: Math.abs(v[i]), l: LETTERS[i][v[i] < 0 ? 0 : 1] }))
    .sort((p, q) => q.a - p.a);
  return parts[0].l + (parts[1].a >= OBLIQUE ? parts[1].l : "");
}

/**
 * The letters on the four sides of an image with this ImageOrientationPatient, or null.
 * @param {number[] | null | undefined} iop
 * @returns {{left: string, right: string, top: string, bottom: string} | null}
 */
export function sideLetters(iop) {
  const f = frameOf(iop);
  if (!f) return null;
  const neg = (/** @type {Vec} */ v) => v.map((x) => -x);
  return { left: directionLetters(neg(f.row)), right: directionLetters(f.row),
           top: directionLetters(neg(f.col)), bottom: directionLetters(f.col) };
}

/**
 * @typedef {{iop: number[] | null, ipp: number[] | null, spacing: number[] | null,
 *            rows: number, cols: number, frameOfReference: string}} Plane
 */

/**
 * The point of patient space at image coordinates (x, y) of `img`; the viewer's image
 * coordinates put pixel (c, r) over [c, c+1) x [r, r+1), and ImagePositionPatient is the
 * centre of pixel (0, 0). PixelSpacing is [row spacing, column spacing] (PS3.3 10.7.1.3).
 * @param {Plane} img @param {number} x @param {number} y @returns {Vec | null}
 */
export function patientPoint(img, x, y) {
  const f = frameOf(img.iop);
  if (!f || !img.ipp || !img.spacing) return null;
  const u = (x - 0.5) * img.spacing[1], v = (y - 0.5) * img.spacing[0];
  return [0, 1, 2].map((i) => /** @type {number[]} */ (img.ipp)[i] + u * f.row[i] + v * f.col[i]);
}

/**
 * Where the plane of slice `src` cuts image `dst`: two points in dst's image coordinates (the
 * ends of the line across the image), or null when they share no Frame of Reference, lack
 * geometry, are (nearly) parallel, or the plane misses the image.
 * @param {Plane} src @param {Plane} dst @returns {[number, number][] | null}
 */
export function referenceLine(src, dst) {
  const fs = frameOf(src.iop), fd = frameOf(dst.iop);
  if (!fs || !fd || !src.ipp || !dst.ipp || !dst.spacing) return null;
  if (!src.frameOfReference || src.frameOfReference !== dst.frameOfReference) return null;
  const n = fs.normal, nn = Math.hypot(...n);
  if (Math.abs(dot(n, fd.normal)) / (nn * Math.hypot(...fd.normal)) > 0.98) return null;
  // signed distance of dst's point (x, y) from src's plane: A x + B y + C = 0 on the line
  const A = dot(n, fd.row) * dst.spacing[1], B = dot(n, fd.col) * dst.spacing[0];
  const d0 = dot(n, /** @type {Vec} */ (dst.ipp.map((v, i) => v - /** @type {number[]} */ (src.ipp)[i])));
  const C = d0 - 0.5 * A - 0.5 * B;
  /** @type {[number, number][]} */
  const pts = [];
  const add = (/** @type {number} */ x, /** @type {number} */ y) => {
    if (x < -1e-6 || x > dst.cols + 1e-6 || y < -1e-6 || y > dst.rows + 1e-6) return;
    if (pts.some((p) => Math.abs(p[0] - x) < 1e-6 && Math.abs(p[1] - y) < 1e-6)) return;
    pts.push([x, y]);
  };
  if (Math.abs(B) > 1e-9) { add(0, -C / B); add(dst.cols, -(A * dst.cols + C) / B); }
  if (Math.abs(A) > 1e-9) { add(-C / A, 0); add(-(B * dst.rows + C) / A, dst.rows); }
  return pts.length >= 2 ? [pts[0], pts[1]] : null;
}

/**
 * The index of `images` whose slice lies nearest to the plane of `src`, along src's normal,
 * when both are parallel stacks of one Frame of Reference; else -1 (no anatomical match).
 * @param {Plane} src @param {Plane[]} images
 */
export function nearestSlice(src, images) {
  const fs = frameOf(src.iop);
  if (!fs || !src.ipp || !images.length) return -1;
  const at = dot(fs.normal, /** @type {Vec} */ (src.ipp));
  let best = -1, bestD = Infinity;
  for (let i = 0; i < images.length; i++) {
    const im = images[i], f = frameOf(im.iop);
    if (!f || !im.ipp || im.frameOfReference !== src.frameOfReference || !src.frameOfReference) return -1;
    if (Math.abs(dot(f.normal, fs.normal)) < 0.98) return -1;
    const d = Math.abs(dot(fs.normal, /** @type {Vec} */ (im.ipp)) - at);
    if (d < bestD) { bestD = d; best = i; }
  }
  return best;
}
