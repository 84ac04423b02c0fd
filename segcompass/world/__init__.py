"""The embedded world: a procedural reasoning-segmentation world and the training of its
stand-ins for pretrained models (the tiny policy's warm start, its probes, the world SAM).

It plays the role that LLaVA / Qwen2.5-VL, SAM ViT-H and RefCOCO play for a real user, so the
whole method runs on a CPU. It depends on the model and training packages, never the reverse.
"""
