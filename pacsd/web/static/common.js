// Shared by every page: the API helper, escaping, formatting, the header bar, job polling.
// Plain ES2017, no build step, nothing fetched from the internet.
"use strict";

const pacs = (() => {
  const API = "../api/";          // pages live at /app/<page>; relative so a proxy prefix works
  const DICOMWEB = "../dicom-web/";

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function toLogin() {
    const next = location.pathname + location.search;
    location.href = "login?next=" + encodeURIComponent(next);
  }

  // JSON in, JSON out. Mutating calls carry X-Requested-With (the server's CSRF check).
  async function api(method, path, body) {
    const opts = { method, headers: { "X-Requested-With": "pacsd", "Accept": "application/json" },
                   credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const rsp = await fetch(API + path, opts);
    if (rsp.status === 401) { toLogin(); throw new ApiError(401, "login required"); }
    const text = await rsp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (!rsp.ok) {
      const msg = (data && data.error) || text.replace(/^\d+ [^:]*: /, "").trim() || rsp.statusText;
      throw new ApiError(rsp.status, msg);
    }
    return data;
  }

  const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  // DICOM DA "20240131" -> "2024-01-31"; anything else unchanged.
  const fmtDate = (da) => (/^\d{8}$/.test(da || "") ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6)}` : (da || ""));
  // DICOM TM "093012.5" -> "09:30"
  const fmtTime = (tm) => (/^\d{4}/.test(tm || "") ? `${tm.slice(0, 2)}:${tm.slice(2, 4)}` : "");
  // DICOM PN "DOE^JOHN" -> "DOE, JOHN" (alphabetic group only)
  const fmtName = (pn) => {
    const parts = String(pn || "").split("=")[0].split("^").filter(Boolean);
    return parts.length > 1 ? `${parts[0]}, ${parts.slice(1).join(" ")}` : (parts[0] || "");
  };
  const fmtBytes = (n) => {
    const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0; n = Number(n) || 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
  };

  let mePromise = null;
  const me = () => (mePromise = mePromise || api("GET", "me"));

  // The bar at the top of every page: <header id="nav"></header>
  async function header(active) {
    const el = document.getElementById("nav");
    if (!el) return;
    const links = [["./", "Studies", "studies"], ["qr", "Query/Retrieve", "qr"],
                   ["worklist", "Worklist", "worklist"], ["admin", "Admin", "admin"]];
    el.innerHTML = `<a class="brand" href="./">pacsd</a>` + links.map(([href, label, key]) =>
      `<a href="${href}" class="${key === active ? "active" : ""}" id="nav-${key}">${label}</a>`).join("") +
      `<span class="spacer"></span><span id="nav-user"></span>`;
    try {
      const m = await me();
      const u = document.getElementById("nav-user");
      if (m.user) {
        u.innerHTML = `${esc(m.user)}${m.admin ? " (admin)" : ""} <button id="logout" class="link">Log out</button>`;
        document.getElementById("logout").onclick = async () => {
          await fetch("logout", { method: "POST", headers: { "X-Requested-With": "pacsd" } });
          location.href = "login";
        };
      }
      if (!m.admin) document.getElementById("nav-admin").classList.add("hidden");
      // The Worklist names every patient scheduled: for users who see every study.
      if (m.restricted || m.shared) document.getElementById("nav-worklist").classList.add("hidden");
    } catch (e) { /* 401 already redirected */ }
  }

  // Poll a background job (send, retrieve) until it ends; onUpdate(job) on each poll.
  async function watchJob(id, onUpdate, intervalMs = 400) {
    for (let i = 0; i < 100000; i++) {       // bounded: ~11 h at 400 ms
      const job = await api("GET", "jobs/" + encodeURIComponent(id));
      onUpdate(job);
      if (job.state !== "running" && job.state !== "queued") return job;
      await new Promise((r) => setTimeout(r, intervalMs));
    }
    throw new Error("job did not finish");
  }

  // A short message at the bottom of the page.
  function toast(text, isError) {
    let box = document.getElementById("toast");
    if (!box) { box = document.createElement("div"); box.id = "toast"; document.body.appendChild(box); }
    box.textContent = text;
    box.className = isError ? "error show" : "show";
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.className = ""; }, isError ? 8000 : 3000);
  }

  // Several downloads at once (the server streams each as an attachment): one hidden link
  // each, spaced so that browsers do not drop all but the first.
  function downloadEach(urls) {
    urls.forEach((url, i) => setTimeout(() => {
      const a = document.createElement("a");
      a.href = url;
      a.download = "";
      a.className = "hidden";
      document.body.appendChild(a);
      a.click();
      setTimeout(() => a.remove(), 1000);
    }, i * 400));
  }

  return { API, DICOMWEB, ApiError, api, esc, fmtDate, fmtTime, fmtName, fmtBytes, me, header,
           watchJob, toast, toLogin, downloadEach };
})();
