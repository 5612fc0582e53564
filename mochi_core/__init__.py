"""mochi_core: Genmo's Mochi 1 text-to-video model as a standalone PyTorch library (no ComfyUI)."""
