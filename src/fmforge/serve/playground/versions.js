// fmforge playground, versions panel: the serving model version, the feedback collected since it
// was promoted, and the registry's versions with their gate results (GET /admin/versions).
// Refreshed every few seconds, so a hot swap shows up without a reload. textContent only.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const note = document.getElementById("versions-status");
  if (!note) return;

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.append(td);
  }

  function when(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleString() : "-";
  }

  function counts(byKind) {
    const parts = Object.entries(byKind || {}).map(([kind, n]) => n + " " + kind);
    return parts.length ? parts.join(", ") : "none yet";
  }

  function metrics(gate) {
    const values = (gate && gate.metrics) || {};
    return Object.entries(values)
      .map(([k, v]) => k + "=" + (typeof v === "number" ? +v.toFixed(4) : JSON.stringify(v)))
      .join(" ");
  }

  function show(report) {
    const serving = report.serving;
    document.getElementById("model-version").textContent = "version " + serving.version;
    const since = document.getElementById("serving");
    since.replaceChildren();
    const lines = [
      "Serving " + serving.version + " since " + when(serving.since),
      "Feedback since then: " + counts(serving.feedback_since) +
        (serving.generations_since === null ? "" : " on " + serving.generations_since + " generations"),
      "In flight: " + Object.entries(serving.in_flight).map(([v, n]) => v + " " + n).join(", "),
    ];
    for (const line of lines) {
      const div = document.createElement("div");
      div.textContent = line;
      since.append(div);
    }
    const body = document.querySelector("#version-table tbody");
    body.replaceChildren();
    for (const v of report.versions) {
      const row = document.createElement("tr");
      if (v.id === serving.version) row.className = "serving";
      cell(row, v.id);
      cell(row, v.parent || "-");
      cell(row, v.status);
      cell(row, ((v.gate && v.gate.decision) || "-") + (v.gate && v.gate.by ? " by " + v.gate.by : ""));
      cell(row, metrics(v.gate));
      body.append(row);
    }
    document.getElementById("version-table").hidden = report.versions.length === 0;
    const history = document.getElementById("version-history");
    history.replaceChildren();
    for (const event of report.history.slice().reverse()) {
      const item = document.createElement("li");
      item.textContent = when(event.created) + "  " + event.action + " " + event.version + " by " + event.by;
      history.append(item);
    }
    note.className = "muted";
    if (!report.registry) {
      note.textContent = "no model registry (serve with --db URL to follow one)";
    } else if (serving.load_error) {
      note.textContent = "the registry serves " + serving.registry_version + ", but it did not load: " + serving.load_error;
      note.className = "error";
    } else if (serving.registry_version && serving.registry_version !== serving.version) {
      note.textContent = "loading " + serving.registry_version + "…";
    } else {
      note.textContent = "";
    }
  }

  async function refresh() {
    const h = {};
    const key = document.getElementById("api_key").value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    try {
      const response = await fetch("/admin/versions", { headers: h });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        note.textContent = body.error ? body.error.message : response.status + " " + response.statusText;
        return;
      }
      show(body);
    } catch (e) {
      note.textContent = "versions: " + e;
    }
  }

  document.getElementById("api_key").addEventListener("change", refresh);
  refresh();
  setInterval(refresh, REFRESH_MS);
})();
