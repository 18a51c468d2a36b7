// Log in: POST login {name, password}; on 200 go to ?next= when it is a path on this site.
// (No pacs.api here: its 401 handling would send us back to this very page.)
"use strict";

(() => {
  const form = document.getElementById("login-form");
  const err = document.getElementById("error");

  // Open-redirect guard: only "/something" on this origin; never "//host", "/\host" or "http:".
  function target() {
    const next = new URLSearchParams(location.search).get("next") || "";
    if (!/^\/(?![\/\\])/.test(next) || /[\u0000-\u001f\\]/.test(next)) return "./";
    try {
      const url = new URL(next, location.origin);
      return url.origin === location.origin ? url.pathname + url.search + url.hash : "./";
    } catch (e) { return "./"; }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.classList.add("hidden");
    const btn = document.getElementById("login-btn");
    btn.disabled = true;
    try {
      const rsp = await fetch("login", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "application/json", "X-Requested-With": "pacsd" },
        body: JSON.stringify({ name: document.getElementById("name").value.trim(), password: document.getElementById("password").value }),
      });
      if (rsp.ok) { location.replace(target()); return; }
      let msg = rsp.status === 401 ? "Wrong user name or password." : `Login failed (${rsp.status}).`;
      try { const data = await rsp.json(); if (data && data.error) msg = data.error; } catch (e) { /* keep */ }
      err.textContent = msg;
      err.classList.remove("hidden");
      document.getElementById("password").select();
    } catch (e) {
      err.textContent = "Cannot reach the server: " + e.message;
      err.classList.remove("hidden");
    } finally { btn.disabled = false; }
  });
})();
