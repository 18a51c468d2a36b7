// @ts-check
// The viewer's study info, continued: the worklist order the study was made for (accession,
// procedure, status) and what the modality reported of it (MPPS), from
// GET ../api/studies/<uid>/order (pacsd.web.worklist). Asked for once the study is on screen,
// one study at a time: the study list's query joins nothing for it.

import { html, render } from "./html.js";

const WORDS = { SCHEDULED: "scheduled", ARRIVED: "arrived", READY: "ready", STARTED: "in progress",
                COMPLETED: "completed", DISCONTINUED: "discontinued", CANCELED: "cancelled",
                EXPIRED: "expired" };

/**
 * Show the study's order in `el` (left hidden when no worklist item names the study).
 * @param {HTMLElement} el @param {string} studyUid @param {any} pacs common.js's helpers
 */
export async function showOrder(el, studyUid, pacs) {
  let data;
  try {
    data = await pacs.api("GET", `studies/${encodeURIComponent(studyUid)}/order`);
  } catch (e) {
    return;   // an older server, or no right to it: the study info stays as it is
  }
  const order = data && data.order;
  const performed = (data && data.performed) || [];
  if (!order && !performed.length) return;
  const status = order ? (/** @type {Record<string, string>} */ (WORDS)[order.status] || order.status) : "";
  const link = order && data.worklist
    ? html` <a href="${`worklist?day=${encodeURIComponent(order.start_date)}&modality=${encodeURIComponent(order.modality)}`}">worklist</a>`
    : "";
  const p = performed[0];
  render(el, html`${order ? html`<div class="order">Order ${order.accession_number || html`<span>(no accession)</span>`}
      · ${order.requested_procedure_description || order.sps_description || order.modality}
      · <b class="order-status">${status}</b>${link}</div>` : ""}${p ? html`<div class="mpps">MPPS
      ${p.status === "IN PROGRESS" ? "in progress" : p.status.toLowerCase()}${p.status === "COMPLETED"
        ? `: ${p.series} series, ${p.images} images` : ""}${p.calling_aet ? ` (${p.calling_aet})` : ""}</div>` : ""}`);
  el.classList.remove("hidden");
}
