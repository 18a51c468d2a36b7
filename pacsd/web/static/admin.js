// Administration: status (refreshed every 5 s), DICOM nodes, users, routing's dead letters,
// corrections, the recycle bin, the audit trail, recent warnings and errors.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const esc = pacs.esc;
  const nf = new Intl.NumberFormat();
  const REFRESH_MS = 5000;

  // --- status -------------------------------------------------------------------------------
  function uptime(s) {
    s = Math.max(0, Math.floor(Number(s) || 0));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    if (m) return `${m} min ${s % 60} s`;
    return `${s} s`;
  }

  async function loadStatus() {
    try {
      const st = await pacs.api("GET", "status");
      const used = st.disk_total_bytes ? 1 - st.disk_free_bytes / st.disk_total_bytes : 0;
      const tiles = [
        ["Uptime", uptime(st.uptime_s), "uptime"],
        ["Associations now", nf.format(st.associations), "associations"],
        ["Stored today", nf.format(st.stored_today), "stored_today"],
        ["Patients", nf.format(st.patients), "patients"],
        ["Studies", nf.format(st.studies), "studies"],
        ["Series", nf.format(st.series), "series"],
        ["Instances", nf.format(st.instances), "instances"],
        ["Index size", pacs.fmtBytes(st.index_bytes), "index_bytes"],
      ];
      $("stats").innerHTML = tiles.map(([label, value, key]) =>
        `<div class="stat" id="stat-${key}"><div class="label">${label}</div><div class="value">${esc(value)}</div></div>`).join("");
      $("status-details").innerHTML = [
        ["Version", esc(st.version)],
        ["DICOM", `${esc(st.aet)} on port ${esc(st.dicom_port)}`],
        ["HTTP port", esc(st.http_port)],
        ["Started", esc(new Date(st.started * 1000).toLocaleString())],
        ["Disk", `<span id="disk-free">${esc(pacs.fmtBytes(st.disk_free_bytes))} free of ${esc(pacs.fmtBytes(st.disk_total_bytes))}</span>
           <span class="bar${used > 0.9 ? " failed" : ""}" style="display:inline-block;width:160px;vertical-align:middle;margin-left:8px">
           <span style="width:${(used * 100).toFixed(1)}%"></span></span>`],
        ["Storage", `<span class="mono">${esc(st.storage_path)}</span>`],
        ["Data folder", `<span class="mono">${esc(st.data)}</span>`],
        ["Index", `<span class="mono">${esc(st.index_location)}</span>`],
        ["Node", `<span class="mono">${esc(st.node)}</span>`],
        ["Recycle bin", `<span id="trash-summary">${esc(nf.format(st.trash.instances))} instance(s), ${esc(pacs.fmtBytes(st.trash.bytes))}</span>`],
        ["Damaged files", st.integrity.damaged
          ? `<span class="error-text" id="damaged">${esc(nf.format(st.integrity.damaged))}: never sent until put back (see <span class="mono">pacsd verify</span>)</span>`
          : `<span id="damaged">none found</span>`],
      ].map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("");
      $("status-updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      $("status-updated").innerHTML = `<span class="error-text">status unavailable: ${esc(e.message)}</span>`;
    }
  }

  // --- nodes --------------------------------------------------------------------------------
  let nodes = [];
  let editing = null;                  // name of the node being edited inline

  async function loadNodes() {
    try { nodes = await pacs.api("GET", "nodes"); } catch (e) { pacs.toast(e.message, true); }
    renderNodes();
  }

  // What a node may ask of us, in words (the tooltip of its AE title).
  function mayDo(n) {
    const may = ["find", "get", "move", "store"].filter((k) => n["allow_" + k] !== false);
    return may.length ? "May " + may.map((k) => "C-" + k.toUpperCase()).join(", ") : "May only C-ECHO";
  }

  function renderNodes() {
    const tb = document.querySelector("#nodes tbody");
    if (!nodes.length) { tb.innerHTML = `<tr><td colspan="7" class="empty">No nodes yet.</td></tr>`; return; }
    tb.innerHTML = nodes.map((n) => {
      const ro = n.source === "config";
      if (n.name === editing && !ro) {
        return `<tr data-name="${esc(n.name)}" class="editing">
          <td>${esc(n.name)}</td>
          <td><input class="e-aet" value="${esc(n.aet)}" maxlength="16" size="10" aria-label="AE title"></td>
          <td><input class="e-host" value="${esc(n.host)}" size="14" aria-label="Host"></td>
          <td class="num"><input class="e-port" type="number" min="1" max="65535" value="${esc(n.port)}" style="width:6em" aria-label="Port"></td>
          <td><span class="badge info">admin</span></td><td class="echo"></td>
          <td class="actions"><button class="small primary" data-act="save">Save</button><button class="small" data-act="cancel">Cancel</button></td>
        </tr>`;
      }
      return `<tr data-name="${esc(n.name)}">
        <td class="name">${esc(n.name)}</td><td class="mono" title="${esc(mayDo(n))}">${esc(n.aet)}</td><td>${esc(n.host)}</td>
        <td class="num">${esc(n.port)}</td>
        <td>${ro ? `<span class="badge" title="Defined in the configuration file: read-only here">config file</span>`
                 : `<span class="badge info">admin</span>`}</td>
        <td class="echo"></td>
        <td class="actions"><button class="small" data-act="echo">Echo</button>${ro ? "" :
          `<button class="small" data-act="edit">Edit</button><button class="small danger" data-act="remove">Remove</button>`}</td>
      </tr>`;
    }).join("");
  }

  document.querySelector("#nodes tbody").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-act]");
    if (!b) return;
    const tr = b.closest("tr");
    const name = tr.dataset.name;
    const path = "nodes/" + encodeURIComponent(name);
    const act = b.dataset.act;
    if (act === "echo") {
      const cell = tr.querySelector("td.echo");
      cell.innerHTML = `<span class="muted">…</span>`;
      b.disabled = true;
      try {
        const r = await pacs.api("POST", path + "/echo");
        cell.innerHTML = r.ok ? `<span class="badge ok">ok</span> <span class="muted small">${Number(r.ms).toFixed(0)} ms</span>`
                              : `<span class="badge error">failed</span> <span class="error-text small">${esc(r.message)}</span>`;
      } catch (e) {
        cell.innerHTML = `<span class="badge error">failed</span> <span class="error-text small">${esc(e.message)}</span>`;
      } finally { b.disabled = false; }
    } else if (act === "edit") {
      editing = name; renderNodes();
      document.querySelector("#nodes tr.editing .e-aet").focus();
    } else if (act === "cancel") {
      editing = null; renderNodes();
    } else if (act === "save") {
      const body = { name, aet: tr.querySelector(".e-aet").value.trim(), host: tr.querySelector(".e-host").value.trim(),
                     port: parseInt(tr.querySelector(".e-port").value, 10) };
      try {
        await pacs.api("PUT", path, body);
        editing = null;
        pacs.toast(`Node ${name} saved`);
        loadNodes();
      } catch (e) { pacs.toast(e.message, true); }
    } else if (act === "remove") {
      if (!confirm(`Remove the DICOM node "${name}"?`)) return;
      try {
        await pacs.api("DELETE", path);
        pacs.toast(`Node ${name} removed`);
        loadNodes();
      } catch (e) { pacs.toast(e.message, true); }
    }
  });
  document.querySelector("#nodes tbody").addEventListener("keydown", (ev) => {
    if (!ev.target.closest("tr.editing")) return;
    if (ev.key === "Enter") ev.target.closest("tr").querySelector('[data-act="save"]').click();
    if (ev.key === "Escape") { editing = null; renderNodes(); }
  });

  $("node-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { name: $("n-name").value.trim(), aet: $("n-aet").value.trim(), host: $("n-host").value.trim(),
                   port: parseInt($("n-port").value, 10) };
    try {
      await pacs.api("POST", "nodes", body);
      pacs.toast(`Node ${body.name} added`);
      ev.target.reset();
      loadNodes();
    } catch (e) { pacs.toast(e.message, true); }
  });

  // --- users --------------------------------------------------------------------------------
  let users = [];
  let me = null;

  async function loadUsers() {
    try { users = await pacs.api("GET", "users"); } catch (e) { pacs.toast(e.message, true); }
    renderUsers();
  }

  function renderUsers() {
    const tb = document.querySelector("#users tbody");
    $("first-user-note").classList.toggle("hidden", users.length > 0);
    $("u-admin").disabled = !users.length;   // the first user is an administrator (server-side too)
    if (!users.length) {
      $("u-admin").checked = true;
      tb.innerHTML = `<tr><td colspan="4" class="empty">No users: the web side is open (and bound to this computer only).</td></tr>`;
      return;
    }
    tb.innerHTML = users.map((u) => {
      const ro = u.source === "config";
      const self = me && me.user === u.name;
      return `<tr data-name="${esc(u.name)}">
        <td class="name">${esc(u.name)}${self ? ` <span class="muted small">(you)</span>` : ""}</td>
        <td>${u.admin ? `<span class="badge info">administrator</span>` : "user"}</td>
        <td>${ro ? `<span class="badge" title="Defined in the configuration file: read-only here">config file</span>` : "admin"}</td>
        <td class="actions">${ro ? "" : `
          <span class="pw hidden"><input type="password" class="e-password" placeholder="new password" minlength="8"
             autocomplete="new-password" aria-label="New password"> <button class="small primary" data-act="pw-save">Set</button>
             <button class="small" data-act="pw-cancel">Cancel</button></span>
          <button class="small" data-act="pw">Change password</button>
          <button class="small" data-act="toggle-admin">${u.admin ? "Make user" : "Make admin"}</button>
          <button class="small danger" data-act="remove">Remove</button>`}</td>
      </tr>`;
    }).join("");
  }

  // A refusal (the last administrator, a name taken) stays on the page until the next action.
  function usersError(message) {
    $("users-error").textContent = message || "";
    $("users-error").classList.toggle("hidden", !message);
    if (message) pacs.toast(message, true);
  }

  document.querySelector("#users tbody").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-act]");
    if (!b) return;
    usersError("");
    const tr = b.closest("tr");
    const name = tr.dataset.name;
    const path = "users/" + encodeURIComponent(name);
    const user = users.find((u) => u.name === name);
    const act = b.dataset.act;
    try {
      if (act === "pw") {
        tr.querySelector(".pw").classList.remove("hidden");
        b.classList.add("hidden");
        tr.querySelector(".e-password").focus();
      } else if (act === "pw-cancel") {
        renderUsers();
      } else if (act === "pw-save") {
        const pw = tr.querySelector(".e-password").value;
        if (pw.length < 8) { pacs.toast("A password needs at least 8 characters", true); return; }
        await pacs.api("PUT", path, { password: pw });
        pacs.toast(`Password of ${name} changed`);
        renderUsers();
      } else if (act === "toggle-admin") {
        await pacs.api("PUT", path, { admin: !user.admin });
        loadUsers();
      } else if (act === "remove") {
        if (!confirm(`Remove the user "${name}"?`)) return;
        await pacs.api("DELETE", path);
        pacs.toast(`User ${name} removed`);
        loadUsers();
      }
    } catch (e) { usersError(e.message); }
  });
  document.querySelector("#users tbody").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && ev.target.classList.contains("e-password")) {
      ev.target.closest("tr").querySelector('[data-act="pw-save"]').click();
    }
  });

  $("user-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { name: $("u-name").value.trim(), password: $("u-password").value, admin: $("u-admin").checked };
    const first = !users.length;
    usersError("");
    try {
      const added = await pacs.api("POST", "users", body);
      pacs.toast(`User ${body.name} added` + (added && added.note ? `: ${added.note}` : ""));
      ev.target.reset();
      // The first user turned log-in on: this page now needs it (the server made it an admin).
      if (first) { pacs.toLogin(); return; }
      loadUsers();
    } catch (e) { usersError(e.message); }
  });

  // --- routing: dead letters ---------------------------------------------------------------
  async function loadQueue() {
    const tb = document.querySelector("#queue tbody");
    try {
      const q = await pacs.api("GET", "queue?state=dead");
      const c = q.counts;
      $("queue-counts").textContent = `${c.queued} queued, ${c.dead} dead, ${c.done} done`;
      $("queue-retry-all").disabled = !q.jobs.length;
      tb.innerHTML = q.jobs.length ? q.jobs.map((j) => `<tr data-id="${j.id}">
          <td class="mono small">${j.id}</td><td>${esc(j.route)}</td><td>${esc(j.destination)}</td>
          <td class="mono small">${esc(j.study_uid)}${j.sop_uid ? `<br>${esc(j.sop_uid)}` : ""}</td>
          <td>${j.attempts}</td><td class="message">${esc(j.last_error)}</td>
          <td class="actions"><button type="button" class="q-retry">Retry</button>
            <button type="button" class="q-forget">Forget</button></td></tr>`).join("")
        : `<tr><td colspan="7" class="empty">No dead letters.</td></tr>`;
    } catch (e) {
      tb.innerHTML = `<tr><td colspan="7" class="error-text">${esc(e.message)}</td></tr>`;
    }
  }
  document.querySelector("#queue tbody").addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button");
    const row = ev.target.closest("tr[data-id]");
    if (!btn || !row) return;
    const ids = [Number(row.dataset.id)];
    try {
      if (btn.classList.contains("q-retry")) await pacs.api("POST", "queue/retry", { ids });
      else if (btn.classList.contains("q-forget")) await pacs.api("POST", "queue/forget", { ids });
      loadQueue();
    } catch (e) { pacs.toast(e.message, true); }
  });
  $("queue-retry-all").addEventListener("click", async () => {
    try { await pacs.api("POST", "queue/retry", { dead: true }); loadQueue(); }
    catch (e) { pacs.toast(e.message, true); }
  });
  $("queue-refresh").addEventListener("click", loadQueue);

  // --- corrections (pacsd.storage.corrections) --------------------------------------------
  function fix(formId, call) {
    $(formId).addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const out = $("fix-result"), button = ev.target.querySelector("button");
      button.disabled = true;
      out.className = "small";
      out.textContent = "Working…";
      try {
        const r = await call();
        out.textContent = r.change !== undefined
          ? `Done: ${nf.format(r.instances)} image(s) rewritten (change #${r.change}); the previous versions are in the recycle bin.`
          : `Done: ${nf.format(r.restored)} image(s) restored from the recycle bin.`;
        ev.target.reset();
        loadTrash();
        loadStatus();
      } catch (e) {
        out.className = "small error-text";
        out.textContent = e.message;
      } finally { button.disabled = false; }
    });
  }
  const val = (id) => $(id).value.trim();
  fix("fix-merge", () => pacs.api("POST", "patients/merge", { from: val("fm-from"), into: val("fm-into") }));
  fix("fix-study", () => pacs.api("POST", `studies/${encodeURIComponent(val("fs-uid"))}/move`, { to_patient: val("fs-to") }));
  fix("fix-series", () => pacs.api("POST", `series/${encodeURIComponent(val("fr-uid"))}/move`, { to_study: val("fr-to") || "new" }));
  fix("fix-undo", () => pacs.api("POST", "undo", { uid: val("fu-uid") }));

  // --- the recycle bin ---------------------------------------------------------------------
  async function loadTrash() {
    const tb = document.querySelector("#trash tbody");
    try {
      const t = await pacs.api("GET", "trash");
      $("trash-counts").textContent = `${nf.format(t.instances)} instance(s), ${pacs.fmtBytes(t.bytes)}; kept ${t.days} day(s)`;
      tb.innerHTML = t.entries.length ? t.entries.map((e) => `<tr data-id="${e.deletion}">
          <td class="nowrap small">${esc(new Date(e.deleted * 1000).toLocaleString())}</td>
          <td>${e.action === "delete" ? "deleted" : "previous version: " + esc(e.action)}</td>
          <td>${esc(e.level.toLowerCase())} <span class="mono small">${esc(e.uid)}</span></td>
          <td>${esc(e.patient_name)} <span class="muted small">${esc(e.patient_id)}</span></td>
          <td>${esc(e.study_date)} ${esc(e.study_description)}</td>
          <td>${nf.format(e.instances)}</td><td class="small">${esc(e.who)}</td>
          <td class="actions">${e.action === "delete" ? `<button type="button" class="t-restore">Restore</button>` : ""}</td></tr>`).join("")
        : `<tr><td colspan="8" class="empty">The recycle bin is empty.</td></tr>`;
    } catch (e) {
      tb.innerHTML = `<tr><td colspan="8" class="error-text">${esc(e.message)}</td></tr>`;
    }
  }
  document.querySelector("#trash tbody").addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button.t-restore");
    const row = ev.target.closest("tr[data-id]");
    if (!btn || !row) return;
    btn.disabled = true;
    try {
      const r = await pacs.api("POST", "trash/restore", { uid: row.dataset.id });
      pacs.toast(`${r.restored} instance(s) restored` + (r.already_stored.length ? `; ${r.already_stored.length} stored again since, left in the bin` : ""));
      loadTrash();
      loadStatus();
    } catch (e) { btn.disabled = false; pacs.toast(e.message, true); }
  });
  $("trash-refresh").addEventListener("click", loadTrash);

  // --- the audit trail ----------------------------------------------------------------------
  async function loadAudit() {
    const tb = document.querySelector("#audit tbody");
    const q = new URLSearchParams({ limit: "200" });
    for (const [key, id] of [["patient", "au-patient"], ["study", "au-study"], ["user", "au-user"],
      ["action", "au-action"], ["since", "au-since"], ["until", "au-until"]]) {
      const v = $(id).value.trim();
      if (v) q.set(key, v);
    }
    try {
      const res = await pacs.api("GET", "audit?" + q.toString());
      tb.innerHTML = res.records.length ? res.records.map((r) => `<tr>
          <td class="nowrap small">${esc(new Date(r.t * 1000).toLocaleString())}</td>
          <td>${esc(r.action)}</td>
          <td><span class="badge ${r.outcome === "ok" ? "" : "WARNING"}">${esc(r.outcome)}</span></td>
          <td class="small">${esc(r.user || "-")} <span class="muted">${esc(r.via)} ${esc(r.address)}</span></td>
          <td class="small">${(r.patients || []).map((p) => `${esc(p.name)} <span class="muted">${esc(p.id)}</span>`).join("<br>")}</td>
          <td class="mono small">${(r.studies || []).slice(0, 3).map(esc).join("<br>")}${r.studies.length > 3 ? " …" : ""}</td>
          <td class="small">${r.count ? esc(nf.format(r.count)) + " instance(s) " : ""}${esc(r.detail)}</td></tr>`).join("")
        : `<tr><td colspan="7" class="empty">${res.enabled ? "No audit records match." : "The audit trail is off ([audit] enabled = false)."}</td></tr>`;
    } catch (e) {
      tb.innerHTML = `<tr><td colspan="7" class="error-text">${esc(e.message)}</td></tr>`;
    }
  }
  $("audit-search").addEventListener("submit", (ev) => { ev.preventDefault(); loadAudit(); });

  // --- recent errors ------------------------------------------------------------------------
  async function loadLog() {
    const tb = document.querySelector("#log tbody");
    try {
      const recs = await pacs.api("GET", "log?limit=200");
      tb.innerHTML = recs.length ? recs.map((r) => `<tr>
          <td class="nowrap small">${esc(new Date(r.time * 1000).toLocaleString())}</td>
          <td><span class="badge ${esc(r.level)}">${esc(r.level)}</span></td>
          <td class="opt-sm mono small">${esc(r.logger)}</td>
          <td class="message">${esc(r.message)}</td></tr>`).join("")
        : `<tr><td colspan="4" class="empty">Nothing logged at WARNING or worse since the server started.</td></tr>`;
    } catch (e) {
      tb.innerHTML = `<tr><td colspan="4" class="error-text">${esc(e.message)}</td></tr>`;
    }
  }
  $("log-refresh").addEventListener("click", loadLog);

  // --- start --------------------------------------------------------------------------------
  pacs.header("admin");
  pacs.me().then((m) => {
    me = m;
    if (!m.admin) { $("denied").classList.remove("hidden"); return; }
    $("admin").classList.remove("hidden");
    loadStatus();
    loadNodes();
    loadUsers();
    loadQueue();
    loadTrash();
    loadAudit();
    loadLog();
    setInterval(() => { if (!document.hidden) loadStatus(); }, REFRESH_MS);
  }).catch((e) => {
    if (e.status !== 401) { $("denied").textContent = "Could not check your rights: " + e.message; $("denied").classList.remove("hidden"); }
  });
})();
