"""saekit: hook layers of multimodal LLMs, cache their activations with token-type tags,
train sparse autoencoders in the sae-lens format, and encode to sparse codes.

saekit knows nothing of segmentation: segcompass is one of its clients.
"""

__version__ = "0.1.0"
