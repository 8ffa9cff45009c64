// fmforge playground, search tab: queries /v1/search (a server started with --embeddings and
// --search-index) and lists the nearest chunks. Results are inserted with textContent only.
"use strict";

(function () {
  const form = document.getElementById("search-form");
  const list = document.getElementById("search-results");
  const note = document.getElementById("search-status");
  if (!form) return;

  function show(text, isError) {
    note.textContent = text;
    note.className = isError ? "error" : "muted";
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const query = document.getElementById("search-query").value.trim();
    const k = parseInt(document.getElementById("search-k").value, 10) || 5;
    if (!query) return;
    list.replaceChildren();
    show("searching…", false);
    const h = { "Content-Type": "application/json" };
    const key = document.getElementById("api_key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    let response;
    try {
      response = await fetch("/v1/search", { method: "POST", headers: h, body: JSON.stringify({ query, k }) });
    } catch (e) {
      show("network error: " + e, true);
      return;
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      show(body.error ? body.error.message : response.status + " " + response.statusText, true);
      return;
    }
    for (const hit of body.data) {
      const item = document.createElement("li");
      const head = document.createElement("div");
      head.className = "muted";
      head.textContent = `#${hit.rank}  score ${hit.score.toFixed(4)}  ${hit.source}`;
      const text = document.createElement("div");
      text.textContent = hit.text;
      item.append(head, text);
      list.append(item);
    }
    show(`${body.data.length} results from ${body.model}`, false);
  });
})();
