// jit-broker console: the only script. Counts an approval's time left down once a second.
// Pages work without it; the server renders the time left when the page is served.
"use strict";
(function () {
  function words(seconds) {
    var h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + s + " s";
    return s + " s";
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-expires]").forEach(function (el) {
      var left = Math.floor((Date.parse(el.getAttribute("data-expires")) - now) / 1000);
      el.textContent = left > 0 ? words(left) + " left" : "expired";
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    tick();
    setInterval(tick, 1000);
  });
})();
