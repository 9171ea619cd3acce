// The mcptwist dashboard: polls the bridge's admin JSON every two seconds and
// draws it. Everything from the bridge goes into the page as text
// (textContent), never as markup.
(function () {
  "use strict";

  var POLL_MS = 2000;
  var cards = new Map();
  var endpointCards = new Map();
  var busy = false;
  var lastServers = [];

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (response) {
        return response.json().catch(function () { return null; }).then(function (body) {
          if (!response.ok) {
            var reason = body && body.error && body.error.message ? body.error.message : response.statusText;
            throw new Error(response.status + " " + reason);
          }
          return body;
        });
      });
  }

  function post(url) {
    return fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: "{}",
      cache: "no-store"
    }).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (body) {
        if (!response.ok) {
          var reason = body && body.error && body.error.message ? body.error.message : response.statusText;
          throw new Error(reason);
        }
        return body;
      });
    });
  }

  function say(text, isError) {
    var message = $("message");
    message.textContent = text;
    message.className = isError ? "message error" : "message";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) { return "–"; }
    var s = Math.floor(seconds);
    if (s < 60) { return s + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min " + (s % 60) + " s"; }
    if (s < 86400) { return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min"; }
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function number(value, digits) {
    if (value === null || value === undefined) { return "–"; }
    return Number(value).toFixed(digits);
  }

  // Charts

  function colour(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
  }

  var CHARTS = [
    { key: "calls", title: "Calls per second", series: [{ field: "calls", label: "calls/s", colour: "--calls" }] },
    { key: "errors", title: "Error rate (%)", series: [{ field: "errors", label: "errors %", colour: "--errors", scale: 100 }] },
    {
      key: "latency",
      title: "Latency (ms)",
      series: [
        { field: "p50", label: "p50", colour: "--p50" },
        { field: "p95", label: "p95", colour: "--p95" }
      ]
    }
  ];

  function chartWidth(target) {
    return Math.max(200, (target.clientWidth || target.parentNode.clientWidth || 320));
  }

  function makeChart(spec, target) {
    var fg = colour("--muted");
    var grid = colour("--grid");
    var series = [{}];
    spec.series.forEach(function (s) {
      series.push({ label: s.label, stroke: colour(s.colour), width: 1.5, spanGaps: false, points: { show: true, size: 4 } });
    });
    var axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, size: 40 };
    var options = {
      width: chartWidth(target),
      height: 90,
      series: series,
      legend: { show: true, live: false },
      cursor: { show: false },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(max || 0, spec.key === "errors" ? 5 : 1)]; } } },
      axes: [Object.assign({}, axis, { size: 24 }), axis]
    };
    return new window.uPlot(options, emptyData(spec), target);
  }

  function emptyData(spec) {
    var data = [[]];
    spec.series.forEach(function () { data.push([]); });
    return data;
  }

  function chartData(spec, times, points) {
    var data = [times];
    spec.series.forEach(function (s) {
      var values = points ? points[s.field] : [];
      data.push(values.map(function (v) { return v === null ? null : (s.scale ? v * s.scale : v); }));
    });
    return data;
  }

  // Servers

  function fact(facts, label, className) {
    var wrap = el("div");
    wrap.appendChild(el("dt", null, label));
    var value = el("dd", className, "–");
    wrap.appendChild(value);
    facts.appendChild(wrap);
    return value;
  }

  function actionButton(label, action, name) {
    var button = el("button", "action", label);
    button.type = "button";
    button.dataset.action = action;
    button.dataset.server = name;
    button.addEventListener("click", function () { act(action, name, button); });
    return button;
  }

  function serverCard(name) {
    var card = el("article", "card server");
    card.dataset.server = name;
    var head = el("div", "card-head");
    head.appendChild(el("h3", null, name));
    var state = el("span", "state", "…");
    head.appendChild(state);
    card.appendChild(head);
    var facts = el("dl", "facts");
    var fields = {
      state: state,
      pid: fact(facts, "pid", "pid"),
      uptime: fact(facts, "uptime", "uptime"),
      restarts: fact(facts, "restarts", "restarts"),
      sessions: fact(facts, "sessions", "sessions"),
      in_flight: fact(facts, "in flight", "in-flight"),
      rate: fact(facts, "calls/s now", "rate"),
      total: fact(facts, "calls, 10 min", "calls-total"),
      failed: fact(facts, "failed, 10 min", "calls-failed")
    };
    card.appendChild(facts);
    var charts = el("div", "charts");
    var plots = {};
    CHARTS.forEach(function (spec) {
      charts.appendChild(el("p", "chart-title", spec.title));
      var target = el("div", "chart chart-" + spec.key);
      charts.appendChild(target);
      plots[spec.key] = { spec: spec, target: target, plot: null };
    });
    card.appendChild(charts);
    var actions = el("div", "actions");
    actions.appendChild(actionButton("Restart", "restart", name));
    actions.appendChild(actionButton("Stop", "stop", name));
    actions.appendChild(actionButton("Start", "start", name));
    card.appendChild(actions);
    var details = el("details", "stderr");
    details.appendChild(el("summary", null, "Last stderr lines"));
    var pre = el("pre", "stderr-lines", "");
    details.appendChild(pre);
    card.appendChild(details);
    fields.stderr = pre;
    $("servers").appendChild(card);
    var entry = { card: card, fields: fields, plots: plots, points: null };
    cards.set(name, entry);
    return entry;
  }

  function showServers(servers) {
    var seen = new Set();
    servers.forEach(function (s) {
      seen.add(s.name);
      var entry = cards.get(s.name) || serverCard(s.name);
      var f = entry.fields;
      var state = s.stopped_by_operator && s.state === "stopped" ? "stopped (operator)" : s.state;
      if (s.unresponsive) { state += ", unresponsive"; }
      f.state.textContent = state;
      f.state.className = "state " + String(s.state);
      f.pid.textContent = s.pids.length ? s.pids.join(", ") : "–";
      f.uptime.textContent = duration(s.uptime);
      f.restarts.textContent = String(s.restarts);
      f.sessions.textContent = String(s.sessions);
      f.in_flight.textContent = String(s.in_flight);
      f.stderr.textContent = s.stderr.length ? s.stderr.join("\n") : "(nothing yet)";
      entry.card.querySelector('[data-action="start"]').disabled = s.state === "running";
      entry.card.querySelector('[data-action="stop"]').disabled = s.state === "stopped";
    });
    cards.forEach(function (entry, name) {
      if (!seen.has(name)) {
        entry.card.remove();
        cards.delete(name);
      }
    });
    $("no-servers").hidden = servers.length > 0;
    lastServers = servers.map(function (s) { return s.name; });
    updateServerFilter();
  }

  function showHistory(history) {
    cards.forEach(function (entry, name) {
      var points = history.servers[name];
      entry.points = points;
      var f = entry.fields;
      if (points) {
        var last = points.calls[points.calls.length - 1];
        f.rate.textContent = number(last, 1);
        f.total.textContent = String(points.total);
        f.failed.textContent = String(points.failed);
      }
      Object.keys(entry.plots).forEach(function (key) {
        var chart = entry.plots[key];
        if (!window.uPlot) { return; }
        if (!chart.plot) { chart.plot = makeChart(chart.spec, chart.target); }
        chart.plot.setData(chartData(chart.spec, history.t, points));
      });
    });
  }

  function rebuildCharts() {
    cards.forEach(function (entry) {
      Object.keys(entry.plots).forEach(function (key) {
        var chart = entry.plots[key];
        if (chart.plot) {
          chart.plot.destroy();
          chart.plot = null;
        }
      });
    });
  }

  function resizeCharts() {
    cards.forEach(function (entry) {
      Object.keys(entry.plots).forEach(function (key) {
        var chart = entry.plots[key];
        if (chart.plot) { chart.plot.setSize({ width: chartWidth(chart.target), height: 90 }); }
      });
    });
  }

  // Endpoints

  function showEndpoints(endpoints) {
    var seen = new Set();
    endpoints.forEach(function (e) {
      seen.add(e.name);
      var entry = endpointCards.get(e.name);
      if (!entry) {
        var card = el("article", "card endpoint");
        card.dataset.endpoint = e.name;
        var head = el("div", "card-head");
        head.appendChild(el("h3", null, e.name));
        var state = el("span", "state", "");
        head.appendChild(state);
        card.appendChild(head);
        var facts = el("dl", "facts");
        var sessions = fact(facts, "sessions", "sessions");
        card.appendChild(facts);
        var members = el("ul", "members");
        card.appendChild(members);
        $("endpoints").appendChild(card);
        entry = { card: card, state: state, sessions: sessions, members: members };
        endpointCards.set(e.name, entry);
      }
      entry.state.textContent = e.state;
      entry.state.className = "state " + String(e.state);
      entry.sessions.textContent = String(e.sessions);
      entry.members.replaceChildren();
      e.servers.forEach(function (m) {
        entry.members.appendChild(el("li", null, m.name + ": " + m.state));
      });
    });
    endpointCards.forEach(function (entry, name) {
      if (!seen.has(name)) {
        entry.card.remove();
        endpointCards.delete(name);
      }
    });
    $("endpoints-section").hidden = endpoints.length === 0;
  }

  // The audit trail

  function updateServerFilter() {
    var select = $("filter-server");
    var current = select.value;
    var have = Array.prototype.map.call(select.options, function (o) { return o.value; }).slice(1);
    if (have.join("\n") === lastServers.join("\n")) { return; }
    while (select.options.length > 1) { select.remove(1); }
    lastServers.forEach(function (name) {
      var option = el("option", null, name);
      option.value = name;
      select.appendChild(option);
    });
    select.value = lastServers.indexOf(current) >= 0 ? current : "";
  }

  function auditQuery() {
    var query = new URLSearchParams();
    query.set("limit", "100");
    var server = $("filter-server").value;
    var principal = $("filter-principal").value.trim();
    var outcome = $("filter-outcome").value;
    if (server) { query.set("server", server); }
    if (principal) { query.set("principal", principal); }
    if (outcome) { query.set("outcome", outcome); }
    return "/admin/audit?" + query.toString();
  }

  function detailOf(record) {
    var skip = { ts: 1, event: 1, server: 1, principal: 1, status: 1, outcome: 1, target: 1 };
    var parts = [];
    Object.keys(record).forEach(function (key) {
      if (skip[key]) { return; }
      var value = record[key];
      parts.push(key + "=" + (typeof value === "object" ? JSON.stringify(value) : String(value)));
    });
    return parts.join(" ");
  }

  function outcomeOf(record) {
    if (record.event === "request") { return record.status || ""; }
    if (record.outcome !== undefined) { return String(record.outcome); }
    return "";
  }

  function showAudit(audit) {
    $("audit-off").hidden = audit.enabled;
    var rows = $("audit-rows");
    rows.replaceChildren();
    audit.records.forEach(function (record) {
      var row = el("tr");
      row.appendChild(el("td", null, String(record.ts || "").replace("T", " ").replace("Z", "")));
      row.appendChild(el("td", null, record.event));
      row.appendChild(el("td", null, record.server || record.target || ""));
      row.appendChild(el("td", null, record.principal || ""));
      var outcome = outcomeOf(record);
      var cell = el("td", null, outcome);
      var word = outcome.split(":")[0];
      if (/^(ok|error|timeout|refused|cancelled)$/.test(word)) { cell.className = "outcome-" + word; }
      row.appendChild(cell);
      row.appendChild(el("td", "detail", detailOf(record)));
      rows.appendChild(row);
    });
  }

  // Actions

  function act(action, name, button) {
    var what = action.charAt(0).toUpperCase() + action.slice(1);
    if (!window.confirm(what + " the server " + name + "?")) { return; }
    button.disabled = true;
    say(what + " of " + name + "…", false);
    post("/admin/servers/" + encodeURIComponent(name) + "/" + action)
      .then(function () { say(what + " of " + name + ": done.", false); })
      .catch(function (error) { say(what + " of " + name + " failed: " + error.message, true); })
      .then(function () {
        button.disabled = false;
        poll();
      });
  }

  function reload() {
    if (!window.confirm("Reload the configuration file?")) { return; }
    var button = $("reload");
    button.disabled = true;
    say("Reloading…", false);
    post("/admin/reload")
      .then(function () { say("Configuration reloaded.", false); })
      .catch(function (error) { say("Reload failed: " + error.message, true); })
      .then(function () {
        button.disabled = false;
        poll();
      });
  }

  // Polling

  function poll() {
    if (busy) { return; }
    busy = true;
    Promise.all([getJSON("/admin/overview"), getJSON("/admin/history"), getJSON(auditQuery())])
      .then(function (answers) {
        var overview = answers[0];
        showServers(overview.servers);
        showEndpoints(overview.endpoints);
        $("reload").hidden = !overview.may_reload;
        showHistory(answers[1]);
        showAudit(answers[2]);
        $("updated").textContent = "updated " + new Date().toLocaleTimeString();
        $("updated").dataset.polls = String(Number($("updated").dataset.polls || "0") + 1);
      })
      .catch(function (error) {
        $("updated").textContent = "cannot reach the bridge: " + error.message;
      })
      .then(function () { busy = false; });
  }

  function start() {
    $("reload").addEventListener("click", reload);
    $("audit-filter").addEventListener("submit", function (event) { event.preventDefault(); poll(); });
    ["filter-server", "filter-outcome"].forEach(function (id) { $(id).addEventListener("change", poll); });
    $("filter-principal").addEventListener("input", poll);
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", function () {
      rebuildCharts();
      poll();
    });
    var resizing = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizing);
      resizing = setTimeout(resizeCharts, 150);
    });
    poll();
    setInterval(poll, POLL_MS);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
