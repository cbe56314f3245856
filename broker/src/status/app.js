// The status page's script: reads <base>/data every few seconds and draws it. Plain DOM, no
// library, no build step; every text from the broker goes in with textContent (channel names,
// reasons and ids come from clients and must never become markup).
"use strict";
(function () {
  var BASE = document.body.getAttribute("data-base") || "/status";
  var PERIOD = 3000;
  var SERIES = [["in", "In (WebSocket)"], ["out", "Out"], ["sent", "SMS sent"], ["failed", "SMS failed"]];
  var updates = 0;
  var lastOk = null;

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs) {
    var e = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (attrs[k] === null || attrs[k] === undefined) { return; }
        if (k === "text") { e.textContent = String(attrs[k]); } else { e.setAttribute(k, String(attrs[k])); }
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) { continue; }
      e.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function svg(tag, attrs) {
    var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    return e;
  }

  function setText(id, v) { $(id).textContent = v === null || v === undefined ? "" : String(v); }

  function badge(cls, text) { return el("span", { "class": "badge " + cls, text: text }); }

  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  function duration(s) {
    s = Math.max(0, Math.round(s));
    if (s < 60) { return s + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min"; }
    if (s < 86400) { return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min"; }
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function ago(iso, now) {
    if (!iso) { return "never"; }
    var t = Date.parse(iso);
    if (isNaN(t)) { return iso; }
    return duration((now - t) / 1000) + " ago";
  }

  function clock(iso) {
    var t = Date.parse(iso);
    return isNaN(t) ? (iso || "") : new Date(t).toLocaleString();
  }

  function signalBars(dbm) {
    var n = dbm >= -73 ? 4 : dbm >= -83 ? 3 : dbm >= -93 ? 2 : dbm >= -109 ? 1 : 0;
    var b = el("span", { "class": "bars", "aria-hidden": "true" });
    for (var i = 1; i <= 4; i++) {
      var bar = el("i", { "class": i <= n ? "on" : "" });
      bar.style.height = (i * 25) + "%";
      b.appendChild(bar);
    }
    return b;
  }

  function cell(k, v, cls) { return el("td", { "data-k": k, "class": cls || null, text: v }); }

  function overall(d) {
    if (d.sms && d.sms.health) { return d.sms.health.status; }
    var s = d.broker && d.broker.status;
    return s === "ok" ? "pass" : s === "degraded" ? "fail" : "warn";
  }

  function drawTiles(d, now) {
    var b = d.broker || {};
    setText("t-broker", b.status || "?");
    setText("t-version", "version " + (b.version || "?"));
    setText("t-connections", b.connections);
    setText("t-uptime", "up " + duration(b.uptime_seconds || 0));
    setText("t-stored", b.stored);
    setText("t-storage", b.storage);
    var gws = (d.sms && d.sms.gateways) || [];
    var online = gws.filter(function (g) { return g.connected; }).length;
    var modems = 0, ready = 0;
    gws.forEach(function (g) {
      if (!g.connected) { return; }
      (g.modems || []).forEach(function (m) { modems++; if (m.state === "ready") { ready++; } });
    });
    setText("t-gateways", d.sms ? online + " of " + gws.length : "SMS off");
    setText("t-modems", ready + " of " + modems + " modem(s) ready");
    var s = d.chart.series;
    var sum = function (a) { return (a || []).reduce(function (x, y) { return x + y; }, 0); };
    setText("t-sent", sum(s.sent) + " sent");
    setText("t-failed", sum(s.failed) + " failed");
  }

  function drawChecks(d) {
    var ul = $("checks");
    clear(ul);
    var checks = d.sms && d.sms.health ? d.sms.health.checks : null;
    if (!checks) {
      ul.appendChild(el("li", { "data-check": "broker" }, badge(overall(d), overall(d)), " broker: storage " + (d.broker && d.broker.storage)));
      return;
    }
    Object.keys(checks).forEach(function (name) {
      var c = checks[name];
      ul.appendChild(el("li", { "data-check": name }, badge(c.status, c.status), " " + name + ": " + c.description));
    });
  }

  function drawGateways(d, now) {
    var box = $("gateways");
    var gws = (d.sms && d.sms.gateways) || [];
    if (!gws.length) { return; }
    clear(box);
    gws.forEach(function (g) {
      var a = g.agent;
      var card = el("article", { "class": "card", "data-gateway": g.id },
        el("h3", null, g.id + " ", g.connected ? badge("ok", "online") : badge("offline", "offline"),
          a && a.heartbeatLate ? badge("warn", "silent") : null),
        el("div", { "class": "meta" },
          "last seen " + ago(g.lastSeen, now) +
          (a ? " · agent " + a.version + " · queued " + a.queued + " · unsent reports " + a.unpublished +
            " · heartbeat " + ago(a.heartbeatAt, now) : "") +
          " · last SMS " + ago(g.lastSmsAt, now)));
      card.querySelector(".meta").setAttribute("data-k", "meta");
      (g.modems || []).forEach(function (m) {
        var dl = el("dl");
        var row = function (k, label, v) {
          if (v === null || v === undefined || v === "") { return; }
          dl.appendChild(el("dt", { text: label }));
          var dd = el("dd", { "data-k": k });
          if (typeof v === "object") { dd.appendChild(v); } else { dd.textContent = String(v); }
          dl.appendChild(dd);
        };
        if (m.signalDbm !== null && m.signalDbm !== undefined) {
          row("signal", "Signal", el("span", null, signalBars(m.signalDbm), " " + m.signalDbm + " dBm"));
        }
        row("operator", "Operator", m.operator);
        row("registration", "Network", m.registration);
        row("reason", "Why", m.reason);
        if (m.sent !== undefined) { row("counts", "Sent / failed", m.sent + " / " + m.failed + (m.retried ? " (" + m.retried + " retried)" : "")); }
        row("lastSent", "Last SMS", m.lastSentAt ? ago(m.lastSentAt, now) : null);
        row("lastError", "Last error", m.lastError);
        card.appendChild(el("div", { "class": "modem", "data-modem": m.name },
          el("strong", { text: m.name }), " ", badge(m.state, m.state), dl));
      });
      box.appendChild(card);
    });
  }

  function drawChart(d) {
    var c = d.chart, s = c.series;
    var n = (s["in"] || []).length;
    var max = 1;
    SERIES.forEach(function (x) { (s[x[0]] || []).forEach(function (v) { if (v > max) { max = v; } }); });
    var chart = $("chart");
    clear(chart);
    [5, 80, 155].forEach(function (y) { chart.appendChild(svg("line", { "class": "grid", x1: 0, x2: 600, y1: y, y2: y })); });
    SERIES.forEach(function (x) {
      var pts = (s[x[0]] || []).map(function (v, i) {
        return (n > 1 ? (i * 600 / (n - 1)) : 0).toFixed(1) + "," + (155 - v * 150 / max).toFixed(1);
      });
      chart.appendChild(svg("polyline", { "class": x[0], points: pts.join(" "), "data-series": x[0] }));
    });
    setText("chart-from", clock(c.firstMinute));
    setText("chart-max", "top: " + max + "/min");
    var legend = $("legend");
    clear(legend);
    SERIES.forEach(function (x) {
      var total = (s[x[0]] || []).reduce(function (a, b) { return a + b; }, 0);
      legend.appendChild(el("li", { "class": x[0], "data-series": x[0] }, el("i"), x[1] + ": ", el("b", { "data-k": "total", text: total })));
    });
  }

  function drawChannels(d) {
    var tb = $("channels").tBodies[0];
    clear(tb);
    if (!d.channels.length) {
      tb.appendChild(el("tr", null, el("td", { colspan: 7, "class": "empty", text: "No channel has been used yet." })));
    }
    d.channels.forEach(function (c) {
      tb.appendChild(el("tr", { "data-channel": c.name },
        el("td", null, el("code", { text: c.name })),
        cell("receivers", c.receivers, "n"), cell("stored", c.stored, "n"), cell("in", c["in"], "n"),
        cell("out", c.out, "n"), cell("unrouted", c.unrouted, "n"), cell("expired", c.expired, "n")));
    });
  }

  function phones(m) { return m.recipients.map(function (r) { return r.phone; }).join(", "); }

  function detail(m) {
    var out = [];
    m.recipients.forEach(function (r) {
      if (r.error) { out.push(r.error); } else if (r.heldBack) { out.push(r.heldBack); } else if (r.modem) { out.push("via " + r.modem); }
    });
    return out.join("; ");
  }

  function drawMessages(d, now) {
    var tb = $("messages").tBodies[0], ft = $("failures").tBodies[0];
    clear(tb); clear(ft);
    var note = $("messages-note");
    var sms = d.sms;
    if (!sms || !sms.messages) {
      note.hidden = false;
      note.textContent = !sms ? "The SMS service is off ([sms] enabled = false)." : (sms.listError || "");
      return;
    }
    note.hidden = true;
    if (!sms.messages.length) {
      tb.appendChild(el("tr", null, el("td", { colspan: 5, "class": "empty", text: "No SMS yet." })));
    }
    sms.messages.forEach(function (m) {
      tb.appendChild(el("tr", { "data-message": m.id },
        el("td", null, el("code", { text: m.id })),
        el("td", { "data-k": "state" }, badge(m.state, m.state)),
        cell("to", phones(m)), cell("updated", ago(m.updatedAt, now)), cell("detail", detail(m), "reason")));
    });
    if (!sms.failures.length) {
      ft.appendChild(el("tr", null, el("td", { colspan: 4, "class": "empty", text: "No failure." })));
    }
    sms.failures.forEach(function (m) {
      ft.appendChild(el("tr", { "data-message": m.id },
        el("td", null, el("code", { text: m.id })),
        cell("when", clock(m.updatedAt)), cell("to", phones(m)), cell("reason", detail(m), "reason")));
    });
  }

  function render(d) {
    var now = Date.parse(d.now) || Date.now();
    var o = overall(d);
    var b = $("overall");
    b.className = "badge " + o;
    b.textContent = o === "pass" ? "all good" : o === "warn" ? "attention" : "problem";
    drawTiles(d, now);
    drawChecks(d);
    drawGateways(d, now);
    drawChart(d);
    drawChannels(d);
    drawMessages(d, now);
  }

  function tick() {
    var ctl = typeof AbortController === "function" ? new AbortController() : null;
    var timer = ctl ? setTimeout(function () { ctl.abort(); }, 10000) : null;
    fetch(BASE + "/data", { cache: "no-store", credentials: "same-origin", signal: ctl ? ctl.signal : undefined })
      .then(function (r) {
        if (!r.ok) { throw new Error("the broker answered " + r.status); }
        return r.json();
      })
      .then(function (d) {
        render(d);
        lastOk = new Date();
        updates++;
        document.body.setAttribute("data-updates", String(updates));
        $("problem").hidden = true;
        setText("updated", lastOk.toLocaleTimeString());
      })
      .catch(function (e) {
        var p = $("problem");
        p.hidden = false;
        p.textContent = "Cannot read the broker's figures (" + e.message + "); showing those of " +
          (lastOk ? lastOk.toLocaleTimeString() : "never") + ". Retrying.";
      })
      .then(function () {
        if (timer) { clearTimeout(timer); }
        setTimeout(tick, PERIOD);
      });
  }

  tick();
})();
