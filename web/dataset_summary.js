// The dataset nodes' summary (image counts, the bucket table, skipped files) shown on the node
// itself, from the pack's "sd3lora.dataset" websocket event sent when the node runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const DATASET_NODES = ["SD3LoraImageFolder", "SD3LoraDatasetConfig", "SD3LoraImagesFromGraph"];
const WIDGET = "dataset summary";

/** The node's read-only summary box, made on first use; never saved into the workflow. */
function summaryWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = node.addWidget("text", WIDGET, "", () => {}, { multiline: true, serialize: false });
    widget.serialize = false; // keep widgets_values (and so shared workflows) unchanged
    widget.disabled = true;
  }
  return widget;
}

function onDataset(event) {
  const node = app.graph?.getNodeById(Number(event.detail?.node)) ?? app.graph?.getNodeById(event.detail?.node);
  if (!node || !DATASET_NODES.includes(node.comfyClass ?? node.type)) return;
  summaryWidget(node).value = event.detail.summary;
  node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize?.()[1] ?? node.size[1])]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "sd3lora.DatasetSummary",
  async setup() {
    api.addEventListener("sd3lora.dataset", onDataset);
  },
});
