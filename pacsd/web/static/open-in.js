// "Open in another viewer": Weasis (a link to ../api/studies/UID/weasis, which redirects to
// weasis:// with a manifest URL carrying a study token) and OHIF ([http] ohif_url set:
// {ohif_url}/viewer?StudyInstanceUIDs=UID). Used by the study list's rows and the viewer.
"use strict";

const pacsOpenIn = (() => {
  let settings = null;                  // GET ../api/viewers, once
  // Not pacs.api: a 401 here (a share link's holder) must not send the page to the login.
  const load = () => (settings = settings || fetch(pacs.API + "viewers", {
    credentials: "same-origin", headers: { "Accept": "application/json" } })
    .then((r) => (r.ok ? r.json() : {})).catch(() => ({})));

  const weasisHref = (uid) => "../api/studies/" + encodeURIComponent(uid) + "/weasis";
  const ohifHref = (base, uid) => base + "/viewer?StudyInstanceUIDs=" + encodeURIComponent(uid);

  // The links of one study as HTML (escaped), for a table cell.
  function links(uid, s) {
    const esc = pacs.esc;
    let html = `<a class="open-weasis" href="${esc(weasisHref(uid))}" title="Open in Weasis (installed on this computer)">Weasis</a>`;
    if (s && s.ohif_url) {
      html += ` <a class="open-ohif" href="${esc(ohifHref(s.ohif_url, uid))}" target="_blank" rel="noopener" title="Open in OHIF">OHIF</a>`;
    }
    return html;
  }

  // The viewer page: its two buttons (links styled as buttons) for the study shown.
  async function decorate(uid) {
    // A share link's holder (/api/me says "shared") has no account Weasis could use.
    const me = await pacs.me().catch(() => ({}));
    if (!uid || me.shared) return;
    const s = await load();
    const weasis = document.getElementById("open-weasis");
    const ohif = document.getElementById("open-ohif");
    if (weasis) { weasis.href = weasisHref(uid); weasis.classList.remove("hidden"); }
    if (ohif && s.ohif_url) { ohif.href = ohifHref(s.ohif_url, uid); ohif.classList.remove("hidden"); }
  }

  // The viewer page (/app/viewer?study=UID) has the two links in its action bar.
  function onViewer() {
    if (document.getElementById("open-weasis")) decorate(new URLSearchParams(location.search).get("study") || "");
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", onViewer);
  else onViewer();

  return { load, links, decorate };
})();
