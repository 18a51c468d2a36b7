// Query/Retrieve: C-FIND a configured node through ../api/nodes/<name>/studies, C-MOVE the chosen
// studies to us (POST .../retrieve) and follow each job. The node and criteria live in the URL.
"use strict";

(() => {
  const FIELDS = ["patient", "patient_id", "from", "to", "accession", "modality"];
  const $ = (id) => document.getElementById(id);
  const tbody = document.querySelector("#results tbody");
  let results = [];
  const selected = new Set();
  const retrieved = new Map();     // study_uid -> "running" | "done" | "failed"
  let seq = 0;
  let failed = false;              // the last search failed: say so in the table, not "none found"

  const node = () => $("node").value;
  const nodePath = () => "nodes/" + encodeURIComponent(node());
  const iso2da = (iso) => (iso || "").replace(/-/g, "");
  const da2iso = (da) => (/^\d{8}$/.test(da || "") ? pacs.fmtDate(da) : "");

  function showError(msg) { const el = $("error"); el.textContent = msg; el.classList.remove("hidden"); }
  function hideError() { $("error").classList.add("hidden"); }

  async function loadNodes(want) {
    const sel = $("node");
    try {
      const nodes = await pacs.api("GET", "nodes");
      if (!nodes.length) {
        sel.innerHTML = `<option value="">no nodes configured</option>`;
        showError("No DICOM nodes are configured. An administrator can add them on the Admin page.");
        return false;
      }
      sel.innerHTML = nodes.map((n) => `<option value="${pacs.esc(n.name)}">${pacs.esc(n.name)}` +
        ` — ${pacs.esc(n.aet)}@${pacs.esc(n.host)}:${pacs.esc(n.port)}</option>`).join("");
      if (want && nodes.some((n) => n.name === want)) sel.value = want;
      return true;
    } catch (e) {
      sel.innerHTML = `<option value="">—</option>`;
      showError("Could not load the node list: " + e.message);
      return false;
    }
  }

  $("echo-btn").addEventListener("click", async () => {
    const out = $("echo-result");
    if (!node()) return;
    out.innerHTML = `<span class="muted">echoing…</span>`;
    try {
      const r = await pacs.api("POST", nodePath() + "/echo");
      out.innerHTML = r.ok
        ? `<span class="badge ok">ok</span> <span class="muted">${Number(r.ms).toFixed(0)} ms</span>`
        : `<span class="badge error">failed</span> <span class="error-text">${pacs.esc(r.message)}</span>`;
    } catch (e) {
      out.innerHTML = `<span class="badge error">failed</span> <span class="error-text">${pacs.esc(e.message)}</span>`;
    }
  });
  $("node").addEventListener("change", () => { $("echo-result").innerHTML = ""; });

  function criteria() {
    const q = new URLSearchParams();
    for (const k of FIELDS) {
      let v = $("f-" + k).value.trim();
      if (k === "from" || k === "to") v = iso2da(v);
      if (v) q.set(k, v);
    }
    return q;
  }

  async function search(push) {
    if (!node()) return;
    const q = criteria();
    const url = "?" + new URLSearchParams([["node", node()], ...q]).toString();
    if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
    const mine = ++seq;
    selected.clear();
    hideError();
    $("status").textContent = `Searching ${node()}…`;
    $("search-btn").disabled = true;
    try {
      const data = await pacs.api("GET", nodePath() + "/studies?" + q.toString());
      if (mine !== seq) return;
      results = data.studies || [];
      failed = false;
      $("status").textContent = `${results.length} ${results.length === 1 ? "study" : "studies"} on ${node()}`;
    } catch (e) {
      if (mine !== seq) return;
      results = [];
      failed = true;
      $("status").textContent = "";
      showError(`${node()}: ${e.message}`);
    } finally {
      if (mine === seq) $("search-btn").disabled = false;
    }
    render();
  }

  function stateCell(uid) {
    const st = retrieved.get(uid);
    if (st === "done") return `<a class="open-local" href="viewer?study=${encodeURIComponent(uid)}">Open</a>`;
    if (st) return `<span class="badge ${st}">${st}</span>`;
    return "";
  }

  function render() {
    const esc = pacs.esc;
    if (!results.length) {
      tbody.innerHTML = `<tr><td colspan="9" class="empty">${failed ? "The search failed (see above)." : "No studies found."}</td></tr>`;
    } else {
      tbody.innerHTML = results.map((s) => `<tr data-uid="${esc(s.study_uid)}" class="${selected.has(s.study_uid) ? "selected" : ""}">
        <td class="check"><input type="checkbox" class="row-check" ${selected.has(s.study_uid) ? "checked" : ""} aria-label="Select study"></td>
        <td class="patient">${esc(pacs.fmtName(s.patient_name))}</td>
        <td class="patient-id">${esc(s.patient_id)}</td>
        <td class="nowrap">${esc(pacs.fmtDate(s.study_date))} ${esc(pacs.fmtTime(s.study_time))}</td>
        <td>${esc(s.description)}</td>
        <td class="opt-sm">${esc(s.accession)}</td>
        <td>${String(s.modalities || "").split("\\").filter(Boolean).map((m) => `<span class="badge">${esc(m)}</span>`).join("")}</td>
        <td class="num">${s.instances == null ? "" : esc(s.instances)}</td>
        <td class="state">${stateCell(s.study_uid)}</td>
      </tr>`).join("");
    }
    updateSelection();
  }

  function updateSelection() {
    $("selected-count").textContent = `${selected.size} selected`;
    $("retrieve-btn").disabled = selected.size === 0;
    const all = $("check-all");
    all.checked = results.length > 0 && results.every((s) => selected.has(s.study_uid));
    all.indeterminate = !all.checked && selected.size > 0;
  }

  tbody.addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-uid]");
    if (!tr || ev.target.closest("a")) return;
    const uid = tr.dataset.uid;
    const box = tr.querySelector(".row-check");
    if (ev.target !== box) box.checked = !box.checked;    // the whole row toggles
    if (box.checked) selected.add(uid); else selected.delete(uid);
    tr.classList.toggle("selected", box.checked);
    updateSelection();
  });
  $("check-all").addEventListener("change", (ev) => {
    selected.clear();
    if (ev.target.checked) results.forEach((s) => selected.add(s.study_uid));
    render();
  });

  function setState(uids, st) {
    for (const uid of uids) {
      retrieved.set(uid, st);
      const td = tbody.querySelector(`tr[data-uid="${CSS.escape(uid)}"] td.state`);
      if (td) td.innerHTML = stateCell(uid);
    }
  }

  $("retrieve-btn").addEventListener("click", async () => {
    const uids = [...selected];
    if (!uids.length) return;
    const from = node();
    const studies = results.filter((s) => selected.has(s.study_uid));
    $("jobs-panel").classList.remove("hidden");
    const el = document.createElement("div");
    el.className = "job";
    const title = studies.length === 1
      ? `${pacs.fmtName(studies[0].patient_name) || studies[0].patient_id} ${pacs.fmtDate(studies[0].study_date)}`
      : `${studies.length} studies`;
    el.innerHTML = `<span class="title"></span><progress max="1"></progress>
      <span class="badge queued">queued</span><span class="msg muted small"></span><span class="links"></span>`;
    el.querySelector(".title").textContent = `Retrieve ${title} from ${from}`;
    $("jobs").prepend(el);
    selected.clear();
    render();
    setState(uids, "running");

    const show = (job) => {
      const bar = el.querySelector("progress");
      if (job.total) { bar.max = job.total; bar.value = job.done + job.failed; }
      if (job.state === "done" || job.state === "failed") { bar.max = 1; bar.value = 1; }
      const badge = el.querySelector(".badge");
      badge.className = "badge " + job.state;
      badge.textContent = job.state + (job.total ? ` ${job.done}/${job.total}` : job.done ? ` ${job.done}` : "") +
        (job.failed ? `, ${job.failed} failed` : "");
      const msg = el.querySelector(".msg");
      msg.textContent = job.message || "";
      msg.classList.toggle("error-text", job.state === "failed");
    };
    try {
      const { job } = await pacs.api("POST", "nodes/" + encodeURIComponent(from) + "/retrieve", { studies: uids });
      const end = await pacs.watchJob(job, show);
      if (end.state === "done") {
        setState(uids, "done");
        el.querySelector(".links").innerHTML = studies.map((s) =>
          `<a class="open-local" href="viewer?study=${encodeURIComponent(s.study_uid)}">Open ${pacs.esc(pacs.fmtName(s.patient_name) || s.patient_id)} ${pacs.esc(pacs.fmtDate(s.study_date))}</a>`).join(" · ");
        pacs.toast("Retrieve finished");
      } else {
        setState(uids, "failed");
        pacs.toast(`Retrieve from ${from} failed: ${end.message}`, true);
      }
    } catch (e) {
      show({ state: "failed", message: e.message, total: null, done: 0, failed: 0 });
      setState(uids, "failed");
      pacs.toast(e.message, true);
    }
  });

  $("search").addEventListener("submit", (ev) => { ev.preventDefault(); search(true); });

  function fromUrl() {
    const q = new URLSearchParams(location.search);
    for (const k of FIELDS) {
      const v = q.get(k) || "";
      $("f-" + k).value = (k === "from" || k === "to") ? da2iso(v) : v;
    }
    return q;
  }
  window.addEventListener("popstate", async () => {
    const q = fromUrl();
    if (q.get("node")) { $("node").value = q.get("node"); search(false); }
  });

  pacs.header("qr");
  (async () => {
    const q = fromUrl();
    const ok = await loadNodes(q.get("node"));
    if (ok && q.get("node")) search(false);     // a shared link / reload repeats its search
  })();
})();
