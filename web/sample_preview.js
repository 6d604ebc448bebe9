// Newest training sample inside the SD3 LoRA Train node (right of the loss chart, below the stats
// line) with the step it was made at, from the pack's "sd3lora.samples" websocket event or the
// server's history after a page reload.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TRAIN_NODE, applyRecord, findNode, liveArea, liveLayout } from "./lib/live_view.js";

/** The /view URL of a saved sample (the host serves the output folder there). */
function viewUrl(info) {
  const q = new URLSearchParams({ filename: info.filename, subfolder: info.subfolder ?? "", type: info.type ?? "output" });
  return api.apiURL(`/view?${q}`);
}

function onSamples(event) {
  const node = findNode(event.detail?.node);
  if (node) applyRecord(node, { samples: event.detail.images, samples_step: event.detail.step });
}

/** The loaded <img> of the node's newest sample (loading it on first use), or null. */
function sampleImage(node) {
  const info = node.sd3lora?.samples?.[0];
  if (!info) return null;
  const url = viewUrl(info);
  if (node.sd3loraImage?.dataset.url !== url) {
    const img = new Image();
    img.dataset.url = url;
    img.onload = () => node.setDirtyCanvas?.(true, true);
    img.src = url;
    node.sd3loraImage = img;
  }
  return node.sd3loraImage.complete && node.sd3loraImage.naturalWidth ? node.sd3loraImage : null;
}

app.registerExtension({
  name: "sd3lora.SamplePreview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      const img = !this.flags?.collapsed && sampleImage(this);
      const box = img && liveLayout(liveArea(this), true).thumb;
      if (box) {
        const label = this.sd3lora.samplesStep != null ? `sample, step ${this.sd3lora.samplesStep}` : "sample";
        const room = box.h - 14; // the label goes under the image
        const scale = Math.min(box.w / img.naturalWidth, room / img.naturalHeight);
        const w = img.naturalWidth * scale, h = img.naturalHeight * scale;
        ctx.drawImage(img, box.x + (box.w - w) / 2, box.y, w, h);
        ctx.save();
        ctx.font = "11px sans-serif";
        ctx.fillStyle = "#ccc";
        ctx.textAlign = "center";
        ctx.fillText(label, box.x + box.w / 2, box.y + h + 11);
        ctx.restore();
      }
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.sd3loraImage = null; // drop the image so the browser can free it
      return onRemoved?.apply(this, arguments);
    };
  },
  setup() {
    api.addEventListener("sd3lora.samples", onSamples);
  },
});
