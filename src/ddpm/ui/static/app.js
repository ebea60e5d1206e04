// The page: a client of the JSON API in ddpm/ui/app.py. No framework, nothing fetched from elsewhere.
"use strict";

const $ = sel => document.querySelector(sel);
const state = {meta: null, runs: [], run: null, job: null, frames: [], trainAfter: -1, trainRecords: [],
               trainTimer: null, schedules: null};
const DEAD = "the ddpm ui server is not answering (stopped?)";
const RUNS_EVERY_MS = 3000;  // the header's checkpoint and training state follow the run folders
const FORWARD_WAIT_MS = 80;  // a slider drag asks for the picture of the t it rests at, not every t passed
window.ddpmTimings = {};  // click -> first frame, read by the browser test and bench/ui_latency.py

// The token `ddpm ui` printed at start (off loopback), from the address opened; sent as a header
// on every request. The header also marks a request as the page's own: another site's page
// cannot set it without the server's leave (it answers no CORS preflight).
const TOKEN = (() => {
  const given = new URLSearchParams(location.search).get("token");
  if (given) sessionStorage.setItem("ddpm-token", given);
  return given || sessionStorage.getItem("ddpm-token") || "";
})();

function showError(msg) { const e = $("#error"); e.textContent = msg; e.hidden = !msg; }

// fetch, with the server's one-line message for an answer that is not ok, and a plain sentence
// for a server that does not answer at all (fetch itself says only "Failed to fetch")
async function request(path, opts) {
  let r;
  opts = {...opts, headers: {...(opts?.headers || {}), "X-DDPM-Token": TOKEN}};
  try { r = await fetch(path, opts); } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error(DEAD);
  }
  if (r.ok) return r;
  const body = r.headers.get("content-type")?.includes("json") ? await r.json().catch(() => null) : null;
  throw new Error(body?.error || `${r.status} ${r.statusText}`);
}

async function api(path, opts) {
  const r = await request(path, opts);
  return r.headers.get("content-type")?.includes("json") ? r.json() : null;
}

function postJSON(path, obj) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(obj)});
}

// an image for the run picked, decoded by the server once at the run's size
function uploadImage(file, run) {
  return api(`/api/upload?run=${encodeURIComponent(run?.name || "")}`, {method: "POST", body: file});
}

// ---- runs and tabs ----
function currentRun() { return state.runs.find(r => r.name === $("#run").value) || null; }

async function loadRuns() {
  state.meta = await api("/api/meta");
  state.runs = (await api("/api/runs")).runs;
  fillRunSelect();
  if (!state.runs.length) showError("No run folders found: start `ddpm ui RUN` or put runs under --runs.");
  fillSamplerSelects();
  onRunChange();
  setInterval(refreshRuns, RUNS_EVERY_MS);
}

function fillRunSelect() {
  const sel = $("#run"), picked = sel.value;
  sel.innerHTML = "";
  for (const r of state.runs) sel.add(new Option(r.name + (r.checkpoint ? "" : " (no checkpoint yet)"), r.name));
  if (state.runs.some(r => r.name === picked)) sel.value = picked;
}

// The run folders change while the page is open (a checkpoint written, training ended): the
// header and the run list follow, without touching the forms or what is drawn.
async function refreshRuns() {
  if (document.hidden) return;
  let runs;
  try { runs = (await api("/api/runs")).runs; } catch (err) { return; }  // the next poll tries again
  const names = rs => rs.map(r => r.name + ":" + r.checkpoint).join("|");
  const changed = names(runs) !== names(state.runs);
  const picked = $("#run").value;
  state.runs = runs;
  if (changed) fillRunSelect();
  if ($("#run").value !== picked) { onRunChange(); return; }  // the run picked is gone
  state.run = currentRun();
  showRunInfo(state.run);
}

function showRunInfo(r) {
  $("#run-info").textContent = r && r.config
    ? `${r.preset}: ${r.image_size}x${r.image_size}, ` +
      (r.process === "vp" ? `T=${r.T}, ${r.schedule} schedule` : `${r.process} process`) + `, ${r.objective}` +
      (r.checkpoint ? `, ${r.checkpoint}` : ", no checkpoint yet") + (r.training ? " · training now" : "") : "";
}

function fillSamplerSelects() {
  const f = $("#sample-form");
  for (const s of state.meta.samplers) f.sampler.add(new Option(s.name, s.name));
  for (const p of state.meta.precisions) f.precision.add(new Option(p, p, p === "fp32", p === "fp32"));
  f.sampler.value = "ddim";
  $("nav button[data-tab=edit]").hidden = !state.meta.edit;
  if (state.meta.edit) setupEdit();
  addCompareRow("ddim", 20); addCompareRow("dpm++2m", 10);
}

function onRunChange() {
  const r = currentRun();
  detachJob();  // the old run's sample must not go on drawing under the new run's name
  clearSample();
  $("#compare-out").innerHTML = "";
  for (const id of ["#fwd-img", "#edit-xt", "#edit-x0", "#edit-result"]) $(id).removeAttribute("src");
  $("#edit-downloads").hidden = true; $("#edit-status").textContent = "";
  state.run = r;
  showRunInfo(r);
  setupConditional(r);
  if (r && r.student) {  // a distilled student samples as it was trained
    const f = $("#sample-form");
    f.sampler.value = r.student.sampler; f.steps.value = r.student.steps;
  }
  state.schedules = null; state.trainAfter = -1; state.trainRecords = [];
  const tab = document.querySelector("nav button.active").dataset.tab;
  if (tab === "forward") openForward();
  if (tab === "training") openTraining();
  if (tab === "edit") openEdit();
}

function setupConditional(r) {
  const ag = document.querySelector("#sample-form .ag");  // autoguidance: runs that kept a guiding model
  ag.hidden = !(r && r.guide && state.meta.fields.includes("autoguidance"));
  const f = $("#sample-form"), cond = document.querySelector("#sample-form .cond");
  const ok = r && r.num_classes > 0 && ["classes", "guidance"].every(k => state.meta.fields.includes(k));
  cond.hidden = !ok;
  f.classes.innerHTML = "";
  if (!ok) return;
  f.classes.add(new Option("any (drawn as in training)", ""));  // the default: labels in the data's proportions
  (r.class_names.length ? r.class_names : [...Array(r.num_classes).keys()].map(String))
    .forEach(name => f.classes.add(new Option(name, name)));
  f.classes.add(new Option("all (a row each)", "all"));
  f.classes.add(new Option("none (the null class)", "none"));
}

function switchTab(name) {
  document.querySelectorAll("nav button").forEach(b => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".panel").forEach(p => { p.hidden = p.id !== "panel-" + name; });
  clearInterval(state.trainTimer);
  if (name === "forward") openForward();
  if (name === "training") openTraining();
  if (name === "edit") openEdit();
}

// ---- sampling (shared by Sample and Compare) ----
function sampleParams(form, extra) {
  const num = k => { const v = form[k].value.trim(); return v === "" ? null : Number(v); };
  const p = {run: $("#run").value, seed: num("seed"), n: num("n"), ...extra};
  if (form === $("#sample-form")) {
    Object.assign(p, {sampler: form.sampler.value, steps: num("steps"), precision: form.precision.value});
    const st = state.run && state.run.student;
    if (st && p.sampler === st.sampler) Object.assign(p, {spacing: st.spacing, eta: st.eta});
    if (!form.querySelector(".cond").hidden)
      Object.assign(p, {classes: form.classes.value || null, guidance: num("guidance")});
    if (!form.querySelector(".ag").hidden) p.autoguidance = num("autoguidance") || 0;
  }
  return p;
}

// Start a job and feed its server-sent events to onEvent; resolves with the last event.
// A job detached meanwhile (the run switched) resolves with "detached" and feeds nothing more.
async function runJob(params, onEvent, path = "/api/sample") {
  const ticket = {};
  state.job = ticket;
  let job;
  try { job = await postJSON(path, params); } finally { if (state.job === ticket && !job) state.job = null; }
  if (state.job !== ticket) { cancelJob(job.id); return {type: "detached"}; }
  return new Promise(resolve => {
    const es = new EventSource(`/api/jobs/${job.id}/events`);
    const end = ev => { es.close(); if (state.job === current) state.job = null; resolve(ev); };
    const current = state.job = {id: job.id, es, end};
    es.onmessage = m => {
      const ev = JSON.parse(m.data);
      onEvent(ev, job);
      if (["done", "cancelled", "error"].includes(ev.type)) end(ev);
    };
    es.onerror = () => { const ev = {type: "error", message: DEAD}; onEvent(ev, job); end(ev); };
  });
}

function cancelJob(id) { postJSON(`/api/jobs/${id}/cancel`, {}).catch(() => {}); }

// Stop listening to the running job and cancel it on the server (its slot is freed at once).
function detachJob() {
  const j = state.job;
  state.job = null;
  if (!j) return;
  if (j.id) { cancelJob(j.id); j.end({type: "detached"}); }
}

function clearSample() {
  state.frames = [];
  for (const id of ["#img-xt", "#img-x0"]) $(id).removeAttribute("src");  // no picture: nothing shown
  $("#downloads").hidden = true;
  $("#sample-progress").value = 0;
  $("#sample-status").textContent = "Pick a run and press Sample.";
  const sc = $("#scrub");
  sc.value = sc.max = "0"; sc.disabled = true;
  scrubLabel(-1);
}

function setGrid(img, url, width, scale) {
  img.src = url;
  img.style.width = Math.round(width * scale) + "px";
}

function gridScale(width) { return Math.max(1, Math.min(6, Math.floor(420 / width))); }

async function onSample(e) {
  e.preventDefault();
  showError("");
  const f = $("#sample-form");
  window.ddpmTimings = {click: performance.now()};
  clearSample();
  $("#sample-go").disabled = true; $("#sample-cancel").disabled = false;
  $("#sample-status").textContent = "loading the model…";
  $("#sample-progress").value = 0;
  try {
    const last = await runJob(sampleParams(f), onSampleEvent);
    if (last.type === "error") showError(last.message);
    if (last.type === "detached") clearSample();
  } catch (err) {
    showError(err.message);
    $("#sample-status").textContent = "";
  } finally {
    $("#sample-go").disabled = false; $("#sample-cancel").disabled = true;
  }
}

function onSampleEvent(ev, job) {
  const s = $("#sample-status");
  if (ev.type === "frame") {
    if (window.ddpmTimings.firstFrame === undefined) window.ddpmTimings.firstFrame = performance.now();
    state.frames.push(ev);
    const k = gridScale(ev.width);
    setGrid($("#img-xt"), ev.x_t, ev.width, k); setGrid($("#img-x0"), ev.x0, ev.width, k);
    $("#sample-progress").value = ev.done / ev.total;
    s.textContent = `step ${ev.done} / ${ev.total} · ${ev.elapsed.toFixed(2)} s`;
  } else if (ev.type === "progress") {
    $("#sample-progress").value = ev.done / ev.total;
  } else if (ev.type === "done") {
    window.ddpmTimings.done = performance.now();
    s.textContent = `${ev.n} images · ${ev.steps} steps · ${ev.nfe} network evaluations per image · ` +
                    `${ev.seconds.toFixed(2)} s · ${ev.arithmetic}`;
    const sc = $("#scrub");
    sc.max = String(state.frames.length - 1); sc.value = sc.max; sc.disabled = state.frames.length < 2;
    scrubLabel(state.frames.length - 1);
    const base = `/api/jobs/${job.id}/files/`;
    $("#dl-grid").href = base + "grid.png"; $("#dl-gif").href = base + "denoising.gif";
    $("#dl-npz").href = base + "samples.npz";
    $("#dl-gif").hidden = !ev.gif;
    $("#downloads").hidden = false;
  } else if (ev.type === "cancelled") {
    const last = state.frames[state.frames.length - 1];
    s.textContent = `cancelled at step ${last ? last.done : 0} of ${last ? last.total : "?"}`;
    const sc = $("#scrub");  // what was drawn so far can still be scrubbed
    sc.max = String(Math.max(0, state.frames.length - 1)); sc.value = sc.max; sc.disabled = state.frames.length < 2;
    scrubLabel(state.frames.length - 1);
  } else if (ev.type === "error") {
    s.textContent = "";
  }
}

function scrubLabel(i) {
  const fr = state.frames[i];
  $("#scrub-label").textContent = fr ? `step ${fr.done} of ${fr.total}` : "";
}

function onScrub() {
  const i = Number($("#scrub").value), fr = state.frames[i];
  if (!fr) return;
  const k = gridScale(fr.width);
  setGrid($("#img-xt"), fr.x_t, fr.width, k); setGrid($("#img-x0"), fr.x0, fr.width, k);
  scrubLabel(i);
}

async function onCancel() {
  if (!state.job || !state.job.id) return;
  $("#sample-cancel").disabled = true;
  try { await postJSON(`/api/jobs/${state.job.id}/cancel`, {}); } catch (err) { showError(err.message); }
}

// ---- compare ----
function addCompareRow(sampler, steps) {
  const rows = $("#compare-rows");
  if (rows.children.length >= 4) return;
  const row = document.createElement("div");
  row.className = "row";
  const sel = document.createElement("select");
  for (const s of state.meta.samplers) sel.add(new Option(s.name, s.name));
  sel.value = sampler;
  const st = document.createElement("input");
  Object.assign(st, {type: "number", min: 1, value: steps});
  const rm = document.createElement("button");
  Object.assign(rm, {type: "button", textContent: "×", title: "remove"});
  rm.onclick = () => { if (rows.children.length > 2) row.remove(); };
  row.append(sel, st, rm);
  rows.append(row);
}

async function onCompare(e) {
  e.preventDefault();
  showError("");
  const f = $("#compare-form"), out = $("#compare-out");
  out.innerHTML = "";
  $("#compare-go").disabled = true;
  const rows = [...document.querySelectorAll("#compare-rows .row")];
  try {
    for (const row of rows) {  // one at a time, so each wall time is the sampler's alone
      const [sel, st] = row.querySelectorAll("select, input");
      const col = document.createElement("div");
      col.className = "col";
      col.innerHTML = `<h3>${sel.value}, ${st.value} steps</h3><progress max="1" value="0"></progress>` +
                      `<img class="grid" alt="${sel.value}"><p class="muted"></p>`;
      out.append(col);
      const params = sampleParams(f, {sampler: sel.value, steps: Number(st.value), stream: false});
      const last = await runJob(params, ev => {
        if (ev.type === "progress") col.querySelector("progress").value = ev.done / ev.total;
        if (ev.type === "done") {
          setGrid(col.querySelector("img"), ev.grid, ev.width, gridScale(ev.width));
          col.querySelector("p").textContent = `NFE ${ev.nfe} · ${ev.seconds.toFixed(2)} s`;
          col.querySelector("progress").value = 1;
        }
      });
      if (last.type === "detached") break;
      if (last.type === "error") { col.querySelector("p").textContent = last.message; showError(last.message); }
    }
  } catch (err) {
    showError(err.message);
  } finally {
    $("#compare-go").disabled = false;
  }
}

// ---- forward process ----
async function openForward() {
  const r = currentRun();
  if (!r || !r.config) return;
  try {
    if (!state.schedules) state.schedules = await api(`/api/runs/${encodeURIComponent(r.name)}/schedules`);
    const t = $("#fwd-t");
    t.max = String(state.schedules.T - 1);
    updateForward();
  } catch (err) { showError(err.message); }
}

function scheduleAt(name, key, t) {
  const s = state.schedules, ts = s.t, ys = s.curves[name][key];
  let i = ts.findIndex(v => v >= t);
  if (i < 0) i = ts.length - 1;
  if (i === 0 || ts[i] === t) return ys[i];
  const w = (t - ts[i - 1]) / (ts[i] - ts[i - 1]);
  return ys[i - 1] * (1 - w) + ys[i] * w;
}

// The picture of the latest t only: a move waits FORWARD_WAIT_MS for the next, a request still
// out when a newer t is wanted is aborted, and the next starts once it has ended (one at a time).
const fwd = {timer: null, ctrl: null, want: null};

function forwardURL() {
  const r = currentRun();
  const q = new URLSearchParams({t: $("#fwd-t").value, index: $("#fwd-index").value || 0});
  if (state.upload) q.set("upload", state.upload);
  return `/api/runs/${encodeURIComponent(r.name)}/forward.png?${q}`;
}

function loadForward() {
  fwd.want = forwardURL();
  if (fwd.ctrl) { fwd.ctrl.abort(); return; }  // its end starts the latest
  const url = fwd.want, ctrl = fwd.ctrl = new AbortController(), img = $("#fwd-img");
  request(url, {signal: ctrl.signal}).then(res => res.blob()).then(blob => {
    if (fwd.want !== url) return;
    const obj = URL.createObjectURL(blob);
    img.onload = () => { img.style.width = img.naturalWidth * gridScale(img.naturalWidth / 1.6) + "px";
                         URL.revokeObjectURL(obj); };
    img.src = obj;
  }).catch(err => { if (err.name !== "AbortError") showError(err.message); })
    .finally(() => { fwd.ctrl = null; if (fwd.want !== url) loadForward(); });
}

function updateForward() {
  const r = currentRun(), s = state.schedules;
  if (!r || !s) return;
  const t = Number($("#fwd-t").value);
  clearTimeout(fwd.timer);
  fwd.timer = setTimeout(loadForward, FORWARD_WAIT_MS);
  const ab = scheduleAt(s.schedule, "alpha_bar", t), snr = scheduleAt(s.schedule, "snr", t);
  $("#fwd-readout").textContent = `t = ${t}   ᾱ_t = ${ab.toFixed(4)}   SNR = ${snr.toExponential(2)}`;
  const series = key => Object.keys(s.curves).map((name, k) => ({
    x: s.t, y: s.curves[name][key], colour: COLOURS[k], width: name === s.schedule ? 3 : 1.2,
    label: name === s.schedule ? name + " (this run)" : name}));
  drawChart($("#chart-ab"), series("alpha_bar"), {title: "ᾱ_t: signal left", marker: t, xlabel: "t"});
  drawChart($("#chart-snr"), series("snr"), {title: "SNR = ᾱ_t / (1 − ᾱ_t)", logY: true, marker: t, xlabel: "t"});
}

async function onUpload(file) {
  if (!file) return;
  try {
    state.upload = (await uploadImage(file, currentRun())).upload;
    updateForward();
  } catch (err) { showError(err.message); }
}

// ---- training ----
function openTraining() {
  clearInterval(state.trainTimer);
  pollTraining();
  state.trainTimer = setInterval(pollTraining, 2000);
}

async function pollTraining() {
  const r = currentRun();
  if (!r) return;
  try {
    const res = await api(`/api/runs/${encodeURIComponent(r.name)}/log?after=${state.trainAfter}`);
    if (res.records.length) {
      state.trainRecords.push(...res.records);
      state.trainAfter = res.records[res.records.length - 1].step;
    }
    drawTraining();
    const img = $("#train-sample");
    if (res.sample_step !== null && img.dataset.step !== String(res.sample_step)) {
      img.onload = () => { img.style.width = img.naturalWidth * 2 + "px"; img.hidden = false; };
      img.src = `/api/runs/${encodeURIComponent(r.name)}/sample.png?step=${res.sample_step}`;
      img.dataset.step = String(res.sample_step);
      $("#train-sample-caption").textContent = `the latest sample grid, step ${res.sample_step}`;
    }
    const recs = state.trainRecords, last = recs[recs.length - 1];
    const live = currentRun()?.training;  // the server's word, refreshed with the run list
    $("#train-status").textContent = last ? `step ${last.step}, loss ${fmtNum(last.loss)}` +
      (live ? " · training now, updating every 2 s" : " · not training now") : "no log.jsonl records yet";
  } catch (err) { showError(err.message); clearInterval(state.trainTimer); }
}

function drawTraining() {
  const recs = state.trainRecords, x = recs.map(r => r.step);
  const col = k => recs.map(r => (typeof r[k] === "number" ? r[k] : null));
  const quarters = [0, 1, 2, 3].map(q => ({x, y: col("loss_q" + q), label: `t in quarter ${q + 1}`,
                                         colour: COLOURS[q + 1], width: 1}));
  drawChart($("#chart-loss"), [{x, y: col("loss"), label: "loss", colour: COLOURS[0], width: 2}, ...quarters],
            {title: "loss (overall and per quarter of t)", logY: true, xlabel: "step"});
  drawChart($("#chart-lr"), [{x, y: col("lr"), label: null}], {title: "learning rate", xlabel: "step"});
  drawChart($("#chart-grad"), [{x, y: col("grad_norm"), label: null}], {title: "gradient norm", logY: true, xlabel: "step"});
  drawChart($("#chart-ips"), [{x, y: col("img_per_s"), label: null}], {title: "images / s", xlabel: "step"});
}

// ---- downloads ----
// A download is fetched first: a sample the server no longer keeps says so on the page (an
// anchor's own download would fail silently), and its links go.
async function onDownload(e) {
  const a = e.target.closest(".downloads a");
  if (!a) return;
  e.preventDefault();
  try {
    const blob = await (await request(a.href)).blob();
    const obj = URL.createObjectURL(blob), tmp = document.createElement("a");
    Object.assign(tmp, {href: obj, download: a.getAttribute("download")});
    tmp.click();
    setTimeout(() => URL.revokeObjectURL(obj), 10000);
  } catch (err) {
    showError(err.message);
    if (/no such sample/.test(err.message)) a.closest(".downloads").hidden = true;
  }
}

// ---- wiring ----
function wire() {
  document.querySelectorAll("nav button").forEach(b => b.addEventListener("click", () => switchTab(b.dataset.tab)));
  $("#run").addEventListener("change", onRunChange);
  document.querySelectorAll(".downloads").forEach(d => d.addEventListener("click", onDownload));
  $("#sample-form").addEventListener("submit", onSample);
  $("#sample-cancel").addEventListener("click", onCancel);
  $("#scrub").addEventListener("input", onScrub);
  $("#compare-form").addEventListener("submit", onCompare);
  $("#compare-add").addEventListener("click", () => addCompareRow("ddpm", 50));
  $("#fwd-t").addEventListener("input", updateForward);
  $("#fwd-index").addEventListener("change", () => { state.upload = null; updateForward(); });
  $("#fwd-file").addEventListener("change", e => onUpload(e.target.files[0]));
  const drop = $("#fwd-drop");
  drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); onUpload(e.dataTransfer.files[0]); });
}

window.addEventListener("DOMContentLoaded", () => {
  wire();
  loadRuns().catch(err => showError(err.message));
});
