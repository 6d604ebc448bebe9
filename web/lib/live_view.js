// Shared state of the SD3 LoRA live view: one `node.sd3lora` object per training node, filled from
// the pack's websocket events and, after a page reload, from GET /sd3lora/history?node=ID.
// This module only exports helpers; the extensions that use it are loss_chart.js and sample_preview.js.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

export const TRAIN_NODE = "SD3LoraTrain";
export const CHART_HEIGHT = 150; // px added below the node's widgets for the chart and stats line
export const STATS_HEIGHT = 18;

/** A fresh, empty view for one node. */
export function emptyView() {
  return { losses: [], step: 0, total: 0, lr: null, stepsPerS: null, etaS: null, running: false, samples: [] };
}

/** The training node with id `id` in the current graph, or null. */
export function findNode(id) {
  const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
  return node?.type === TRAIN_NODE || node?.comfyClass === TRAIN_NODE ? node : null;
}

/** Merge a server record (event or history) into the node's view and redraw. */
export function applyRecord(node, rec) {
  const view = (node.sd3lora ??= emptyView());
  // A history answer can arrive after newer step events: it never moves the view back.
  if (Array.isArray(rec.losses) && (rec.step ?? 0) < view.step) return;
  if (Array.isArray(rec.losses)) view.losses = rec.losses.slice();
  else if (typeof rec.loss === "number") {
    view.losses.length = Math.min(view.losses.length, rec.step - 1); // a new session starts at step 1
    view.losses.push(rec.loss);
  }
  if (rec.step != null) view.step = rec.step;
  if (rec.total != null) view.total = rec.total;
  if (rec.lr != null) view.lr = rec.lr;
  if ("steps_per_s" in rec) view.stepsPerS = rec.steps_per_s;
  if ("eta_s" in rec) view.etaS = rec.eta_s;
  if ("running" in rec) view.running = rec.running;
  if (rec.done) view.running = false;
  else if (typeof rec.loss === "number") view.running = true;
  if (Array.isArray(rec.samples)) view.samples = rec.samples;
  node.setDirtyCanvas?.(true, true);
}

/** Fetch the server's history of a node (chart after a page reload). */
export async function loadHistory(node) {
  try {
    const res = await api.fetchApi(`/sd3lora/history?node=${encodeURIComponent(node.id)}`);
    if (res.ok) applyRecord(node, await res.json());
  } catch (err) {
    console.warn("sd3lora: could not load the training history", err);
  }
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

/** The node area below the widgets where the live view draws: {x, y, w, h}. */
export function liveArea(node) {
  return { x: 8, y: node.size[1] - CHART_HEIGHT, w: node.size[0] - 16, h: CHART_HEIGHT - 6 };
}
