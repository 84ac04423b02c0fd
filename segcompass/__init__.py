"""segcompass: reasoning segmentation whose path from thought to mask goes through SAE concepts."""
