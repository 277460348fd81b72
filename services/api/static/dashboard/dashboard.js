// Tandem dashboard: reads /v1/dashboard/* with the user's API key (kept in sessionStorage).
// Everything from the API is written with textContent, never parsed as HTML, except the
// evaluation table, which the server renders from its own table.md with escaping.
"use strict";

const KEY_NAME = "tandem.apiKey";
const REFRESH_MS = 5000;
const ACTIVE_BATCH = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];

const $ = (id) => document.getElementById(id);
let timer = null;
let plotUrl = null;

class AuthError extends Error {}

async function api(path, as = "json") {
  const key = sessionStorage.getItem(KEY_NAME);
  const response = await fetch(path, { headers: { Authorization: `Bearer ${key}` } });
  if (response.status === 401) throw new AuthError("the API key was refused");
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(detail);
  }
  return as === "blob" ? response.blob() : response.json();
}

// --- small DOM helpers -----------------------------------------------------------------

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell ?? "";
    tr.appendChild(td);
  }
  return tr;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

const tflops = (x) => (x === null || x === undefined ? "" : Number(x).toPrecision(4));
const pct = (x) => `${(100 * x).toFixed(1)}%`;
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const shortId = (id) => (id ? id.replace(/^(job|batch)_/, "").slice(0, 10) : "");

function badge(status) {
  return el("span", status, `badge status-${status}`);
}

function progressBar(fraction, label) {
  const outer = el("div", null, "progress");
  const inner = el("div", null, "progress-fill");
  inner.style.width = `${Math.round(100 * fraction)}%`;
  outer.appendChild(inner);
  outer.appendChild(el("span", label, "progress-label"));
  return outer;
}

// --- overview ---------------------------------------------------------------------------

function renderCounts(jobs, hours) {
  $("window").textContent = `(last ${hours} h)`;
  const tiles = STATUSES.map((status) => tile(status, jobs.counts[status], status));
  tiles.push(tile("generated tokens", jobs.generated_tokens, "tokens"));
  tiles.push(tile("TFLOPs", tflops(jobs.tflops), "tflops"));
  $("counts").replaceChildren(...tiles);
}

function tile(label, value, name) {
  const box = el("div", null, "tile");
  const number = el("div", value, "tile-value");
  number.dataset.testid = `count-${name}`;
  box.append(number, el("div", label, "tile-label"));
  return box;
}

function renderStrategies(strategies) {
  fill($("strategies").tBodies[0], strategies.map((s) =>
    row([s.strategy, s.succeeded, tflops(s.mean_tflops), s.mean_generated_tokens])));
}

function renderBatches(batches) {
  $("no-batches").hidden = batches.length > 0;
  $("batches").hidden = batches.length === 0;
  fill($("batches").tBodies[0], batches.map((b) => {
    const tr = row([
      el("code", shortId(b.id)), badge(b.status),
      progressBar(b.progress, `${b.done} / ${b.total}`),
      b.counts.queued, b.counts.running, b.counts.succeeded, b.counts.failed,
      b.cost.generated_tokens, tflops(b.cost.tflops), when(b.created_at),
    ]);
    tr.dataset.batch = b.id;
    tr.title = b.id;
    return tr;
  }));
}

function renderJobs(jobs) {
  fill($("jobs").tBodies[0], jobs.map((j) => {
    const link = el("a", shortId(j.id));
    link.href = `#job=${encodeURIComponent(j.id)}`;
    link.title = j.id;
    const tr = row([
      link, j.strategy, badge(j.status), el("span", j.question, "question-cell"), j.answer,
      j.stopped_at_stage ?? "", j.generated_tokens, tflops(j.tflops), when(j.created_at),
    ]);
    tr.dataset.job = j.id;
    return tr;
  }));
}

function renderReportBrief(report) {
  const brief = $("report-brief");
  brief.replaceChildren();
  if (!report.available) {
    brief.textContent = report.configured
      ? "No evaluation report found in the reports directory yet (run `tandem eval --out ...`)."
      : "No evaluation reports directory configured (TANDEM_EVAL_DIR).";
    return;
  }
  brief.append(`Latest report: ${report.name} (${report.dataset}, ${when(report.generated_at)}) `);
  const link = el("a", "open the latest evaluation report");
  link.id = "report-link";
  link.href = "#report";
  brief.appendChild(link);
}

async function loadOverview() {
  const data = await api("/v1/dashboard/overview");
  renderCounts(data.jobs, data.window_hours);
  renderStrategies(data.strategies);
  renderBatches(data.batches);
  renderJobs(data.recent_jobs);
  renderReportBrief(data.report);
  return data.batches.some((b) => ACTIVE_BATCH.has(b.status))
    || data.jobs.counts.queued + data.jobs.counts.running > 0;
}

// --- a job's timeline ---------------------------------------------------------------------

function decisionText(stage) {
  if (stage.decision) {
    const d = stage.decision;
    return `p=${Number(d.probability).toFixed(3)} vs ${d.threshold}: ${d.verdict}`;
  }
  return stage.finish_reason || "";
}

function savingText(saving) {
  if (saving.basis === "self" || saving.basis === "unknown") return saving.explanation;
  const sign = saving.saving >= 0 ? "saves" : "costs more:";
  return `${sign} ${pct(Math.abs(saving.saving))} (${tflops(saving.tflops)} vs ` +
    `${tflops(saving.coordinator_alone_tflops)} TFLOPs); ${saving.explanation}`;
}

function renderTimeline(job) {
  const most = Math.max(1, ...job.stages.map((s) => s.generated_tokens));
  fill($("timeline").tBodies[0], job.stages.map((s) => {
    const bar = el("div", null, `bar role-${s.role}`);
    const share = (100 * s.generated_tokens) / most;
    bar.style.width = s.generated_tokens > 0 ? `${Math.max(2, Math.round(share))}%` : "0";
    const tr = row([
      s.seq, s.kind, s.model, s.note, s.generated_tokens, bar, tflops(s.tflops),
      tflops(s.prefill_tflops), `${s.latency_s.toFixed(2)} s`, decisionText(s),
    ]);
    tr.dataset.stage = s.kind;
    if (job.stop.seq === s.seq) tr.classList.add("stopped-here");
    return tr;
  }));
}

async function loadJob(id) {
  const job = await api(`/v1/dashboard/jobs/${encodeURIComponent(id)}`);
  $("job").hidden = false;
  $("job-id").textContent = job.id;
  $("job-status").replaceWith(Object.assign(badge(job.status), { id: "job-status" }));
  $("job-question").textContent = job.question;
  $("job-strategy").textContent = job.strategy;
  $("job-answer").textContent = job.answer ?? (job.error ? `error: ${job.error}` : "—");
  $("job-stop").textContent = job.stop.stage === null || job.stop.stage === undefined
    ? job.stop.reason : `stage ${job.stop.stage}: ${job.stop.reason}`;
  $("job-cost").textContent = `${job.totals.generated_tokens} generated tokens, ` +
    `${tflops(job.totals.tflops)} TFLOPs (+ ${tflops(job.totals.prefill_tflops)} prefill)`;
  $("job-saving").textContent = savingText(job.saving);
  renderTimeline(job);
  return job.status === "queued" || job.status === "running";
}

// --- the evaluation report -----------------------------------------------------------------

async function loadReport() {
  const report = await api("/v1/dashboard/report");
  const box = $("report-table");
  // Server-rendered from table.md with every text escaped (see services/api/dashboard.py).
  box.innerHTML = report.table_html;
  $("report").hidden = false;
  if (report.pareto_url) {
    const blob = await api(report.pareto_url, "blob");
    if (plotUrl) URL.revokeObjectURL(plotUrl);
    plotUrl = URL.createObjectURL(blob);
    $("report-plot").src = plotUrl;
    $("report-plot").hidden = false;
  }
}

// --- the page's life ---------------------------------------------------------------------------

function route() {
  const hash = decodeURIComponent(location.hash.slice(1));
  return {
    job: hash.startsWith("job=") ? hash.slice(4) : null,
    report: hash === "report",
  };
}

async function refresh() {
  clearTimeout(timer);
  const { job, report } = route();
  try {
    let active = await loadOverview();
    if (job) active = (await loadJob(job)) || active; else $("job").hidden = true;
    if (report && $("report").hidden) await loadReport();
    $("error").textContent = "";
    $("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (active) timer = setTimeout(refresh, REFRESH_MS);
  } catch (error) {
    if (error instanceof AuthError) return logout(error.message);
    $("error").textContent = error.message;
    timer = setTimeout(refresh, REFRESH_MS * 2);
  }
}

function showApp(on) {
  $("login").hidden = on;
  $("app").hidden = !on;
  $("refresh").hidden = !on;
  $("forget").hidden = !on;
}

function logout(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(KEY_NAME);
  $("login-error").textContent = message || "";
  showApp(false);
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_NAME, $("key").value.trim());
    $("key").value = "";
    $("login-error").textContent = "";
    showApp(true);
    refresh();
  });
  $("forget").addEventListener("click", () => logout("Key forgotten."));
  $("refresh").addEventListener("click", refresh);
  window.addEventListener("hashchange", () => {
    if (route().job) $("job").scrollIntoView();
    refresh();
  });
  if (sessionStorage.getItem(KEY_NAME)) {
    showApp(true);
    refresh();
  } else {
    showApp(false);
  }
}

document.addEventListener("DOMContentLoaded", start);
