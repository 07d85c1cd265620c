// agent-fabric dashboard: keeps nodes, agents and events from the server's
// event stream (/api/stream) and redraws the tables. No framework, no build.
"use strict";

const MAX_EVENTS = 200;
const view = { nodes: new Map(), agents: new Map(), events: [] };
let pending = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

function ago(iso) {
  if (!iso) return "-";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d`;
}

function stateCell(value) {
  return el("td", value, `state s-${value}`);
}

function fill(tbody, rows, columns) {
  const fresh = document.createDocumentFragment();
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", "none", "empty");
    td.colSpan = columns;
    tr.appendChild(td);
    fresh.appendChild(tr);
  }
  for (const tr of rows) fresh.appendChild(tr);
  tbody.replaceChildren(fresh);
}

function renderNodes() {
  const rows = [...view.nodes.values()]
    .sort((a, b) => a.node_id.localeCompare(b.node_id))
    .map((n) => {
      const tr = el("tr");
      tr.dataset.node = n.node_id;
      tr.dataset.state = n.state;
      const m = n.metrics;
      const labels = Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(",");
      tr.append(
        el("td", n.node_id),
        stateCell(n.state),
        el("td", n.hostname || "-"),
        el("td", m ? `${m.cpu_percent.toFixed(1)}%` : "-"),
        el("td", m ? `${bytes(m.memory_used_bytes)} / ${bytes(m.memory_total_bytes)}` : "-"),
        el("td", m ? m.load1.toFixed(2) : "-"),
        el("td", n.agents ?? "-"),
        el("td", n.heartbeat_age === null ? "-" : `${n.heartbeat_age.toFixed(1)}s`),
        el("td", labels || "-"),
      );
      return tr;
    });
  fill(document.querySelector("#nodes tbody"), rows, 9);
}

function renderAgents() {
  const rows = [...view.agents.values()]
    .sort((a, b) => a.agent_id.localeCompare(b.agent_id))
    .map((a) => {
      const tr = el("tr");
      tr.dataset.agent = a.agent_id;
      tr.dataset.state = a.state;
      const up = a.state === "running" || a.state === "paused";
      const m = up ? a.metrics : null;
      tr.append(
        el("td", a.agent_id),
        el("td", a.node_id),
        stateCell(a.state),
        stateCell(a.health),
        el("td", up && a.pid ? a.pid : "-"),
        el("td", m ? `${m.cpu_percent.toFixed(1)}%` : "-"),
        el("td", m ? bytes(m.rss_bytes) : "-"),
        el("td", a.restarts),
        el("td", ago(a.since)),
      );
      return tr;
    });
  fill(document.querySelector("#agents tbody"), rows, 9);
}

function eventItem(e) {
  const li = el("li");
  li.dataset.kind = e.type.replace(/^io\.agent-fabric\./, "");
  const when = new Date(e.time);
  li.append(
    el("span", when.toLocaleTimeString(), "time"),
    el("span", li.dataset.kind, "kind"),
    el("span", `${e.subject || "-"}${e.actor ? ` by ${e.actor}` : ""}`),
  );
  return li;
}

function renderEvents() {
  const list = document.getElementById("events");
  list.replaceChildren(...view.events.slice().reverse().map(eventItem));
}

function renderSummary() {
  const agents = [...view.agents.values()];
  const running = agents.filter((a) => a.state === "running").length;
  document.getElementById("summary").textContent =
    `${view.nodes.size} nodes · ${agents.length} agents (${running} running)`;
}

function render() {
  pending = null;
  renderNodes();
  renderAgents();
  renderEvents();
  renderSummary();
}

function soon() {
  if (pending === null) pending = setTimeout(render, 50);
}

function connect() {
  const status = document.getElementById("status");
  const stream = new EventSource("/api/stream");
  stream.addEventListener("open", () => {
    status.dataset.connected = "yes";
    status.textContent = "live";
  });
  stream.addEventListener("error", () => {
    // EventSource reconnects by itself; the snapshot it gets then resets the view.
    status.dataset.connected = "no";
    status.textContent = "reconnecting…";
  });
  stream.addEventListener("snapshot", (msg) => {
    const snap = JSON.parse(msg.data);
    view.nodes = new Map(snap.nodes.map((n) => [n.node_id, n]));
    view.agents = new Map(snap.agents.map((a) => [a.agent_id, a]));
    view.events = snap.events.slice(-MAX_EVENTS);
    if (snap.title) document.title = snap.title;
    soon();
  });
  stream.addEventListener("agent", (msg) => {
    const a = JSON.parse(msg.data);
    view.agents.set(a.agent_id, a);
    soon();
  });
  stream.addEventListener("agent_removed", (msg) => {
    view.agents.delete(JSON.parse(msg.data).agent_id);
    soon();
  });
  stream.addEventListener("node", (msg) => {
    const n = JSON.parse(msg.data);
    view.nodes.set(n.node_id, n);
    soon();
  });
  stream.addEventListener("event", (msg) => {
    view.events.push(JSON.parse(msg.data));
    if (view.events.length > MAX_EVENTS) view.events.shift();
    soon();
  });
}

connect();
setInterval(soon, 1000); // ages move even when nothing else does
