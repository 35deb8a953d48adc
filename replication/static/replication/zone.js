// Tells the server the operator's time zone, as the browser knows it
// (Intl), in the "tz" cookie: from the next page on, pages and the admin
// write times in that zone (oma_site/display_zone.py; until then, and for a
// name the server does not know, in TIME_ZONE_DISPLAY).
(function () {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  if (!zone || !/^[A-Za-z0-9_+\-\/]+$/.test(zone)) return;
  if (document.cookie.split("; ").indexOf("tz=" + zone) !== -1) return;
  document.cookie = "tz=" + zone + "; path=/; max-age=31536000; samesite=lax" +
    (location.protocol === "https:" ? "; secure" : "");
})();
