"use strict";
// The dashboard is opened with the function key in its URL (?code=...). Carry it to every
// link and form of the app so that pages and the JSON API keep working; store it nowhere.
(() => {
  const code = new URLSearchParams(location.search).get("code");
  if (!code) return;
  for (const a of document.querySelectorAll('a[href^="/api/"]')) {
    const url = new URL(a.getAttribute("href"), location.origin);
    url.searchParams.set("code", code);
    a.setAttribute("href", url.pathname + url.search + url.hash);
  }
  for (const form of document.querySelectorAll('form[action^="/api/"]')) {
    const input = document.createElement("input");
    input.type = "hidden";
    input.name = "code";
    input.value = code;
    form.append(input);
  }
})();
