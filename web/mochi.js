// Mochi 1 nodes: frontend helpers, through the frontend's public extension hooks only.
//  - Mochi1SaveVideo plays the video it saved, inside the node.
//  - Mochi1Sampler snaps frames to 6k+1 and width/height to multiples of 16, and shows the
//    latent size and the DiT token count for the current shape.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "mochi.nodes";
const SAVE_NODE = "Mochi1SaveVideo";
const SHAPE_NODES = ["Mochi1Sampler"];

export function snapFrames(value) {
  const k = Math.max(1, Math.round((Number(value) - 1) / 6));
  return 6 * k + 1;
}

export function snapSize(value) {
  return Math.max(16, Math.round(Number(value) / 16) * 16);
}

export function latentInfo(width, height, frames) {
  const t = (frames - 1) / 6 + 1;
  const h = height / 8;
  const w = width / 8;
  const tokens = t * (h / 2) * (w / 2);
  return { t, h, w, tokens, text: `latent 12×${t}×${h}×${w} · ${tokens.toLocaleString("en-US")} tokens` };
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function addInfoWidget(node) {
  const element = document.createElement("div");
  element.className = "mochi1-shape-info";
  element.style.cssText = "font: 12px monospace; opacity: 0.8; padding: 2px 6px; white-space: nowrap;";
  const info = node.addDOMWidget("mochi_shape_info", "mochi_info", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => element.textContent,
    setValue: () => {},
  });
  info.serialize = false;
  info.computeSize = (width) => [width, 22];
  return element;
}

function setupShapeHelpers(node) {
  const width = widget(node, "width");
  const height = widget(node, "height");
  const frames = widget(node, "frames");
  if (!width || !height || !frames) return;
  const element = addInfoWidget(node);
  const refresh = () => {
    const latentLinked = node.inputs?.some((i) => i.name === "latent" && i.link != null);
    const info = latentInfo(width.value, height.value, frames.value);
    element.textContent = latentLinked ? "size from the connected latent" : info.text;
    node.mochiShapeInfo = element.textContent;
  };
  const snap = (w, fn) => {
    const original = w.callback;
    w.callback = function (value, ...rest) {
      const snapped = fn(value);
      if (snapped !== w.value) w.value = snapped;
      const result = original?.call(this, snapped, ...rest);
      refresh();
      return result;
    };
  };
  snap(width, snapSize);
  snap(height, snapSize);
  snap(frames, snapFrames);
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    const result = onConnectionsChange?.apply(this, args);
    refresh();
    return result;
  };
  node.mochiRefreshShape = refresh;
  refresh();
}

function videoElement(result) {
  const params = new URLSearchParams({
    filename: result.filename,
    subfolder: result.subfolder ?? "",
    type: result.type ?? "output",
  });
  const url = api.apiURL(`/view?${params}`);
  const isVideo = result.format === "mp4" || result.format === "webm";
  const el = document.createElement(isVideo ? "video" : "img");
  el.src = url;
  el.style.cssText = "width: 100%; max-height: 100%; object-fit: contain;";
  if (isVideo) {
    Object.assign(el, { controls: true, loop: true, muted: true, autoplay: true, playsInline: true });
  }
  el.title = `${result.filename} · ${result.frames} frames at ${result.fps} fps`;
  return el;
}

function setupVideoPlayer(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    const result = onExecuted?.apply(this, arguments);
    const saved = message?.mochi_video?.[0];
    if (!saved) return result;
    if (!this.mochiPlayer) {
      const container = document.createElement("div");
      container.className = "mochi1-player";
      container.style.cssText = "width: 100%; height: 100%; display: flex; justify-content: center;";
      const w = this.addDOMWidget("mochi_player", "mochi_video", container, {
        serialize: false,
        hideOnZoom: false,
        getValue: () => "",
        setValue: () => {},
      });
      w.serialize = false;
      w.computeSize = (width) => [width, Math.max(160, width * 0.6)];
      this.mochiPlayer = container;
      this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
    }
    this.mochiPlayer.replaceChildren(videoElement(saved));
    this.mochiSaved = saved;
    app.graph?.setDirtyCanvas(true, true);
    return result;
  };
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === SAVE_NODE) setupVideoPlayer(nodeType);
  },
  async nodeCreated(node) {
    if (SHAPE_NODES.includes(node.comfyClass)) setupShapeHelpers(node);
  },
  async loadedGraphNode(node) {
    node.mochiRefreshShape?.();
  },
});
