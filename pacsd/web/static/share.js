// The PIN page of a share link (/share/TOKEN): the PIN goes back to the same address; the
// answer sets the link's cookie and names the viewer to open.
"use strict";
document.getElementById("pin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const error = document.getElementById("error");
  error.classList.add("hidden");
  const rsp = await fetch(location.pathname, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-Requested-With": "pacsd" },
    body: JSON.stringify({ pin: document.getElementById("pin").value }),
  });
  let data = {};
  try { data = await rsp.json(); } catch (e) { /* not JSON */ }
  if (rsp.ok && data.next) { location.href = data.next; return; }
  error.textContent = data.error || `refused (${rsp.status})`;
  error.classList.remove("hidden");
});
