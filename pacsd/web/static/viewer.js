// The study viewer page (/app/viewer?study=UID[&series=UID]): layout, toolbar, keyboard, cine,
// the series and tag panels, ZIP/send/delete, and window.pacsViewer for tests and benchmarks.
// Plain ES2017 in three ES modules, no framework, no build step:
//   viewer-pixels.js    metadata, slice order, frame fetching and decoding, LUTs, series cache
//   viewer-viewport.js  one viewport: drawing, overlays, tools, measurements, touch
//   viewer-geometry.js  patient geometry: reading order, orientation letters, reference lines
//   viewer-tools.js     pixel value, distance/angle/ellipse measurements, linked scrolling
//   viewer.js           this page, which wires them together
// ES modules rather than classic scripts sharing globals: each file names what it takes from
// the others (import) and what it gives (export), and nothing leaks onto window except
// pacsViewer. Every engine the tests cover (Chromium, Firefox, WebKit) runs them, and the CSP's
// script-src 'self' allows them; viewer.html preloads the two imports (modulepreload) so they
// are fetched alongside this file, not after it.

import { DW, SeriesStore } from "./viewer-pixels.js";
import { Viewport } from "./viewer-viewport.js";
import { linkedIndex, referenceLine } from "./viewer-tools.js";
import { showOrder } from "./viewer-order.js";

const PRESETS = {
  lung: { center: -600, width: 1500 }, bone: { center: 400, width: 1800 },
  brain: { center: 40, width: 80 }, abdomen: { center: 40, width: 400 },
};
const PRESET_KEYS = { 1: "default", 2: "lung", 3: "bone", 4: "brain", 5: "abdomen" };
const $ = (id) => document.getElementById(id);
// Timings count from the start of navigation (performance.now()'s origin): what the user waits.
const scriptStartMs = Math.round(performance.now());

// ---- the study and its series ---------------------------------------------------------------
const params = new URLSearchParams(location.search);
const studyUid = params.get("study") || "";
let study = null;             // /api/studies/<uid>

// ---- viewports -----------------------------------------------------------------------------
const viewports = [];
let active = 0;
let layout = 1;
let tool = "wl";
let firstSeries = null;
const timings = { scriptStartMs, firstImageMs: null, allLoadedMs: null };
let drawCount = 0;

// What the pixel store and the viewports need from the page.
const store = new SeriesStore(studyUid, {
  centres: (s) => viewports.filter((v) => v.series === s && v.visible()).map((v) => v.index),
  shown: () => viewports.map((v) => v.series),
  previewed(s) { for (const v of viewports) if (v.series === s) v.invalidate(); },
  loaded(s, i) {
    if (s.loaded === s.count && timings.allLoadedMs === null && s === firstSeries) {
      timings.allLoadedMs = Math.round(s.allLoadedMs);
    }
    for (const v of viewports) if (v.series === s && (v.index === i || s.loaded === s.count)) v.invalidate();
    progress();
  },
});
const page = {
  store,
  get study() { return study; },
  get tool() { return tool; },
  get layout() { return layout; },
  setActive: (n) => setActive(n),
  showSeries: (uid, vp) => showSeries(uid, vp),
  imageChanged: (vp) => { linkViewports(vp); onImageChange(vp); loadNear(vp); },
  markThumbs: () => markThumbs(),
  scheduleRender: () => scheduleRender(),
  drawn(vp) {
    drawCount++;
    if (timings.firstImageMs === null && vp.series === firstSeries) {
      timings.firstImageMs = Math.round(performance.now());
      api.ready = true;
    }
  },
};

// The loading bars: one per series thumbnail, one per viewport; redrawn at most every
// PROGRESS_MS while slices arrive (each redraw costs the page a frame), at once when done.
const PROGRESS_MS = 250;
let progressTimer = null, progressAt = 0;
function progress() {
  if (progressTimer !== null) return;
  const done = [...store.cache.values()].every((x) => x.loaded === x.count);
  const wait = done ? 0 : Math.max(0, progressAt + PROGRESS_MS - performance.now());
  progressTimer = setTimeout(() => requestAnimationFrame(() => {
    progressTimer = null;
    progressAt = performance.now();
    for (const x of store.cache.values()) {
      const bar = document.querySelector(`.series-thumb[data-uid="${x.uid}"] .bar > span`);
      if (bar) bar.style.transform = `scaleX(${x.count ? x.loaded / x.count : 0})`;
    }
    for (const v of viewports) v.showProgress();
  }), wait);
}

// ---- loading follows the slice on screen (the fetching itself: viewer-pixels.js) -----------
// Slices dropped by the memory cap, or not yet fetched, are asked for nearest the new slice.
function loadNear(vp) {
  const s = vp.series;
  if (s && s.sorted && s.loaded < s.count && s.batches < 2) store.startLoading(s);
}
// What the loading did, for tests and benchmarks: batch requests made, slices dropped.
function loadingStats() {
  const s = activeVp() && activeVp().series;
  return { batchRequests: store.batchRequests || 0, batches: s ? s.batchesSent : 0,
           metadataMs: s && s.metadataMs !== null ? Math.round(s.metadataMs) : null,
           evicted: s ? s.evicted : 0, bytes: s ? s.bytes : 0, single: s ? s.single.size : 0 };
}

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
  updateReferenceLines();
}

function showSeries(uid, vp) {
  const info = study && study.series.find((x) => x.series_uid === uid);
  if (!info) { pacs.toast("No such series in this study", true); return; }
  const s = store.get(info);
  store.evict();
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
  else if (k === "a" || k === "A") setTool("angle");
  else if (k === "e" || k === "E") setTool("ellipse");
  else if (k === "l" || k === "L") setLinked(!linked);
  else if (k === "c" || k === "C") copyImageLink();
  else if (k === "f" || k === "F") { vp.fit = true; vp.pan = { x: 0, y: 0 }; vp.invalidate(); }
  else if (k === "i" || k === "I") { vp.invert = !vp.invert; vp.invalidate(); }
  else if (k === "r" || k === "R") vp.resetView();
  else if (k === " ") toggleCine();
  else if (k === "t" || k === "T") toggleTags();
  else handled = false;
  if (handled) e.preventDefault();
});

// ---- 1x2: linked scrolling and reference lines ----------------------------------------------
// With "Link" on (off at first: two series side by side are often scrolled apart, and the
// reference lines already tell where one slice lies in the other), scrolling one viewport
// moves the other to the slice nearest in the patient (or by as many slices when the two
// stacks share no geometry). Each viewport always shows where the other's slice cuts it (the
// reference line) when their planes cross.
let linked = false;
let linking = false;
function setLinked(on) {
  linked = on;
  const b = $("btn-link");
  b.classList.toggle("active", on);
  b.setAttribute("aria-pressed", String(on));
  for (const v of viewports) v.lastIndex = v.index;
  updateReferenceLines();
}
function linkViewports(vp) {
  const other = viewports[1 - vp.n];
  // A series just opened follows the other viewport; a scrolled one leads it.
  const opened = vp.lastSeries !== vp.series;
  const before = opened ? vp.index : vp.lastIndex;
  vp.lastSeries = vp.series;
  vp.lastIndex = vp.index;
  if (linked && layout === 2 && !linking) {
    const [from, to] = opened ? [other, vp] : [vp, other];
    const i = linkedIndex(from, to, opened ? from.index : before);
    if (i !== null && i !== to.index) {
      linking = true;
      try { to.setIndex(i); } finally { linking = false; }
    }
  }
  updateReferenceLines();
}
function updateReferenceLines() {
  for (const v of viewports) {
    const other = viewports[1 - v.n];
    const line = layout === 2 && v.image && other.image && v.series && v.series.sorted &&
      other.series && other.series.sorted ? referenceLine(other.image, v.image) : null;
    if (JSON.stringify(line) !== JSON.stringify(v.refLine)) { v.refLine = line; v.invalidate(); }
  }
}

// ---- a link to this image --------------------------------------------------------------------
// /app/viewer?study=..&series=..&instance=SOP[&frame=n] opens the viewer at that image
// (openAtLink below); copied to the clipboard where the browser allows it, else put into the
// address bar (history.replaceState) to be copied from there.
function imageLink(vp = activeVp()) {
  const img = vp.image;
  if (!img || !vp.series) return "";
  const q = new URLSearchParams({ study: studyUid, series: vp.series.uid, instance: img.sop });
  if (img.frames > 1) q.set("frame", String(img.frame));
  return `${location.origin}${location.pathname}?${q}`;
}
let lastLink = "";
async function copyImageLink() {
  const url = imageLink();
  if (!url) return;
  lastLink = url;
  try {
    await navigator.clipboard.writeText(url);
    pacs.toast("Link copied: " + url);
  } catch (e) {   // no clipboard (plain HTTP to another host, or refused)
    history.replaceState(null, "", url);
    pacs.toast("The address bar holds the link to this image: " + url);
  }
}
function openAtLink(vp) {
  const sop = params.get("instance");
  if (!sop || !vp.series) return;
  const frame = Number(params.get("frame")) || 1;
  const i = vp.series.images.findIndex((im) => im.sop === sop && im.frame === frame);
  if (i >= 0) vp.setIndex(i);
  else pacs.toast("The linked image is not in this series", true);
}

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
  $("tags-title").textContent = "Image " + (activeVp().index + 1) + " · " + sop;
  if (sop === tagsSop && tagsData) return;
  tagsSop = sop;
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
  const m = await pacs.me().catch(() => ({}));
  if (m.shared) {
    // A share link's holder: this study, read only; no nodes to send to.
    $("send-group").classList.add("hidden");
    return;
  }
  setupSharing(m);
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
    if (!await confirmDialog(`Delete the whole study of ${pacs.fmtName(study.patient_name)} (${study.instances} images)? It goes to the recycle bin, restorable from the admin page.`, "Delete study")) return;
    try {
      const r = await pacs.api("DELETE", `studies/${encodeURIComponent(studyUid)}`);
      pacs.toast(`Deleted ${r && r.deleted} image(s)`);
      location.href = "./";
    } catch (e) { pacs.toast("Delete failed: " + e.message, true); }
  };
  // Corrections (administrators): the patient's and the study's attributes, each changed
  // one in every file of the patient or study (POST /api/patients/ID/update, .../studies/UID/update).
  const EDIT = {
    patient: [["e-name", "PatientName", "patient_name"], ["e-pid", "PatientID", "patient_id"],
              ["e-birth", "PatientBirthDate", "birth_date"], ["e-sex", "PatientSex", "sex"]],
    study: [["e-accession", "AccessionNumber", "accession"], ["e-description", "StudyDescription", "description"],
            ["e-date", "StudyDate", "study_date"], ["e-referring", "ReferringPhysicianName", "referring"]],
  };
  $("btn-edit-study").onclick = () => {
    for (const fields of Object.values(EDIT)) for (const [id, , key] of fields) $(id).value = study[key] || "";
    $("edit-error").textContent = "";
    $("edit").showModal();
  };
  $("edit-save").onclick = async () => {
    const changed = (fields) => Object.fromEntries(fields.filter(([id, , key]) => $(id).value.trim() !== (study[key] || ""))
      .map(([id, kw]) => [kw, $(id).value.trim()]));
    const patient = changed(EDIT.patient), studyChanges = changed(EDIT.study);
    if (!Object.keys(patient).length && !Object.keys(studyChanges).length) { $("edit").close(); return; }
    $("edit-save").disabled = true;
    try {
      if (Object.keys(studyChanges).length)
        await pacs.api("POST", `studies/${encodeURIComponent(studyUid)}/update`, { changes: studyChanges });
      if (Object.keys(patient).length)
        await pacs.api("POST", `patients/${encodeURIComponent(study.patient_id)}/update`, { changes: patient });
      $("edit").close();
      pacs.toast("Corrected; the previous versions are in the recycle bin");
      location.reload();
    } catch (e) {
      $("edit-error").textContent = e.message;
    } finally { $("edit-save").disabled = false; }
  };
  $("btn-delete-series").onclick = async () => {
    const vp = activeVp(), s = vp.series;
    if (!s) return;
    if (!await confirmDialog(`Delete series ${s.info.number} ${s.info.description || ""} (${s.info.instances} images)? It goes to the recycle bin, restorable from the admin page.`, "Delete series")) return;
    try {
      const r = await pacs.api("DELETE", `series/${encodeURIComponent(s.uid)}`);
      pacs.toast(`Deleted ${r && r.deleted} image(s)`);
      study.series = study.series.filter((x) => x.series_uid !== s.uid);
      store.drop(s);
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
  if (m && m.admin) {
    for (const id of ["btn-delete-study", "btn-delete-series", "btn-edit-study", "btn-labels"]) $(id).classList.remove("hidden");
  }
}

// Labels (administrators) and share links (administrators and groups with share = true).
function setupSharing(m) {
  const showLabels = () => { $("study-labels").textContent = (study.labels || []).join(", "); };
  showLabels();
  $("btn-labels").onclick = () => {
    $("labels-input").value = (study.labels || []).join(", ");
    $("labels-error").textContent = "";
    $("labels").showModal();
  };
  $("labels-save").onclick = async () => {
    const want = $("labels-input").value.split(",").map((s) => s.trim()).filter(Boolean);
    const have = study.labels || [];
    try {
      const r = await pacs.api("POST", `studies/${encodeURIComponent(studyUid)}/labels`,
        { add: want.filter((l) => !have.includes(l)), remove: have.filter((l) => !want.includes(l)) });
      study.labels = r.labels;
      showLabels();
      $("labels").close();
    } catch (e) { $("labels-error").textContent = e.message; }
  };
  if (!m.share) return;
  $("btn-share").classList.remove("hidden");
  const listLinks = async () => {
    const links = await pacs.api("GET", `shares?study=${encodeURIComponent(studyUid)}`).catch(() => []);
    const tbody = $("share-list").querySelector("tbody");
    tbody.innerHTML = links.map((l) => {
      const state = l.revoked ? "revoked" : (l.expires * 1000 < Date.now() ? "expired"
        : "until " + new Date(l.expires * 1000).toLocaleString());
      return `<tr><td>${pacs.esc(l.note || "")}</td><td>${pacs.esc(state)}</td><td>${l.uses} use(s)${l.pin ? ", PIN" : ""}</td>
        <td>${l.revoked || l.expires * 1000 < Date.now() ? "" : `<button type="button" data-revoke="${pacs.esc(l.id)}">Revoke</button>`}</td></tr>`;
    }).join("");
    tbody.querySelectorAll("[data-revoke]").forEach((b) => {
      b.onclick = async () => {
        try { await pacs.api("POST", `shares/${b.dataset.revoke}/revoke`, {}); } catch (e) { $("share-error").textContent = e.message; }
        listLinks();
      };
    });
  };
  $("btn-share").onclick = () => {
    $("share-url").value = ""; $("share-error").textContent = "";
    listLinks();
    $("share").showModal();
  };
  $("share-make").onclick = async () => {
    try {
      const r = await pacs.api("POST", `studies/${encodeURIComponent(studyUid)}/share`, {
        hours: Number($("share-hours").value), pin: $("share-pin").value, note: $("share-note").value });
      $("share-url").value = r.url;
      $("share-url").select();
      listLinks();
    } catch (e) { $("share-error").textContent = e.message; }
  };
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
  $("btn-link").onclick = () => setLinked(!linked);
  $("btn-copy-link").onclick = () => copyImageLink();
  $("cine").onclick = () => toggleCine();
  $("tags-toggle").onclick = () => toggleTags();
  $("tags-close").onclick = () => toggleTags(false);
  $("tags-filter").addEventListener("input", renderTags);
  // Buttons keep no focus, so the arrow keys keep scrolling.
  document.querySelectorAll(".vtoolbar button").forEach((b) => b.addEventListener("mouseup", () => b.blur()));
  const box = $("viewports");
  for (let n = 0; n < 2; n++) { const v = new Viewport(n, page); viewports.push(v); box.appendChild(v.el); }
  if (window.ResizeObserver) new ResizeObserver(() => viewports.forEach((v) => v.invalidate())).observe(box);
  window.addEventListener("resize", () => viewports.forEach((v) => v.invalidate()));
  setTool("wl");
  setLayout(1);
  setActive(0);
}

async function main() {
  // The study first: everything on screen waits for it.
  const studyRsp = studyUid ? pacs.api("GET", "studies/" + encodeURIComponent(studyUid)) : null;
  if (studyRsp) studyRsp.catch(() => {});   // awaited below, once the page is wired
  pacs.header("studies");
  wire();
  if (!studyUid) { viewports[0].ov.msg.textContent = "No study given (?study=UID)"; return; }
  try {
    study = await studyRsp;
  } catch (e) {
    viewports[0].ov.msg.textContent = "Cannot open the study: " + e.message;
    return;
  }
  document.title = `${pacs.fmtName(study.patient_name) || "Viewer"} – pacsd`;
  const wanted = params.get("series");
  const first = study.series.find((x) => x.series_uid === wanted) || study.series.find((x) => x.instances > 0);
  // The first image's requests go out before the thumbnails' and the panels'.
  if (first) firstSeries = store.get(first);
  renderSeriesPanel();
  setupActions();
  showOrder($("study-order"), studyUid, pacs);   // the worklist order, if any: after the images' requests
  if (!first) { viewports[0].ov.msg.textContent = "This study has no images"; return; }
  const opened = showSeries(first.series_uid, viewports[0]);
  if (opened && params.get("instance")) opened.then(() => openAtLink(viewports[0]));
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
  get loading() { return loadingStats(); },
  setSlice(i, n = active) { viewports[n].setIndex(i); },
  renderNow() { renderNow(); },       // draw what is pending now, not at the next frame
  setLayout, setTool, setPreset, setActive, showSeries: (uid, n = active) => showSeries(uid, viewports[n]),
  get linked() { return linked; },
  setLinked, imageLink: () => imageLink(), get lastLink() { return lastLink; },
  study: () => study,
};
window.pacsViewer = api;
main();
