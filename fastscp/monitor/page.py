"""The live status page: one static HTML document with inline CSS and JS.

The page holds no data: its script fetches ``status.json`` every second and
rebuilds the sections from it, so it updates without a reload and the
monitor serves the same bytes to everyone. No external assets (the server
may have no internet access).

Every value from the snapshot reaches the DOM as a text node
(``textContent``/``append``), never as markup: AE titles, modalities and
outcomes come from the network. As a second line of defence the page is
served with a Content-Security-Policy that allows only this script and this
stylesheet (by hash), so injected markup could neither run script nor load
anything.
"""

from __future__ import annotations

import base64
import hashlib

_STYLE = """
:root { --ok: #1a7f37; --bad: #c62828; --warn: #b26a00; --muted: #5f6b7a; --line: #d8dee4;
        --bg: #f6f8fa; --card: #ffffff; --text: #1f2328; --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Roboto, sans-serif;
       background: var(--bg); color: var(--text); }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 16px; padding: 12px 20px;
         background: #16324f; color: #fff; }
header h1 { margin: 0; font-size: 20px; font-weight: 600; }
header .meta { color: #c9d6e3; }
main { padding: 12px 20px 24px; max-width: 1600px; }
h2 { font-size: 15px; margin: 0 0 8px; font-weight: 600; }
h2 .note { font-weight: 400; color: var(--muted); font-size: 13px; }
section, .card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
                 margin-bottom: 12px; }
.alert { border-radius: 6px; padding: 10px 14px; margin-bottom: 10px; font-weight: 500; border: 1px solid; }
.alert.bad { background: #fdecea; border-color: #f5b5ad; color: #8a1c12; }
.alert.warn { background: #fff4e0; border-color: #f0c98a; color: #6b4100; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; margin-bottom: 12px; }
@media (min-width: 760px) { .tiles { grid-template-columns: repeat(4, 1fr); } }
@media (min-width: 1500px) { .tiles { grid-template-columns: repeat(8, 1fr); } }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; }
.tile .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.tile .value { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; margin: 2px 0; }
.tile .sub { color: var(--muted); font-size: 12px; }
.tile.bad { border-color: var(--bad); background: #fdecea; }
.tile.bad .value { color: var(--bad); }
.grid { display: grid; gap: 12px; margin-bottom: 12px;
        grid-template-columns: repeat(auto-fit, minmax(min(100%, 320px), 1fr)); }
.grid.wide { grid-template-columns: repeat(auto-fit, minmax(min(100%, 520px), 1fr)); }
.grid > section { margin-bottom: 0; min-width: 0; }
section { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; white-space: nowrap; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.ae { font-family: ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
tbody tr:nth-child(even) { background: #fafbfc; }
.empty { color: var(--muted); margin: 4px 0; }
.pill { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
        background: #e7ebef; color: var(--text); white-space: nowrap; }
.pill.ok { background: #dcf3e3; color: var(--ok); }
.pill.bad { background: #fdecea; color: var(--bad); }
.pill.warn { background: #fff4e0; color: var(--warn); }
header .pill { font-size: 13px; }
.bar { position: relative; height: 14px; background: #e7ebef; border-radius: 3px; overflow: hidden; margin: 6px 0; }
.bar .fill { position: absolute; left: 0; top: 0; bottom: 0; background: var(--accent); }
.bar .fill.bad { background: var(--bad); }
.bar .mark { position: absolute; top: 0; bottom: 0; width: 2px; background: var(--bad); }
.share { display: inline-block; height: 8px; background: #9ec1e6; border-radius: 2px; vertical-align: middle; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
details summary { cursor: pointer; font-weight: 600; font-size: 15px; }
#config table { margin-top: 8px; }
#config td:first-child { white-space: nowrap; color: var(--muted); font-family: ui-monospace, monospace; }
#config td:last-child { font-family: ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
footer { color: var(--muted); font-size: 12px; padding: 0 20px 16px; }
.bad-text { color: var(--bad); font-weight: 600; }
h2.sub-heading { margin-top: 14px; }
"""

_SCRIPT = r"""
"use strict";
// Everything shown comes from status.json; values become text nodes only.
const REFRESH_MS = 1000;
const STALE_MS = 5000;
const NUMBER = new Intl.NumberFormat("en-US");
let last = null;          // the latest snapshot
let lastChange = 0;       // Date.now() when snapshot.time last changed
let problem = "";         // why the last fetch failed, "" when it worked
let waiting = "";         // the monitor's message while it has no snapshot yet
let updates = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null && value !== "") node.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));   // append(string) makes a text node
  }
  return node;
}
function fill(id, ...children) { document.getElementById(id).replaceChildren(...children.flat(Infinity)); }

// -- formatting -----------------------------------------------------------------------------
function int(n) { return NUMBER.format(n); }
function fixed(n, digits) { return Number(n).toFixed(digits); }
function bytes(n) {  // SI, as fastscp.status.human_bytes writes them (tests/unit/monitor/test_monitor_page.py)
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + " " + units[i];
}
function percent(fraction) {
  const p = 100 * fraction;
  return p > 0 && p < 0.1 ? "< 0.1%" : fixed(p, p > 0 && p < 10 ? 1 : 0) + "%";
}
function pad(n) { return String(n).padStart(2, "0"); }
function clock(epoch) {
  if (!epoch) return "";
  const d = new Date(epoch * 1000);
  const time = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  if (d.toDateString() === new Date().toDateString()) return time;
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + time;
}
function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const m = Math.floor(s / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
  if (s < 60) return s + " s";
  if (h < 1) return m + " min " + pad(s % 60) + " s";
  if (d < 1) return h + " h " + pad(m % 60) + " min";
  return d + " d " + (h % 24) + " h";
}
function seconds(value) {
  if (value === Infinity) return "more";
  return value < 1 ? fixed(value * 1000, value < 0.01 ? 1 : 0) + " ms" : fixed(value, 1) + " s";
}
function outcomeClass(outcome) {
  if (/^released/.test(outcome)) return "ok";
  if (/abort|reject|fail|error|timeout/i.test(outcome)) return "bad";
  return "warn";
}

// -- building blocks ------------------------------------------------------------------------
function table(columns, rows, empty) {
  if (!rows.length) return el("p", {class: "empty"}, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map(c => el("th", {class: c.cls}, c.label)))),
    el("tbody", {}, rows.map(row => el("tr", {}, row.map((cell, i) => el("td", {class: columns[i].cls}, cell))))));
}
function tile(label, value, sub, bad) {
  return el("div", {class: bad ? "tile bad" : "tile", "data-tile": label},
    el("div", {class: "label"}, label), el("div", {class: "value"}, value), el("div", {class: "sub"}, sub));
}
function bar(fraction, bad, mark) {
  const fillNode = el("div", {class: bad ? "fill bad" : "fill"});
  fillNode.style.width = Math.min(100, Math.max(0, fraction * 100)) + "%";
  const node = el("div", {class: "bar"}, fillNode);
  if (mark !== undefined) {
    const markNode = el("div", {class: "mark", title: "free-space watermark"});
    markNode.style.left = Math.min(100, Math.max(0, mark * 100)) + "%";
    node.append(markNode);
  }
  return node;
}
function countTable(label, counts, cls, empty) {
  const entries = Object.entries(counts).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
  const top = entries.length ? entries[0][1] : 0;
  const share = n => {
    const span = el("span", {class: "share"});
    span.style.width = (top ? 80 * n / top : 0) + "px";
    return span;
  };
  return table([{label: label, cls: cls}, {label: "Instances", cls: "num"}, {label: ""}],
               entries.map(([key, n]) => [key, int(n), share(n)]), empty);
}
function quantile(histogram, q) {
  if (!histogram.count) return null;
  let seen = 0;
  for (let i = 0; i < histogram.counts.length; i++) {
    seen += histogram.counts[i];
    if (seen >= q * histogram.count) return i < histogram.buckets.length ? histogram.buckets[i] : Infinity;
  }
  return Infinity;
}
function upTo(value, format, top) { return value === Infinity ? "over " + format(top) : "up to " + format(value); }
function flatten(value, prefix, out) {
  if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
    for (const [key, inner] of Object.entries(value)) flatten(inner, prefix ? prefix + "." + key : key, out);
  } else {
    const shown = Array.isArray(value) ? value.map(v => typeof v === "string" ? v : JSON.stringify(v)).join(", ")
                : typeof value === "string" ? value : JSON.stringify(value);
    out.push([prefix, shown === "" ? "\u2014" : shown]);
  }
  return out;
}

// -- sections -------------------------------------------------------------------------------
function renderHeader(s) {
  document.title = s.ae_title + " \u2013 fastscp status";
  const running = s.state === "running";
  fill("heading", "fastscp \u00b7 " + s.ae_title);
  fill("meta",
    el("span", {class: running ? "pill ok" : "pill warn", id: "state"}, s.state),
    " listening on " + s.host + ":" + s.port + " \u00b7 up " + duration(s.time - s.started) +
    " \u00b7 version " + s.version + " \u00b7 status of " + clock(s.time));
}
function renderAlerts(s) {
  const alerts = [];
  if (problem) alerts.push(["warn", "Cannot reach the monitor (" + problem + ")." +
                                     (s ? " The figures below are from " + clock(s.time) + "." : "")]);
  if (waiting) alerts.push(["warn", "Waiting for the first status report from the server: " + waiting]);
  if (s && !problem && Date.now() - lastChange > STALE_MS) {
    alerts.push(["warn", "No new status from the server for " + duration((Date.now() - lastChange) / 1000) +
                         ": it may be overloaded or stopped."]);
  }
  if (s && s.storage.below_watermark) {
    alerts.push(["bad", "Storage is below its free-space watermark: " + bytes(s.storage.free_bytes) +
                        " free, minimum " + bytes(s.storage.min_free_bytes) + " (storage.min_free_bytes). " +
                        "New objects are refused with status 0xA700 (Out of resources) until space is freed in " +
                        s.storage.root + "."]);
  }
  if (s && s.state !== "running") {
    alerts.push(["warn", "The server is " + s.state + ": it accepts no new associations; open ones may finish."]);
  }
  for (const w of (s ? s.workers : [])) {
    if (!w.alive) alerts.push(["bad", "Worker " + w.index + " (pid " + w.pid + ") is not running; " +
                                      "its associations were aborted and it is being restarted."]);
  }
  for (const h of (s && s.hooks) || []) {
    if (h.failed) alerts.push(["warn", "Hook " + h.name + " gave up on " + int(h.failed) + " events; last error at " +
                                       clock(h.last_error_at) + ": " + h.last_error]);
  }
  fill("alerts", alerts.map(([cls, message]) => el("div", {class: "alert " + cls, role: "alert"}, message)));
}
function renderTiles(s) {
  const t = s.totals, r = s.rates, st = s.storage;
  const alive = s.workers.filter(w => w.alive).length;
  const restarts = s.workers.reduce((n, w) => n + w.restarts, 0);
  fill("tiles",
    tile("Instances stored", int(t.instances), int(t.failures) + " failed \u00b7 " + int(t.duplicates) + " duplicates",
         false),
    tile("Data received", bytes(t.bytes), "", false),
    tile("Instances/s (1 min)", fixed(r.instances_per_s_1m, 1), "5 min: " + fixed(r.instances_per_s_5m, 1) + "/s",
         false),
    tile("MB/s (1 min)", fixed(r.mb_per_s_1m, 1), "5 min: " + fixed(r.mb_per_s_5m, 1) + " MB/s", false),
    tile("Open associations", int(s.open.length),
         int(t.associations) + " ended \u00b7 " + int(t.rejected) + " rejected", false),
    tile("Storage free", bytes(st.free_bytes),
         (st.total_bytes ? percent(st.free_bytes / st.total_bytes) + " of " + bytes(st.total_bytes) : "") +
         " \u00b7 min " + bytes(st.min_free_bytes), st.below_watermark),
    tile("Index lag", int(s.index.lag), int(s.index.committed) + " committed" +
         (s.index.kept_files ? " \u00b7 " + int(s.index.kept_files) + " files kept" : ""), false),
    ...(s.poststore ? [tile("Post-store lag", int(s.poststore.waiting),
                            "oldest " + fixed(s.poststore.oldest_seconds, 1) + " s \u00b7 " +
                            int(s.poststore.thumbnails) + " thumbnails made" +
                            (s.poststore.kept_files ? " \u00b7 " + int(s.poststore.kept_files) + " files kept" : ""),
                            false)] : []),
    tile("Workers alive", alive + " of " + s.workers.length, int(restarts) + " restarts", alive < s.workers.length));
}
function renderOpen(s) {
  fill("open-count", "(" + s.open.length + ")");
  const rows = [...s.open].sort((a, b) => a.started - b.started).map(a => [
    a.calling_ae_title, a.called_ae_title, a.peer_address, String(a.worker), clock(a.started),
    duration(s.time - a.started), int(a.instances), int(a.failures), bytes(a.bytes), fixed(a.rate, 1) + "/s"]);
  fill("open", table([
    {label: "Calling AE", cls: "ae"}, {label: "Called AE", cls: "ae"}, {label: "Address"},
    {label: "Worker", cls: "num"}, {label: "Started"}, {label: "Open for", cls: "num"},
    {label: "Instances", cls: "num"}, {label: "Failed", cls: "num"}, {label: "Received", cls: "num"},
    {label: "Rate", cls: "num"}], rows, "No association is open."));
}
function renderRecent(s) {
  const rows = s.recent.map(a => [
    a.calling_ae_title, a.peer_address, clock(a.started), clock(a.ended),
    duration((a.ended || s.time) - a.started), int(a.instances), int(a.failures), bytes(a.bytes),
    el("span", {class: "pill " + outcomeClass(a.outcome)}, a.outcome || "ended")]);
  fill("recent", table([
    {label: "Calling AE", cls: "ae"}, {label: "Address"}, {label: "Started"}, {label: "Ended"},
    {label: "Duration", cls: "num"}, {label: "Instances", cls: "num"}, {label: "Failed", cls: "num"},
    {label: "Received", cls: "num"}, {label: "Outcome"}], rows, "No association has ended yet."));
}
function renderCounts(s) {
  fill("modalities", countTable("Modality", s.per_modality, "ae", "Nothing stored yet."));
  fill("calling", countTable("Calling AE", s.per_calling_ae, "ae", "Nothing stored yet."));
  const rejects = Object.entries(s.rejects).sort((a, b) => b[1] - a[1]);
  fill("rejects", table([{label: "Reason"}, {label: "Associations", cls: "num"}],
                        rejects.map(([reason, n]) => [reason, int(n)]), "No association was rejected."));
}
function renderStorage(s) {
  const st = s.storage, total = st.total_bytes || 1;
  fill("storage",
    bar(st.used_bytes / total, st.below_watermark, 1 - st.min_free_bytes / total),
    el("dl", {},
      el("dt", {}, "Folder"), el("dd", {}, st.root),
      el("dt", {}, "Used"), el("dd", {}, bytes(st.used_bytes) + " of " + bytes(st.total_bytes)),
      el("dt", {}, "Free"), el("dd", {class: st.below_watermark ? "bad-text" : ""}, bytes(st.free_bytes) +
                                  (st.below_watermark ? " \u2014 below the watermark: stores get 0xA700" : "")),
      el("dt", {}, "Watermark"), el("dd", {}, bytes(st.min_free_bytes) + " (storage.min_free_bytes)")),
    el("h2", {class: "sub-heading"}, "Index"),
    el("dl", {},
      el("dt", {}, "Database"), el("dd", {}, s.index.path),
      el("dt", {}, "Committed"), el("dd", {}, int(s.index.committed) + " instances"),
      el("dt", {}, "Lag"), el("dd", {}, int(s.index.lag) + " instances stored, not yet in the index")));
}
function renderPerformance(s) {
  const lat = s.store_latency_seconds, size = s.object_size_bytes;
  const latTop = lat.buckets[lat.buckets.length - 1], sizeTop = size.buckets[size.buckets.length - 1];
  const row = (label, h, format, top) => h.count ? [label, int(h.count), format(h.sum / h.count),
    upTo(quantile(h, 0.5), format, top), upTo(quantile(h, 0.95), format, top), upTo(quantile(h, 0.99), format, top)]
    : [label, "0", "\u2014", "\u2014", "\u2014", "\u2014"];
  fill("performance", table([{label: ""}, {label: "Count", cls: "num"}, {label: "Mean", cls: "num"},
    {label: "Median", cls: "num"}, {label: "95%", cls: "num"}, {label: "99%", cls: "num"}],
    [row("Store time", lat, seconds, latTop), row("Object size", size, bytes, sizeTop)], ""));
}
function renderWorkers(s) {
  fill("workers", table([{label: "Worker", cls: "num"}, {label: "PID", cls: "num"}, {label: "State"},
    {label: "Open associations", cls: "num"}, {label: "Running since"}, {label: "Restarts", cls: "num"}],
    s.workers.map(w => [String(w.index), String(w.pid),
      el("span", {class: w.alive ? "pill ok" : "pill bad"}, w.alive ? "running" : "not running"),
      int(w.open_associations), clock(w.started), int(w.restarts)]), "No worker processes."));
}
function renderForwarding(s) {
  const destinations = s.forwarding || [];
  document.getElementById("forwarding-section").hidden = !destinations.length;
  const rows = destinations.map(d => [d.name, int(d.queued), int(d.in_flight), int(d.sent),
    int(d.failed), int(d.resent), d.queued ? duration(d.oldest_queued_seconds) : "\u2014",
    d.last_error ? clock(d.last_error_at) + " " + d.last_error : "\u2014"]);
  fill("forwarding", table([{label: "Destination", cls: "ae"}, {label: "Queued", cls: "num"},
    {label: "In flight", cls: "num"}, {label: "Sent", cls: "num"}, {label: "Failed", cls: "num"},
    {label: "Resent", cls: "num"}, {label: "Oldest queued", cls: "num"}, {label: "Last error"}], rows,
    "Forwarding is off (no forwarding.destinations)."));
}
function renderHooks(s) {
  const hooks = s.hooks || [];
  document.getElementById("hooks-section").hidden = !hooks.length;
  fill("hooks", table([{label: "Hook", cls: "ae"}, {label: "Event"}, {label: "Runs", cls: "num"},
    {label: "Succeeded", cls: "num"}, {label: "Failed", cls: "num"}, {label: "Retried", cls: "num"},
    {label: "Timed out", cls: "num"}, {label: "Dropped", cls: "num"}, {label: "Running", cls: "num"},
    {label: "Queued", cls: "num"}, {label: "Last error"}],
    hooks.map(h => [h.name, h.event, int(h.runs), int(h.succeeded),
      el("span", {class: h.failed ? "bad-text" : ""}, int(h.failed)), int(h.retried), int(h.timed_out),
      int(h.dropped), int(h.running), int(h.queued),
      h.last_error ? clock(h.last_error_at) + " " + h.last_error : ""]), "No hooks configured."));
}
function renderConfig(s) {
  fill("config", table([{label: "Key"}, {label: "Value"}], flatten(s.config, "", []), "No configuration."));
}
function render() {
  renderAlerts(last);
  if (!last) return;
  renderHeader(last); renderTiles(last); renderOpen(last); renderRecent(last); renderCounts(last);
  renderStorage(last); renderPerformance(last); renderWorkers(last); renderForwarding(last);
  renderHooks(last); renderConfig(last);
  document.getElementById("content").hidden = false;
}

async function refresh() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (response.status === 503) {
      const body = await response.json().catch(() => ({}));
      waiting = String(body.error || "no status yet");
      problem = "";
    } else if (!response.ok) {
      throw new Error("HTTP " + response.status + " from status.json");
    } else {
      const snapshot = await response.json();
      if (!last || snapshot.time !== last.time) lastChange = Date.now();
      last = snapshot; waiting = ""; problem = "";
    }
  } catch (err) {
    problem = String((err && err.message) || err);
  }
  try {
    render();
  } catch (err) {
    fill("page-error", el("div", {class: "alert bad"}, "This page could not show the status: " + err));
  }
  updates++;
  document.body.dataset.updates = String(updates);
  setTimeout(refresh, REFRESH_MS);
}
refresh();
"""

_BODY = """
<header><h1 id="heading">fastscp</h1><div class="meta" id="meta">connecting&hellip;</div></header>
<main>
<div id="page-error"></div>
<div id="alerts"></div>
<noscript><div class="alert warn">This page needs JavaScript. The same figures are at
<a href="status.json">status.json</a> and <a href="metrics">metrics</a>.</div></noscript>
<div id="content" hidden>
<div class="tiles" id="tiles"></div>
<section><h2>Open associations <span class="note" id="open-count"></span></h2><div id="open"></div></section>
<section><h2>Recent associations <span class="note">newest first</span></h2><div id="recent"></div></section>
<div class="grid">
<section><h2>By modality</h2><div id="modalities"></div></section>
<section><h2>By calling AE</h2><div id="calling"></div></section>
<section><h2>Rejected associations</h2><div id="rejects"></div></section>
</div>
<div class="grid wide">
<section><h2>Storage</h2><div id="storage"></div></section>
<section><h2>Store time and object size <span class="note">from histogram buckets</span></h2>
<div id="performance"></div>
<h2 class="sub-heading">Workers</h2><div id="workers"></div></section>
</div>
<section id="forwarding-section" hidden><h2>Forwarding <span class="note">per destination; resent: sent again
after an interruption, possibly twice</span></h2><div id="forwarding"></div></section>
<section id="hooks-section" hidden><h2>Post-receive hooks <span class="note">since the post-store process
started</span></h2><div id="hooks"></div></section>
<section><details open><summary>Configuration in force</summary><div id="config"></div></details></section>
</div>
</main>
<footer>Updated every second from <a href="status.json">status.json</a> &middot;
Prometheus: <a href="metrics">metrics</a> &middot; health: <a href="healthz">healthz</a> &middot;
<a href="studies">study browser</a></footer>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: The page, UTF-8.
PAGE: bytes = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<title>fastscp status</title>\n<link rel="icon" href="data:,">\n'
    f"<style>{_STYLE}</style>\n</head>\n<body>{_BODY}<script>{_SCRIPT}</script>\n</body>\n</html>\n"
).encode()

#: Served with :data:`PAGE`: only its own script and stylesheet run, it may
#: fetch only from this origin, and it loads no images, frames or fonts.
CONTENT_SECURITY_POLICY: str = (
    f"default-src 'none'; script-src {_sha256(_SCRIPT)}; style-src {_sha256(_STYLE)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
