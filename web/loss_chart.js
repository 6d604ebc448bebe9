// Loss chart inside the SD3 LoRA Train node: raw and smoothed loss, step/total, steps/s, ETA,
// learning rate. Updated from the pack's "sd3lora.progress" websocket event; restored from the
// server after a page reload.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  CHART_HEIGHT, STATS_HEIGHT, TRAIN_NODE, applyRecord, emptyView, findNode, formatDuration, liveArea,
  loadHistory, smooth,
} from "./lib/live_view.js";

const RAW = "rgba(140,170,230,0.55)", SMOOTH = "#f07030", GRID = "#555", TEXT = "#ccc";

function onProgress(event) {
  const node = findNode(event.detail?.node);
  if (node) applyRecord(node, event.detail);
}

/** Draw the stats line and the chart into the node's live area (left of any sample image). */
function drawChart(ctx, node) {
  const view = node.sd3lora ?? emptyView();
  const area = liveArea(node);
  const imageW = view.samples.length ? area.h : 0; // sample_preview.js draws a square on the right
  const w = area.w - (imageW ? imageW + 6 : 0);
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.fillStyle = TEXT;
  const stats = [`step ${view.step}/${view.total || "?"}`,
                 view.stepsPerS ? `${view.stepsPerS.toFixed(2)} it/s` : null,
                 view.running ? `ETA ${formatDuration(view.etaS)}` : null,
                 view.lr != null ? `lr ${view.lr.toExponential(1)}` : null,
                 view.losses.length ? `loss ${view.losses[view.losses.length - 1].toFixed(4)}` : null];
  ctx.fillText(stats.filter(Boolean).join("  ·  "), area.x, area.y + 11);
  const top = area.y + STATS_HEIGHT, h = area.h - STATS_HEIGHT;
  ctx.strokeStyle = GRID;
  ctx.strokeRect(area.x, top, w, h);
  const losses = view.losses;
  if (losses.length) {
    const lo = Math.min(...losses), hi = Math.max(...losses), span = hi - lo || 1;
    const px = (i) => area.x + (losses.length > 1 ? (i / (losses.length - 1)) * w : w / 2);
    const py = (v) => top + h - ((v - lo) / span) * (h - 4) - 2;
    for (const [series, color, width] of [[losses, RAW, 1], [smooth(losses), SMOOTH, 2]]) {
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      series.forEach((v, i) => (i ? ctx.lineTo(px(i), py(v)) : ctx.moveTo(px(i), py(v))));
      if (series.length === 1) ctx.arc(px(0), py(series[0]), 2, 0, 2 * Math.PI);
      ctx.stroke();
    }
    ctx.fillStyle = TEXT;
    ctx.fillText(hi.toPrecision(3), area.x + 3, top + 11);
    ctx.fillText(lo.toPrecision(3), area.x + 3, top + h - 3);
  } else {
    ctx.fillText("loss chart: queue the workflow to train", area.x + 6, top + h / 2);
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
      size[1] += CHART_HEIGHT; // room for the chart below the widgets
      size[0] = Math.max(size[0], 340);
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
