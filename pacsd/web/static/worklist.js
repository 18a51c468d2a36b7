// @ts-check
// The Worklist page (/app/worklist?day=YYYYMMDD&modality=CT), for clinics without a RIS: the
// scheduled steps of a day under a tab per modality; added, changed and cancelled by hand;
// what the modality reported (MPPS) and the study that came of each; a label printed with the
// accession number as a barcode. Talks to ../api/worklist (pacsd.web.worklist), which checks
// every value: its 400 message is shown in the form as it is.

import { html, render } from "./html.js";
import { barcode } from "./code128.js";

// @ts-ignore: common.js's global, from the classic script loaded before this module
const P = pacs;
/** @param {string} id @returns {any} */
const $ = (id) => document.getElementById(id);

const OPEN = new Set(["SCHEDULED", "ARRIVED", "READY", "STARTED"]);
const WORDS = { SCHEDULED: "scheduled", ARRIVED: "arrived", READY: "ready", STARTED: "in progress",
                COMPLETED: "completed", DISCONTINUED: "discontinued", CANCELED: "cancelled",
                EXPIRED: "expired" };

// ---- days (DICOM DA, the browser's local date) -----------------------------------------------
const pad = (/** @type {number} */ n) => String(n).padStart(2, "0");
/** @param {Date} d */
const toDA = (d) => `${d.getFullYear()}${pad(d.getMonth() + 1)}${pad(d.getDate())}`;
/** @param {string} da @param {number} n */
const shift = (da, n) => toDA(new Date(Number(da.slice(0, 4)), Number(da.slice(4, 6)) - 1,
                                       Number(da.slice(6, 8)) + n));
/** @param {string} da */
const da2iso = (da) => (/^\d{8}$/.test(da || "") ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6)}` : "");
/** @param {string} iso */
const iso2da = (iso) => (iso || "").replace(/-/g, "");
/** @param {string} tm "0930", "093000" -> "09:30" */
const tm2input = (tm) => (/^\d{4}/.test(tm || "") ? `${tm.slice(0, 2)}:${tm.slice(2, 4)}` : "");
/** @param {string} v "09:30" -> "0930" */
const input2tm = (v) => (v || "").replace(/:/g, "").slice(0, 6);

const params = new URLSearchParams(location.search);
let day = /^\d{8}$/.test(params.get("day") || "") ? String(params.get("day")) : toDA(new Date());
let tab = (params.get("modality") || "").toUpperCase();
/** @type {any[]} */
let items = [];
/** @type {string[]} */
let modalities = [];
/** @type {any} the item the form edits; null: a new one */
let editing = null;
let seq = 0;

// ---- loading -----------------------------------------------------------------------------------
async function load() {
  const mine = ++seq;
  const q = new URLSearchParams({ day });
  if ($("q").value.trim()) q.set("q", $("q").value.trim());
  if ($("status").value) q.set("status", $("status").value);
  $("day").value = da2iso(day);
  const url = new URLSearchParams({ day });
  if (tab) url.set("modality", tab);
  history.replaceState(null, "", "?" + url.toString());
  document.body.classList.add("busy");
  try {
    const data = await P.api("GET", "worklist?" + q.toString());
    if (mine !== seq) return;
    items = data.items;
    modalities = data.modalities;
    $("error").classList.add("hidden");
  } catch (e) {
    if (mine !== seq) return;
    items = [];
    modalities = [];
    showError(e.message);
  } finally {
    if (mine === seq) document.body.classList.remove("busy");
  }
  renderTabs();
  renderRows();
  document.body.dataset.loaded = String(mine);   // for the tests: this load is on screen
}

/** @param {string} message */
function showError(message) {
  $("error").textContent = message;
  $("error").classList.remove("hidden");
}

// ---- rendering ---------------------------------------------------------------------------------
function renderTabs() {
  const names = [...modalities];
  if (tab && !names.includes(tab)) names.push(tab);
  const count = (/** @type {string} */ m) => items.filter((it) => !m || it.modality === m).length;
  render($("tabs"), html`${["", ...names].map((m) => html`<button type="button" role="tab"
      class="tab${m === tab ? " active" : ""}" aria-selected="${String(m === tab)}" data-modality="${m}"
      id="tab-${m || "all"}">${m || "All"} <span class="count">${count(m)}</span></button>`)}`);
}

/** The MPPS state and the study of an item. @param {any} it */
function performedCell(it) {
  const p = it.performed[0];
  const state = !p ? ""
    : p.status === "IN PROGRESS" ? html`<span class="badge warn">in progress</span>`
    : p.status === "COMPLETED"
      ? html`<span class="badge ok">completed</span> ${p.series} series, ${p.images} images`
      : html`<span class="badge error">discontinued</span>`;
  const more = it.performed.length > 1 ? html` <span class="muted">(+${it.performed.length - 1})</span>` : "";
  const study = it.study
    ? html`<a class="open-study" href="${"viewer?study=" + encodeURIComponent(it.study)}">Open study</a>`
    : "";
  return html`${p ? html`<div class="small mpps" title="${p.calling_aet ? "reported by " + p.calling_aet : ""}">MPPS: ${state}${more}</div>` : ""}${study}`;
}

/** @param {any} it */
function row(it) {
  const status = /** @type {Record<string, string>} */ (WORDS)[it.status] || it.status;
  return html`<tr data-id="${it.id}" class="${OPEN.has(it.status) ? "" : "ended"}">
    <td class="nowrap time">${tm2input(it.start_time) || "–"}</td>
    <td class="patient">${P.fmtName(it.patient_name) || html`<span class="muted">(no name)</span>`}</td>
    <td class="patient-id">${it.patient_id}</td>
    <td class="opt-md nowrap">${P.fmtDate(it.patient_birth_date)}</td>
    <td class="opt-md">${it.patient_sex}</td>
    <td class="opt-sm accession">${it.accession_number}</td>
    <td class="procedure"><span class="badge">${it.modality}</span><span class="proc">${it.requested_procedure_description || it.sps_description}</span></td>
    <td class="opt-md station">${it.station_aet}${it.station_name ? html` <span class="muted">${it.station_name}</span>` : ""}</td>
    <td class="status"><span class="badge st-${it.status}">${status}</span>${performedCell(it)}</td>
    <td class="actions">
      <button type="button" class="small" data-act="edit">Edit</button>
      <button type="button" class="small" data-act="label" title="Print a label with the accession number as a barcode">Label</button>
      ${OPEN.has(it.status) ? html`<button type="button" class="small danger" data-act="cancel">Cancel</button>` : ""}
    </td></tr>`;
}

function renderRows() {
  const shown = items.filter((it) => !tab || it.modality === tab);
  const tbody = $("worklist").querySelector("tbody");
  render(tbody, shown.length ? html`${shown.map(row)}`
    : html`<tr><td colspan="10" class="empty">Nothing scheduled${tab ? " for " + tab : ""} on ${P.fmtDate(day)}.</td></tr>`);
  const open = shown.filter((it) => OPEN.has(it.status)).length;
  $("summary").textContent = `${shown.length} item(s), ${open} open, on ${P.fmtDate(day)}`;
}

// ---- the form: add and edit --------------------------------------------------------------------
/** @returns {any[]} */
const fields = () => [...$("item-form").querySelectorAll("[data-col]")];

/** What an input shows of a stored value. @param {any} el @param {string} value */
function shown(el, value) {
  if (el.type === "date") return da2iso(value);
  if (el.type === "time") return tm2input(value);
  return value || "";
}

/** What a stored value becomes from an input. @param {any} el */
function stored(el) {
  if (el.type === "date") return iso2da(el.value);
  if (el.type === "time") return input2tm(el.value);
  return el.value.trim();
}

/** @param {any} item null: a new item */
function openForm(item) {
  editing = item;
  $("item-title").textContent = item ? "Edit worklist item" : "New worklist item";
  $("item-error").textContent = "";
  const blank = { start_date: day, modality: tab, status: "SCHEDULED" };
  for (const el of fields()) {
    const value = shown(el, (item || blank)[el.dataset.col] || "");
    if (el.tagName === "SELECT") {
      for (const opt of [...el.options]) if (opt.dataset.extra) opt.remove();
      if (![...el.options].some((o) => o.value === value)) {
        // A value the list does not offer (STARTED, EXPIRED; a sex of U from HL7): shown as it
        // is, so that saving other changes leaves it alone.
        const opt = new Option(value, value);
        opt.dataset.extra = "1";
        el.add(opt);
      }
    }
    el.value = value;
  }
  $("item").showModal();
  $("f-patient_name").focus();
}

/** The values to send: all given ones for a new item, the changed ones for an edit. */
function collect() {
  /** @type {Record<string, string>} */
  const out = {};
  for (const el of fields()) {
    const col = el.dataset.col, value = stored(el);
    // An edit sends what the person changed: what the input shows differs from what it showed.
    if (editing ? el.value !== shown(el, editing[col] || "") : value) out[col] = value;
  }
  return out;
}

async function save() {
  const values = collect();
  try {
    const item = editing
      ? await P.api("PUT", "worklist/" + editing.id, values)
      : await P.api("POST", "worklist", values);
    $("item").close();
    P.toast(editing ? "Saved" : `Added for ${P.fmtDate(item.start_date)} ${tm2input(item.start_time)}`);
    // Show where it is now: its day, its modality's tab (unless all are shown).
    day = item.start_date || day;
    if (tab && item.modality !== tab) tab = item.modality;
    await load();
  } catch (e) {
    $("item-error").textContent = e.message;   // the API's own words (clean_step's)
  }
}

// ---- cancel, label -----------------------------------------------------------------------------
/** A yes/no question in the page's dialog. @param {string} text @returns {Promise<boolean>} */
function ask(text) {
  const dlg = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "yes"), { once: true });
    dlg.returnValue = "";
    dlg.showModal();
  });
}

/** @param {any} it */
async function cancel(it) {
  const who = P.fmtName(it.patient_name) || it.patient_id;
  const what = it.requested_procedure_description || it.sps_description || it.modality;
  const when = `${P.fmtDate(it.start_date)} ${tm2input(it.start_time)}`.trim();
  if (!await ask(`Cancel ${what} of ${who} (${it.patient_id}) on ${when}? The modalities will no longer see it.`)) return;
  try {
    await P.api("POST", `worklist/${it.id}/cancel`, {});
    P.toast("Cancelled");
  } catch (e) {
    P.toast(e.message, true);
  }
  await load();
}

/** Fill the label (a print-only view, worklist.css) and print it. @param {any} it */
function printLabel(it) {
  $("label-name").textContent = P.fmtName(it.patient_name) || "(no name)";
  $("label-pid").textContent = "ID " + it.patient_id;
  $("label-birth").textContent = [P.fmtDate(it.patient_birth_date), it.patient_sex].filter(Boolean).join(" ");
  $("label-proc").textContent = [it.modality, it.requested_procedure_description || it.sps_description].filter(Boolean).join(" · ");
  $("label-when").textContent = `${P.fmtDate(it.start_date)} ${tm2input(it.start_time)}`.trim() +
    (it.station_name || it.station_aet ? ` · ${it.station_name || it.station_aet}` : "");
  $("label-acc").textContent = it.accession_number || "–";
  const bars = it.accession_number ? barcode(it.accession_number) : null;
  $("label-bars").replaceChildren(...(bars ? [bars] : []));
  document.body.classList.add("printing-label");
  window.print();
}
window.addEventListener("afterprint", () => document.body.classList.remove("printing-label"));

// ---- events ------------------------------------------------------------------------------------
/** @param {string} next */
function goDay(next) {
  if (!/^\d{8}$/.test(next)) return;
  day = next;
  load();
}

$("prev-day").addEventListener("click", () => goDay(shift(day, -1)));
$("next-day").addEventListener("click", () => goDay(shift(day, 1)));
$("today").addEventListener("click", () => goDay(toDA(new Date())));
$("day").addEventListener("change", () => goDay(iso2da($("day").value)));
$("status").addEventListener("change", () => load());
$("day-form").addEventListener("submit", (/** @type {Event} */ ev) => { ev.preventDefault(); load(); });
$("add-btn").addEventListener("click", () => openForm(null));
$("item-close").addEventListener("click", () => $("item").close());
$("item-form").addEventListener("submit", (/** @type {Event} */ ev) => { ev.preventDefault(); save(); });
$("tabs").addEventListener("click", (/** @type {any} */ ev) => {
  const b = ev.target.closest("button[data-modality]");
  if (!b) return;
  tab = b.dataset.modality;
  load();
});
$("worklist").addEventListener("click", (/** @type {any} */ ev) => {
  const b = ev.target.closest("button[data-act]");
  const tr = ev.target.closest("tr[data-id]");
  if (!b || !tr) return;
  const it = items.find((x) => String(x.id) === tr.dataset.id);
  if (!it) return;
  if (b.dataset.act === "edit") openForm(it);
  else if (b.dataset.act === "label") printLabel(it);
  else if (b.dataset.act === "cancel") cancel(it);
});

// ---- start -------------------------------------------------------------------------------------
P.header("worklist");
P.me().then((/** @type {any} */ m) => {
  if (m.restricted) {
    $("add-btn").disabled = true;
    showError("The Worklist is for users who see every study.");
  }
}).catch(() => {});
load();
