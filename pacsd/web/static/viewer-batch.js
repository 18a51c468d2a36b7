// The viewer's pixel worker (a module Web Worker, started by viewer-pixels.js): fetches a
// batch of frames (pacsd's /dicom-web/.../series/{uid}/pixels, multipart/related of native
// little endian frames), cuts the parts as they stream in (viewer-multipart.js), and hands each
// frame back as an ArrayBuffer of its own (transferred, not copied). Nothing else is done to
// the pixels here: the page masks the bits above BitsStored in its lookup table and finds a
// slice's range only when it needs it, so that the bytes are touched once on their way.
//
// Message in:  {id, url, accept}
// Messages out: {id, frame: {sop, n, buffer}} per frame as it arrives, then
//               {id, done: true, status, frames, complete} or {id, error: message, status}.

import { cutter } from "./viewer-multipart.js";

async function batch(msg) {
  const { id, url, accept } = msg;
  const rsp = await fetch(url, { headers: { Accept: accept }, credentials: "same-origin" });
  if (!rsp.ok) {
    if (rsp.body) rsp.body.cancel().catch(() => {});
    postMessage({ id, error: `${rsp.status} ${rsp.statusText}`, status: rsp.status });
    return;
  }
  const m = /boundary="?([^";,]+)"?/i.exec(rsp.headers.get("Content-Type") || "");
  if (!m) throw new Error("no multipart boundary");
  let frames = 0;
  const cut = cutter(m[1], (part, buffer) => {
    if (!part.sop) return;
    postMessage({ id, frame: { sop: part.sop, n: part.n, buffer } }, [buffer]);
    frames++;
  });
  const reader = rsp.body.getReader();
  for (;;) {   // ends with the body
    const { value, done } = await reader.read();
    if (value) cut.feed(value);
    if (done || cut.ended) break;
  }
  if (!cut.ended) reader.cancel().catch(() => {});
  postMessage({ id, done: true, status: rsp.status, frames, complete: cut.ended });
}

onmessage = (e) => {
  batch(e.data).catch((err) => postMessage({ id: e.data.id, error: String(err && err.message || err), status: 0 }));
};
