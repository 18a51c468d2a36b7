// The study list's "Export de-identified…": the two options, the burned-in warning asked of
// the server first (GET /api/studies/<uid>/deidentify), then one ZIP per selected study
// (GET /api/studies/<uid>/zip?deidentify=1&longitudinal=…&clean=…). docs/web.md.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const dialog = $("deid");
  let uids = [];

  $("deid-btn").addEventListener("click", async () => {
    uids = window.pacsSelectedStudies ? window.pacsSelectedStudies() : [];
    if (!uids.length) return;
    const box = $("deid-warning");
    box.classList.add("hidden");
    box.textContent = "";
    dialog.showModal();
    const lines = [];
    for (const uid of uids) {
      try {
        const r = await pacs.api("GET", "studies/" + encodeURIComponent(uid) + "/deidentify");
        if (r.warning) lines.push(r.warning);
      } catch (e) { lines.push(e.message); }
    }
    if (lines.length) {
      box.textContent = lines.join("\n");   // text, never markup
      box.classList.remove("hidden");
    }
  });

  $("deid-ok").addEventListener("click", () => {
    const q = "?deidentify=1" + ($("deid-longitudinal").checked ? "&longitudinal=1" : "") +
      ($("deid-clean").checked ? "&clean=1" : "");
    let delay = 0;
    for (const uid of uids) {
      setTimeout(() => {
        const a = document.createElement("a");
        a.href = "../api/studies/" + encodeURIComponent(uid) + "/zip" + q;
        a.download = "";
        a.className = "hidden";
        document.body.appendChild(a);
        a.click();
        setTimeout(() => a.remove(), 1000);
      }, delay);
      delay += 400;
    }
    dialog.close();
    pacs.toast(`Downloading ${uids.length} de-identified ${uids.length === 1 ? "study" : "studies"}…` +
      ($("deid-warning").textContent ? " Check the warned series' pixels before sharing." : ""));
  });
})();
