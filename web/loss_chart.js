// Loss chart inside the SD3 LoRA Train node: raw and smoothed loss over the step axis, a legend,
// step/total, steps/s, ETA, learning rate, what the session did (continuing, or why it started
// anew), and the caching's progress before the first step. Updated from the pack's
// "sd3lora.progress" websocket event; restored from the server after a page reload.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  CHART_HEIGHT, TRAIN_NODE, applyRecord, emptyView, findNode, formatDuration, liveArea, liveLayout,
  loadHistory, smooth,
} from "./lib/live_view.js";

const RAW = "rgba(140,170,230,0.55)", SMOOTH = "#f07030", GRID = "#555", TEXT = "#ccc", DIM = "#999";
const NEW_SESSION = "#e0b050";

function onProgress(event) {
  const node = findNode(event.detail?.node);
  if (node) applyRecord(node, event.detail);
}

/** The stats line: caching progress before the first step, then step, rate, ETA, lr and loss. */
function statsText(view) {
  if (view.phase && !view.losses.length) return view.phase;
  const last = view.losses[view.losses.length - 1];
  return [`step ${view.step}/${view.total || "?"}`,
          view.stepsPerS ? `${view.stepsPerS.toFixed(2)} it/s` : null,
          view.running ? `ETA ${formatDuration(view.etaS)}` : null,
          view.lr != null ? `lr ${view.lr.toExponential(1)}` : null,
          last != null ? `loss ${last.toFixed(4)}` : null].filter(Boolean).join("  ·  ");
}

/** Text clipped with an ellipsis to `width` px. */
function fit(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  while (text.length > 1 && ctx.measureText(text + "…").width > width) text = text.slice(0, -1);
  return text + "…";
}

/** Loss labels left of the plot, step labels below it, and the raw/smoothed legend above its top right. */
function drawAxes(ctx, plot, lo, hi, first, last) {
  ctx.fillStyle = TEXT;
  ctx.textAlign = "right";
  ctx.fillText(hi.toPrecision(3), plot.x - 4, plot.y + 9);
  ctx.fillText(lo.toPrecision(3), plot.x - 4, plot.y + plot.h);
  ctx.textAlign = "left";
  ctx.fillText(String(first), plot.x, plot.y + plot.h + 12);
  ctx.textAlign = "center";
  ctx.fillText("step", plot.x + plot.w / 2, plot.y + plot.h + 12);
  ctx.textAlign = "right";
  ctx.fillText(String(last), plot.x + plot.w, plot.y + plot.h + 12);
  // Legend inside the plot's top right, on a backing so the lines never hide it.
  const items = [["raw", RAW], ["smoothed", SMOOTH]];
  let x = plot.x + plot.w - 4;
  for (const [label, color] of items.reverse()) {
    const w = ctx.measureText(label).width;
    ctx.fillStyle = "rgba(30,30,30,0.8)";
    ctx.fillRect(x - w - 20, plot.y + 2, w + 20, 12);
    ctx.fillStyle = TEXT;
    ctx.fillText(label, x, plot.y + 12);
    ctx.fillStyle = color;
    ctx.fillRect(x - w - 17, plot.y + 7, 12, 2);
    x -= w + 26;
  }
  ctx.textAlign = "left";
}

/** Draw the stats line, the session note and the chart into the node's live area. */
function drawChart(ctx, node) {
  const view = node.sd3lora ?? emptyView();
  const area = liveArea(node);
  const lay = liveLayout(area, view.samples.length > 0);
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = TEXT;
  ctx.fillText(fit(ctx, statsText(view), area.w), lay.stats.x, lay.stats.y);
  if (view.note) {
    const fresh = /new session/.test(view.note);
    ctx.fillStyle = fresh ? NEW_SESSION : DIM;
    ctx.fillText(fit(ctx, view.note, area.w), lay.note.x, lay.note.y);
  }
  const plot = lay.plot;
  ctx.strokeStyle = GRID;
  ctx.strokeRect(plot.x, plot.y, plot.w, plot.h);
  const losses = view.losses;
  if (losses.length) {
    const lo = Math.min(...losses), hi = Math.max(...losses), span = hi - lo || 1;
    const px = (i) => plot.x + (losses.length > 1 ? (i / (losses.length - 1)) * plot.w : plot.w / 2);
    const py = (v) => plot.y + plot.h - ((v - lo) / span) * (plot.h - 20) - 2; // the top 18 px hold the legend
    for (const [series, color, width] of [[losses, RAW, 1], [smooth(losses), SMOOTH, 2]]) {
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      series.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
      if (series.length === 1) ctx.arc(px(0), py(series[0]), 2, 0, 2 * Math.PI);
      ctx.stroke();
    }
    drawAxes(ctx, plot, lo, hi, view.step - losses.length + 1, view.step);
  } else {
    ctx.fillStyle = DIM;
    ctx.fillText(view.phase ? "the chart starts at the first step" : "loss chart: queue the workflow to train",
                 plot.x + 6, plot.y + plot.h / 2);
  }
  ctx.restore();
}

app.registerExtension({
  name: "sd3lora.LossChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize.apply(this, arguments);
      size[1] += CHART_HEIGHT; // room for the live view below the widgets
      size[0] = Math.max(size[0], 380);
      return size;
    };
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.sd3lora = emptyView();
      this.setSize(this.computeSize());
      return result;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) drawChart(ctx, this);
      return result;
    };
  },
  setup() {
    api.addEventListener("sd3lora.progress", onProgress);
  },
  loadedGraphNode(node) {
    if (node.type !== TRAIN_NODE && node.comfyClass !== TRAIN_NODE) return;
    // Saved workflows may carry a size without room for the chart (applied after onConfigure).
    const min = node.computeSize();
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
    loadHistory(node);
  },
  nodeCreated(node) {
    if (node.comfyClass === TRAIN_NODE) loadHistory(node);
  },
});
