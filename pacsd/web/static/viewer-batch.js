// The viewer's pixel worker (a dedicated Web Worker, started by viewer-pixels.js): fetches a
// batch of frames (pacsd's /dicom-web/.../series/{uid}/pixels, multipart/related of native
// little endian frames), cuts the parts as they stream in, and hands each frame back as an
// ArrayBuffer of its own (transferred, not copied), with its pixels masked to BitsStored and its
// min/max found: the work of a slice is done here, so the page only draws.
//
// Message in:  {id, url, accept, kinds: {sop: {bitsAllocated, bitsStored, signed, bytes}}}
// Messages out: {id, frame: {sop, n, buffer, min, max}} per frame as it arrives, then
//               {id, done: true, status} or {id, error: message, status}.
// Parts are cut by their Content-Length (pacsd sends it); a part without one is cut at the next
// delimiter (RFC 2046 5.1), which costs a scan.
"use strict";

const enc = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));

function indexOf(hay, needle, from) {
  const n0 = needle[0], last = hay.length - needle.length;
  outer: for (let i = from; i <= last; i++) {
    if (hay[i] !== n0) continue;
    for (let j = 1; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

// A growable byte queue over the stream's chunks: bytes are copied once into `buf`.
class Bytes {
  constructor() { this.buf = new Uint8Array(1 << 20); this.start = 0; this.end = 0; }
  get length() { return this.end - this.start; }
  view() { return this.buf.subarray(this.start, this.end); }
  push(chunk) {
    if (this.end + chunk.length > this.buf.length) {
      const live = this.length;
      if (live + chunk.length <= this.buf.length) this.buf.copyWithin(0, this.start, this.end);
      else {
        const next = new Uint8Array(Math.max(this.buf.length * 2, live + chunk.length));
        next.set(this.view());
        this.buf = next;
      }
      this.start = 0; this.end = live;
    }
    this.buf.set(chunk, this.end);
    this.end += chunk.length;
  }
  // n bytes as a fresh ArrayBuffer (aligned for any typed array), consumed.
  take(n) {
    const out = new Uint8Array(n);
    out.set(this.buf.subarray(this.start, this.start + n));
    this.start += n;
    return out.buffer;
  }
  skip(n) { this.start += n; }
}

// Mask / sign-extend the bits above BitsStored (they may carry overlays or garbage) and find
// min/max, in one pass.
function finish(kind, buffer) {
  const ba = kind.bitsAllocated, bs = kind.bitsStored, signed = kind.signed;
  const n = Math.floor(buffer.byteLength / (ba / 8));
  let a;
  if (ba === 8) a = signed ? new Int8Array(buffer, 0, n) : new Uint8Array(buffer, 0, n);
  else if (ba === 16) a = signed ? new Int16Array(buffer, 0, n) : new Uint16Array(buffer, 0, n);
  else a = signed ? new Int32Array(buffer, 0, n) : new Uint32Array(buffer, 0, n);
  let lo = Infinity, hi = -Infinity;
  if (bs < ba && ba <= 16 && signed) {
    const sh = 32 - bs;
    for (let i = 0; i < n; i++) {
      const v = (a[i] << sh) >> sh; a[i] = v;
      if (v < lo) lo = v; if (v > hi) hi = v;
    }
  } else if (bs < ba && ba <= 16) {
    const mask = (1 << bs) - 1;
    for (let i = 0; i < n; i++) {
      const v = a[i] & mask; a[i] = v;
      if (v < lo) lo = v; if (v > hi) hi = v;
    }
  } else {
    for (let i = 0; i < n; i++) { const v = a[i]; if (v < lo) lo = v; if (v > hi) hi = v; }
  }
  return { min: lo, max: hi };
}

const LOCATION = /\/instances\/([0-9.]+)\/frames\/(\d+)\s*$/;

async function batch(msg) {
  const { id, url, accept, kinds } = msg;
  const rsp = await fetch(url, { headers: { Accept: accept }, credentials: "same-origin" });
  if (!rsp.ok) {
    if (rsp.body) rsp.body.cancel().catch(() => {});
    postMessage({ id, error: `${rsp.status} ${rsp.statusText}`, status: rsp.status });
    return;
  }
  const m = /boundary="?([^";,]+)"?/i.exec(rsp.headers.get("Content-Type") || "");
  if (!m) throw new Error("no multipart boundary");
  const first = enc("--" + m[1]), delim = enc("\r\n--" + m[1]), eoh = enc("\r\n\r\n");
  const q = new Bytes();
  const reader = rsp.body.getReader();
  let state = "preamble", part = null, ended = false, frames = 0;
  // Cut what the queue holds; returns false when more bytes are needed.
  const step = () => {
    const v = q.view();
    if (state === "preamble") {
      const i = indexOf(v, first, 0);
      if (i < 0) return false;
      q.skip(i + first.length);
      state = "delimiter";
      return true;
    }
    if (state === "delimiter") {   // after a delimiter: "--" (the end) or the line end
      if (v.length < 2) return false;
      if (v[0] === 45 && v[1] === 45) { ended = true; return false; }
      const eol = indexOf(v, enc("\r\n"), 0);
      if (eol < 0) return false;
      q.skip(eol + 2);
      state = "headers";
      return true;
    }
    if (state === "headers") {
      const i = indexOf(v, eoh, 0);
      if (i < 0) return false;
      const text = String.fromCharCode.apply(null, v.subarray(0, i));
      part = { length: -1, sop: null, n: 1 };
      for (const line of text.split("\r\n")) {
        const c = line.indexOf(":");
        if (c < 0) continue;
        const name = line.slice(0, c).trim().toLowerCase(), value = line.slice(c + 1).trim();
        if (name === "content-length") part.length = Number(value);
        else if (name === "content-location") {
          const loc = LOCATION.exec(value);
          if (loc) { part.sop = loc[1]; part.n = Number(loc[2]); }
        }
      }
      q.skip(i + eoh.length);
      state = "body";
      return true;
    }
    // body: by its length (copied into the frame's own buffer as it arrives, once), else up
    // to the next delimiter
    let buffer;
    if (part.length >= 0) {
      if (!part.out) { part.out = new Uint8Array(part.length); part.filled = 0; }
      if (part.filled < part.length) {
        const k = Math.min(v.length, part.length - part.filled);
        part.out.set(v.subarray(0, k), part.filled);
        part.filled += k;
        q.skip(k);
        if (part.filled < part.length) return false;
      }
      if (q.length < delim.length) return false;
      buffer = part.out.buffer;
    } else {
      const n = indexOf(v, delim, 0);
      if (n < 0) return false;
      buffer = q.take(n);
    }
    q.skip(delim.length);
    state = "delimiter";
    const kind = part.sop && kinds[part.sop];
    if (kind) {
      const { min, max } = finish(kind, buffer);
      postMessage({ id, frame: { sop: part.sop, n: part.n, buffer, min, max } }, [buffer]);
      frames++;
    }
    return true;
  };
  while (!ended) {   // ends with the body
    const { value, done } = await reader.read();
    if (value) q.push(value);
    while (!ended && step()) { /* cut every whole part */ }
    if (done) break;
  }
  if (!ended) reader.cancel().catch(() => {});
  postMessage({ id, done: true, status: rsp.status, frames, complete: ended });
}

onmessage = (e) => {
  batch(e.data).catch((err) => postMessage({ id: e.data.id, error: String(err && err.message || err), status: 0 }));
};
