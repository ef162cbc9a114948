"use strict";
// A function key never enters the page: links and forms hold none, and nothing writes one into
// the markup. A key given once in the address (#code=KEY; ?code=KEY is taken too) is kept in this
// tab's sessionStorage and removed from the address bar. With a key, each page is fetched from
// /api/pages/... with the x-functions-key header and written into this document; the address bar
// shows the key-free /api/ui/... address. Signed-in users (App Service Authentication) and
// `nwcap serve` need no key: their pages load as usual and this script does nothing.
(() => {
  const STORED = "nwcap.functionKey";
  const UI = "/api/ui";
  const KEYED = "/api/pages";

  function takeKeyFromAddress() {
    const query = new URLSearchParams(location.search);
    const fragment = new URLSearchParams(location.hash.slice(1));
    if (!query.has("code") && !fragment.has("code")) return;
    const key = fragment.get("code") || query.get("code");
    query.delete("code");
    fragment.delete("code");
    const search = query.toString();
    const hash = fragment.toString();
    history.replaceState(null, "", location.pathname + (search ? "?" + search : "") + (hash ? "#" + hash : ""));
    if (key) sessionStorage.setItem(STORED, key);
  }

  // Where a key-free address is fetched from with the key: /api/ui/X -> /api/pages/X, the API as is.
  function keyedPath(url) {
    const path = url.pathname;
    if (path === UI || path.startsWith(UI + "/")) return KEYED + path.slice(UI.length) + url.search;
    return path + url.search;
  }

  function say(message) {
    const p = document.getElementById("key-shell-message");
    if (p) p.textContent = message;
  }

  function writeText(text) {
    document.open();
    document.write("<!doctype html><title>JSON · nwcap</title><pre></pre>");
    document.close();
    document.querySelector("pre").textContent = text; // as text: the data is never parsed as HTML
    window.addEventListener("popstate", () => open(new URL(location.href), false));
  }

  async function open(url, push) {
    const key = sessionStorage.getItem(STORED);
    let response;
    try {
      response = await fetch(keyedPath(url), {
        headers: { "x-functions-key": key },
        cache: "no-store",
        credentials: "same-origin",
        redirect: "error",
      });
    } catch (error) {
      say("The page could not be fetched: " + error);
      return;
    }
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(STORED);
      if (push) location.assign(url.href); // no longer a key: let the server (sign-in) decide
      else say("The function key was refused (HTTP " + response.status + "); open the page again with #code=<function key>, or sign in.");
      return;
    }
    const text = await response.text();
    if (push) history.pushState(null, "", url.pathname + url.search + url.hash);
    if ((response.headers.get("Content-Type") || "").startsWith("text/html")) {
      document.open();
      document.write(text); // our own page: its inline code is allowed by hash, its data escaped
      document.close();
    } else {
      writeText(text);
    }
  }

  function ownAddress(url) {
    return url.origin === location.origin && url.pathname.startsWith("/api/");
  }

  // A key pasted into the fragment of a page already open: take it and load the page with it.
  window.addEventListener("hashchange", () => {
    if (!new URLSearchParams(location.hash.slice(1)).has("code")) return;
    takeKeyFromAddress();
    if (sessionStorage.getItem(STORED)) open(new URL(location.href), false);
  });
  takeKeyFromAddress();
  if (!sessionStorage.getItem(STORED)) return;
  if (document.getElementById("key-shell")) {
    open(new URL(location.href), false);
    return;
  }
  document.addEventListener("click", (event) => {
    if (event.defaultPrevented || event.button !== 0) return;
    if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    const a = event.target.closest("a[href]");
    if (!a) return;
    const url = new URL(a.getAttribute("href"), location.href);
    if (!ownAddress(url)) return;
    if (url.pathname === location.pathname && url.search === location.search && url.hash) return;
    event.preventDefault();
    open(url, true);
  });
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form.method.toLowerCase() !== "get") return;
    const url = new URL(form.getAttribute("action") || location.pathname, location.href);
    if (!ownAddress(url)) return;
    url.search = new URLSearchParams(new FormData(form)).toString();
    event.preventDefault();
    open(url, true);
  });
  window.addEventListener("popstate", () => open(new URL(location.href), false));
  document.documentElement.dataset.keyed = "ready"; // links and forms now go through open()
})();
