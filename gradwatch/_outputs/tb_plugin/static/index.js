// gradwatch's TensorBoard tab: per-timestep ||dL/dh_t|| profiles and the propagation curve,
// with a slider over the training steps gradwatch replayed.
//
// A plain ES module (no build step, no external resources). TensorBoard loads it in an
// iframe whose <base> is /data/plugin/gradwatch/, so "runs" and "profiles" are this plugin's
// routes. Data format: docs/panels.md, "The gradwatch tab".

const SVG = "http://www.w3.org/2000/svg";
const COLORS = {
  total: "#222222",
  carried: "#1f77b4",
  direct: "#ff7f0e",
  cell_total: "#2ca02c",
  propagation: "#6a3d9a",
  horizon: "#d62728",
  bad: "#d62728",
  grid: "#e4e4e4",
  axis: "#888888",
};
const PROFILE_ROWS = ["total", "carried", "direct", "cell_total"];
const VERDICT_COLORS = {
  healthy: "#2e7d32",
  vanishing: "#1565c0",
  exploding: "#c62828",
  nonfinite: "#6a1b9a",
};

const CSS = `
  body { margin: 0; font: 13px Roboto, "Helvetica Neue", Arial, sans-serif; color: #212121;
         background: #fff; }
  .gw-bar { display: flex; flex-wrap: wrap; gap: 12px 20px; align-items: center;
            padding: 10px 16px; border-bottom: 1px solid #e0e0e0; background: #fafafa; }
  .gw-bar label { display: flex; gap: 6px; align-items: center; }
  .gw-bar select { max-width: 320px; }
  .gw-slider { display: flex; gap: 10px; align-items: center; padding: 10px 16px;
               border-bottom: 1px solid #e0e0e0; }
  .gw-slider input[type=range] { flex: 1; min-width: 200px; }
  .gw-step { min-width: 260px; font-variant-numeric: tabular-nums; }
  .gw-panels { display: flex; flex-wrap: wrap; gap: 16px; padding: 16px; }
  .gw-card { border: 1px solid #e0e0e0; border-radius: 4px; padding: 8px 12px; }
  .gw-card h3 { margin: 0 0 2px; font-size: 14px; font-weight: 500; }
  .gw-meta { color: #616161; font-size: 12px; margin-bottom: 4px; }
  .gw-charts { display: flex; flex-wrap: wrap; gap: 8px; }
  .gw-verdict { font-weight: 600; }
  .gw-empty { padding: 24px 16px; color: #616161; max-width: 760px; line-height: 1.5; }
  .gw-empty code { background: #f1f1f1; padding: 1px 4px; }
  .gw-legend { display: flex; gap: 14px; padding: 0 16px; color: #424242; font-size: 12px; }
  .gw-legend span::before { content: ""; display: inline-block; width: 16px; height: 3px;
                            margin-right: 5px; vertical-align: middle;
                            background: var(--c); }
  svg text { font-size: 10px; fill: #424242; }
  svg .gw-title { font-size: 11px; font-weight: 500; fill: #212121; }
`;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJson(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// "NaN", "Infinity" and "-Infinity" arrive as strings; Number() reads them.
const num = (v) => (typeof v === "number" ? v : Number(v));

function fmt(v, digits = 3) {
  v = num(v);
  if (Number.isNaN(v)) return "n/a";
  if (!Number.isFinite(v)) return v > 0 ? "∞" : "-∞";
  if (v !== 0 && (Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3)) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

function niceTicks(lo, hi, count = 6) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  return ticks;
}

function decadeTicks(lo, hi) {
  const a = Math.ceil(lo);
  const b = Math.floor(hi);
  const every = Math.max(1, Math.ceil((b - a + 1) / 7));
  const ticks = [];
  for (let d = a; d <= b; d += 1) if (d % every === 0) ticks.push(d);
  return ticks.length ? ticks : [Math.round((lo + hi) / 2)];
}

// A line chart in SVG. series: [{name, color, dash, ys (already on the plotted scale, null =
// gap), bad (indices of non-finite values)}]; x is the index.
function lineChart({ title, xLabel, yLabel, n, yRange, logY, series, vline, hlines, guide }) {
  const W = 440;
  const H = 250;
  const m = { l: 52, r: 12, t: 22, b: 36 };
  const pw = W - m.l - m.r;
  const ph = H - m.t - m.b;
  const [y0, y1] = yRange;
  const xMax = Math.max(n - 1, 1);
  const sx = (x) => m.l + (x / xMax) * pw;
  const sy = (y) => m.t + ph - ((y - y0) / (y1 - y0)) * ph;
  const svg = svgEl("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  svg.append(svgEl("text", { x: m.l, y: 14, class: "gw-title" }, title));

  const yTicks = logY ? decadeTicks(y0, y1) : niceTicks(y0, y1, 5);
  for (const y of yTicks) {
    svg.append(svgEl("line", { x1: m.l, x2: m.l + pw, y1: sy(y), y2: sy(y), stroke: COLORS.grid }));
    const label = svgEl("text", { x: m.l - 6, y: sy(y) + 3, "text-anchor": "end" });
    if (logY) {
      label.append("10");
      label.append(svgEl("tspan", { dy: -5, "font-size": 8 }, String(y)));
    } else {
      label.textContent = String(y);
    }
    svg.append(label);
  }
  for (const x of niceTicks(0, xMax, 6).filter((x) => Number.isInteger(x))) {
    svg.append(svgEl("line", { x1: sx(x), x2: sx(x), y1: m.t + ph, y2: m.t + ph + 4, stroke: COLORS.axis }));
    svg.append(svgEl("text", { x: sx(x), y: m.t + ph + 15, "text-anchor": "middle" }, String(x)));
  }
  svg.append(svgEl("rect", { x: m.l, y: m.t, width: pw, height: ph, fill: "none", stroke: COLORS.axis }));
  svg.append(svgEl("text", { x: m.l + pw / 2, y: H - 4, "text-anchor": "middle" }, xLabel));
  svg.append(
    svgEl("text", { x: 12, y: m.t + ph / 2, "text-anchor": "middle",
                    transform: `rotate(-90 12 ${m.t + ph / 2})` }, yLabel),
  );

  for (const h of hlines || []) {
    if (h.y < y0 || h.y > y1) continue;
    svg.append(svgEl("line", { x1: m.l, x2: m.l + pw, y1: sy(h.y), y2: sy(h.y), stroke: h.color,
                               "stroke-dasharray": "4 3" }));
    svg.append(svgEl("text", { x: m.l + pw - 4, y: sy(h.y) - 4, "text-anchor": "end" }, h.label));
  }
  const clip = `gw-clip-${Math.random().toString(36).slice(2)}`;
  const defs = svgEl("defs");
  const clipPath = svgEl("clipPath", { id: clip });
  clipPath.append(svgEl("rect", { x: m.l, y: m.t, width: pw, height: ph }));
  defs.append(clipPath);
  svg.append(defs);
  const plot = svgEl("g", { "clip-path": `url(#${clip})` });
  svg.append(plot);
  for (const s of series) {
    let d = "";
    let pen = false;
    s.ys.forEach((y, i) => {
      if (y === null || !Number.isFinite(y)) {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${sx(i).toFixed(1)},${sy(y).toFixed(1)}`;
      pen = true;
    });
    if (d) {
      plot.append(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.6,
                                  "stroke-dasharray": s.dash || "none" }));
    }
    // isolated points would be invisible as a path: draw them as dots
    s.ys.forEach((y, i) => {
      const alone = (j) => j < 0 || j >= s.ys.length || s.ys[j] === null || !Number.isFinite(s.ys[j]);
      if (y !== null && Number.isFinite(y) && alone(i - 1) && alone(i + 1)) {
        plot.append(svgEl("circle", { cx: sx(i), cy: sy(y), r: 2, fill: s.color }));
      }
    });
    for (const i of s.bad || []) {
      const x = sx(i);
      const y = m.t + 6;
      svg.append(svgEl("path", { d: `M${x - 3},${y - 3}L${x + 3},${y + 3}M${x - 3},${y + 3}L${x + 3},${y - 3}`,
                                 stroke: COLORS.bad, "stroke-width": 1.5 }));
    }
  }
  if (vline && Number.isFinite(vline.x) && vline.x >= 0 && vline.x <= xMax) {
    svg.append(svgEl("line", { x1: sx(vline.x), x2: sx(vline.x), y1: m.t, y2: m.t + ph,
                               stroke: vline.color, "stroke-width": 1.5 }));
    svg.append(svgEl("text", { x: sx(vline.x) + 4, y: m.t + 12, fill: vline.color }, vline.label));
  }

  // hover: a guide line and the values at the nearest index
  if (guide) {
    const line = svgEl("line", { y1: m.t, y2: m.t + ph, stroke: "#9e9e9e", visibility: "hidden" });
    const text = svgEl("text", { x: m.l + 4, y: m.t + ph - 6, visibility: "hidden" });
    svg.append(line, text);
    const overlay = svgEl("rect", { x: m.l, y: m.t, width: pw, height: ph, fill: "transparent" });
    overlay.addEventListener("mousemove", (event) => {
      const box = svg.getBoundingClientRect();
      const px = ((event.clientX - box.left) / box.width) * W;
      const i = Math.round(((px - m.l) / pw) * xMax);
      if (i < 0 || i >= n) return;
      line.setAttribute("x1", sx(i));
      line.setAttribute("x2", sx(i));
      text.textContent = guide(i);
      line.setAttribute("visibility", "visible");
      text.setAttribute("visibility", "visible");
    });
    overlay.addEventListener("mouseleave", () => {
      line.setAttribute("visibility", "hidden");
      text.setAttribute("visibility", "hidden");
    });
    svg.append(overlay);
  }
  return svg;
}

function log10OrNull(v) {
  v = num(v);
  return Number.isFinite(v) && v > 0 ? Math.log10(v) : null;
}

function padRange(lo, hi, pad) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [-1, 1];
  if (hi - lo < 1e-9) return [lo - pad, hi + pad];
  return [lo - (hi - lo) * 0.05, hi + (hi - lo) * 0.05];
}

// log10 range of the profile rows (and plain range of propagation) of one panel over steps.
function ranges(steps, layer, direction, rows) {
  let pLo = Infinity;
  let pHi = -Infinity;
  let aLo = Infinity;
  let aHi = -Infinity;
  for (const s of steps) {
    for (const row of rows) {
      for (const v of s.values[row][layer][direction]) {
        const y = log10OrNull(v);
        if (y !== null) {
          pLo = Math.min(pLo, y);
          pHi = Math.max(pHi, y);
        }
      }
    }
    for (const v of s.values.propagation[layer][direction]) {
      const y = num(v);
      if (Number.isFinite(y)) {
        aLo = Math.min(aLo, y);
        aHi = Math.max(aHi, y);
      }
    }
  }
  return {
    profile: padRange(pLo, pHi, 0.5),
    propagation: padRange(Math.min(aLo, -2.2), Math.max(aHi, 0.2), 0.5),
  };
}

function panelName(layer, direction, directions) {
  const where = `layer ${layer}`;
  if (directions < 2) return where;
  return `${where}, ${direction ? "reverse" : "forward"}`;
}

function renderPanel(data, step, layer, direction, fixed) {
  const v = step.values;
  const n = step.seq_len;
  const rows = PROFILE_ROWS.filter((r) => r in v && (r !== "cell_total" || data.showCell));
  const range = fixed ? fixed : ranges([step], layer, direction, rows);
  const verdict = v.verdict ? v.verdict[layer][direction] : null;
  const gain = v.gain ? num(v.gain[layer][direction]) : NaN;
  const horizon = v.horizon ? num(v.horizon[layer][direction]) : NaN;

  const series = rows.map((row) => {
    const raw = v[row][layer][direction];
    const bad = [];
    raw.forEach((x, i) => {
      if (!Number.isFinite(num(x))) bad.push(i);
    });
    return {
      name: row,
      color: COLORS[row],
      dash: row === "cell_total" ? "5 3" : null,
      width: row === "total" ? 2 : 1.4,
      ys: raw.map(log10OrNull),
      bad,
    };
  });
  const profile = lineChart({
    title: "||dL/dh_t|| per timestep",
    xLabel: "timestep t",
    yLabel: "||dL/dh_t|| (log)",
    n,
    yRange: range.profile,
    logY: true,
    series,
    guide: (i) => `t=${i}  ` + rows.map((r) => `${r} ${fmt(v[r][layer][direction][i])}`).join("  "),
  });

  const prop = v.propagation[layer][direction].map((x) => (Number.isFinite(num(x)) ? num(x) : null));
  const propSeries = [{ name: "log10 a(k)", color: COLORS.propagation, ys: prop, width: 1.8 }];
  if (Number.isFinite(gain) && gain > 0) {
    const slope = Math.log10(gain);
    propSeries.push({ name: "gain", color: "#9e9e9e", dash: "2 3", width: 1,
                      ys: prop.map((_, k) => k * slope) });
  }
  const propagation = lineChart({
    title: "propagation log10 a(k)",
    xLabel: "k steps back",
    yLabel: "log10 a(k)",
    n,
    yRange: range.propagation,
    logY: false,
    series: propSeries,
    hlines: [{ y: -2, color: "#757575", label: "1%" }],
    vline: Number.isFinite(horizon)
      ? { x: horizon, color: COLORS.horizon, label: `horizon ${fmt(horizon)}` }
      : null,
    guide: (k) => `k=${k}  log10 a=${fmt(prop[k])}`,
  });

  const verdictSpan = el("span", { class: "gw-verdict" }, verdict || "no verdict");
  if (verdict && VERDICT_COLORS[verdict]) verdictSpan.style.color = VERDICT_COLORS[verdict];
  let horizonText = "n/a";
  if (Number.isFinite(horizon)) {
    horizonText = `${fmt(horizon)} steps` + (horizon > n - 1 ? " (beyond the sequence)" : "");
  } else if (!Number.isNaN(horizon)) {
    horizonText = "never below 1%";
  }
  return el(
    "div",
    { class: "gw-card" },
    el("h3", {}, panelName(layer, direction, data.num_directions), " — ", verdictSpan),
    el("div", { class: "gw-meta" },
       `gain ${fmt(gain)} per step · horizon ${horizonText} · sequence length ${n}`),
    el("div", { class: "gw-charts" }, profile, propagation),
  );
}

export async function render() {
  document.head.append(el("style", {}, CSS));
  document.body.textContent = "";
  const runSelect = el("select");
  const tagSelect = el("select");
  const fixedBox = el("input", { type: "checkbox", checked: "" });
  const cellBox = el("input", { type: "checkbox" });
  const reloadButton = el("button", { type: "button" }, "Reload");
  const slider = el("input", { type: "range", min: 0, max: 0, value: 0, step: 1 });
  const stepLabel = el("span", { class: "gw-step" }, "");
  const prev = el("button", { type: "button", title: "previous step" }, "◀");
  const next = el("button", { type: "button", title: "next step" }, "▶");
  const last = el("button", { type: "button", title: "latest step" }, "latest");
  const legend = el("div", { class: "gw-legend" });
  const panels = el("div", { class: "gw-panels" });
  const message = el("div", { class: "gw-empty" });
  const cellLabel = el("label", {}, cellBox, "cell state (LSTM)");

  document.body.append(
    el("div", { class: "gw-bar" },
       el("label", {}, "Run", runSelect),
       el("label", {}, "Module", tagSelect),
       el("label", {}, fixedBox, "same axes for all steps"),
       cellLabel,
       reloadButton),
    el("div", { class: "gw-slider" }, el("span", {}, "Training step"), prev, slider, next, last,
       stepLabel),
    legend,
    message,
    panels,
  );

  let runs = {};
  let data = null; // the /profiles answer of the selected tag
  let fixedRanges = {};

  function showMessage(html) {
    message.innerHTML = html;
    message.style.display = html ? "" : "none";
  }

  function draw() {
    panels.textContent = "";
    if (!data || !data.steps.length) return;
    const index = Number(slider.value);
    const step = data.steps[index];
    const t = new Date(step.wall_time * 1000);
    stepLabel.textContent =
      `step ${step.step}  (${index + 1} of ${data.steps.length})  ·  ${t.toLocaleString()}`;
    data.showCell = cellBox.checked;
    for (let layer = 0; layer < data.num_layers; layer += 1) {
      for (let direction = 0; direction < data.num_directions; direction += 1) {
        const key = `${layer}/${direction}/${data.showCell}`;
        if (fixedBox.checked && !(key in fixedRanges)) {
          const rows = PROFILE_ROWS.filter((r) => r in step.values && (r !== "cell_total" || data.showCell));
          fixedRanges[key] = ranges(data.steps, layer, direction, rows);
        }
        panels.append(renderPanel(data, step, layer, direction, fixedBox.checked ? fixedRanges[key] : null));
      }
    }
  }

  function drawLegend() {
    legend.textContent = "";
    const rows = PROFILE_ROWS.filter((r) => data && data.rows.includes(r) && (r !== "cell_total" || cellBox.checked));
    const names = { total: "total dL/dh_t", carried: "carried (through the recurrence)",
                    direct: "direct (injected at t)", cell_total: "cell dL/dc_t" };
    for (const r of rows) {
      const item = el("span", {}, names[r]);
      item.style.setProperty("--c", COLORS[r]);
      legend.append(item);
    }
    const bad = el("span", {}, "non-finite (×)");
    bad.style.setProperty("--c", COLORS.bad);
    legend.append(bad);
  }

  async function loadTag(keepStep) {
    const run = runSelect.value;
    const tag = tagSelect.value;
    if (!run || !tag) return;
    const atEnd = !data || Number(slider.value) === data.steps.length - 1;
    data = await getJson(`profiles?run=${encodeURIComponent(run)}&tag=${encodeURIComponent(tag)}`);
    fixedRanges = {};
    cellLabel.style.display = data.rows.includes("cell_total") ? "" : "none";
    slider.max = Math.max(data.steps.length - 1, 0);
    let index = data.steps.length - 1;
    if (keepStep !== undefined && !atEnd) {
      const found = data.steps.findIndex((s) => s.step === keepStep);
      if (found >= 0) index = found;
    }
    slider.value = Math.max(index, 0);
    showMessage(data.steps.length ? "" : "No steps recorded for this module yet.");
    drawLegend();
    draw();
  }

  function fillTags() {
    const previous = tagSelect.value;
    tagSelect.textContent = "";
    for (const entry of runs[runSelect.value] || []) {
      const label = `${entry.module} (${entry.kind}, ${entry.num_layers} layer` +
        `${entry.num_layers > 1 ? "s" : ""}${entry.num_directions > 1 ? ", bidirectional" : ""})`;
      tagSelect.append(el("option", { value: entry.tag }, label));
    }
    if ([...tagSelect.options].some((o) => o.value === previous)) tagSelect.value = previous;
  }

  async function loadRuns() {
    const keep = data && data.steps.length ? data.steps[Number(slider.value)].step : undefined;
    const previous = runSelect.value;
    runs = await getJson("runs");
    runSelect.textContent = "";
    for (const run of Object.keys(runs)) runSelect.append(el("option", { value: run }, run));
    if (!Object.keys(runs).length) {
      data = null;
      panels.textContent = "";
      showMessage(
        "No gradwatch profiles found. <code>PanelWriter</code> (used by the <code>GradWatch</code> " +
        "callback and <code>Monitor</code>) writes them with every replayed report to a " +
        "TensorBoard <code>SummaryWriter</code> or <code>TensorBoardLogger</code>.",
      );
      return;
    }
    if (previous in runs) runSelect.value = previous;
    fillTags();
    await loadTag(keep);
  }

  const move = (delta) => {
    const value = Math.min(Math.max(Number(slider.value) + delta, 0), Number(slider.max));
    slider.value = value;
    draw();
  };
  slider.addEventListener("input", draw);
  prev.addEventListener("click", () => move(-1));
  next.addEventListener("click", () => move(1));
  last.addEventListener("click", () => move(Number(slider.max)));
  fixedBox.addEventListener("change", draw);
  cellBox.addEventListener("change", () => {
    drawLegend();
    draw();
  });
  runSelect.addEventListener("change", () => {
    fillTags();
    data = null;
    loadTag().catch(fail);
  });
  tagSelect.addEventListener("change", () => {
    data = null;
    loadTag().catch(fail);
  });
  reloadButton.addEventListener("click", () => loadRuns().catch(fail));

  function fail(error) {
    showMessage("");
    message.textContent = `Could not load gradwatch data: ${error.message || error}`;
    message.style.display = "";
  }

  try {
    await loadRuns();
  } catch (error) {
    fail(error);
  }
}
