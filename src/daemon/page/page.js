// cellstream's live page: the run so far from v1/run and v1/cells, then live from the
// v1/events stream. Plain SVG and canvas, no library, every URL relative (a reverse proxy
// may serve the daemon under a path prefix).
'use strict';

const errors = [];
function reportError(message) {
  errors.push(String(message));
  const el = document.getElementById('errors');
  el.hidden = false;
  el.textContent = errors.join('\n');
  document.body.dataset.errors = String(errors.length);
}
window.addEventListener('error', (e) => reportError(e.message));
window.addEventListener('unhandledrejection', (e) => reportError('unhandled: ' + e.reason));

const SVG = 'http://www.w3.org/2000/svg';
const UNASSIGNED = 'unassigned';
const PALETTE = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1',
  '#ff9da7', '#9c755f', '#2f4b7c', '#a05195', '#665191', '#d45087', '#00a6a6', '#8cd17d',
  '#b6992d', '#499894', '#86bcb6', '#e8a33d', '#79706e'];
const COMPOSITION_BARS = 40;
const TABLE_ROWS = 200;

const state = { run: null, cells: null, pending: [], colours: new Map() };

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svgEl(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}
function fmt(x, digits = 0) {
  if (x === undefined || x === null || Number.isNaN(x)) return '–';
  return Number(x).toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}
function pct(x) { return x === undefined || x === null ? '–' : fmt(100 * x, 1) + '%'; }
function when(unix) { return new Date(unix * 1000).toLocaleTimeString(); }

// A label's colour: stable for the page's life, grey for unassigned.
function colour(label) {
  if (label === UNASSIGNED) return '#c4c8cf';
  if (!state.colours.has(label)) state.colours.set(label, PALETTE[state.colours.size % PALETTE.length]);
  return state.colours.get(label);
}
function seedColours() {
  const names = new Set();
  const ref = state.run && state.run.reference;
  if (ref) ref.labels.forEach((l) => names.add(l));
  if (state.run) Object.keys(state.run.totals.labels).forEach((l) => names.add(l));
  [...names].sort().forEach(colour);
}

async function getJSON(path) {
  const r = await fetch(path, { cache: 'no-store', credentials: 'same-origin' });
  if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
  return r.json();
}

async function load() {
  const [run, cells] = await Promise.all([getJSON('v1/run'), getJSON('v1/cells')]);
  state.run = run;
  state.cells = cells;
  const pending = state.pending;
  state.pending = [];
  pending.forEach(apply);
  render();
}

let cellsTimer = null;
function refreshCellsSoon() {
  if (cellsTimer) return;
  cellsTimer = setTimeout(async () => {
    cellsTimer = null;
    state.cells = await getJSON('v1/cells');
    renderMap();
  }, 500);
}

function apply(update) {
  const run = state.run;
  if (!run.batches.some((e) => e.seq === update.entry.seq)) {
    run.batches.push(update.entry);
    while (run.batches.length > run.limits.history) run.batches.shift();
  }
  run.totals = update.totals;
  run.run_qc = update.run_qc;
  run.alerts = update.alerts;
}

function connect() {
  const source = new EventSource('v1/events');
  const live = document.getElementById('live');
  source.addEventListener('open', () => { live.textContent = 'live'; live.className = 'pill on'; });
  source.addEventListener('error', () => { live.textContent = 'reconnecting'; live.className = 'pill off'; });
  source.addEventListener('batch', (ev) => {
    const update = JSON.parse(ev.data);
    if (!state.run) { state.pending.push(update); return; }
    apply(update);
    render();
    refreshCellsSoon();
  });
  source.addEventListener('alerts', (ev) => {
    if (!state.run) return;
    state.run.alerts = JSON.parse(ev.data);
    renderAlerts();
  });
  source.addEventListener('reload', () => { load().catch(reportError); });
}

function render() {
  seedColours();
  renderHeader();
  renderAlerts();
  renderTable();
  renderComposition();
  renderQc();
  renderMap();
}

function renderHeader() {
  const { model, reference, totals } = state.run;
  let text = `model ${model.name}${model.version ? ' v' + model.version : ''}`;
  if (reference) text += ` · reference of ${fmt(reference.cells)} cells`;
  document.getElementById('model').textContent = text;
  const t = document.getElementById('totals');
  t.textContent = `${fmt(totals.batches_ok)} batches · ${fmt(totals.cells)} cells` +
    (totals.batches_failed ? ` · ${fmt(totals.batches_failed)} quarantined` : '') +
    (totals.batches_retried ? ` · ${fmt(totals.batches_retried)} retried` : '');
  t.dataset.cells = String(totals.cells);
}

function renderAlerts() {
  const ul = document.getElementById('alerts');
  ul.replaceChildren();
  for (const a of state.run.alerts) {
    const li = el('li', { class: a.firing ? 'firing' : 'ok', 'data-alert': a.name, title: a.summary });
    const value = a.value === null || a.value === undefined ? '' : ` (${fmt(a.value, 2)})`;
    li.textContent = `${a.firing ? '● ' : ''}${a.name.replace(/^Cellstream/, '')}${a.firing ? value : ''}`;
    ul.append(li);
  }
}

function renderTable() {
  const tbody = document.querySelector('#batches tbody');
  tbody.replaceChildren();
  const rows = state.run.batches.slice(-TABLE_ROWS).reverse();
  for (const b of rows) {
    const tr = el('tr', { class: b.outcome, 'data-batch': b.batch, 'data-outcome': b.outcome });
    const outcome = b.outcome === 'ok' ? 'ok'
      : `${b.outcome === 'failed' ? 'quarantined' : 'retried'}: ${b.problem.stage} ${b.problem.kind}`;
    const cells = [
      [b.batch], [outcome, b.outcome === 'ok' ? 'outcome-ok' : ''],
      [b.outcome === 'ok' ? fmt(b.cells) : '–', 'num'],
      [b.outcome === 'ok' ? fmt(b.median.n_genes) : '–', 'num'],
      [b.outcome === 'ok' ? fmt(b.median.total_counts) : '–', 'num'],
      [b.outcome === 'ok' ? fmt(b.median.pct_mito, 1) : '–', 'num'],
      [b.outcome === 'ok' ? pct(b.unassigned_fraction) : '–', 'num'],
      [b.median_novelty === undefined ? '–' : fmt(b.median_novelty, 2), 'num'],
      [b.outcome === 'ok' ? fmt(b.timings.latency, 2) : '–', 'num'],
      [when(b.finished_at)],
    ];
    for (const [text, cls] of cells) tr.append(el('td', cls ? { class: cls } : {}, text));
    if (b.problem) tr.title = b.problem.error;
    tbody.append(tr);
  }
  const { batches, limits } = state.run;
  document.getElementById('batches-note').textContent =
    batches.length >= limits.history ? `(the last ${limits.history})` : '';
}

// Stacked bars: each batch's composition (unassigned on top), the reference's beside them.
function renderComposition() {
  const box = document.getElementById('composition');
  box.replaceChildren();
  const ok = state.run.batches.filter((b) => b.outcome === 'ok' && b.cells > 0).slice(-COMPOSITION_BARS);
  const ref = state.run.reference;
  const bars = ok.map((b) => ({
    name: b.batch,
    parts: Object.entries(b.labels).map(([l, n]) => [l, n / b.cells]),
  }));
  if (ref) bars.push({ name: 'reference', parts: Object.entries(ref.composition), reference: true });
  const W = Math.max(560, box.clientWidth || 900), H = 230, top = 8, bottom = 70, left = 34;
  const svg = svgEl('svg', { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  const plotH = H - top - bottom;
  const slot = Math.min(48, (W - left - 10) / Math.max(bars.length + (ref ? 1 : 0), 1));
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH * (1 - f);
    svg.append(svgEl('line', { x1: left, x2: W, y1: y, y2: y, class: 'axis' }));
    const t = svgEl('text', { x: left - 4, y: y + 4, 'text-anchor': 'end' });
    t.textContent = `${f * 100}%`;
    svg.append(t);
  }
  bars.forEach((bar, i) => {
    const x = left + 4 + (i + (bar.reference ? 1 : 0)) * slot;
    const parts = bar.parts.slice().sort((a, b) => (a[0] === UNASSIGNED) - (b[0] === UNASSIGNED)
      || a[0].localeCompare(b[0]));
    let y = top + plotH;
    for (const [label, share] of parts) {
      const h = share * plotH;
      y -= h;
      const r = svgEl('rect', { x, y, width: slot * 0.8, height: Math.max(h, 0), fill: colour(label) });
      const title = svgEl('title');
      title.textContent = `${bar.name}: ${label} ${pct(share)}`;
      r.append(title);
      svg.append(r);
    }
    const tx = x + slot * 0.4, ty = top + plotH + 8;
    const t = svgEl('text', { x: tx, y: ty, 'text-anchor': 'end', transform: `rotate(-45 ${tx} ${ty})` });
    t.textContent = bar.name.length > 14 ? bar.name.slice(0, 13) + '…' : bar.name;
    if (bar.reference) t.setAttribute('font-weight', 'bold');
    svg.append(t);
  });
  box.append(svg);
  document.getElementById('composition-note').textContent =
    ok.length ? `(share of each batch's cells; ${ref ? 'the reference\'s at the right' : 'no reference configured'})` : '(no batch yet)';
  // Legend: every label with its cells over the run and, with a reference, its share there.
  const legend = document.getElementById('legend');
  legend.replaceChildren();
  const labels = new Set([...Object.keys(state.run.totals.labels), ...(ref ? ref.labels : [])]);
  for (const label of [...labels].sort((a, b) => (a === UNASSIGNED) - (b === UNASSIGNED) || a.localeCompare(b))) {
    const n = state.run.totals.labels[label] || 0;
    const li = el('li', { 'data-label': label, 'data-cells': String(n) });
    const swatch = el('span', { class: 'swatch' });
    swatch.style.background = colour(label); // CSSOM: the page's CSP allows no style attributes
    li.append(swatch);
    li.append(document.createTextNode(`${label}: ${fmt(n)} cells`));
    if (ref && ref.composition[label] !== undefined) {
      li.append(el('span', { class: 'muted' }, ` (reference ${pct(ref.composition[label])})`));
    }
    legend.append(li);
  }
}

// One histogram per QC figure: the latest batch filled, the run outlined, each as fractions.
function renderQc() {
  const box = document.getElementById('qc');
  box.replaceChildren();
  const { bins, run_qc } = state.run;
  const latest = state.run.batches.slice().reverse().find((b) => b.outcome === 'ok');
  const figures = [['n_genes', 'genes per cell'], ['total_counts', 'UMIs per cell'], ['pct_mito', '% mito UMIs']];
  for (const [key, title] of figures) {
    const b = bins[key];
    const run = run_qc[key];
    const last = latest && latest.qc ? latest.qc[key] : null;
    const norm = (h) => { const s = h.reduce((a, x) => a + x, 0) || 1; return h.map((x) => x / s); };
    const runF = norm(run), lastF = last ? norm(last) : null;
    const max = Math.max(...runF, ...(lastF || [0]), 1e-9);
    const W = 520, H = 110, left = 8, bottom = 22, top = 16;
    const svg = svgEl('svg', { width: '100%', viewBox: `0 0 ${W} ${H}`, 'data-qc': key });
    const w = (W - left * 2) / b.n, plotH = H - top - bottom;
    const head = svgEl('text', { x: left, y: 11 });
    head.textContent = `${title}: latest batch${latest ? ' (' + latest.batch + ')' : ''} filled, run outlined`;
    svg.append(head);
    if (lastF) lastF.forEach((f, i) => {
      const h = (f / max) * plotH;
      svg.append(svgEl('rect', { x: left + i * w, y: top + plotH - h, width: Math.max(w - 1, 1), height: h, fill: '#4e79a7', opacity: 0.6 }));
    });
    let d = '';
    runF.forEach((f, i) => {
      const y = top + plotH - (f / max) * plotH;
      d += `${i ? 'L' : 'M'}${left + i * w},${y}L${left + (i + 1) * w},${y}`;
    });
    svg.append(svgEl('path', { d, fill: 'none', stroke: '#1d2330', 'stroke-width': 1.2 }));
    svg.append(svgEl('line', { x1: left, x2: W - left, y1: top + plotH, y2: top + plotH, class: 'axis' }));
    for (let i = 0; i <= b.n; i += Math.max(1, Math.round(b.n / 7))) {
      const v = b.lo + (b.hi - b.lo) * (i / b.n);
      const anchor = i === 0 ? 'start' : (i + Math.max(1, Math.round(b.n / 7)) > b.n ? 'end' : 'middle');
      const t = svgEl('text', { x: left + i * w, y: H - 6, 'text-anchor': anchor });
      t.textContent = b.log ? fmt(10 ** v) : fmt(v);
      svg.append(t);
    }
    box.append(svg);
  }
}

// The sampled cells on the reference's map (reference cells in grey beneath) or on the
// run's two principal axes; the latest batch's cells ringed.
function renderMap() {
  const canvas = document.getElementById('map');
  const ctx = canvas.getContext('2d');
  const ratio = window.devicePixelRatio || 1;
  const W = 560, H = 420;
  canvas.width = W * ratio;
  canvas.height = H * ratio;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, W, H);
  const c = state.cells;
  const note = document.getElementById('map-note');
  if (!c || c.cells.x.length === 0) {
    note.textContent = '(no cells yet)';
    canvas.dataset.cells = '0';
    return;
  }
  const refCells = c.reference_cells;
  const xs = c.cells.x.concat(refCells ? refCells.x : []);
  const ys = c.cells.y.concat(refCells ? refCells.y : []);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const pad = 12;
  const sx = (x) => pad + ((x - x0) / ((x1 - x0) || 1)) * (W - 2 * pad);
  const sy = (y) => H - pad - ((y - y0) / ((y1 - y0) || 1)) * (H - 2 * pad);
  if (refCells) {
    ctx.fillStyle = 'rgba(120,128,140,0.18)';
    for (let i = 0; i < refCells.x.length; i++) {
      ctx.beginPath();
      ctx.arc(sx(refCells.x[i]), sy(refCells.y[i]), 2, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  const latest = state.run && state.run.batches.slice().reverse().find((b) => b.outcome === 'ok');
  const n = c.cells.x.length;
  for (let i = 0; i < n; i++) {
    ctx.beginPath();
    ctx.arc(sx(c.cells.x[i]), sy(c.cells.y[i]), 2.6, 0, 2 * Math.PI);
    ctx.fillStyle = colour(c.cells.label[i]);
    ctx.fill();
    if (latest && c.cells.batch[i] === latest.batch) {
      ctx.strokeStyle = 'rgba(20,20,20,0.7)';
      ctx.lineWidth = 0.8;
      ctx.stroke();
    }
  }
  canvas.dataset.cells = String(n);
  const how = c.projection === 'reference'
    ? 'placed on the reference\'s map by their nearest reference cells (grey)'
    : 'on the run\'s first two principal components';
  note.textContent = `(${fmt(n)} sampled cells${c.sampled_every > 1 ? `, 1 in ${c.sampled_every}` : ''}, ${how}; the latest batch ringed)`;
}

document.addEventListener('DOMContentLoaded', () => {
  connect();
  load().catch(reportError);
  // Some alert states depend on time alone; the whole view is re-read now and then too.
  setInterval(() => { load().catch(reportError); }, 60000);
});
