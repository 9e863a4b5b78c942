// The rbee dashboard: polls GET /v2/dashboard with the admin key and streams the playground
// from POST /v1/chat/completions. Everything the queen sends is written with textContent,
// never as HTML, so a model or node name cannot become markup.
"use strict";

const KEY_ITEM = "rbee.queen.key";
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

let pollTimer = null;
let pollRound = 0; // a new key or a sign-out starts a new round; an older poll's answer is dropped
let chatAbort = null;

function storedKey() { return sessionStorage.getItem(KEY_ITEM); }

function authHeaders(key) { return { Authorization: "Bearer " + key }; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function ms(v) { return v === null || v === undefined ? "–" : v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(2) + " s"; }

function num(v) { return v === null || v === undefined ? "–" : String(v); }

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tableId, items, render, empty) {
  const body = $(tableId).querySelector("tbody");
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    render(tr, item);
    return tr;
  });
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, empty, "muted");
    td.colSpan = $(tableId).querySelectorAll("thead th").length;
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function device(d) {
  const mem = d.memory_total_bytes === null ? "" :
    " " + (d.memory_free_bytes === null ? "?" : bytes(d.memory_free_bytes)) + " / " + bytes(d.memory_total_bytes);
  return d.backend + ":" + d.device + (d.name ? " " + d.name : "") + mem;
}

function renderNodes(nodes) {
  fill("nodes", nodes, (tr, n) => {
    tr.dataset.node = n.name;
    cell(tr, n.name);
    if (n.error) {
      cell(tr, "unreachable: " + n.error, "bad").colSpan = 4;
      return;
    }
    cell(tr, n.hostname || (n.source === "registration" ? "(registered workers)" : "–"));
    cell(tr, n.ram_total_bytes === null ? "–" : bytes(n.ram_free_bytes) + " / " + bytes(n.ram_total_bytes), "num");
    cell(tr, n.devices.length ? n.devices.map(device).join("; ") : "–");
    cell(tr, n.hive_running === null ? "–" : n.hive_running ? "running" : "stopped");
  }, "no nodes");
}

function renderWorkers(workers) {
  fill("workers", workers, (tr, w) => {
    tr.dataset.worker = w.id;
    cell(tr, w.id);
    cell(tr, w.node);
    cell(tr, w.model);
    const busy = cell(tr, w.busy + " / " + w.slots + " ", "num");
    const meter = document.createElement("meter");
    meter.min = 0; meter.max = w.slots; meter.value = w.busy;
    busy.appendChild(meter);
    cell(tr, w.tokens_per_s === null ? "–" : w.tokens_per_s.toFixed(1), "num");
    cell(tr, w.busy ? "busy" : seconds(w.idle_s), "num");
    cell(tr, String(w.served), "num");
    cell(tr, w.backend ? w.backend + (w.device === null ? "" : ":" + w.device) : "–");
  }, "no workers");
}

function renderModels(models) {
  fill("models", models, (tr, m) => {
    cell(tr, m.node);
    cell(tr, m.name);
    cell(tr, bytes(m.size_bytes), "num");
    cell(tr, m.quantization || "–");
    cell(tr, num(m.context_length), "num");
    cell(tr, m.loaded ? "yes" : "no", m.loaded ? "ok" : "muted");
  }, "no models");
  const select = $("chat-model");
  const names = [...new Set(models.map((m) => m.name))].sort();
  const current = select.value;
  if (names.join("\n") !== [...select.options].map((o) => o.value).join("\n")) {
    select.replaceChildren(...names.map((name) => new Option(name, name)));
    if (names.includes(current)) select.value = current;
  }
}

function renderRequests(requests) {
  fill("requests", requests, (tr, r) => {
    cell(tr, new Date(r.at * 1000).toLocaleTimeString());
    cell(tr, r.route);
    cell(tr, r.model);
    cell(tr, r.node);
    cell(tr, r.worker);
    cell(tr, r.error ? r.outcome + " (" + r.error + ")" : r.outcome, r.outcome === "ok" ? "ok" : "bad");
    cell(tr, String(r.tokens), "num");
    cell(tr, ms(r.ttft_ms), "num");
    cell(tr, ms(r.duration_ms), "num");
    cell(tr, r.tokens_per_s === null ? "–" : r.tokens_per_s.toFixed(1), "num");
  }, "no requests yet");
}

function render(data) {
  $("queen-info").textContent = "queen " + data.queen.version;
  $("updated").textContent = "updated " + new Date(data.queen.now * 1000).toLocaleTimeString();
  renderNodes(data.nodes);
  renderWorkers(data.workers);
  renderModels(data.models);
  renderRequests(data.requests);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status;
}

function signOut(message) {
  pollRound += 1;
  clearTimeout(pollTimer);
  pollTimer = null;
  sessionStorage.removeItem(KEY_ITEM);
  $("fleet").hidden = true;
  for (const id of ["nodes", "workers", "models", "requests"]) $(id).querySelector("tbody").replaceChildren();
  $("chat-model").replaceChildren();
  $("login").hidden = false;
  $("forget").hidden = true;
  showError(message);
}

async function poll(round) {
  const key = storedKey();
  if (!key || round !== pollRound) return;
  const again = () => { if (round === pollRound) pollTimer = setTimeout(() => poll(round), POLL_MS); };
  let response;
  try {
    response = await fetch("/v2/dashboard", { headers: authHeaders(key), cache: "no-store" });
  } catch (err) {
    if (round === pollRound) showError("the queen did not answer: " + err.message);
    again();
    return;
  }
  if (round !== pollRound) return;
  if (response.status === 401 || response.status === 403) {
    signOut("key refused (HTTP " + response.status + "): " + await errorMessage(response));
    return;
  }
  if (!response.ok) {
    showError(await errorMessage(response));
  } else {
    showError("");
    $("login").hidden = true;
    $("forget").hidden = false;
    $("fleet").hidden = false;
    render(await response.json());
  }
  again();
}

function restart() {
  pollRound += 1;
  clearTimeout(pollTimer);
  poll(pollRound);
}

function parseEvents(buffer, onData) {
  // SSE: events end with a blank line; only `data:` lines matter here (`: ping` comments are skipped).
  let end;
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
    if (data) onData(data);
  }
  return buffer;
}

async function chat(event) {
  event.preventDefault();
  const key = storedKey();
  const answer = $("chat-answer");
  const status = $("chat-status");
  answer.textContent = "";
  status.textContent = "waiting for the first token…";
  chatAbort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  const started = performance.now();
  let tokens = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { ...authHeaders(key), "Content-Type": "application/json" },
      body: JSON.stringify({
        model: $("chat-model").value,
        messages: [{ role: "user", content: $("chat-prompt").value }],
        max_tokens: Number($("chat-max").value) || 128,
        stream: true,
        stream_options: { include_usage: true },
      }),
      signal: chatAbort.signal,
    });
    if (!response.ok) {
      status.textContent = "error: " + await errorMessage(response);
      status.className = "bad";
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let failed = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseEvents(buffer + value.replace(/\r\n/g, "\n"), (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) { failed = chunk.error.message || "error"; return; }
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
        if (piece) answer.textContent += piece;
      });
    }
    const secs = (performance.now() - started) / 1000;
    status.className = failed ? "bad" : "muted";
    status.textContent = failed ? "error: " + failed : "done: " + tokens + " tokens in " + secs.toFixed(1) + " s";
  } catch (err) {
    status.className = "bad";
    status.textContent = err.name === "AbortError" ? "stopped" : "error: " + err.message;
  } finally {
    chatAbort = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_ITEM, key);
    $("key").value = "";
    showError("");
    restart();
  });
  $("forget").addEventListener("click", () => signOut(""));
  $("chat-form").addEventListener("submit", chat);
  $("chat-stop").addEventListener("click", () => { if (chatAbort) chatAbort.abort(); });
  if (storedKey()) restart();
}

start();
