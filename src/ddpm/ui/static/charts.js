// Line charts on a <canvas>: a few series, linear or log y, an optional vertical marker.
"use strict";

const COLOURS = ["#3b6fb6", "#e07b39", "#3a9e5c", "#c8423e", "#8064a2", "#2b2b2b"];

function niceTicks(lo, hi, n) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  return out;
}

function fmtNum(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(0);
  return String(+v.toPrecision(3));
}

// series: [{x: [...], y: [...], label, colour, width}]; opts: {title, logY, marker, xlabel}
function drawChart(canvas, series, opts) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  const pad = {l: 56, r: 22, t: 44, b: 34};
  ctx.clearRect(0, 0, W, H);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#222";
  ctx.fillText(opts.title || "", pad.l, 16);
  const fy = v => opts.logY ? Math.log10(Math.max(v, 1e-12)) : v;
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const s of series) s.x.forEach((x, i) => {
    const y = s.y[i];
    if (y === null || !isFinite(y) || (opts.logY && y <= 0)) return;
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, fy(y)); y1 = Math.max(y1, fy(y));
  });
  if (!isFinite(x0)) { ctx.fillStyle = "#6b6b6b"; ctx.fillText("no data yet", W / 2 - 30, H / 2); return; }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += 0.5; y0 -= 0.5; }
  const px = x => pad.l + (x - x0) / (x1 - x0) * (W - pad.l - pad.r);
  const py = y => H - pad.b - (y - y0) / (y1 - y0) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#e3e3e3"; ctx.lineWidth = 1; ctx.fillStyle = "#6b6b6b";
  const yt = opts.logY ? niceTicks(Math.floor(y0), Math.ceil(y1), 6).filter(v => Number.isInteger(v) && v >= y0 && v <= y1)
                       : niceTicks(y0, y1, 5);
  for (const v of yt) {
    ctx.beginPath(); ctx.moveTo(pad.l, py(v)); ctx.lineTo(W - pad.r, py(v)); ctx.stroke();
    ctx.fillText(opts.logY ? "1e" + v : fmtNum(v), 4, py(v) + 4);
  }
  for (const v of niceTicks(x0, x1, 6)) ctx.fillText(fmtNum(v), px(v) - 8, H - pad.b + 14);
  if (opts.xlabel) ctx.fillText(opts.xlabel, W - pad.r - 40, H - 4);
  series.forEach((s, k) => {
    ctx.strokeStyle = s.colour || COLOURS[k % COLOURS.length]; ctx.lineWidth = s.width || 1.5;
    ctx.beginPath();
    let pen = false;
    s.x.forEach((x, i) => {
      const y = s.y[i];
      if (y === null || !isFinite(y) || (opts.logY && y <= 0)) { pen = false; return; }
      pen ? ctx.lineTo(px(x), py(fy(y))) : ctx.moveTo(px(x), py(fy(y)));
      pen = true;
    });
    ctx.stroke();
  });
  let lx = pad.l;
  series.forEach((s, k) => {
    if (!s.label) return;
    ctx.fillStyle = s.colour || COLOURS[k % COLOURS.length];
    ctx.fillRect(lx, 26, 10, 3);
    ctx.fillText(s.label, lx + 14, 32);
    lx += ctx.measureText(s.label).width + 28;
  });
  if (opts.marker !== undefined && opts.marker !== null) {
    ctx.strokeStyle = "#c8423e"; ctx.lineWidth = 1; ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(px(opts.marker), pad.t); ctx.lineTo(px(opts.marker), H - pad.b); ctx.stroke();
    ctx.setLineDash([]);
  }
}
