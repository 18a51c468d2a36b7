// multipart/related bodies (RFC 2046 5.1, PS3.18 8.6.1.2) cut as they stream in, for the
// viewer's pixel worker (viewer-batch.js): cutter(boundary, emit) gives feed(chunk), called with
// each chunk of the body, and emit(part, buffer) is called once per whole part with the part's
// headers read ({length, sop, n} from Content-Length and Content-Location) and its body as an
// ArrayBuffer of its own.
//
// Speed: a 1,000-slice CT is half a gigabyte, so each byte is touched once: a part's body is
// copied from the chunks straight into the part's own buffer, cut by its Content-Length (pacsd
// sends it). Only the small pieces between bodies (delimiters, part headers) go through a carry
// buffer when they straddle two chunks. A part without a Content-Length is cut at the next
// delimiter, which costs a scan and a second copy.

const enc = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));
const CRLF = enc("\r\n"), EOH = enc("\r\n\r\n");
const PIECE = 4096;           // bytes moved into the carry at a time while looking for a token
const MAX_HEAD = 64 * 1024;   // part headers (and a preamble) longer than this: not a batch

function indexOf(hay, needle, from) {
  const n0 = needle[0], last = hay.length - needle.length;
  outer: for (let i = from; i <= last; i++) {
    if (hay[i] !== n0) continue;
    for (let j = 1; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

// A growable byte queue for what straddles chunks.
class Carry {
  constructor() { this.buf = new Uint8Array(PIECE * 2); this.start = 0; this.end = 0; }
  get length() { return this.end - this.start; }
  view() { return this.buf.subarray(this.start, this.end); }
  push(bytes) {
    const live = this.length;
    if (this.end + bytes.length > this.buf.length) {
      if (live + bytes.length <= this.buf.length) this.buf.copyWithin(0, this.start, this.end);
      else {
        const next = new Uint8Array(Math.max(this.buf.length * 2, live + bytes.length));
        next.set(this.view());
        this.buf = next;
      }
      this.start = 0; this.end = live;
    }
    this.buf.set(bytes, this.end);
    this.end += bytes.length;
  }
  skip(n) { this.start += n; if (this.start === this.end) this.start = this.end = 0; }
}

const LOCATION = /\/instances\/([0-9.]+)\/frames\/(\d+)\s*$/;

// The multipart cutter: feed(chunk) for each chunk of the body; emit(part) per whole part.
// step(v) works on the bytes v (the rest of a chunk, or the carry) and returns how many it
// consumed, 0 when it needs more.
export function cutter(boundary, emit) {
  const first = enc("--" + boundary), delim = enc("\r\n--" + boundary);
  const carry = new Carry();
  const st = { state: "preamble", part: null, ended: false };

  function headers(text) {
    const part = { length: -1, sop: null, n: 1, out: null, filled: 0, scan: 0 };
    for (const line of text.split("\r\n")) {
      const c = line.indexOf(":");
      if (c < 0) continue;
      const name = line.slice(0, c).trim().toLowerCase(), value = line.slice(c + 1).trim();
      if (name === "content-length" && /^\d+$/.test(value)) part.length = Number(value);
      else if (name === "content-location") {
        const loc = LOCATION.exec(value);
        if (loc) { part.sop = loc[1]; part.n = Number(loc[2]); }
      }
    }
    if (part.length >= 0) part.out = new Uint8Array(part.length);
    return part;
  }

  function step(v) {
    switch (st.state) {
      case "preamble": {
        const i = indexOf(v, first, 0);
        if (i < 0) { if (v.length > MAX_HEAD) throw new Error("no multipart boundary"); return 0; }
        st.state = "delimiter";
        return i + first.length;
      }
      case "delimiter": {   // after a delimiter: "--" (the end) or the line's end
        if (v.length < 2) return 0;
        if (v[0] === 45 && v[1] === 45) { st.ended = true; return 0; }
        const eol = indexOf(v, CRLF, 0);
        if (eol < 0) { if (v.length > MAX_HEAD) throw new Error("bad multipart delimiter"); return 0; }
        st.state = "headers";
        return eol + 2;
      }
      case "headers": {
        const i = indexOf(v, EOH, 0);
        if (i < 0) { if (v.length > MAX_HEAD) throw new Error("part headers too long"); return 0; }
        st.part = headers(String.fromCharCode.apply(null, v.subarray(0, i)));
        st.state = st.part.length === 0 ? "after" : "body";
        return i + EOH.length;
      }
      case "body": {
        const part = st.part;
        if (part.length >= 0) {   // by its length: copied once, into the frame's own buffer
          const k = Math.min(v.length, part.length - part.filled);
          part.out.set(v.subarray(0, k), part.filled);
          part.filled += k;
          if (part.filled === part.length) st.state = "after";
          return k;
        }
        const n = indexOf(v, delim, part.scan);   // else up to the next delimiter
        if (n < 0) { part.scan = Math.max(0, v.length - delim.length + 1); return 0; }
        emit(part, v.slice(0, n).buffer);
        st.state = "delimiter";
        return n + delim.length;
      }
      case "after": {   // the delimiter that must follow a body cut by its length
        if (v.length < delim.length) return 0;
        if (indexOf(v.subarray(0, delim.length), delim, 0) !== 0) throw new Error("part longer than its Content-Length");
        emit(st.part, st.part.out.buffer);
        st.state = "delimiter";
        return delim.length;
      }
    }
    return 0;
  }

  // A body of unknown length is gathered whole in the carry; anything else moves into it a
  // piece at a time, and only while a token straddles chunks.
  function feed(chunk) {
    let p = 0;
    while (!st.ended) {
      if (!carry.length) {
        if (p >= chunk.length) return;
        const used = step(chunk.subarray(p));
        if (used) { p += used; continue; }
        if (st.ended) return;
      }
      if (p >= chunk.length) return;   // the carry holds the start of a token: the next chunk
      const unknown = st.state === "body" && st.part.length < 0;
      const k = unknown ? chunk.length - p : Math.min(PIECE, chunk.length - p);
      carry.push(chunk.subarray(p, p + k));
      p += k;
      for (let used; carry.length && !st.ended && (used = step(carry.view()));) carry.skip(used);
    }
  }
  return { feed, get ended() { return st.ended; } };
}
