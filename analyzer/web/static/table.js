"use strict";
// Sortable, filterable, paged tables over rows embedded as JSON. Text goes in with
// textContent only: capture-derived strings are never parsed as HTML.
(() => {
  const numberFormat = new Intl.NumberFormat("en-US");
  const MAX_SHOWN = 200;
  const INVISIBLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu;
  const PRINT_ALL = 2000; // rows printed in full up to this many; beyond, the current page only

  // Same as analyzer.web.html.shown: invisible and bidi control characters made visible, long texts cut.
  function shown(value) {
    const text = String(value).replace(INVISIBLE, (c) => "\\u" + c.codePointAt(0).toString(16).padStart(4, "0"));
    const chars = Array.from(text);
    if (chars.length <= MAX_SHOWN) return text;
    return chars.slice(0, MAX_SHOWN - 1).join("") + "… (+" + (chars.length - MAX_SHOWN + 1) + " characters)";
  }

  function cellText(value) {
    if (value === null || value === undefined) return "";
    if (Array.isArray(value)) return value.join("\n");
    return String(value);
  }

  function fill(td, value) {
    if (value === null || value === undefined) td.textContent = "–";
    else if (typeof value === "number") td.textContent = numberFormat.format(value);
    else if (Array.isArray(value)) {
      for (const line of value) {
        const div = document.createElement("div");
        div.textContent = shown(line);
        td.append(div);
      }
    } else td.textContent = shown(value);
  }

  function setUp(root) {
    const data = JSON.parse(root.querySelector("script.table-data").textContent);
    const numeric = new Set(data.numeric);
    const copy = new Set(data.copy || []); // one click selects the whole cell (display filters)
    const keys = data.keys || null; // column 0 holds addresses: numeric sort keys, one per row
    const rows = data.rows.map((cells, index) => ({ cells, index, search: null }));
    const tbody = root.querySelector("tbody");
    const headers = Array.from(root.querySelectorAll("thead th"));
    const textInput = root.querySelector(".filter-text");
    const selects = Array.from(root.querySelectorAll(".filter-select"));
    const nonEmpty = Array.from(root.querySelectorAll(".filter-nonempty"));
    const count = root.querySelector(".count");
    const pageLabel = root.querySelector(".page");
    const prev = root.querySelector(".prev");
    const next = root.querySelector(".next");
    const anchor = root.dataset.anchor || "";
    const noun = root.dataset.noun || "rows";
    const printNote = root.querySelector(".print-note");
    const pageSize = data.page_size;
    const state = { column: null, descending: false, page: 0 };
    let view = rows;

    function matches(row, needle) {
      for (const select of selects) {
        if (select.value && cellText(row.cells[Number(select.dataset.col)]) !== select.value) return false;
      }
      for (const box of nonEmpty) {
        if (box.checked && cellText(row.cells[Number(box.dataset.col)]) === "") return false;
      }
      if (needle) {
        if (row.search === null) row.search = row.cells.map(cellText).join("\n").toLowerCase();
        if (!row.search.includes(needle)) return false;
      }
      return true;
    }

    function compute() {
      const needle = textInput ? textInput.value.trim().toLowerCase() : "";
      view = rows.filter((row) => matches(row, needle));
      if (state.column !== null) {
        const col = state.column;
        const sign = state.descending ? -1 : 1;
        const key = numeric.has(col)
          ? (row) => Number(row.cells[col] || 0)
          : col === 0 && keys
            ? (row) => keys[row.index]
            : (row) => cellText(row.cells[col]).toLowerCase();
        view.sort((a, b) => {
          const x = key(a), y = key(b);
          return x < y ? -sign : x > y ? sign : a.index - b.index;
        });
      }
    }

    function draw(printing = false) {
      const pages = Math.max(1, Math.ceil(view.length / pageSize));
      state.page = Math.min(state.page, pages - 1);
      const all = printing && view.length <= PRINT_ALL;
      const start = all ? 0 : state.page * pageSize;
      const end = all ? view.length : start + pageSize;
      if (printNote) {
        printNote.textContent = all || pages === 1
          ? ""
          : `Printed: rows ${numberFormat.format(start + 1)}–${numberFormat.format(Math.min(end, view.length))} of ${numberFormat.format(view.length)} (the current page; more than ${numberFormat.format(PRINT_ALL)} rows are not printed in full).`;
      }
      const fragment = document.createDocumentFragment();
      for (const row of view.slice(start, end)) {
        const tr = document.createElement("tr");
        if (anchor) tr.id = anchor + cellText(row.cells[0]);
        row.cells.forEach((value, col) => {
          const td = document.createElement("td");
          if (numeric.has(col)) td.className = "numeric";
          else if (copy.has(col)) td.className = "copy";
          fill(td, value);
          tr.append(td);
        });
        fragment.append(tr);
      }
      tbody.replaceChildren(fragment);
      const shownTo = Math.min(start + pageSize, view.length);
      count.textContent = view.length === rows.length
        ? `${numberFormat.format(rows.length)} ${noun}`
        : `${numberFormat.format(view.length)} of ${numberFormat.format(rows.length)} ${noun} match`;
      pageLabel.textContent = view.length
        ? `${numberFormat.format(start + 1)}–${numberFormat.format(shownTo)} (page ${state.page + 1} of ${pages})`
        : "nothing matches";
      prev.disabled = state.page === 0;
      next.disabled = state.page >= pages - 1;
      headers.forEach((th, col) => {
        if (col === state.column) th.setAttribute("aria-sort", state.descending ? "descending" : "ascending");
        else th.removeAttribute("aria-sort");
      });
    }

    function refresh() { compute(); draw(); }

    headers.forEach((th, col) => {
      th.querySelector("button").addEventListener("click", () => {
        if (state.column === col) state.descending = !state.descending;
        else { state.column = col; state.descending = numeric.has(col); }
        state.page = 0;
        refresh();
      });
    });
    if (textInput) textInput.addEventListener("input", () => { state.page = 0; refresh(); });
    for (const control of [...selects, ...nonEmpty]) control.addEventListener("change", () => { state.page = 0; refresh(); });
    prev.addEventListener("click", () => { state.page -= 1; draw(); });
    next.addEventListener("click", () => { state.page += 1; draw(); });

    // Show the row a link points to (#peer-ADDRESS), whichever page it is on.
    function reveal() {
      if (!anchor || !location.hash.startsWith("#" + anchor)) return;
      let key;
      try {
        key = decodeURIComponent(location.hash.slice(1 + anchor.length));
      } catch (error) {
        return; // a malformed fragment (%zz) names no row
      }
      let position = view.findIndex((row) => cellText(row.cells[0]) === key);
      if (position < 0) {
        if (textInput) textInput.value = "";
        for (const select of selects) select.value = "";
        for (const box of nonEmpty) box.checked = false;
        compute();
        position = view.findIndex((row) => cellText(row.cells[0]) === key);
        if (position < 0) { draw(); return; }
      }
      state.page = Math.floor(position / pageSize);
      draw();
      for (const old of tbody.querySelectorAll("tr.target")) old.classList.remove("target");
      const tr = document.getElementById(anchor + key);
      if (tr) { tr.classList.add("target"); tr.scrollIntoView({ block: "center" }); }
    }
    window.addEventListener("hashchange", reveal);
    window.addEventListener("beforeprint", () => draw(true));
    window.addEventListener("afterprint", () => draw());
    refresh();
    reveal();
  }

  for (const root of document.querySelectorAll(".datatable")) {
    try {
      setUp(root);
    } catch (error) {
      console.warn("table not set up:", error); // the other tables still work
    }
  }
})();
