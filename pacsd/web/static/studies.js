// The study list: search form <-> URL query <-> GET ../api/studies (the server sorts and pages).
"use strict";

(() => {
  const FIELDS = ["patient", "patient_id", "from", "to", "modality", "accession", "description",
                  "label"];
  const SIZES = [25, 50, 100, 200];
  // Sorting a new column starts in its natural direction: newest first for dates and counts.
  const DESC_FIRST = new Set(["date", "received", "instances"]);
  const $ = (id) => document.getElementById(id);

  const tbody = document.querySelector("#studies tbody");
  const selected = new Map();          // study_uid -> study (kept while paging)
  let state = defaults();
  let rows = [];                       // studies of the current page
  let total = 0;
  let seq = 0;                         // answers to older requests are dropped
  let isAdmin = false;
  let viewers = {};                    // GET ../api/viewers: the OHIF link's base, if any

  function defaults() {
    return { patient: "", patient_id: "", from: "", to: "", modality: "", accession: "",
             description: "", label: "", sort: "date", order: "desc", offset: 0, limit: 50 };
  }

  // --- URL <-> state ------------------------------------------------------------------------
  function fromUrl() {
    const q = new URLSearchParams(location.search);
    const s = defaults();
    for (const k of FIELDS) s[k] = (q.get(k) || "").trim();
    if (q.get("sort")) s.sort = q.get("sort");
    if (q.get("order") === "asc" || q.get("order") === "desc") s.order = q.get("order");
    s.offset = Math.max(0, parseInt(q.get("offset"), 10) || 0);
    const limit = parseInt(q.get("limit"), 10);
    s.limit = SIZES.includes(limit) ? limit : 50;
    return s;
  }

  function toQuery(s) {
    const q = new URLSearchParams();
    for (const k of FIELDS) if (s[k]) q.set(k, s[k]);
    q.set("sort", s.sort);
    q.set("order", s.order);
    if (s.offset) q.set("offset", String(s.offset));
    if (s.limit !== 50) q.set("limit", String(s.limit));
    return q.toString();
  }

  // --- form <-> state -----------------------------------------------------------------------
  const da2iso = (da) => (/^\d{8}$/.test(da) ? pacs.fmtDate(da) : "");
  const iso2da = (iso) => (iso || "").replace(/-/g, "");

  function toForm(s) {
    for (const k of FIELDS) {
      const el = $("f-" + k);
      el.value = (k === "from" || k === "to") ? da2iso(s[k]) : s[k];
    }
    $("page-size").value = String(s.limit);
  }

  function fromForm() {
    const s = { ...state };
    for (const k of FIELDS) {
      const v = $("f-" + k).value.trim();
      s[k] = (k === "from" || k === "to") ? iso2da(v) : v;
    }
    return s;
  }

  // --- searching ----------------------------------------------------------------------------
  function go(s, push = true) {
    state = s;
    const url = "?" + toQuery(s);
    if (push && url !== location.search) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
    return run();
  }

  async function run() {
    const mine = ++seq;
    const params = new URLSearchParams(toQuery(state));
    params.set("offset", String(state.offset));
    params.set("limit", String(state.limit));
    $("status").textContent = "Searching…";
    document.body.classList.add("busy");
    try {
      const data = await pacs.api("GET", "studies?" + params.toString());
      if (mine !== seq) return;
      // Past the end (e.g. studies deleted, or an old link): show the last page instead.
      if (data.total > 0 && data.studies.length === 0 && state.offset > 0) {
        const last = Math.floor((data.total - 1) / state.limit) * state.limit;
        return go({ ...state, offset: last }, false);
      }
      rows = data.studies;
      total = data.total;
      hideError();
      render();
      $("status").textContent = "";
    } catch (e) {
      if (mine !== seq) return;
      rows = []; total = 0;
      render();
      showError(e.message);
      $("status").textContent = "";
    } finally {
      if (mine === seq) document.body.classList.remove("busy");
    }
  }

  function showError(msg) { const el = $("error"); el.textContent = msg; el.classList.remove("hidden"); }
  function hideError() { $("error").classList.add("hidden"); }

  // --- rendering ----------------------------------------------------------------------------
  const nf = new Intl.NumberFormat();

  function modalities(m) {
    return String(m || "").split("\\").filter(Boolean)
      .map((x) => `<span class="badge">${pacs.esc(x)}</span>`).join("");
  }

  // Labels (who sees a study: [[groups]]), as chips after the description.
  function labelChips(labels) {
    return (labels || []).map((l) => ` <span class="badge label-chip">${pacs.esc(l)}</span>`).join("");
  }

  // A study an upstream node has and this archive does not (PACS On-Demand): shown, marked
  // "at <node>"; not yet opened, selected or sent from here (docs/on-demand.md).
  function upstreamRow(s) {
    const esc = pacs.esc;
    return `<tr class="upstream" data-uid="${esc(s.study_uid)}" title="Stored at ${esc(s.upstream)}, not here">
          <td class="check"></td>
          <td class="patient">${esc(pacs.fmtName(s.patient_name)) || "<span class=muted>(no name)</span>"}</td>
          <td class="patient-id">${esc(s.patient_id)}</td>
          <td class="opt-md nowrap">${esc(pacs.fmtDate(s.birth_date))}</td>
          <td class="opt-md">${esc(s.sex)}</td>
          <td class="nowrap study-date">${esc(pacs.fmtDate(s.study_date))} ${esc(pacs.fmtTime(s.study_time))}</td>
          <td class="description">${esc(s.description)}</td>
          <td class="opt-sm accession">${esc(s.accession)}</td>
          <td class="modalities">${modalities(s.modalities)}</td>
          <td class="num">${s.series == null ? "" : nf.format(s.series)} / ${s.instances == null ? "" : nf.format(s.instances)}</td>
          <td class="opt-md nowrap"><span class="badge upstream-chip">at ${esc(s.upstream)}</span></td>
          <td class="open-in"></td>
        </tr>`;
  }

  function render() {
    const esc = pacs.esc;
    if (!rows.length) {
      tbody.innerHTML = `<tr><td colspan="12" class="empty">No studies match.</td></tr>`;
    } else {
      tbody.innerHTML = rows.map((s, i) => {
        if (s.upstream) return upstreamRow(s);
        const href = "viewer?study=" + encodeURIComponent(s.study_uid);
        const sel = selected.has(s.study_uid);
        return `<tr class="clickable${sel ? " selected" : ""}" data-i="${i}" data-uid="${esc(s.study_uid)}">
          <td class="check"><input type="checkbox" class="row-check" ${sel ? "checked" : ""}
               aria-label="Select study"></td>
          <td class="patient"><a href="${esc(href)}">${esc(pacs.fmtName(s.patient_name)) || "<span class=muted>(no name)</span>"}</a></td>
          <td class="patient-id">${esc(s.patient_id)}</td>
          <td class="opt-md nowrap">${esc(pacs.fmtDate(s.birth_date))}</td>
          <td class="opt-md">${esc(s.sex)}</td>
          <td class="nowrap study-date">${esc(pacs.fmtDate(s.study_date))} ${esc(pacs.fmtTime(s.study_time))}</td>
          <td class="description">${esc(s.description)}${labelChips(s.labels)}</td>
          <td class="opt-sm accession">${esc(s.accession)}</td>
          <td class="modalities">${modalities(s.modalities)}</td>
          <td class="num">${nf.format(s.series || 0)} / ${nf.format(s.instances || 0)}</td>
          <td class="opt-md nowrap muted">${esc(s.received)}</td>
          <td class="open-in nowrap small">${pacsOpenIn.links(s.study_uid, viewers)}</td>
        </tr>`;
      }).join("");
    }
    for (const th of document.querySelectorAll("#studies th[data-sort]")) {
      th.classList.toggle("sorted-asc", th.dataset.sort === state.sort && state.order === "asc");
      th.classList.toggle("sorted-desc", th.dataset.sort === state.sort && state.order === "desc");
      th.setAttribute("aria-sort", th.dataset.sort !== state.sort ? "none"
        : state.order === "asc" ? "ascending" : "descending");
    }
    const first = total ? state.offset + 1 : 0;
    const last = Math.min(state.offset + rows.length, total);
    $("range").textContent = total ? `${nf.format(first)}–${nf.format(last)} of ${nf.format(total)}`
                                   : "0 studies";
    $("prev-btn").disabled = $("first-btn").disabled = state.offset <= 0;
    $("next-btn").disabled = $("last-btn").disabled = state.offset + state.limit >= total;
    updateSelection();
  }

  function updateSelection() {
    const n = selected.size;
    $("selected-count").textContent = `${n} selected`;
    $("zip-btn").disabled = n === 0;
    $("deid-btn").disabled = n === 0;
    $("send-btn").disabled = n === 0 || !$("send-node").value;
    $("delete-btn").disabled = n === 0;
    const boxes = [...tbody.querySelectorAll(".row-check")];
    const all = $("check-all");
    all.checked = boxes.length > 0 && boxes.every((b) => b.checked);
    all.indeterminate = !all.checked && boxes.some((b) => b.checked);
  }

  // --- events -------------------------------------------------------------------------------
  $("search").addEventListener("submit", (ev) => {
    ev.preventDefault();
    selected.clear();
    go({ ...fromForm(), offset: 0 });
  });
  $("clear-btn").addEventListener("click", () => {
    selected.clear();
    const s = { ...defaults(), limit: state.limit };
    toForm(s);
    go(s);
  });

  function isoDay(offsetDays) {
    const d = new Date();
    d.setDate(d.getDate() - offsetDays);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
  }
  $("quick-dates").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-range]");
    if (!b) return;
    const r = b.dataset.range;
    const [from, to] = r === "today" ? [isoDay(0), isoDay(0)]
      : r === "yesterday" ? [isoDay(1), isoDay(1)]
      : r === "week" ? [isoDay(6), isoDay(0)] : ["", ""];
    $("f-from").value = from;
    $("f-to").value = to;
    selected.clear();
    go({ ...fromForm(), offset: 0 });
  });
  $("f-modality").addEventListener("change", () => { selected.clear(); go({ ...fromForm(), offset: 0 }); });

  document.querySelector("#studies thead").addEventListener("click", (ev) => {
    const th = ev.target.closest("th[data-sort]");
    if (!th) return;
    const key = th.dataset.sort;
    const order = key === state.sort ? (state.order === "asc" ? "desc" : "asc")
                                     : (DESC_FIRST.has(key) ? "desc" : "asc");
    go({ ...state, sort: key, order, offset: 0 });
  });

  const page = (offset) => go({ ...state, offset: Math.max(0, offset) });
  $("first-btn").addEventListener("click", () => page(0));
  $("prev-btn").addEventListener("click", () => page(state.offset - state.limit));
  $("next-btn").addEventListener("click", () => page(state.offset + state.limit));
  $("last-btn").addEventListener("click", () => page(Math.floor(Math.max(0, total - 1) / state.limit) * state.limit));
  $("page-size").addEventListener("change", () => {
    go({ ...state, limit: parseInt($("page-size").value, 10), offset: 0 });
  });

  tbody.addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-uid]");
    if (!tr || tr.classList.contains("upstream")) return;
    const study = rows[Number(tr.dataset.i)];
    if (ev.target.classList.contains("row-check")) {
      if (ev.target.checked) selected.set(study.study_uid, study); else selected.delete(study.study_uid);
      tr.classList.toggle("selected", ev.target.checked);
      updateSelection();
      return;
    }
    if (ev.target.closest("a")) return;             // the link itself (also ctrl/middle-click)
    if (ev.target.closest("td.check")) return;      // a near-miss on the checkbox
    location.href = "viewer?study=" + encodeURIComponent(study.study_uid);
  });
  $("check-all").addEventListener("change", (ev) => {
    for (const s of rows) {
      if (s.upstream) continue;
      if (ev.target.checked) selected.set(s.study_uid, s); else selected.delete(s.study_uid);
    }
    render();
  });

  window.addEventListener("popstate", () => {
    state = fromUrl();
    toForm(state);
    run();
  });

  // --- bulk actions -------------------------------------------------------------------------
  $("zip-btn").addEventListener("click", () => {
    pacs.downloadEach([...selected.keys()].map((uid) => "../api/studies/" + encodeURIComponent(uid) + "/zip"));
    pacs.toast(`Downloading ${selected.size} ${selected.size === 1 ? "study" : "studies"}…`);
  });

  async function loadNodes() {
    try {
      const nodes = await pacs.api("GET", "nodes");
      const sel = $("send-node");
      sel.innerHTML = `<option value="">Send to…</option>` + nodes.map((n) =>
        `<option value="${pacs.esc(n.name)}">${pacs.esc(n.name)} (${pacs.esc(n.aet)})</option>`).join("");
      if (!nodes.length) sel.innerHTML = `<option value="">No DICOM nodes configured</option>`;
    } catch (e) { /* the send box stays empty; the list still works */ }
  }
  $("send-node").addEventListener("change", updateSelection);

  function jobBox(title) {
    const box = $("jobs");
    box.classList.remove("hidden");
    const el = document.createElement("div");
    el.className = "job";
    el.innerHTML = `<span class="title"></span><progress max="1" value="0"></progress>
      <span class="badge queued">queued</span><span class="msg muted small"></span>`;
    el.querySelector(".title").textContent = title;
    box.prepend(el);
    return el;
  }

  function showJob(el, job) {
    const bar = el.querySelector("progress");
    if (job.total) { bar.max = job.total; bar.value = job.done + job.failed; } else bar.removeAttribute("value");
    if (job.state === "done" || job.state === "failed") { bar.max = 1; bar.value = 1; }
    const badge = el.querySelector(".badge");
    badge.className = "badge " + job.state;
    badge.textContent = job.state + (job.total ? ` ${job.done}/${job.total}` : "") +
      (job.failed ? `, ${job.failed} failed` : "");
    el.querySelector(".msg").textContent = job.message || "";
  }

  $("send-btn").addEventListener("click", async () => {
    const node = $("send-node").value;
    if (!node) return;
    for (const [uid, s] of selected) {
      const el = jobBox(`Send ${pacs.fmtName(s.patient_name) || s.patient_id} ${pacs.fmtDate(s.study_date)} → ${node}`);
      try {
        const { job } = await pacs.api("POST", "studies/" + encodeURIComponent(uid) + "/send", { node });
        pacs.watchJob(job, (j) => showJob(el, j)).then((j) => {
          if (j.state === "failed") pacs.toast(`Send to ${node} failed: ${j.message}`, true);
        }).catch((e) => showJob(el, { state: "failed", message: e.message, done: 0, failed: 0 }));
      } catch (e) {
        showJob(el, { state: "failed", message: e.message, done: 0, failed: 0 });
        pacs.toast(e.message, true);
      }
    }
  });

  $("delete-btn").addEventListener("click", async () => {
    const n = selected.size;
    if (!n || !confirm(`Delete ${n} ${n === 1 ? "study" : "studies"} from the archive? It goes to the recycle bin, restorable from the admin page.`)) return;
    let deleted = 0;
    const errors = [];
    for (const uid of [...selected.keys()]) {
      try {
        await pacs.api("DELETE", "studies/" + encodeURIComponent(uid));
        selected.delete(uid);
        deleted++;
      } catch (e) { errors.push(e.message); }
    }
    if (errors.length) pacs.toast(`Deleted ${deleted}; ${errors.length} failed: ${errors[0]}`, true);
    else pacs.toast(`Deleted ${deleted} ${deleted === 1 ? "study" : "studies"}`);
    run();
  });

  // The selected studies, for studies-deid.js (the de-identified export).
  window.pacsSelectedStudies = () => [...selected.keys()];

  // --- start --------------------------------------------------------------------------------
  pacs.header("studies");
  pacs.me().then((m) => {
    isAdmin = !!m.admin;
    $("delete-btn").classList.toggle("hidden", !isAdmin);
  }).catch(() => {});
  loadNodes();
  pacsOpenIn.load().then((v) => { viewers = v || {}; if (rows.length) render(); });
  window.addEventListener("pacs:uploaded", () => run());   // upload.js: show what came in
  state = fromUrl();
  toForm(state);
  go(state, false);
  // The labels in use (those the user's groups see), then the URL's choice among them.
  pacs.api("GET", "labels").then((labels) => {
    const sel = $("f-label");
    for (const l of labels) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = l.label;
      sel.appendChild(opt);
    }
    sel.value = state.label || "";
  }).catch(() => {});
})();
