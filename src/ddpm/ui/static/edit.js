// The Edit panel: paint a mask over an image and inpaint it (RePaint), or edit it at a strength (SDEdit).
"use strict";

const edit = {size: 0, keep: null, img: null, upload: null, painting: false};

function setupEdit() {
  const f = $("#edit-form");
  for (const s of state.meta.samplers) f.sampler.add(new Option(s.name, s.name));
  f.sampler.value = "ddim";
  f.mode.addEventListener("change", editModeChanged);
  f.index.addEventListener("change", () => { edit.upload = null; loadEditImage(); });
  f.strength.addEventListener("input", () => { $("#strength-label").textContent = Number(f.strength.value).toFixed(2); });
  $("#edit-file").addEventListener("change", async e => {
    const file = e.target.files[0];
    if (!file) return;
    try { edit.upload = (await uploadImage(file, currentRun())).upload; loadEditImage(); }
    catch (err) { showError(err.message); }
  });
  f.addEventListener("submit", onEdit);
  $("#edit-cancel").addEventListener("click", async () => {
    $("#edit-cancel").disabled = true;
    if (edit.job) try { await postJSON(`/api/jobs/${edit.job}/cancel`, {}); } catch (err) { showError(err.message); }
  });
  $("#mask-clear").addEventListener("click", () => paintMask(() => 1));
  $("#mask-right").addEventListener("click", () => paintMask((y, x, s) => (x < Math.floor(s / 2) ? 1 : 0)));
  $("#mask-centre").addEventListener("click", () => paintMask((y, x, s) => {
    const lo = Math.floor(s / 4), hi = lo + Math.floor(s / 2);
    return y >= lo && y < hi && x >= lo && x < hi ? 0 : 1;
  }));
  const c = $("#edit-canvas");
  c.addEventListener("pointerdown", e => { edit.painting = true; c.setPointerCapture(e.pointerId); brush(e); });
  c.addEventListener("pointermove", e => { if (edit.painting) brush(e); });
  c.addEventListener("pointerup", () => { edit.painting = false; });
  editModeChanged();
}

function editModeChanged() {
  const inpaint = $("#edit-form").mode.value === "inpaint";
  document.querySelectorAll(".inpaint-only").forEach(e => { e.hidden = !inpaint; });
  document.querySelectorAll(".edit-only").forEach(e => { e.hidden = inpaint; });
  drawEditCanvas();
}

function openEdit() {
  const r = currentRun();
  if (!r || !r.config) return;
  if (edit.size !== r.image_size || !edit.keep) { edit.size = r.image_size; edit.keep = new Uint8Array(r.image_size ** 2).fill(1); }
  loadEditImage();
}

function loadEditImage() {
  const r = currentRun();
  if (!r) return;
  const q = edit.upload ? `upload=${edit.upload}` : `index=${$("#edit-form").index.value || 0}`;
  request(`/api/runs/${encodeURIComponent(r.name)}/source.png?${q}`)
    .then(res => res.blob())
    .then(blob => {
      const img = new Image();
      img.onload = () => { edit.img = img; drawEditCanvas(); };
      img.src = URL.createObjectURL(blob);
    }).catch(err => showError(err.message));
}

function drawEditCanvas() {
  const c = $("#edit-canvas"), ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, c.width, c.height);
  if (edit.img) ctx.drawImage(edit.img, 0, 0, c.width, c.height);
  if (!edit.keep || $("#edit-form").mode.value !== "inpaint") return;
  const cell = c.width / edit.size;
  ctx.fillStyle = "rgba(220, 40, 40, 0.55)";
  for (let y = 0; y < edit.size; y++) for (let x = 0; x < edit.size; x++)
    if (!edit.keep[y * edit.size + x]) ctx.fillRect(x * cell, y * cell, cell, cell);
}

function paintMask(f) {
  if (!edit.keep) return;
  for (let y = 0; y < edit.size; y++) for (let x = 0; x < edit.size; x++) edit.keep[y * edit.size + x] = f(y, x, edit.size);
  drawEditCanvas();
}

function brush(e) {
  if (!edit.keep || $("#edit-form").mode.value !== "inpaint") return;
  const c = $("#edit-canvas"), box = c.getBoundingClientRect();
  const cx = (e.clientX - box.left) / box.width * edit.size, cy = (e.clientY - box.top) / box.height * edit.size;
  const rad = Number($("#edit-brush").value) / 2;
  for (let y = 0; y < edit.size; y++) for (let x = 0; x < edit.size; x++)
    if ((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= rad * rad) edit.keep[y * edit.size + x] = 0;
  drawEditCanvas();
}

async function onEdit(e) {
  e.preventDefault();
  showError("");
  const f = $("#edit-form");
  const num = k => { const v = f[k].value.trim(); return v === "" ? null : Number(v); };
  const params = {run: $("#run").value, mode: f.mode.value, sampler: f.sampler.value, steps: num("steps"),
                  seed: num("seed"), n: num("n"), image: edit.upload ? {upload: edit.upload} : {index: num("index") || 0}};
  if (f.mode.value === "inpaint") Object.assign(params, {keep: Array.from(edit.keep), jump_length: num("jump_length"),
                                                          resample: num("resample")});
  else params.strength = num("strength");
  $("#edit-go").disabled = true; $("#edit-cancel").disabled = false;
  $("#edit-downloads").hidden = true; $("#edit-result").hidden = true;
  $("#edit-status").textContent = "loading the model…";
  try {
    const last = await runJob(params, onEditEvent, "/api/edit");
    if (last.type === "error") showError(last.message);
  } catch (err) { showError(err.message); $("#edit-status").textContent = ""; }
  finally { $("#edit-go").disabled = false; $("#edit-cancel").disabled = true; }
}

function onEditEvent(ev, job) {
  edit.job = job.id;
  const s = $("#edit-status");
  if (ev.type === "frame") {
    const k = gridScale(ev.width);
    setGrid($("#edit-xt"), ev.x_t, ev.width, k); setGrid($("#edit-x0"), ev.x0, ev.width, k);
    $("#edit-progress").value = ev.done / ev.total;
    s.textContent = `step ${ev.done} / ${ev.total} · ${ev.elapsed.toFixed(2)} s`;
  } else if (ev.type === "done") {
    $("#edit-progress").value = 1;
    s.textContent = `${ev.n} results · ${ev.nfe} network evaluations per image · ${ev.seconds.toFixed(2)} s`;
    const img = $("#edit-result");
    setGrid(img, ev.grid, ev.width, Math.max(1, Math.min(4, Math.floor(900 / ev.width))));
    img.hidden = false;
    $("#edit-result-caption").textContent = $("#edit-form").mode.value === "inpaint"
      ? "each row: input | mask (white = kept) | completions" : "each row: input | edits";
    const base = `/api/jobs/${job.id}/files/`;
    $("#edit-dl-grid").href = base + "grid.png"; $("#edit-dl-npz").href = base + "samples.npz";
    $("#edit-downloads").hidden = false;
  } else if (ev.type === "cancelled") {
    s.textContent = "cancelled";
  } else if (ev.type === "error") {
    s.textContent = "";
  }
}
