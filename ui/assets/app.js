// kiln dashboard: routes by the URL fragment, polls the JSON API
// (ui/src/server.rs), draws charts as SVG. No dependencies, no build step.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "kiln-ui-token";
const PHASES = ["all", "pending", "running", "waiting", "succeeded", "failed", "cancelled"];

let info = { actions: false };
let timer = null;
let generation = 0;

// ----- helpers -----

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (options.body !== undefined) headers["content-type"] = "application/json";
  if (options.method === "POST") {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers["authorization"] = "Bearer " + token;
  }
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { error: text }; }
  if (!response.ok) throw new Error((data && data.error) || response.statusText);
  return data;
}

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

function fmtBytes(n) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toString() : n.toFixed(1)) + " " + units[i];
}

function fmtSecs(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1e3).toFixed(1) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function age(rfc3339, now) {
  if (!rfc3339) return "–";
  const secs = ((now ? Date.parse(now) : Date.now()) - Date.parse(rfc3339)) / 1000;
  return Number.isFinite(secs) ? fmtSecs(Math.max(0, secs)) + " ago" : "–";
}

function phaseBadge(phase) {
  return `<span class="phase phase-${esc(phase)}" data-phase="${esc(phase)}">${esc(phase)}</span>`;
}

function table(headers, rows, attrs = "") {
  const head = headers.map((h) => {
    const [label, cls] = Array.isArray(h) ? h : [h, ""];
    return `<th class="${cls}">${esc(label)}</th>`;
  }).join("");
  const body = rows.length ? rows.join("") : `<tr><td colspan="${headers.length}" class="muted">none</td></tr>`;
  return `<div class="table-wrap"><table ${attrs}><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table></div>`;
}

function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 5000);
}

function main() { return document.getElementById("main"); }

// Runs `load` now and every POLL_MS until the route changes. A load that
// fails shows its error on the page (never an unhandled rejection).
function poll(load) {
  const mine = ++generation;
  const tick = async () => {
    if (mine !== generation) return;
    try {
      await load();
      const err = document.getElementById("poll-error");
      if (err) err.textContent = "";
    } catch (e) {
      const err = document.getElementById("poll-error");
      if (err) err.textContent = "error: " + e.message;
    }
    if (mine === generation) timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

// ----- charts -----

// Draws a line chart into the SVG `svg`: `points` are {x, y, lo, hi}
// (lo/hi: the bucket's min and max, drawn as a band). Records the point count
// in data-points so tests and people can see it grow.
function lineChart(svg, points, opts = {}) {
  const W = 600, H = 180, L = 52, R = 10, T = 10, B = 24;
  const pts = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.dataset.points = String(pts.length);
  if (!pts.length) {
    svg.innerHTML = `<text class="label" x="${W / 2}" y="${H / 2}" text-anchor="middle">no data yet</text>`;
    return;
  }
  const xs = pts.map((p) => p.x);
  const ys = pts.flatMap((p) => [p.y, p.lo ?? p.y, p.hi ?? p.y]).filter(Number.isFinite);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (opts.zero) y0 = Math.min(0, y0);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.1; y0 = y0 - (Math.abs(y0) || 1) * 0.1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const line = pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
  let band = "";
  if (pts.some((p) => Number.isFinite(p.lo) && Number.isFinite(p.hi) && p.hi > p.lo)) {
    const upper = pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.hi ?? p.y).toFixed(1)}`);
    const lower = pts.slice().reverse().map((p) => `${sx(p.x).toFixed(1)},${sy(p.lo ?? p.y).toFixed(1)}`);
    band = `<polygon class="band" points="${upper.concat(lower).join(" ")}"></polygon>`;
  }
  const marks = (opts.marks || []).filter((m) => m >= x0 && m <= x1)
    .map((m) => `<line class="mark" x1="${sx(m)}" x2="${sx(m)}" y1="${T}" y2="${H - B}"></line>`).join("");
  const cls = opts.step ? "step-line" : "line";
  const path = opts.step
    ? `<polyline class="${cls}" points="${pts.map((p, i) => {
        const prev = pts[i - 1];
        const here = `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`;
        return prev ? `${sx(p.x).toFixed(1)},${sy(prev.y).toFixed(1)} ${here}` : here;
      }).join(" ")}"></polyline>`
    : `<polyline class="${cls}" points="${line}"></polyline>`;
  svg.innerHTML = `
    <line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"></line>
    <line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"></line>
    <text class="label" x="${L - 4}" y="${T + 9}" text-anchor="end">${esc(fmtNum(y1, 3))}</text>
    <text class="label" x="${L - 4}" y="${H - B}" text-anchor="end">${esc(fmtNum(y0, 3))}</text>
    <text class="label" x="${L}" y="${H - 6}">${esc(fmtNum(x0, 6))}</text>
    <text class="label" x="${W - R}" y="${H - 6}" text-anchor="end">${esc(fmtNum(x1, 6))} ${esc(opts.xlabel || "")}</text>
    ${marks}${band}${path}`;
}

function chartCard(id, title) {
  return `<div class="card chart"><h3><span>${esc(title)}</span><span class="muted" id="${id}-last"></span></h3>
    <svg id="${id}" role="img" aria-label="${esc(title)}" data-points="0"></svg></div>`;
}

// ----- pages -----

async function jobsPage(params) {
  const phase = params.get("phase") || "all";
  main().innerHTML = `<h1>Jobs</h1>
    <div class="controls"><label for="phase-filter">phase</label>
      <select id="phase-filter">${PHASES.map((p) => `<option ${p === phase ? "selected" : ""}>${p}</option>`).join("")}</select>
      <span id="poll-error" class="error"></span></div>
    <div id="jobs"></div>`;
  document.getElementById("phase-filter").addEventListener("change", (e) => {
    location.hash = "#/jobs" + (e.target.value === "all" ? "" : "?phase=" + e.target.value);
  });
  poll(async () => {
    const data = await api("/api/jobs?phase=" + encodeURIComponent(phase));
    const rows = data.jobs.map((j) => {
      const total = j.total_steps || 0;
      const pct = total ? Math.min(100, (100 * j.step) / total) : 0;
      return `<tr data-job="${esc(j.job)}" data-phase="${esc(j.phase)}">
        <td><a href="#/jobs/${encodeURIComponent(j.job)}">${esc(j.job)}</a></td>
        <td>${phaseBadge(j.phase)}</td>
        <td class="num">${esc(j.world_size || "–")}</td>
        <td><span class="bar"><span data-width="${pct.toFixed(1)}"></span></span>${esc(j.step)}/${esc(total || "?")}</td>
        <td class="num">${esc(fmtNum(j.loss))}</td>
        <td class="num">${j.throughput ? esc(fmtNum(j.throughput, 3)) + " /s" : "–"}</td>
        <td class="num">${j.last_checkpoint ?? "–"}</td>
        <td>${esc(age(j.started_at || j.updated_at, data.now))}</td></tr>`;
    });
    document.getElementById("jobs").innerHTML = table(
      ["job", "phase", ["world", "num"], "step", ["loss", "num"], ["throughput", "num"], ["checkpoint", "num"], "started"],
      rows, 'id="jobs-table"');
    sizeBars();
  });
}

// Widths from data attributes: the content security policy forbids inline styles.
function sizeBars() {
  document.querySelectorAll("[data-width]").forEach((el) => { el.style.width = el.dataset.width + "%"; });
}

const CURVES = [
  ["loss", "loss"],
  ["lr", "learning rate"],
  ["throughput", "throughput (samples/s)"],
  ["grad_norm", "gradient norm"],
  ["allreduce_seconds", "all-reduce time (s)"],
  ["step_seconds", "step time (s)"],
];

async function jobPage(job) {
  main().innerHTML = `<h1>Job <span class="mono">${esc(job)}</span> <span id="job-phase"></span></h1>
    <span id="poll-error" class="error"></span>
    <div id="job-facts" class="facts"></div>
    <div id="job-actions" class="controls"></div>
    <h2>Curves</h2>
    <div class="grid">${CURVES.map(([k, t]) => chartCard("chart-" + k, t)).join("")}</div>
    <h2>Held-out metrics</h2><div id="job-evals" class="card"></div>
    <h2>Rounds</h2>
    <div class="grid"><div>${chartCard("chart-world", "world size by step")}</div><div id="job-rounds" class="card"></div></div>
    <h2>Checkpoints</h2><div id="job-checkpoints" class="card"></div>
    <h2>Events</h2><div id="job-events" class="card"></div>
    <h2>Logs</h2>
    <div class="controls">
      <label>node <input id="logs-node" size="12" placeholder="all"></label>
      <label>rank <input id="logs-rank" size="4" inputmode="numeric" placeholder="all"></label>
      <span class="muted">the newest ${LOG_TAIL} lines; all of them: <code>kiln logs ${esc(job)}</code></span>
    </div>
    <pre id="job-logs" class="card logs" data-lines="0"></pre>`;
  const path = "/api/jobs/" + encodeURIComponent(job);
  let rootShown = null;
  poll(async () => {
    const [detail, history] = await Promise.all([api(path), api(path + "/history")]);
    const s = detail.status;
    document.getElementById("job-phase").innerHTML = phaseBadge(s.phase);
    const facts = [
      ["step", `${s.step} / ${s.total_steps || "?"}`],
      ["loss", fmtNum(s.loss)],
      ["throughput", s.throughput ? fmtNum(s.throughput, 3) + " samples/s" : "–"],
      ["world size", s.world_size || "–"],
      ["round", s.round || "–"],
      ["last checkpoint", s.last_checkpoint ? "step " + s.last_checkpoint.step : "–"],
      ["started", s.started_at ? age(s.started_at) : "–"],
      ["finished", s.finished_at ? age(s.finished_at) : "–"],
    ];
    if (s.message) facts.push(["message", s.message]);
    document.getElementById("job-facts").innerHTML = facts
      .map(([k, v]) => `<div class="fact"><div class="k">${esc(k)}</div><div class="v">${esc(v)}</div></div>`).join("");

    const cancellable = info.actions && !["succeeded", "failed", "cancelled"].includes(s.phase) && s.runner !== "kiln run";
    const actions = document.getElementById("job-actions");
    if (cancellable && !actions.dataset.ready) {
      actions.dataset.ready = "1";
      actions.innerHTML = `<button class="danger" id="cancel-job">cancel job</button>`;
      document.getElementById("cancel-job").addEventListener("click", async () => {
        if (!confirm(`Cancel job ${job}?`)) return;
        try { await api(path + "/cancel", { method: "POST", body: {} }); toast("cancel requested"); }
        catch (e) { toast("cancel: " + e.message); }
      });
    } else if (!cancellable) {
      actions.innerHTML = "";
      delete actions.dataset.ready;
    }

    const buckets = history.series.buckets || [];
    const checkpointSteps = (history.checkpoints || []).map((c) => c.step);
    for (const [k] of CURVES) {
      const points = buckets.filter((b) => b.metrics[k]).map((b) => ({
        x: b.last_step, y: b.metrics[k].last, lo: b.metrics[k].min, hi: b.metrics[k].max,
      }));
      const svg = document.getElementById("chart-" + k);
      lineChart(svg, points, { xlabel: "step", marks: k === "loss" ? checkpointSteps : [] });
      // Steps the curve stands for (buckets merge as the job runs, points do not only grow).
      svg.dataset.samples = String(buckets.filter((b) => b.metrics[k]).reduce((a, b) => a + b.count, 0));
      svg.dataset.lastStep = String(points.length ? points[points.length - 1].x : 0);
      const last = points.length ? points[points.length - 1].y : null;
      document.getElementById(`chart-${k}-last`).textContent = last === null ? "" : fmtNum(last);
    }

    const evals = history.evals || [];
    const names = [...new Set(evals.flatMap((e) => Object.keys(e.metrics)))].sort();
    document.getElementById("job-evals").innerHTML = table(["step", ...names.map((n) => [n, "num"])],
      evals.slice().reverse().map((e) => `<tr><td>${e.step}</td>${names.map((n) => `<td class="num">${esc(fmtNum(e.metrics[n]))}</td>`).join("")}</tr>`));

    const rounds = history.rounds || [];
    lineChart(document.getElementById("chart-world"), rounds.map((r) => ({ x: r.step, y: r.world_size }))
      .concat(rounds.length ? [{ x: Math.max(s.step, rounds[rounds.length - 1].step), y: rounds[rounds.length - 1].world_size }] : []),
      { step: true, zero: true, xlabel: "step" });
    document.getElementById("job-rounds").innerHTML = table(
      ["round", ["world", "num"], ["from step", "num"], "state from", ["recovery", "num"], "at"],
      rounds.slice().reverse().map((r, i) => `<tr><td>${r.round}</td><td class="num">${r.world_size}</td><td class="num">${r.step}</td>
        <td>${esc(r.state_source || "–")}</td><td class="num">${i === rounds.length - 1 ? "start " : ""}${esc(fmtSecs(r.setup_seconds))}</td>
        <td>${esc(new Date(r.at * 1000).toLocaleTimeString())}</td></tr>`));

    const root = s.checkpoint_root;
    if (root && rootShown === null) rootShown = root;
    await jobCheckpoints(history.checkpoints || [], root);

    await jobLogs(path);

    document.getElementById("job-events").innerHTML = table(["at", "kind", "node", "detail"],
      (s.events || []).slice().reverse().map((e) => `<tr><td>${esc(e.at)}</td><td>${esc(e.kind)}</td><td>${esc(e.node)}</td><td class="wrap">${esc(e.detail)}</td></tr>`));
  });
}

const LOG_TAIL = 300;

// The job's worker logs (newest LOG_TAIL lines), filtered by node and rank;
// stays scrolled to the end unless the reader scrolled up.
async function jobLogs(path) {
  const pre = document.getElementById("job-logs");
  if (!pre) return;
  const params = new URLSearchParams({ tail: String(LOG_TAIL) });
  const node = document.getElementById("logs-node").value.trim();
  const rank = document.getElementById("logs-rank").value.trim();
  if (node) params.set("node", node);
  if (/^[0-9]+$/.test(rank)) params.set("rank", rank);
  const logs = await api(path + "/logs?" + params.toString());
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.textContent = logs.lines.length
    ? logs.lines.map((l) => `${l.time.slice(11, 23)} ${l.node} r${l.rank ?? "-"} ${l.stream} ${l.text}`).join("\n")
    : "no lines yet";
  pre.dataset.lines = String(logs.lines.length);
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

async function jobCheckpoints(saved, root) {
  let manifests = [];
  let rootError = "";
  if (root) {
    try { manifests = (await api("/api/checkpoints/root?url=" + encodeURIComponent(root))).manifests; }
    catch (e) { rootError = e.message; }
  }
  const bySaved = new Map(saved.map((c) => [c.step, c]));
  const steps = [...new Set(manifests.map((m) => m.step).concat(saved.map((c) => c.step)))].filter((x) => x !== null).sort((a, b) => b - a);
  const rows = steps.map((step) => {
    const m = manifests.find((x) => x.step === step);
    const c = bySaved.get(step);
    const v = m && m.verify;
    const verify = v ? `<span class="${v.ok ? "ok" : "bad"}">${v.ok ? "ok" : "bad"}</span>` : (m ? `<button data-verify="${esc(m.key)}">verify</button>` : "–");
    return `<tr data-step="${step}"><td>${step}</td>
      <td class="num">${esc(fmtBytes(m ? m.raw_bytes : null))}</td>
      <td class="num">${esc(fmtBytes(m ? m.stored_bytes : null))}</td>
      <td class="num">${esc(fmtBytes(c ? c.bytes_reused : m ? m.reused_bytes : null))}</td>
      <td class="num">${esc(fmtBytes(c ? c.bytes_uploaded : m ? m.uploaded_bytes : null))}</td>
      <td class="num">${c ? esc(fmtSecs(c.blocking_seconds)) : "–"}</td>
      <td>${esc(c ? c.codec : (m ? m.codec.join(",") : ""))}</td>
      <td>${verify}${m && m.is_latest ? ' <span class="muted">latest</span>' : ""}</td></tr>`;
  });
  const el = document.getElementById("job-checkpoints");
  el.innerHTML = (root ? `<p class="muted">root <a href="#/checkpoints?url=${encodeURIComponent(root)}" class="mono">${esc(root)}</a></p>` : "")
    + (rootError ? `<p class="error">${esc(rootError)}</p>` : "")
    + table(["step", ["size", "num"], ["stored", "num"], ["reused", "num"], ["uploaded", "num"], ["blocked", "num"], "codec", "verify"], rows);
  el.querySelectorAll("[data-verify]").forEach((b) => b.addEventListener("click", () => verifyManifest(root, b.dataset.verify, b)));
}

async function verifyManifest(root, key, button) {
  button.disabled = true;
  button.textContent = "verifying…";
  try {
    const v = await api("/api/checkpoints/verify", { method: "POST", body: { url: root, key } });
    button.outerHTML = `<span class="${v.ok ? "ok" : "bad"}">${v.ok ? "ok" : "bad: " + esc(v.error || v.bad_chunks + " bad chunks")}</span>`;
  } catch (e) {
    toast("verify: " + e.message);
    button.disabled = false;
    button.textContent = "verify";
  }
}

async function checkpointsPage(params) {
  const { roots } = await api("/api/checkpoints");
  const url = params.get("url") || roots[0] || "";
  const key = params.get("key");
  main().innerHTML = `<h1>Checkpoints</h1>
    <div class="controls"><label for="root-pick">root</label>
      <select id="root-pick">${roots.map((r) => `<option ${r === url ? "selected" : ""}>${esc(r)}</option>`).join("")}</select></div>
    <div id="root"></div>`;
  document.getElementById("root-pick").addEventListener("change", (e) => {
    location.hash = "#/checkpoints?url=" + encodeURIComponent(e.target.value);
  });
  const el = document.getElementById("root");
  if (!url) {
    el.innerHTML = `<p class="muted">No checkpoint roots known: start <code>kiln ui --checkpoints URL</code>, or run a job.</p>`;
    return;
  }
  if (key) return manifestView(el, url, key);
  const r = await api("/api/checkpoints/root?url=" + encodeURIComponent(url));
  const facts = [
    ["checkpoints", r.manifests.length],
    ["state bytes (sum)", fmtBytes(r.logical_bytes)],
    ["stored (distinct chunks)", fmtBytes(r.unique_stored_bytes)],
    ["dedup ratio", r.dedup_ratio ? r.dedup_ratio.toFixed(2) + "×" : "–"],
  ];
  el.innerHTML = `<div class="facts" id="root-facts">${facts.map(([k, v]) => `<div class="fact"><div class="k">${esc(k)}</div><div class="v">${esc(v)}</div></div>`).join("")}</div>
    <h2>Manifests</h2>` + table(
    ["step", "job", "created", ["world", "num"], ["tensors", "num"], ["size", "num"], ["stored", "num"], ["reused", "num"], "verify", ""],
    r.manifests.slice().reverse().map((m) => `<tr data-key="${esc(m.key)}"><td>${m.step ?? "?"}</td><td>${esc(m.job || "")}</td><td>${esc(m.created_at || "")}</td>
      <td class="num">${m.world_size ?? ""}</td><td class="num">${m.tensors}</td><td class="num">${esc(fmtBytes(m.raw_bytes))}</td>
      <td class="num">${esc(fmtBytes(m.stored_bytes))}</td><td class="num">${esc(fmtBytes(m.reused_bytes))}</td>
      <td>${m.error ? `<span class="bad">${esc(m.error)}</span>` : m.verify ? `<span class="${m.verify.ok ? "ok" : "bad"}">${m.verify.ok ? "ok" : "bad"}</span>` : `<button data-verify="${esc(m.key)}">verify</button>`}${m.is_latest ? ' <span class="muted">latest</span>' : ""}</td>
      <td><a href="#/checkpoints?url=${encodeURIComponent(url)}&key=${encodeURIComponent(m.key)}">tensors</a></td></tr>`),
    'id="manifests-table"');
  el.querySelectorAll("[data-verify]").forEach((b) => b.addEventListener("click", () => verifyManifest(url, b.dataset.verify, b)));
}

async function manifestView(el, url, key) {
  const m = await api(`/api/checkpoints/manifest?url=${encodeURIComponent(url)}&key=${encodeURIComponent(key)}`);
  const facts = [
    ["step", m.step], ["job", m.job], ["world size", m.world_size], ["created", m.created_at],
    ["size", fmtBytes(m.totals.raw_bytes)], ["stored", fmtBytes(m.totals.stored_bytes)],
    ["uploaded", fmtBytes(m.totals.uploaded_bytes)], ["code", m.code_version], ["data", m.dataset_fingerprint],
    ...Object.entries(m.metrics).map(([k, v]) => [k, fmtNum(v)]),
  ];
  el.innerHTML = `<p><a href="#/checkpoints?url=${encodeURIComponent(url)}">← all checkpoints</a> · <span class="mono">${esc(key)}</span></p>
    <div class="facts">${facts.map(([k, v]) => `<div class="fact"><div class="k">${esc(k)}</div><div class="v">${esc(v)}</div></div>`).join("")}</div>
    <div class="controls"><span id="verify-slot">${m.verify ? `<span class="${m.verify.ok ? "ok" : "bad"}">verified ${m.verify.ok ? "ok" : "bad"}</span>` : `<button data-verify="${esc(key)}">verify</button>`}</span></div>
    <h2>Tensors</h2>` + table(["name", "dtype", "shape", ["size", "num"], ["stored", "num"], ["chunks", "num"]],
    m.tensors.map((t) => `<tr><td class="mono">${esc(t.name)}</td><td>${esc(t.dtype)}</td><td>[${esc(t.shape.join(", "))}]</td>
      <td class="num">${esc(fmtBytes(t.raw_bytes))}</td><td class="num">${esc(fmtBytes(t.stored_bytes))}</td><td class="num">${t.chunks}</td></tr>`));
  el.querySelectorAll("[data-verify]").forEach((b) => b.addEventListener("click", () => verifyManifest(url, b.dataset.verify, b)));
}

function weightsBar(targets) {
  return `<div class="weights">${targets.map((t) => `<span data-width="${t.weight}" title="v${t.version} ${t.weight}%"></span>`).join("")}</div>`;
}

async function registryPage() {
  main().innerHTML = `<h1>Registry</h1><span id="poll-error" class="error"></span><div id="registries"></div>`;
  poll(async () => {
    const { registries } = await api("/api/registry");
    const el = document.getElementById("registries");
    if (el.querySelector("input:focus, select:focus")) return; // do not redraw under the user's typing
    if (!registries.length) {
      el.innerHTML = `<p class="muted">No registry known: start <code>kiln ui --registry URL</code>, or run a job that registers its model.</p>`;
      return;
    }
    el.innerHTML = registries.map((r) => `<div class="card"><h2 class="mono">${esc(r.url)}</h2>
      ${r.error ? `<p class="error">${esc(r.error)}</p>` : ""}
      ${r.models.length ? "" : '<p class="muted">no models yet</p>'}
      ${r.models.map((m) => modelView(r.url, m)).join("")}</div>`).join("");
    sizeBars();
    el.querySelectorAll("form[data-promote]").forEach((f) => f.addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = {
        registry: f.dataset.registry, model: f.dataset.model, alias: f.elements.alias.value,
        version: Number(f.elements.version.value),
      };
      const w = Number(f.elements.weight.value);
      if (w && w !== 100) body.weight = w;
      try { await api("/api/registry/promote", { method: "POST", body }); toast("promoted"); }
      catch (err) { toast("promote: " + err.message); }
    }));
    el.querySelectorAll("button[data-rollback]").forEach((b) => b.addEventListener("click", async () => {
      if (!confirm(`Roll back alias ${b.dataset.alias} of ${b.dataset.model}?`)) return;
      try {
        await api("/api/registry/rollback", { method: "POST", body: { registry: b.dataset.registry, model: b.dataset.model, alias: b.dataset.alias } });
        toast("rolled back");
      } catch (err) { toast("rollback: " + err.message); }
    }));
  });
}

function modelView(registry, m) {
  const aliases = m.aliases.map((a) => `<tr data-alias="${esc(a.alias)}" data-model="${esc(m.name)}">
    <td>${esc(a.alias)}</td>
    <td class="wrap"><span class="alias-targets">${a.targets.map((t) => `v${t.version} ${t.weight}%`).join(" · ")}</span>${weightsBar(a.targets)}</td>
    <td>${esc(a.updated_at)} by ${esc(a.updated_by)}</td>
    <td>${info.actions && a.previous ? `<button class="danger" data-rollback data-registry="${esc(registry)}" data-model="${esc(m.name)}" data-alias="${esc(a.alias)}">roll back</button>` : ""}</td></tr>`);
  const versions = m.versions.map((v) => `<tr data-version="${v.version}"><td>${v.version}</td><td>${esc(v.created_at)}</td>
    <td class="wrap">${Object.entries(v.metrics).map(([k, x]) => `${esc(k)} ${esc(fmtNum(x))}`).join(", ")}</td>
    <td class="wrap mono">${esc(v.checkpoint.root)} @ step ${v.checkpoint.step}
      → job <a href="#/jobs/${encodeURIComponent(v.lineage.job)}">${esc(v.lineage.job)}</a>
      → spec ${esc(v.lineage.spec_hash.slice(0, 12))} → data ${esc(v.lineage.dataset_fingerprint.slice(0, 12))}</td></tr>`);
  const audit = m.audit.slice(0, 20).map((e) => `<tr><td>${e.seq}</td><td>${esc(e.at)}</td><td>${esc(e.actor)}</td><td>${esc(e.action)}${e.alias ? " " + esc(e.alias) : ""}</td>
    <td class="wrap mono">${esc(JSON.stringify(e.to))}</td></tr>`);
  const promote = info.actions ? `<form class="controls" data-promote data-registry="${esc(registry)}" data-model="${esc(m.name)}">
      promote version <input name="version" type="number" min="1" value="${m.versions.length ? m.versions[0].version : 1}" size="4">
      to alias <input name="alias" value="${esc(m.aliases.length ? m.aliases[0].alias : "production")}" size="10">
      weight <input name="weight" type="number" min="1" max="100" value="100" size="4">%
      <button type="submit">promote</button></form>` : "";
  return `<h3>${esc(m.name)}</h3>
    <h3 class="muted">aliases</h3>${table(["alias", "versions", "moved", ""], aliases, 'class="aliases"')}
    ${promote}
    <h3 class="muted">versions</h3>${table(["version", "created", "metrics", "lineage: checkpoint → job → spec → data"], versions)}
    <h3 class="muted">audit log</h3>${table(["#", "at", "actor", "action", "to"], audit)}`;
}

async function servingPage() {
  main().innerHTML = `<h1>Serving</h1><span id="poll-error" class="error"></span><div id="servers"></div>`;
  const rates = new Map(); // url|model|version -> [{x: time, y: rate}]
  const started = Date.now();
  poll(async () => {
    const { servers } = await api("/api/serving");
    const el = document.getElementById("servers");
    if (!servers.length) {
      el.innerHTML = `<p class="muted">No server configured: start <code>kiln ui --serve-url http://HOST:PORT</code>.</p>`;
      return;
    }
    el.innerHTML = servers.map((s, i) => {
      const rows = s.versions.map((v) => {
        const drift = Object.entries(v.drift_share).map(([c, x]) => `${esc(c)} ${esc(fmtNum(x, 3))}`).join(", ");
        const detected = v.drift_detected.length ? ` <span class="bad">drift: ${esc(v.drift_detected.join(", "))}</span>` : "";
        return `<tr data-model="${esc(v.model)}" data-version="${esc(v.version)}"><td>${esc(v.model)}</td><td>${esc(v.version || "(none)")}</td>
          <td class="num">${v.weight ?? "–"}${v.weight !== null && v.weight !== undefined ? "%" : ""}</td>
          <td class="num">${esc(v.requests_total)}</td><td class="num">${v.request_rate === null ? "–" : esc(fmtNum(v.request_rate, 3)) + " /s"}</td>
          <td class="num">${esc(v.errors_total)}</td><td class="num">${esc(fmtSecs(v.p50_seconds))}</td><td class="num">${esc(fmtSecs(v.p99_seconds))}</td>
          <td class="num">${esc(fmtNum(v.mean_batch_size, 3))}</td><td class="wrap">${drift || "–"}${detected}</td></tr>`;
      });
      return `<div class="card"><h2 class="mono">${esc(s.url)}</h2>${s.error ? `<p class="error">${esc(s.error)}</p>` : ""}
        <p class="muted">open connections ${esc(s.open_connections ?? "–")} · in flight ${esc(s.in_flight_requests ?? "–")}</p>
        ${table(["model", "version", ["weight", "num"], ["requests", "num"], ["rate", "num"], ["errors", "num"], ["p50", "num"], ["p99", "num"], ["batch", "num"], "drift"], rows, 'class="serving-table"')}
        ${chartCard("chart-rate-" + i, "requests per second (all versions)")}</div>`;
    }).join("");
    servers.forEach((s, i) => {
      const total = s.versions.reduce((a, v) => a + (v.request_rate || 0), 0);
      const series = rates.get(s.url) || [];
      if (s.window_seconds) series.push({ x: (Date.now() - started) / 1000, y: total });
      rates.set(s.url, series.slice(-300));
      lineChart(document.getElementById("chart-rate-" + i), rates.get(s.url), { zero: true, xlabel: "s" });
    });
  });
}

// ----- routing -----

async function route() {
  clearTimeout(timer);
  generation++;
  const hash = location.hash || "#/jobs";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  const page = parts[0] || "jobs";
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === page));
  try {
    if (page === "jobs" && parts[1]) await jobPage(decodeURIComponent(parts[1]));
    else if (page === "checkpoints") await checkpointsPage(params);
    else if (page === "registry") await registryPage();
    else if (page === "serving") await servingPage();
    else await jobsPage(params);
  } catch (e) {
    main().innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

async function start() {
  try { info = await api("/api/info"); } catch (e) { info = { actions: false }; }
  const form = document.getElementById("token-form");
  if (info.actions) {
    form.hidden = false;
    const input = document.getElementById("token");
    input.value = sessionStorage.getItem(TOKEN_KEY) || "";
    input.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, input.value.trim()));
    form.addEventListener("submit", (e) => { e.preventDefault(); sessionStorage.setItem(TOKEN_KEY, input.value.trim()); toast("token set"); });
  }
  window.addEventListener("hashchange", route);
  route();
}

start();
