// The graft inspector page. Everything it shows comes from the network (paths,
// headers, bodies): it is only ever put in the page as text (textContent),
// never parsed as HTML. The Content-Security-Policy forbids inline scripts too.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const rows = $("rows");
  const detail = $("detail");
  const detailBody = $("detail-body");
  const filterInput = $("filter");
  const sessions = new Map();
  let entries = [];
  let queued = [];
  // The exchanges in `queued`, by key.
  const queuedKeys = new Set();
  let paused = false;
  let selected = null;
  // Exchanges already shown: a reconnected stream replays the hub's backlog.
  const seen = new Set();

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function clock(ms) {
    const d = new Date(ms);
    const two = (n) => String(n).padStart(2, "0");
    return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
  }

  function size(n) {
    if (n === undefined || n === null) return "";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function sessionName(id) {
    const info = sessions.get(id);
    return info ? info.target : id;
  }

  function wentTo(ev, short) {
    const places = { local: "local process", target: "target", another_session: "another session" };
    let where = places[ev.route] || "target";
    if (ev.mode === "mirror") where += " (mirror)";
    if (ev.filter) where += short ? " · filtered" : ` · filter ${ev.filter}`;
    return where;
  }

  function renderSessions() {
    const list = $("sessions");
    list.replaceChildren();
    if (sessions.size === 0) {
      list.append(el("li", "none yet", "none"));
      return;
    }
    for (const info of sessions.values()) {
      const item = el("li", `${info.target} · ${info.mode}${info.filter ? " · " + info.filter : ""} · ${info.command} (pid ${info.pid})`);
      item.dataset.session = info.session;
      if (info.ended) item.classList.add("ended");
      list.append(item);
    }
  }

  function matches(entry) {
    const wanted = filterInput.value.trim().toLowerCase();
    return wanted === "" || entry.text.includes(wanted);
  }

  function count() {
    const shown = entries.filter((e) => !e.row.hidden).length;
    const diffs = entries.filter((e) => e.ev.kind === "difference").length;
    const requests = entries.length - diffs;
    let text = `${requests} request${requests === 1 ? "" : "s"}`;
    if (diffs > 0) text += `, ${diffs} difference${diffs === 1 ? "" : "s"}`;
    if (shown !== entries.length) text += `, ${shown} shown`;
    if (paused) text += `, ${queued.length} waiting`;
    $("count").textContent = text;
  }

  function addRow(cells, ev, cls, text) {
    const row = el("tr", undefined, cls);
    for (const [value, cellClass, title] of cells) {
      const cell = el("td", value, cellClass);
      cell.title = title === undefined ? String(value) : title;
      row.append(cell);
    }
    const entry = { ev, row, text: text.toLowerCase() };
    row.addEventListener("click", () => select(entry));
    row.hidden = !matches(entry);
    // When the row appeared (wall clock, ms): how long a request took to show.
    row.dataset.shownMs = String(Date.now());
    entries.push(entry);
    rows.append(row);
  }

  const exchangeKey = (ev) => `${ev.session}/${ev.id}`;

  function addExchange(ev) {
    const key = exchangeKey(ev);
    if (seen.has(key)) return;
    seen.add(key);
    const status = ev.response ? ev.response.status : "—";
    // Another session's request: only that it happened, nothing it carried.
    const hidden = ev.route === "another_session";
    const cls = ev.response ? `exchange s${String(status)[0]}` : "exchange none";
    const headers = ev.request_headers.concat(ev.response ? ev.response.headers : []);
    const text = [ev.method, ev.target, status, wentTo(ev), sessionName(ev.session), ev.port]
      .concat(headers.map(([n, v]) => `${n}: ${v}`)).join("\n");
    addRow([
      [clock(ev.started_unix_ms)], [sessionName(ev.session)], [ev.port], [hidden ? "—" : ev.method],
      [hidden ? "(not shown)" : ev.target, "path"], [status, "st"], [hidden ? "" : `${ev.latency_ms.toFixed(1)} ms`],
      [ev.response ? size(ev.response.body.len) : ""], [wentTo(ev, true), "went", wentTo(ev)],
    ], ev, cls, text);
  }

  function addDifference(ev) {
    const json = JSON.stringify(ev.difference);
    addRow([
      [clock(Date.now())], [sessionName(ev.session)], [""], ["DIFF"],
      [json.length > 120 ? json.slice(0, 120) + "…" : json, "path"], ["≠", "st"], [""], [""],
      ["local vs target", "went"],
    ], ev, "diff", `diff difference ${sessionName(ev.session)}\n${json}`);
  }

  function headerTable(headers) {
    const table = el("table");
    for (const [name, value] of headers) {
      const row = el("tr");
      row.append(el("td", name, "name"), el("td", value));
      table.append(row);
    }
    return table;
  }

  function bodyView(body) {
    const box = el("div");
    if (body.len === 0) {
      box.append(el("p", "no body"));
      return box;
    }
    if ((body.text === null || body.text === undefined) && (body.base64 === null || body.base64 === undefined)) {
      box.append(el("p", `${size(body.len)}, not kept`));
      return box;
    }
    let about = `${size(body.len)}`;
    if (body.truncated) about += ", first 64 KiB shown";
    if (!body.complete) about += ", cut short";
    if (body.base64 !== null && body.base64 !== undefined) about += ", not UTF-8: base64";
    box.append(el("p", about));
    box.append(el("pre", body.text !== null && body.text !== undefined ? body.text : body.base64, "body"));
    return box;
  }

  function select(entry) {
    if (selected) selected.row.classList.remove("selected");
    selected = entry;
    entry.row.classList.add("selected");
    const ev = entry.ev;
    const parts = [];
    if (ev.kind === "difference") {
      parts.push(el("h3", `Difference · ${sessionName(ev.session)}`));
      parts.push(el("pre", JSON.stringify(ev.difference, null, 2), "body"));
    } else {
      parts.push(el("h3", `${ev.method} ${ev.target} ${ev.version}`, "line"));
      parts.push(el("p", `${clock(ev.started_unix_ms)} · ${sessionName(ev.session)} · port ${ev.port} · from ${ev.client || "?"} · went to ${wentTo(ev)} · ${ev.latency_ms.toFixed(1)} ms`));
      if (ev.note) parts.push(el("p", ev.note, "note"));
      parts.push(el("h3", "Request headers"), headerTable(ev.request_headers));
      parts.push(el("h3", "Request body"), bodyView(ev.request_body));
      if (ev.response) {
        const r = ev.response;
        parts.push(el("h3", `Response: ${r.version} ${r.status} ${r.reason}`));
        parts.push(el("h3", "Response headers"), headerTable(r.headers));
        parts.push(el("h3", "Response body"), bodyView(r.body));
      } else if (ev.route !== "another_session") {
        parts.push(el("h3", "No response: the connection ended first"));
      }
    }
    detailBody.replaceChildren(...parts);
    detail.hidden = false;
  }

  function handle(ev) {
    switch (ev.kind) {
      case "session":
        sessions.set(ev.session, ev);
        renderSessions();
        break;
      case "ended": {
        const info = sessions.get(ev.session);
        if (info) info.ended = true;
        renderSessions();
        break;
      }
      case "exchange":
        addExchange(ev);
        break;
      case "difference":
        addDifference(ev);
        break;
      default:
        return;
    }
    count();
  }

  filterInput.addEventListener("input", () => {
    for (const entry of entries) entry.row.hidden = !matches(entry);
    count();
  });

  $("pause").addEventListener("click", () => {
    paused = !paused;
    $("pause").textContent = paused ? "Resume" : "Pause";
    $("pause").classList.toggle("on", paused);
    if (!paused) {
      const waiting = queued;
      queued = [];
      queuedKeys.clear();
      waiting.forEach(handle);
    }
    count();
  });

  $("clear").addEventListener("click", () => {
    entries = [];
    queued = [];
    queuedKeys.clear();
    rows.replaceChildren();
    selected = null;
    detail.hidden = true;
    count();
  });

  $("close").addEventListener("click", () => {
    detail.hidden = true;
    if (selected) selected.row.classList.remove("selected");
    selected = null;
  });

  const status = $("status");
  const source = new EventSource("events");
  source.onopen = () => {
    status.textContent = "live";
    status.className = "status live";
  };
  source.onerror = () => {
    status.textContent = "reconnecting…";
    status.className = "status down";
  };
  source.onmessage = (message) => {
    let ev;
    try {
      ev = JSON.parse(message.data);
    } catch (e) {
      return;
    }
    if (paused && (ev.kind === "exchange" || ev.kind === "difference")) {
      // A stream reconnected while paused replays the backlog: an exchange
      // already shown or already waiting is not counted again.
      if (ev.kind === "exchange") {
        const key = exchangeKey(ev);
        if (seen.has(key) || queuedKeys.has(key)) return;
        queuedKeys.add(key);
      }
      queued.push(ev);
      count();
      return;
    }
    handle(ev);
  };
  count();
})();
