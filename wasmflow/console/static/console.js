// wasmflow console: local times, the live runs list (Server-Sent Events) and the action buttons.
// Everything it shows is inserted as text (textContent), never as HTML.
"use strict";

(function () {
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  function localTimes(root) {
    (root || document).querySelectorAll("time[data-ts]").forEach(function (el) {
      var ts = parseFloat(el.getAttribute("data-ts"));
      if (!isNaN(ts)) {
        var d = new Date(ts * 1000);
        el.textContent = d.toLocaleString(undefined, { hour12: false });
        el.title = d.toISOString();
      }
    });
  }

  function notice(text, isError) {
    var box = document.getElementById("notice");
    if (!box) { return; }
    box.hidden = false;
    box.className = "notice" + (isError ? " error" : "");
    box.textContent = text;
  }

  function post(url, body) {
    var options = { method: "POST", credentials: "same-origin",
                    headers: { "X-CSRF-Token": csrf, "Accept": "application/json" } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(url, options).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        return { ok: response.ok, status: response.status, data: data };
      });
    });
  }

  function describe(result) {
    var d = result.data || {};
    if (!result.ok) { return d.error || ("failed (HTTP " + result.status + ")"); }
    if (d.queued) { return "queued " + d.queued.length + " run(s): " + d.queued.join(", "); }
    if (d.outcome) { return "run " + d.run_id + ": " + d.outcome; }
    return "done";
  }

  document.querySelectorAll("button[data-action]").forEach(function (button) {
    button.addEventListener("click", function () {
      button.disabled = true;
      post(button.getAttribute("data-action")).then(function (result) {
        notice(describe(result), !result.ok);
        var queued = result.ok && result.data.queued;
        if (queued && queued.length === 1) {
          window.setTimeout(function () { window.location.href = "/runs/" + queued[0]; }, 600);
        } else if (result.ok) {
          window.setTimeout(function () { window.location.reload(); }, 800);
        } else {
          button.disabled = false;
        }
      }, function () { notice("the server did not answer", true); button.disabled = false; });
    });
  });

  var bulk = document.getElementById("replay-dead");
  if (bulk) {
    bulk.addEventListener("click", function () {
      var filter = {};
      new URLSearchParams(bulk.getAttribute("data-filter") || "").forEach(function (v, k) {
        if (k !== "state" && k !== "limit") { filter[k] = v; }
      });
      post("/api/replay-dead?dry_run=1", filter).then(function (count) {
        if (!count.ok) { notice(describe(count), true); return; }
        if (count.data.matched === 0) { notice("no dead runs match this filter", false); return; }
        if (!window.confirm("Replay " + count.data.matched + " dead run(s)?")) { return; }
        post("/api/replay-dead", filter).then(function (result) {
          var d = result.data || {};
          notice(result.ok ? ("queued " + d.queued.length + " replay(s)" +
                              (d.failed.length ? ", " + d.failed.length + " refused" : "")) : describe(result),
                 !result.ok);
        });
      });
    });
  }

  function cell(row, text, className) {
    var td = document.createElement("td");
    if (className) { td.className = className; }
    if (text instanceof Node) { td.appendChild(text); } else { td.textContent = text == null ? "" : String(text); }
    row.appendChild(td);
    return td;
  }

  function badge(kind, value) {
    var span = document.createElement("span");
    if (value) { span.className = "badge " + kind + "-" + value; span.textContent = value; }
    return span;
  }

  function runRow(run, fresh) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-run", run.id);
    tr.setAttribute("data-state", run.state);
    if (fresh) { tr.className = "fresh"; }
    var link = document.createElement("a");
    link.href = "/runs/" + encodeURIComponent(run.id);
    link.textContent = run.id.slice(0, 12);
    cell(tr, link, "mono");
    cell(tr, run.flow);
    cell(tr, badge("state", run.state));
    cell(tr, badge("status", run.status));
    cell(tr, run.attempt, "num");
    cell(tr, run.event + (run.repo ? " " + run.repo : ""), "wide");
    var time = document.createElement("time");
    time.setAttribute("data-ts", run.created_at);
    cell(tr, time);
    cell(tr, run.duration_ms == null ? "" : run.duration_ms.toFixed(1), "num wide");
    cell(tr, run.error, "wide");
    return tr;
  }

  var live = document.getElementById("live");
  var body = document.getElementById("runs-body");
  if (live && body && !live.hasAttribute("data-paused") && window.EventSource) {
    var query = live.getAttribute("data-live-query");
    var source = new EventSource("/api/live/runs" + (query ? "?" + query : ""));
    source.onopen = function () { live.classList.add("on"); live.textContent = "live"; };
    source.onerror = function () { live.classList.remove("on"); live.textContent = "reconnecting"; };
    source.addEventListener("runs", function (message) {
      var page = JSON.parse(message.data);
      var seen = {};
      body.querySelectorAll("tr[data-run]").forEach(function (tr) {
        seen[tr.getAttribute("data-run")] = tr.getAttribute("data-state");
      });
      var fragment = document.createDocumentFragment();
      page.runs.forEach(function (run) {
        fragment.appendChild(runRow(run, seen[run.id] !== run.state));
      });
      body.replaceChildren(fragment);
      localTimes(body);
      var none = document.getElementById("no-runs");
      if (none) { none.hidden = page.runs.length > 0; }
    });
  }

  localTimes(document);
})();
