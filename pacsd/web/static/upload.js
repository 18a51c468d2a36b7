// Upload from the browser, on the study list: drop files, folders (a patient CD with its
// DICOMDIR) or ZIP archives on the page, or pick them with "Upload files…" / "Upload folder…".
// Every way in ends in one list of items ({name, size, blob()}) and one loop (run): each
// file is checked for "DICM" at offset 128 (a CD's viewer, autorun.inf... are skipped here,
// never sent), then sent a few at a time to POST ../api/upload as multipart/related parts of
// type application/dicom, the durable path of STOW-RS; the server answers one result per part.
// ZIP archives are unpacked here, entry by entry, with the browser's DecompressionStream
// ("deflate-raw"): the server never inflates anything a client sent. An entry that inflates
// beyond the size its archive declares is refused (a ZIP bomb), as are archives of more
// entries than `limits.max_files`.
"use strict";

const pacsUpload = (() => {
  const $ = (id) => document.getElementById(id);
  const BATCH_FILES = 20;              // files per request (the server takes max_parts)
  const BATCH_BYTES = 16 << 20;        // bytes per request, unless one file is larger
  const MAX_DEPTH = 32;                // folder levels walked in a drop
  const MAX_ROWS = 2000;               // result rows shown (the counts cover every file)
  const CD_MAX = 64 << 20;             // a ZIP's central directory, at most
  // From GET ../api/upload; the defaults hold until it answers.
  const limits = { max_body_bytes: 1 << 30, max_parts: 1000, max_files: 10000 };
  const state = newState();

  function newState() {
    return { running: false, finished: false, error: "", files: 0, bytes: 0, doneBytes: 0,
             done: 0, rows: 0, results: [], counts: { stored: 0, duplicate: 0, skipped: 0, failed: 0 } };
  }

  class Refused extends Error {}

  // --- items -------------------------------------------------------------------------------
  const fileItem = (file, name) => ({ name: name || file.webkitRelativePath || file.name,
                                      size: file.size, blob: async () => file });
  const isZip = (file) => /\.zip$/i.test(file.name);

  async function expand(files) {
    const items = [];
    for (const [file, name] of files) {
      if (isZip(file)) {
        let entries;
        try { entries = await zipEntries(file, name); } catch (e) {
          if (e instanceof Refused) throw e;
          entries = [{ name, size: file.size, blob: async () => { throw e; } }];   // listed as failed
        }
        for (const it of entries) {
          items.push(it);
          if (items.length > limits.max_files) break;
        }
      } else items.push(fileItem(file, name));
      if (items.length > limits.max_files) {
        throw new Refused(`more than ${limits.max_files} files in one upload: upload them in parts`);
      }
    }
    return items;
  }

  // A drop's DataTransfer items, walked: folders to any depth up to MAX_DEPTH.
  async function walk(entries, out, depth) {
    for (const entry of entries) {
      if (out.length > limits.max_files) {
        throw new Refused(`more than ${limits.max_files} files in one upload: upload them in parts`);
      }
      if (entry.isFile) {
        const file = await new Promise((res, rej) => entry.file(res, rej));
        out.push([file, entry.fullPath.replace(/^\//, "")]);
      } else if (entry.isDirectory) {
        if (depth >= MAX_DEPTH) throw new Refused(`folders nested deeper than ${MAX_DEPTH} levels`);
        const reader = entry.createReader();
        for (let i = 0; i < 100000; i++) {          // readEntries answers a batch at a time
          const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
          if (!batch.length) break;
          await walk(batch, out, depth + 1);
        }
      }
    }
    return out;
  }

  // --- ZIP archives (PKWARE APPNOTE: end of central directory, ZIP64, central directory) ----
  const u16 = (v, o) => v.getUint16(o, true);
  const u32 = (v, o) => v.getUint32(o, true);
  const u64 = (v, o) => v.getUint32(o, true) + v.getUint32(o + 4, true) * 2 ** 32;
  const view = async (blob, start, end) => new DataView(await blob.slice(start, end).arrayBuffer());

  async function zipEntries(file, label) {
    const damaged = (what) => new Error(`not a readable ZIP archive (${what})`);
    const tailStart = Math.max(0, file.size - 65557);
    const tail = await view(file, tailStart, file.size);
    let eocd = -1;
    for (let p = tail.byteLength - 22; p >= 0; p--) if (u32(tail, p) === 0x06054b50) { eocd = p; break; }
    if (eocd < 0) throw damaged("no end of central directory");
    let count = u16(tail, eocd + 10), cdSize = u32(tail, eocd + 12), cdOffset = u32(tail, eocd + 16);
    if (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) {
      const at = tailStart + eocd - 20;
      const loc = at >= 0 ? await view(file, at, at + 20) : null;
      if (!loc || loc.byteLength < 20 || u32(loc, 0) !== 0x07064b50) throw damaged("ZIP64 locator");
      const z64 = u64(loc, 8);
      const z = await view(file, z64, z64 + 56);
      if (z.byteLength < 56 || u32(z, 0) !== 0x06064b50) throw damaged("ZIP64 end record");
      count = u64(z, 32); cdSize = u64(z, 40); cdOffset = u64(z, 48);
    }
    if (count > limits.max_files) {
      throw new Refused(`${label}: ${count} entries, more than ${limits.max_files}: refused`);
    }
    if (cdSize > CD_MAX || cdOffset + cdSize > file.size) throw damaged("central directory");
    const cd = await view(file, cdOffset, cdOffset + cdSize);
    const names = new TextDecoder("utf-8");
    const out = [];
    let p = 0;
    for (let k = 0; k < count; k++) {
      if (p + 46 > cd.byteLength || u32(cd, p) !== 0x02014b50) throw damaged("central directory entry");
      const entry = { flags: u16(cd, p + 8), method: u16(cd, p + 10), csize: u32(cd, p + 20),
                      usize: u32(cd, p + 24), local: u32(cd, p + 42) };
      const nlen = u16(cd, p + 28), xlen = u16(cd, p + 30), clen = u16(cd, p + 32);
      if (p + 46 + nlen + xlen + clen > cd.byteLength) throw damaged("central directory entry");
      const name = names.decode(new Uint8Array(cd.buffer, cd.byteOffset + p + 46, nlen));
      for (let x = p + 46 + nlen, end = x + xlen; x + 4 <= end; x += 4 + u16(cd, x + 2)) {
        if (u16(cd, x) !== 1) continue;             // the ZIP64 extra field: the 64-bit values
        let q = x + 4;
        for (const key of ["usize", "csize", "local"]) {
          if (entry[key] === 0xffffffff && q + 8 <= end) { entry[key] = u64(cd, q); q += 8; }
        }
      }
      p += 46 + nlen + xlen + clen;
      if (name.endsWith("/")) continue;            // a folder
      out.push({ name: `${label}/${name}`, size: entry.usize, blob: () => entryBlob(file, entry) });
    }
    return out;
  }

  async function entryBlob(file, e) {
    if (e.flags & 1) throw new Error("encrypted in the ZIP archive: unpack it first");
    if (e.usize > limits.max_body_bytes) throw new Error("larger than the server takes ([http] max_body_mb)");
    const h = await view(file, e.local, e.local + 30);
    if (h.byteLength < 30 || u32(h, 0) !== 0x04034b50) throw new Error("a damaged ZIP entry");
    const start = e.local + 30 + u16(h, 26) + u16(h, 28);
    const raw = file.slice(start, start + e.csize);
    if (e.method === 0) {
      if (raw.size !== e.usize) throw new Error("a damaged ZIP entry (its size)");
      return raw;
    }
    if (e.method !== 8) throw new Error(`compressed with method ${e.method}: only stored and deflate are read`);
    if (typeof DecompressionStream === "undefined") throw new Error("this browser cannot unpack ZIP archives: unpack it first");
    let seen = 0, bomb = null;
    const bound = new TransformStream({ transform(chunk, ctl) {
      seen += chunk.byteLength;
      if (seen > e.usize) {
        bomb = new Error(`inflates beyond the ${e.usize} bytes its archive declares: refused (a ZIP bomb?)`);
        ctl.error(bomb);
      } else ctl.enqueue(chunk);
    } });
    let out;
    try {
      out = await new Response(raw.stream().pipeThrough(new DecompressionStream("deflate-raw"))
        .pipeThrough(bound)).blob();
    } catch (err) {
      throw bomb || new Error("a damaged ZIP entry: " + (err.message || err));
    }
    if (out.size !== e.usize) throw new Error("a damaged ZIP entry (its size)");
    return out;
  }

  // --- sending ------------------------------------------------------------------------------
  async function isDicom(blob) {
    if (blob.size < 132) return false;
    const magic = new Uint8Array(await blob.slice(128, 132).arrayBuffer());
    return String.fromCharCode(...magic) === "DICM";
  }

  function post(batch, onProgress) {
    const boundary = "pacsd-" + Math.random().toString(36).slice(2) + Date.now().toString(36);
    const parts = [];
    for (const { blob } of batch) {
      parts.push(`--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, blob, "\r\n");
    }
    parts.push(`--${boundary}--\r\n`);
    const body = new Blob(parts);
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", pacs.API + "upload");
      xhr.setRequestHeader("X-Requested-With", "pacsd");
      xhr.setRequestHeader("Accept", "application/json");
      xhr.setRequestHeader("Content-Type", `multipart/related; type="application/dicom"; boundary=${boundary}`);
      xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) onProgress(ev.loaded / ev.total); };
      // fatal: the server is gone or the session ended, so the next batch would fare no better
      const fatal = (msg) => Object.assign(new Error(msg), { fatal: true });
      xhr.onerror = () => reject(fatal("the connection to the server failed"));
      xhr.onload = () => {
        if (xhr.status === 401) { pacs.toLogin(); reject(fatal("login required")); return; }
        let data = null;
        try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
        if (xhr.status !== 200 || !data || !Array.isArray(data.results)) {
          reject(new Error((data && data.error) || xhr.responseText.replace(/^\d+ [^:]*: /, "").trim()
                           || `HTTP ${xhr.status}`));
          return;
        }
        resolve(data);
      };
      xhr.send(body);
    });
  }

  function record(item, result) {
    const r = { name: item.name, status: result.status, reason: result.reason || "",
                study: result.study || "" };
    state.results.push(r);
    state.counts[r.status] = (state.counts[r.status] || 0) + 1;
    state.done++;
    state.doneBytes += item.size;
    if (state.rows < MAX_ROWS) {
      state.rows++;
      const tr = document.createElement("tr");
      tr.className = "upload-" + r.status;
      tr.innerHTML = `<td class="name"></td><td><span class="badge"></span></td><td class="reason small"></td>`;
      tr.querySelector(".name").textContent = r.name;
      const badge = tr.querySelector(".badge");
      badge.textContent = r.status;
      badge.classList.add({ stored: "ok", duplicate: "info", skipped: "warn", failed: "failed" }[r.status] || "info");
      const cell = tr.querySelector(".reason");
      if (r.study && (r.status === "stored" || r.status === "duplicate")) {
        const a = document.createElement("a");
        a.href = "viewer?study=" + encodeURIComponent(r.study);
        a.textContent = "open the study";
        if (r.reason) cell.append(r.reason + " · ");
        cell.append(a);
      } else cell.textContent = r.reason;
      $("upload-results").querySelector("tbody").append(tr);
    }
    show();
  }

  function show(inFlight = 0) {
    const bar = $("upload-progress");
    bar.max = Math.max(1, state.bytes);
    bar.value = state.finished ? bar.max : Math.min(bar.max, state.doneBytes + inFlight);
    const c = state.counts;
    const more = state.results.length > state.rows ? ` (the first ${state.rows} listed)` : "";
    $("upload-summary").textContent =
      `${state.done} of ${state.files} files, ${pacs.fmtBytes(bar.value)} of ${pacs.fmtBytes(state.bytes)}: ` +
      `${c.stored} stored, ${c.duplicate} already there, ${c.skipped} skipped, ${c.failed} failed${more}` +
      (state.error ? ` — ${state.error}` : "");
    $("upload-title").textContent = state.running ? "Uploading…" : state.error ? "Upload stopped" : "Upload finished";
  }

  function open() {
    $("upload").classList.remove("hidden");
    $("upload-results").querySelector("tbody").innerHTML = "";
  }

  // The one loop every way in goes through.
  async function run(items) {
    Object.assign(state, newState(), { running: true, files: items.length,
                                        bytes: items.reduce((n, it) => n + it.size, 0) });
    open();
    show();
    let i = 0;
    try {
      while (i < items.length) {
        const batch = [];
        let bytes = 0;
        const room = Math.min(BATCH_BYTES, limits.max_body_bytes - 65536);
        while (i < items.length && batch.length < Math.min(BATCH_FILES, limits.max_parts)) {
          const item = items[i];
          if (batch.length && bytes + item.size > room) break;
          i++;
          if (item.size > limits.max_body_bytes - 65536) {
            record(item, { status: "failed", reason: "larger than the server takes ([http] max_body_mb)" });
            continue;
          }
          let blob;
          try { blob = await item.blob(); } catch (e) {
            record(item, { status: "failed", reason: e.message || String(e) });
            continue;
          }
          if (!await isDicom(blob)) {
            record(item, { status: "skipped", reason: "not a DICOM file (no DICM at offset 128)" });
            continue;
          }
          batch.push({ item, blob });
          bytes += item.size;
        }
        if (!batch.length) continue;
        let data;
        try {
          data = await post(batch, (f) => show(f * bytes));
        } catch (e) {
          if (e.fatal) throw Object.assign(e, { batch });
          // This request refused whole (a body too large, a full disk): its files say why,
          // and the upload goes on with the next ones.
          batch.forEach(({ item }) => record(item, { status: "failed", reason: e.message }));
          continue;
        }
        batch.forEach(({ item }, k) => record(item, data.results[k] ||
          { status: "failed", reason: "the server did not answer for this file" }));
      }
    } catch (e) {
      state.error = e.message || String(e);
      for (const { item } of e.batch || []) record(item, { status: "failed", reason: "not sent: " + state.error });
      for (; i < items.length; i++) record(items[i], { status: "failed", reason: "not sent: " + state.error });
    } finally {
      state.running = false;
      state.finished = true;
      show();
      window.dispatchEvent(new CustomEvent("pacs:uploaded", { detail: { ...state.counts } }));
    }
    return state;
  }

  // pairs of [File, name] -> the loop; refusals (too many, a damaged ZIP) said in the panel.
  async function start(pairs) {
    if (state.running) { pacs.toast("An upload is still running", true); return state; }
    let items;
    try {
      items = await expand(pairs);
    } catch (e) {
      Object.assign(state, newState(), { finished: true, error: e.message || String(e) });
      open();
      show();
      pacs.toast(state.error, true);
      return state;
    }
    if (!items.length) { pacs.toast("Nothing to upload"); return state; }
    return run(items);
  }

  const fromFiles = (list) => start([...list].map((f) => [f, f.webkitRelativePath || f.name]));

  async function fromDrop(dt) {
    // The entries must be taken during the event; walked afterwards.
    const entries = [...(dt.items || [])].filter((it) => it.kind === "file")
      .map((it) => (it.webkitGetAsEntry ? it.webkitGetAsEntry() : null));
    if (entries.length && entries.every(Boolean)) {
      let pairs;
      try { pairs = await walk(entries, [], 0); } catch (e) {
        Object.assign(state, newState(), { finished: true, error: e.message || String(e) });
        open();
        show();
        return state;
      }
      return start(pairs);
    }
    return fromFiles(dt.files);
  }

  // --- the page -----------------------------------------------------------------------------
  function init() {
    pacs.api("GET", "upload").then((l) => Object.assign(limits, l)).catch(() => {});
    const files = $("upload-files"), folder = $("upload-folder");
    $("upload-files-btn").addEventListener("click", () => files.click());
    $("upload-folder-btn").addEventListener("click", () => folder.click());
    for (const input of [files, folder]) {
      input.addEventListener("change", () => {
        const list = [...input.files];
        input.value = "";
        if (list.length) fromFiles(list);
      });
    }
    $("upload-close").addEventListener("click", () => { if (!state.running) $("upload").classList.add("hidden"); });
    const zone = $("drop-zone");
    const carriesFiles = (ev) => ev.dataTransfer && [...ev.dataTransfer.types].includes("Files");
    let depth = 0;
    document.addEventListener("dragenter", (ev) => { if (carriesFiles(ev)) { depth++; zone.classList.remove("hidden"); } });
    document.addEventListener("dragleave", (ev) => { if (carriesFiles(ev) && --depth <= 0) { depth = 0; zone.classList.add("hidden"); } });
    document.addEventListener("dragover", (ev) => {
      if (!carriesFiles(ev)) return;
      ev.preventDefault();
      ev.dataTransfer.dropEffect = "copy";
    });
    document.addEventListener("drop", (ev) => {
      if (!carriesFiles(ev)) return;
      ev.preventDefault();
      depth = 0;
      zone.classList.add("hidden");
      fromDrop(ev.dataTransfer);
    });
    window.addEventListener("beforeunload", (ev) => { if (state.running) { ev.preventDefault(); ev.returnValue = ""; } });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
  return { state, limits, start, fromFiles, fromDrop };
})();
window.pacsUpload = pacsUpload;   // for the tests, as window.pacsViewer
