// What the console's pages add to htmx. htmx itself refreshes the live
// fragments (hx-get, hx-trigger="every 1s" in the templates, polling on
// while the server is away); this file only
// - names each table cell's column (data-label), on the page and in every
//   fragment htmx brings in: on a phone the rows stack into cards;
// - shows the "lost contact" banner (#live-status) while a refresh fails,
//   and hides it at the next one that succeeds;
// - asks before a form with data-confirm is sent, fragments' forms included
//   (the CSP forbids inline onsubmit handlers).
(function () {
  function label(root) {
    if (!root.querySelectorAll) return;
    const tables = root.matches && root.matches("table") ? [root] : root.querySelectorAll("table");
    tables.forEach(function (table) {
      const names = Array.from(table.querySelectorAll("thead th")).map(function (th) { return th.textContent.trim(); });
      if (!names.length) return;
      table.querySelectorAll("tbody tr").forEach(function (tr) {
        Array.from(tr.children).forEach(function (td, i) {
          if (names[i] && !td.hasAttribute("colspan")) td.dataset.label = names[i];
        });
      });
    });
  }
  // htmx:load: the page's body once htmx has started, then each element a swap brought in.
  document.addEventListener("htmx:load", function (e) { label(e.target); });

  function lostContact(lost) {
    const banner = document.getElementById("live-status");
    if (banner) banner.hidden = !lost;
  }
  ["htmx:sendError", "htmx:responseError", "htmx:timeout"].forEach(function (name) {
    document.addEventListener(name, function () { lostContact(true); });
  });
  document.addEventListener("htmx:afterRequest", function (e) { if (e.detail.successful) lostContact(false); });

  document.addEventListener("submit", function (e) {
    const form = e.target.closest("form[data-confirm]");
    if (form && !confirm(form.dataset.confirm)) e.preventDefault();
  });
})();
