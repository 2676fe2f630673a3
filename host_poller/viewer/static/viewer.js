// rlm view: renders the JSON of /api/runs and /api/runs/{id}.
// Everything shown comes from models and tenants, so it is hostile: text is only ever set
// with textContent (never innerHTML), links are built from validated ids, and the page's
// Content-Security-Policy runs no script but this file.
"use strict";

const PAGE_SIZE = 50;
// The app's root, from this script's own address (<root>/static/viewer.js): every link and
// request is built on it, so the viewer also works mounted under a prefix.
const BASE = new URL("..", document.currentScript.src);

function url(path) {
  return new URL(path, BASE).href;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function fmtInt(n) {
  return Math.round(n || 0).toLocaleString("en-US");
}

function fmtCost(usd) {
  return "$" + (usd || 0).toFixed(usd >= 1 ? 2 : 6);
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "?";
  return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s";
}

function fmtTime(t) {
  if (!t) return "?";
  return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
}

function tokens(usage) {
  return usage ? (usage.input_tokens || 0) + (usage.output_tokens || 0) : 0;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = false;
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error ? body.error : { code: "http_error", message: response.statusText };
    throw new Error(`${response.status} ${error.code}: ${error.message}`);
  }
  return body;
}

// --- the list of runs ---------------------------------------------------------------------

async function showRuns() {
  const params = new URLSearchParams(location.search);
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  let data;
  try {
    data = await getJSON(url(`api/runs?offset=${offset}&limit=${PAGE_SIZE}`));
  } catch (exc) {
    showError(`Could not list the runs: ${exc.message}`);
    return;
  }
  document.getElementById("dir").textContent = data.trajectory_dir;
  const body = document.querySelector("#runs tbody");
  for (const run of data.runs) {
    const link = el("a", { href: url("runs/" + encodeURIComponent(run.run_id)), text: run.run_id });
    const status = el("span", { class: "status status-" + statusClass(run.status), text: run.status });
    body.append(
      el(
        "tr",
        { class: "run-row", "data-run-id": run.run_id },
        el("td", { text: fmtTime(run.started) }),
        el("td", {}, link),
        el("td", { text: run.model || "?" }),
        el("td", { class: "num", text: run.iterations }),
        el("td", { class: "num", text: run.sub_calls }),
        el("td", { class: "num", text: run.depth }),
        el("td", { class: "num", text: fmtInt(run.tokens) }),
        el("td", { class: "num", text: fmtCost(run.cost_usd) }),
        el("td", {}, status),
        el("td", { class: "preview", text: run.answer ?? run.error ?? "" }),
      ),
    );
  }
  document.getElementById("empty").hidden = data.total > 0;
  const last = Math.min(data.total, offset + data.runs.length);
  document.getElementById("page-info").textContent =
    data.total ? `${offset + 1}-${last} of ${data.total}` : "";
  const newer = document.getElementById("newer");
  const older = document.getElementById("older");
  newer.disabled = offset === 0;
  older.disabled = last >= data.total;
  newer.addEventListener("click", () => (location.search = `?offset=${Math.max(0, offset - PAGE_SIZE)}`));
  older.addEventListener("click", () => (location.search = `?offset=${offset + PAGE_SIZE}`));
  if (data.files_left_out) {
    showError(`${data.files_left_out} older trajectory files not listed (RLM_VIEW_MAX_FILES).`);
  }
}

function statusClass(status) {
  if (status === "final") return "ok";
  if (status === "error" || (status || "").startsWith("budget")) return "bad";
  return "other";
}

// --- one run -----------------------------------------------------------------------------

async function showRun() {
  const runId = decodeURIComponent(location.pathname.split("/").pop());
  document.getElementById("run-id").textContent = runId;
  document.title = `RLM run ${runId}`;
  let data;
  try {
    data = await getJSON(url("api/runs/" + encodeURIComponent(runId)));
  } catch (exc) {
    showError(`Could not load the run: ${exc.message}`);
    return;
  }
  renderSummary(data);
  const notes = document.getElementById("notes");
  for (const note of data.notes) notes.append(el("li", { text: note }));
  const answer = data.end ? data.end.answer : data.root.answer ? data.root.answer.value : null;
  document.getElementById("final-answer").textContent = answer ?? "(no final answer)";
  renderTimeline(data.timeline);
  document.getElementById("tree").append(renderNode(data.root, true));
}

function renderSummary(data) {
  const run = data.run || {};
  const start = data.start || {};
  const end = data.end || {};
  const rows = [
    ["Query", start.query],
    ["Root model", start.model || run.model],
    ["Sub-call model", start.sub_model],
    ["Environment", start.environment],
    ["Started (UTC)", fmtTime(run.started)],
    ["Status", end.stop_reason ? `${end.stop_reason}: ${end.stop_detail || ""}` : run.status],
    ["Iterations (root)", run.iterations],
    ["Sub-calls", run.sub_calls],
    ["Depth reached", run.depth],
    ["Tokens", fmtInt(run.tokens)],
    ["Cost", fmtCost(run.cost_usd)],
    ["Wall time", end.wall_s !== undefined ? fmtSeconds(end.wall_s) : null],
    ["Files", data.files.map((f) => (f.tenant ? f.tenant + "/" : "") + f.name).join(", ")],
  ];
  const list = el("dl", { class: "summary" });
  for (const [label, value] of rows) {
    if (value === null || value === undefined || value === "") continue;
    list.append(el("dt", { text: label }), el("dd", { text: value }));
  }
  document.getElementById("summary").append(list);
}

function renderTimeline(timeline) {
  const box = document.getElementById("timeline");
  const bars = timeline.bars;
  const caption = document.getElementById("timeline-caption");
  if (!bars.length) {
    caption.textContent = "No sub-calls were recorded in this run's files.";
    return;
  }
  const total = Math.max(...bars.map((b) => b.end), 1e-6);
  const lanes = Math.max(...bars.map((b) => b.lane)) + 1;
  caption.textContent =
    `${bars.length} sub-calls over ${fmtSeconds(total)} from the run's start; ` +
    `at most ${lanes} at once. Hover a bar for its details.`;
  box.style.height = `${lanes * 20 + 4}px`;
  for (const bar of bars) {
    const width = Math.max(0.4, ((bar.end - bar.start) / total) * 100);
    const node = el("div", {
      class: `bar bar-${bar.kind === "rlm" ? "rlm" : "llm"}`,
      "data-kind": bar.kind,
      "data-depth": bar.depth,
      title:
        `${bar.kind === "rlm" ? "rlm_query (sub-RLM)" : "llm_query"} at depth ${bar.depth}` +
        ` · ${bar.model || "?"} · ${fmtSeconds(bar.latency_s)} · ${fmtInt(tokens(bar.usage))} tokens` +
        ` · ${fmtCost(bar.usage.cost_usd)}`,
      text: `d${bar.depth} ${bar.kind}`,
    });
    node.style.left = `${(bar.start / total) * 100}%`;
    node.style.width = `${width}%`;
    node.style.top = `${bar.lane * 20 + 2}px`;
    box.append(node);
  }
}

function renderNode(node, open) {
  const isRoot = node.depth === 0 && !node.request_id;
  const label = isRoot ? "Root RLM" : `Sub-RLM (rlm_query ${node.request_id})`;
  const usage = node.subtree_usage || node.usage;
  const facts = [
    `depth ${node.depth}`,
    `${node.iterations.length} iteration${node.iterations.length === 1 ? "" : "s"}`,
    `${fmtInt(tokens(usage))} tokens ${node.subtree_usage ? "with its sub-calls" : "of its own model"}`,
    fmtCost(usage.cost_usd),
    `${node.subtree_usage ? "latency" : "span"} ${fmtSeconds(node.latency_s)}`,
  ];
  if (node.tenant) facts.push(`tenant ${node.tenant}`);
  const details = el(
    "details",
    { class: `node depth-${Math.min(node.depth, 5)}`, "data-node-id": node.id, "data-depth": node.depth },
    el(
      "summary",
      {},
      el("span", { class: "node-label", text: label }),
      el("span", { class: "facts", text: facts.join(" · ") }),
    ),
  );
  details.open = open;
  const body = el("div", { class: "node-body" });
  if (node.placed === "missing") {
    body.append(el("p", { class: "muted", text: "The root run's file is not here: these are parts answered by this host." }));
  } else if (node.placed === "time" || node.placed === "unplaced") {
    body.append(el("p", { class: "muted", text: "Placed under its parent by time (the trajectory does not name the parent)." }));
  }
  if (node.subtree_usage) {
    body.append(el("p", { class: "muted", text: `Own root-model calls: ${fmtInt(tokens(node.usage))} tokens, ${fmtCost(node.usage.cost_usd)}; with its sub-calls: ${fmtInt(tokens(node.subtree_usage))} tokens.` }));
  }
  for (const error of node.errors) {
    body.append(el("p", { class: "error", text: `${error.where || "error"}: ${error.error}` }));
  }
  for (const iteration of node.iterations) {
    const calls = node.sub_calls.filter((c) => c.iteration === iteration.index);
    const children = node.children.filter((c) => c.parent_iteration === iteration.index);
    body.append(renderIteration(iteration, calls, children));
  }
  const loose = node.sub_calls.filter((c) => c.iteration === null || c.iteration === undefined);
  if (loose.length) body.append(renderCalls(loose, "Sub-calls (iteration unknown)"));
  for (const child of node.children) {
    if (child.parent_iteration === null || child.parent_iteration === undefined) {
      body.append(renderNode(child, false));
    }
  }
  if (node.last_call) {
    body.append(
      el("h4", { text: "Last call (after max iterations)" }),
      el("pre", { class: "response", text: node.last_call.response || "" }),
    );
  }
  if (node.answer) {
    body.append(
      el("div", { class: "node-answer" },
        el("strong", { text: `Answer (${node.answer.source || "?"}): ` }),
        el("span", { class: "answer-value", text: node.answer.value })),
    );
  }
  details.append(body);
  return details;
}

function renderIteration(iteration, calls, children) {
  const facts = [
    `${fmtInt(tokens(iteration.usage))} tokens`,
    fmtCost(iteration.usage ? iteration.usage.cost_usd : 0),
    `model ${fmtSeconds(iteration.latency_s)}`,
    `${(iteration.code || []).length} code block(s)`,
  ];
  if (calls.length) facts.push(`${calls.length} sub-call(s)`);
  if (children.length) facts.push(`${children.length} sub-RLM(s)`);
  if (iteration.final) facts.push("final");
  const details = el(
    "details",
    { class: "iteration", "data-index": iteration.index },
    el("summary", {}, el("span", { class: "iteration-label", text: `Iteration ${iteration.index + 1}` }), el("span", { class: "facts", text: facts.join(" · ") })),
  );
  details.open = true;
  details.append(el("h4", { text: "Model reply" }), el("pre", { class: "response", text: iteration.response ?? "" }));
  (iteration.code || []).forEach((run, i) => {
    details.append(el("h4", { text: `Code ${i + 1}` + (run.duration_ms !== null ? ` (ran ${fmtSeconds(run.duration_ms / 1000)})` : "") }));
    details.append(el("pre", { class: "code", text: run.code ?? "" }));
    if (run.stdout) details.append(el("h4", { text: "Output" }), el("pre", { class: "stdout", text: run.stdout }));
    if (run.stderr) details.append(el("h4", { text: "Stderr" }), el("pre", { class: "stderr", text: run.stderr }));
    if (run.error) {
      details.append(el("h4", { text: "Error" }), el("pre", { class: "error", text: `${run.error.type}: ${run.error.message}\n${run.error.traceback || ""}` }));
    }
  });
  if (calls.length) details.append(renderCalls(calls, "Sub-calls"));
  for (const child of children) details.append(renderNode(child, false));
  return details;
}

function renderCalls(calls, title) {
  const table = el(
    "table",
    { class: "calls" },
    el("thead", {}, el("tr", {}, ...["Kind", "Depth", "Model", "Start", "Latency", "Tokens", "Cost"].map((h) => el("th", { text: h })))),
  );
  const body = el("tbody");
  for (const call of calls) {
    body.append(
      el(
        "tr",
        { class: "call", "data-kind": call.kind },
        el("td", { text: call.kind === "rlm" ? "rlm_query" : "llm_query" }),
        el("td", { class: "num", text: call.depth }),
        el("td", { text: call.model || "?" }),
        el("td", { class: "num", text: fmtSeconds(call.start) }),
        el("td", { class: "num", text: fmtSeconds(call.latency_s) }),
        el("td", { class: "num", text: fmtInt(tokens(call.usage)) }),
        el("td", { class: "num", text: fmtCost(call.usage.cost_usd) }),
      ),
    );
  }
  table.append(body);
  return el("div", { class: "calls-box" }, el("h4", { text: title }), table);
}

if (document.body.dataset.page === "runs") showRuns();
else if (document.body.dataset.page === "run") showRun();
