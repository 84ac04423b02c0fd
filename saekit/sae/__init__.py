"""Sparse autoencoders: training (`train_sae`), the sae-lens folder format (`save_sae`,
`load_sae`) and sparse encoding (`encode_sparse`)."""

from saekit.sae.config import MemoryEstimate, SAETrainConfig, memory_estimate
from saekit.sae.encode import encode_dense, encode_sparse, load_codes, save_codes
from saekit.sae.io import LoadedSAE, load_sae, read_sae_info, save_sae
from saekit.sae.model import SparseAutoencoder
from saekit.sae.training import SAETrainer, TrainingData, lr_at, train_sae

__all__ = [
    "LoadedSAE", "MemoryEstimate", "SAETrainConfig", "SAETrainer", "SparseAutoencoder",
    "TrainingData", "encode_dense", "encode_sparse", "load_codes", "load_sae", "lr_at",
    "memory_estimate", "read_sae_info", "save_codes", "save_sae", "train_sae",
]
