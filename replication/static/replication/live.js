// Live fragments: every element with data-live-url is refreshed in place
// every data-live-ms milliseconds (default 1500) without reloading the page.
// While the server cannot be reached, a banner says so and polling goes on.
(function () {
  // Every body cell gets its column's name (data-label): on a phone the rows
  // stack into cards and each value says what it is.
  function label(root) {
    root.querySelectorAll("table").forEach(function (table) {
      const names = Array.from(table.querySelectorAll("thead th")).map(function (th) { return th.textContent.trim(); });
      if (!names.length) return;
      table.querySelectorAll("tbody tr").forEach(function (tr) {
        Array.from(tr.children).forEach(function (td, i) {
          if (names[i] && !td.hasAttribute("colspan")) td.dataset.label = names[i];
        });
      });
    });
  }

  function refresh(el) {
    const banner = document.getElementById("live-status");
    fetch(el.dataset.liveUrl, { headers: { "X-Requested-With": "fetch" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) { el.innerHTML = html; label(el); if (banner) banner.hidden = true; })
      .catch(function () { if (banner) banner.hidden = false; })
      .finally(function () { setTimeout(function () { refresh(el); }, Number(el.dataset.liveMs || 1500)); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    label(document);
    document.querySelectorAll("[data-live-url]").forEach(function (el) {
      setTimeout(function () { refresh(el); }, Number(el.dataset.liveMs || 1500));
    });
  });
  // A form with data-confirm asks first (the CSP forbids inline onsubmit
  // handlers); listened for on the document, so forms a live fragment
  // brings in ask too.
  document.addEventListener("submit", function (e) {
    const form = e.target.closest("form[data-confirm]");
    if (form && !confirm(form.dataset.confirm)) e.preventDefault();
  });
})();
