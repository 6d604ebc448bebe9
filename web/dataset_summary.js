// The dataset nodes' summary (image counts, the bucket table, skipped files) drawn on the node
// itself below its widgets, from the pack's "sd3lora.dataset" websocket event sent when the node
// runs, and from the server's history after a page reload. It is drawn text, not a widget: the
// frontend draws a read-only widget without its value, and the workflow's saved values stay as
// they were.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { fetchHistory, nodeById, widgetsBottom } from "./lib/live_view.js";

const DATASET_NODES = ["SD3LoraImageFolder", "SD3LoraDatasetConfig", "SD3LoraImagesFromGraph"];
const LINE = 14, PAD = 8, FONT = "11px monospace";

const isDatasetNode = (node) => DATASET_NODES.includes(node?.comfyClass ?? node?.type);

/** The summary's lines wrapped to the node's width (the node never widens for them, so it keeps
 to its column of the layout), or [] when the node has not run. Cached per text and width. */
function summaryLines(node) {
  if (!node.sd3loraSummary) return [];
  const width = node.size[0] - 2 * PAD;
  const cached = node.sd3loraWrapped;
  if (cached?.text === node.sd3loraSummary && cached.width === width) return cached.lines;
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = FONT;
  const lines = [];
  for (const raw of node.sd3loraSummary.split("\n")) {
    let line = raw;
    while (line.length > 1 && ctx.measureText(line).width > width) {
      let cut = line.length - 1;
      while (cut > 1 && ctx.measureText(line.slice(0, cut)).width > width) cut--;
      const space = line.lastIndexOf(" ", cut);
      if (space > cut / 2) cut = space + 1; // break at a space when one is near
      lines.push(line.slice(0, cut));
      line = line.slice(cut);
    }
    lines.push(line);
  }
  node.sd3loraWrapped = { text: node.sd3loraSummary, width, lines };
  return lines;
}

/** Show `summary` on the node and grow the node (downwards) so that every line is inside it. */
function setSummary(node, summary) {
  node.sd3loraSummary = summary;
  const min = node.computeSize();
  node.setSize([node.size[0], Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas?.(true, true);
}

function onDataset(event) {
  const node = nodeById(event.detail?.node);
  if (isDatasetNode(node)) setSummary(node, event.detail.summary);
}

function drawSummary(ctx, node) {
  const lines = summaryLines(node);
  if (!lines.length) return;
  const top = Math.min(widgetsBottom(node) ?? node.size[1], node.size[1] - lines.length * LINE - PAD);
  ctx.save();
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(PAD / 2, top + 2, node.size[0] - PAD, lines.length * LINE + 4);
  ctx.font = FONT;
  ctx.fillStyle = "#ddd";
  lines.forEach((line, i) => ctx.fillText(line, PAD, top + 2 + LINE * (i + 1) - 3));
  ctx.restore();
}

app.registerExtension({
  name: "sd3lora.DatasetSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!DATASET_NODES.includes(nodeData.name)) return;
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize.apply(this, arguments);
      const lines = summaryLines(this).length;
      if (lines) size[1] += lines * LINE + PAD;
      return size;
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      if (!this.flags?.collapsed) drawSummary(ctx, this);
      return result;
    };
  },
  async setup() {
    api.addEventListener("sd3lora.dataset", onDataset);
  },
  async loadedGraphNode(node) {
    if (!isDatasetNode(node)) return;
    const rec = await fetchHistory(node.id);
    if (rec?.dataset_summary) setSummary(node, rec.dataset_summary);
  },
});
