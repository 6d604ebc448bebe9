// Shared state of the SD3 LoRA live view: one `node.sd3lora` object per training node, filled from
// the pack's websocket events and, after a page reload, from GET /sd3lora/history?node=ID.
// This module only exports helpers; the extensions that use it are loss_chart.js and sample_preview.js.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

export const TRAIN_NODE = "SD3LoraTrain";
export const CHART_HEIGHT = 190; // px the live view needs below the node's widgets (its minimum)
export const LINE_HEIGHT = 15; // the stats line and the session note above the chart
export const AXIS_HEIGHT = 14; // step labels below the chart
export const GUTTER = 44; // loss labels left of the chart

/** A fresh, empty view for one node. */
export function emptyView() {
  return { losses: [], step: 0, total: 0, lr: null, stepsPerS: null, etaS: null, running: false, samples: [],
           samplesStep: null, note: "", phase: "" };
}

/** The node with id `id` in the current graph, or null. */
export function nodeById(id) {
  return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id) ?? null;
}

/** The training node with id `id` in the current graph, or null. */
export function findNode(id) {
  const node = nodeById(id);
  return node?.type === TRAIN_NODE || node?.comfyClass === TRAIN_NODE ? node : null;
}

/** Merge a server record (event or history) into the node's view and redraw.

 `reset` (a run starts) replaces the view with the session's: a new session's chart starts empty
 and its note says why. `losses` (history, a run's end) is the whole series. */
export function applyRecord(node, rec) {
  let view = (node.sd3lora ??= emptyView());
  if (rec.reset) view = node.sd3lora = Object.assign(emptyView(), { samples: view.samples, samplesStep: view.samplesStep });
  // A history answer can arrive after newer step events: it never moves the view back.
  else if (Array.isArray(rec.losses) && !rec.done && (rec.step ?? 0) < view.step) return;
  if (Array.isArray(rec.losses)) view.losses = rec.losses.slice();
  else if (typeof rec.loss === "number") {
    view.losses.length = Math.min(view.losses.length, rec.step - 1);
    view.losses.push(rec.loss);
    view.phase = "";
  }
  if (rec.step != null) view.step = rec.step;
  if (rec.total != null) view.total = rec.total;
  if (rec.lr != null) view.lr = rec.lr;
  if ("steps_per_s" in rec) view.stepsPerS = rec.steps_per_s;
  if ("eta_s" in rec) view.etaS = rec.eta_s;
  if ("running" in rec) view.running = rec.running;
  if (rec.done) view.running = false;
  else if (typeof rec.loss === "number") view.running = true;
  if (typeof rec.note === "string") view.note = rec.note;
  if (typeof rec.phase === "string") view.phase = rec.phase;
  if (Array.isArray(rec.samples)) view.samples = rec.samples;
  if ("samples_step" in rec) view.samplesStep = rec.samples_step;
  node.setDirtyCanvas?.(true, true);
}

/** GET /sd3lora/history for a node: its chart, or a dataset node's summary (null on failure). */
export async function fetchHistory(nodeId) {
  try {
    const res = await api.fetchApi(`/sd3lora/history?node=${encodeURIComponent(nodeId)}`);
    return res.ok ? await res.json() : null;
  } catch (err) {
    console.warn("sd3lora: could not load the history of node", nodeId, err);
    return null;
  }
}

/** Fetch the server's history of a training node (chart after a page reload). */
export async function loadHistory(node) {
  const rec = await fetchHistory(node.id);
  if (rec) applyRecord(node, rec);
}

/** Exponential moving average with TensorBoard's bias correction (same as nodes/loss_plot.py). */
export function smooth(values, weight = 0.9) {
  let avg = 0;
  return values.map((v, i) => {
    avg = weight * avg + (1 - weight) * v;
    return avg / (1 - weight ** (i + 1));
  });
}

/** "1h02m", "3m05s", "12s". */
export function formatDuration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "-";
  const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  if (h) return `${h}h${String(m).padStart(2, "0")}m`;
  return m ? `${m}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

/** The y (node coordinates) just below the node's last widget, or null before widgets are laid out. */
export function widgetsBottom(node) {
  let bottom = null;
  for (const w of node.widgets ?? []) {
    const y = w.last_y ?? w.y;
    if (typeof y !== "number" || w.hidden) continue;
    const h = w.computeSize?.(node.size[0])?.[1] ?? globalThis.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20;
    bottom = Math.max(bottom ?? 0, y + h);
  }
  return bottom;
}

/** The node area below the widgets where the live view draws: {x, y, w, h}. It starts right under
 the last widget (no gap, whatever size a workflow stored) and fills the node to its bottom. */
export function liveArea(node) {
  const top = widgetsBottom(node) ?? node.size[1] - CHART_HEIGHT;
  const y = Math.min(top + 6, node.size[1] - CHART_HEIGHT);
  return { x: 8, y, w: node.size[0] - 16, h: node.size[1] - y - 6 };
}

/** Where each part of the live view goes inside `area`: stats line, note line, chart, step axis,
 and the sample thumbnail right of the chart (below the text, so it never covers it). */
export function liveLayout(area, hasSample) {
  const top = area.y + 2 * LINE_HEIGHT + 2;
  const plotH = area.h - 2 * LINE_HEIGHT - AXIS_HEIGHT - 4;
  const thumb = hasSample ? Math.min(plotH, Math.floor(area.w * 0.4)) : 0;
  return {
    stats: { x: area.x, y: area.y + 11 },
    note: { x: area.x, y: area.y + LINE_HEIGHT + 11 },
    plot: { x: area.x + GUTTER, y: top, w: area.w - GUTTER - (thumb ? thumb + 8 : 0), h: plotH },
    thumb: thumb ? { x: area.x + area.w - thumb, y: top, w: thumb, h: thumb } : null,
  };
}
