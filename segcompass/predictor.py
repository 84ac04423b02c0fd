"""The user API: images + instructions -> masks, with the concept pathway kept as data.

`Predictor` wraps one loaded `SegCompass` and reuses it for every call:

    1. decode   greedy, KV-cached generation of '<think> … </think> <REF_POS>×K' (never
                sampling: upstream evaluated at temperature 1.0, so its scores were noisy);
    2. forward  ONE SegCompass pass over prompt + response: SAE codes, slot heatmaps,
                confidences, masks and provenance;
    3. post     masks back to the image frame, the final mask, and per slot its top atoms
                with where they fire (image patches on the policy's grid, prompt/CoT words).

The final mask is the single slot's mask for the single-object prompt, and for the
multi-object prompt the union of the slots whose confidence is >= `conf_threshold`
(none -> empty: that is how "no target" is predicted).

    predictor = Predictor(load_segcompass("runs/segcompass/final"), PredictorConfig(conf_threshold=0.5))
    [pred] = predictor.predict([image], ["the red square"], multi=False)
    pred.mask, pred.confidences, pred.provenance[0].atoms[0].image_cells
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from saekit.errors import UserError
from saekit.inputs import ModelBatch, TokenType, build_batch
from segcompass.model import SegCompass, SegCompassOutput
from segcompass.postprocess import masks_to_image, resized_size
from segcompass.template import ParsedResponse, build_prompt, k_for, parse_response

DEFAULT_CONF_THRESHOLD = 0.5


class TextFiring(NamedTuple):
    """An atom firing at a text token."""

    text: str
    """The token's text (a word for the world's tokenizer), whitespace stripped."""
    position: int
    """Position in the policy's input sequence (prompt + response)."""
    response_index: int
    """Index among the response (chain of thought) tokens; -1 for a prompt token."""
    kind: str
    """'prompt' (the question) or 'response' (the model's chain of thought)."""
    activation: float
    """SAE activation h_j at this token."""


class AtomTrace(NamedTuple):
    """One atom of a slot's concept pathway: its weight and where it fired."""

    atom: int
    """SAE atom index j."""
    weight: float
    """Summed attention weight of the atom's (token, atom) pairs into the slot."""
    name: str | None
    """Human-readable concept name, when the caller supplied `atom_names`."""
    image_cells: np.ndarray
    """(n, 2) int (row, col) of the image tokens where the atom fired, on the policy's grid."""
    image_values: np.ndarray
    """(n,) float activation at those image tokens."""
    text: list[TextFiring]
    """Prompt and response tokens where the atom fired, in sequence order."""

    def image_map(self, grid_shape: tuple[int, int]) -> np.ndarray:
        """(rows, cols) float32 activation of the atom on the image-token grid (0 where silent)."""
        out = np.zeros(grid_shape, dtype=np.float32)
        if len(self.image_cells):
            out[self.image_cells[:, 0], self.image_cells[:, 1]] = self.image_values
        return out


class SlotTrace(NamedTuple):
    """Provenance of one slot: its heaviest atoms."""

    slot: int
    atoms: list[AtomTrace]
    """Heaviest first."""


class ResponseToken(NamedTuple):
    text: str
    """The token's surface text, with its leading space (concatenating them gives the response)."""
    position: int
    """Position in the policy's input sequence."""


class Prediction(NamedTuple):
    """Everything one image + instruction produced. K = slots the prompt asked for."""

    mask: np.ndarray
    """(H, W) bool final mask."""
    slot_masks: np.ndarray
    """(K, H, W) bool per-slot masks (mask logit > 0) in the image frame."""
    slot_probs: np.ndarray
    """(K, H, W) float32 per-slot mask probabilities in the image frame."""
    heatmaps: np.ndarray
    """(K, h, w) float32 slot heatmap probabilities H_k at the head's resolution, padding cropped."""
    confidences: np.ndarray
    """(K,) float32 slot confidences c_k (sigmoid)."""
    selected: np.ndarray
    """(K,) bool slots that make up `mask`."""
    response: str
    """The generated response (special tokens kept)."""
    parsed: ParsedResponse
    """`template.parse_response(response, K)`; `.think` is the chain of thought."""
    provenance: list[SlotTrace]
    """Per slot, its top atoms and where they fire."""
    response_tokens: list[ResponseToken]
    """The response as the policy tokenized it (for highlighting the chain of thought)."""
    image_grid: tuple[int, int]
    """(rows, cols) of the policy's image-token grid."""
    grid_region: tuple[int, int, int, int]
    """(top, left, height, width) of the image region the grid covers (LLaVA centre-crops)."""
    multi: bool
    """Whether the multi-object (K-slot) prompt was used."""


@dataclass(frozen=True)
class PredictorConfig:
    """How predictions are made (shared by `segcompass predict` and `segcompass eval`)."""

    conf_threshold: float = DEFAULT_CONF_THRESHOLD
    """Multi-object prompt: slots with confidence >= this make up the mask (none -> empty mask)."""
    max_new_tokens: int = 96
    """Longest generated response, in tokens (greedy decoding)."""
    batch_size: int = 16
    """Images per decoding + forward batch."""
    top_atoms: int = 8
    """SAE atoms kept per slot in the provenance (0 = none)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf_threshold <= 1.0:
            raise UserError(f"--conf-threshold must lie in [0, 1], got {self.conf_threshold}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.top_atoms < 0:
            raise UserError(f"need --max-new-tokens >= 1, --batch-size >= 1 and --top-atoms >= 0 (got "
                            f"{self.max_new_tokens}, {self.batch_size}, {self.top_atoms})")


class Stages(NamedTuple):
    """Seconds spent in each stage of the last `predict` call (summed over batches)."""

    decode: float
    forward: float
    postprocess: float


class Query(NamedTuple):
    """One request, as the stage methods take it."""

    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    instruction: str
    multi: bool
    """Use the multi-object (K-slot) prompt."""


class Predictor:
    """Greedy decoding + one SegCompass pass + post-processing, reusing one loaded model."""

    def __init__(self, model: SegCompass, config: PredictorConfig | None = None, *,
                 atom_names: dict[int, str] | None = None):
        self.model = model.eval()  # inference only: no dropout
        self.config = config or PredictorConfig()
        self.atom_names = dict(atom_names or {})
        self.last_stages = Stages(0.0, 0.0, 0.0)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray], instructions: Sequence[str], *,
                multi: bool | Sequence[bool], progress: bool = False) -> list[Prediction]:
        """(H, W, 3) uint8 RGB images + instructions -> one Prediction each, in order."""
        queries = _queries(images, instructions, multi)
        out, times = [], np.zeros(3)
        for start in tqdm(range(0, len(queries), self.batch_size), desc="predict", disable=not progress):
            chunk = queries[start:start + self.batch_size]
            t0 = time.perf_counter()
            responses = self.generate(chunk)
            t1 = time.perf_counter()
            batch, result = self.run_model(chunk, responses)
            t2 = time.perf_counter()
            out += self.postprocess(chunk, responses, batch, result)
            times += (t1 - t0, t2 - t1, time.perf_counter() - t2)
        self.last_stages = Stages(*times.tolist())
        return out

    @torch.no_grad()
    def generate(self, queries: Sequence[Query]) -> list[str]:
        """Greedy responses (special tokens kept, end-of-turn and padding removed)."""
        prompts = [build_prompt(q.instruction, multi=q.multi) for q in queries]
        return greedy_responses(self.model.loaded, [q.image for q in queries], prompts,
                                max_new_tokens=self.config.max_new_tokens)

    @torch.no_grad()
    def run_model(self, queries: Sequence[Query], responses: Sequence[str]
                  ) -> tuple[ModelBatch, SegCompassOutput]:
        """The one SegCompass forward pass over prompt + response."""
        prompts = [build_prompt(q.instruction, multi=q.multi) for q in queries]
        batch = build_batch(self.model.loaded, [Image.fromarray(q.image) for q in queries], prompts,
                            list(responses), padding_side="right")
        embeddings = self.model.image_embeddings([q.image for q in queries])
        return batch, self.model(batch, embeddings)

    @torch.no_grad()
    def postprocess(self, queries: Sequence[Query], responses: Sequence[str], batch: ModelBatch,
                    out: SegCompassOutput) -> list[Prediction]:
        """Per sample: masks in the image frame, final mask, provenance."""
        tokens = _TokenTable(self.model.loaded.tokenizer, batch, out)
        return [self._one(b, q, responses[b], out, tokens) for b, q in enumerate(queries)]

    def _one(self, b: int, query: Query, response: str, out: SegCompassOutput,
             tokens: "_TokenTable") -> Prediction:
        k = min(k_for(query.multi), self.model.head.num_slots)
        height, width = query.image.shape[:2]
        side = self.model.sam_input_size
        resized = resized_size(height, width, side)
        logits = masks_to_image(out.head.mask_logits[b, :k], input_size=side, resized=resized,
                                original=(height, width))  # (k, m, m) -> (k, H, W)
        slot_probs = logits.sigmoid().float().cpu().numpy()
        slot_masks = (logits > 0).cpu().numpy()
        confidences = out.head.confidence_logits[b, :k].sigmoid().float().cpu().numpy()
        selected = np.ones(k, bool) if not query.multi else confidences >= self.config.conf_threshold
        mask = slot_masks[selected].any(axis=0) if selected.any() else np.zeros((height, width), bool)
        provenance = [SlotTrace(slot, self._atoms(b, slot, out, tokens)) for slot in range(k)]
        return Prediction(
            mask=mask, slot_masks=slot_masks, slot_probs=slot_probs,
            heatmaps=_heatmaps(out.head.heatmap_logits[b, :k], resized, side), confidences=confidences,
            selected=selected, response=response, parsed=parse_response(response, k_for(query.multi)),
            provenance=provenance, response_tokens=tokens.response_tokens(b), image_grid=tokens.grid_shape(b),
            grid_region=grid_region((height, width), self.model.loaded.image_processor), multi=query.multi)

    def _atoms(self, b: int, slot: int, out: SegCompassOutput, tokens: "_TokenTable") -> list[AtomTrace]:
        if self.config.top_atoms == 0:
            return []
        top = out.head.provenance.top_atoms(b, slot, self.config.top_atoms)
        traces = []
        for atom, weight, token_ids, values in zip(top.atoms.tolist(), top.weights.tolist(),
                                                   top.token_ids, top.values):
            cells, cell_values, text = tokens.firings(token_ids.cpu(), values.float().cpu())
            traces.append(AtomTrace(int(atom), float(weight), self.atom_names.get(int(atom)), cells,
                                    cell_values, text))
        return traces


def _queries(images: Sequence[np.ndarray], instructions: Sequence[str],
             multi: bool | Sequence[bool]) -> list[Query]:
    if isinstance(instructions, str):
        raise UserError("predict: instructions must be a list of strings, one per image")
    multis = [bool(multi)] * len(images) if isinstance(multi, (bool, np.bool_)) else [bool(m) for m in multi]
    if not len(images) == len(instructions) == len(multis):
        raise UserError(f"predict: {len(images)} images, {len(instructions)} instructions and "
                        f"{len(multis)} multi flags; give one of each per image")
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"predict: image {i} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    return [Query(np.asarray(i), str(t), m) for i, t, m in zip(images, instructions, multis)]


def _heatmaps(heatmap_logits: Tensor, resized: tuple[int, int], side: int) -> np.ndarray:
    """(k, m, m) heatmap logits in the padded square -> (k, h, w) probabilities of the image part."""
    m = heatmap_logits.shape[-1]
    h, w = max(1, round(resized[0] * m / side)), max(1, round(resized[1] * m / side))
    return heatmap_logits[:, :h, :w].sigmoid().float().cpu().numpy()


def grid_region(image_shape: tuple[int, int], image_processor) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image the policy's patch grid covers.

    LLaVA-1.5's CLIP processor resizes the shortest side and centre-crops a square, so its
    grid covers the central min(H, W) square; processors without a crop see everything.
    """
    height, width = image_shape
    if getattr(image_processor, "do_center_crop", False):
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side
    return 0, 0, height, width


@torch.no_grad()
def greedy_responses(loaded, images: Sequence[np.ndarray], prompts: Sequence[str], *,
                     max_new_tokens: int = 96) -> list[str]:
    """Greedy, KV-cached responses of one left-padded batch (as `policy_eval.generate_responses`,
    from raw images and prompts). The image placeholder token is suppressed: an image
    token inside a response would be taken for image features on the second pass."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    batch = build_batch(loaded, [Image.fromarray(i) for i in images], list(prompts), padding_side="left")
    inputs = {k: v.to(device) for k, v in batch.model_inputs.items()}
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                               pad_token_id=pad if pad is not None else eos,
                               suppress_tokens=[int(model.config.image_token_id)])
    texts = []
    for row in generated[:, inputs["input_ids"].shape[1]:].tolist():  # (B, T_new)
        row = row[:row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=False))
    return texts


class _TokenTable:
    """Looks up, for the SAE tokens of one forward pass, their sample, kind, grid cell and text."""

    def __init__(self, tokenizer, batch: ModelBatch, out: SegCompassOutput):
        self.tokenizer = tokenizer
        self.input_ids = batch.model_inputs["input_ids"].cpu()  # (B, T)
        self.types = batch.token_types.cpu()  # (B, T)
        self.grid = batch.image_grid.cpu()  # (B, T, 2)
        self.sample = out.slots.token_sample_index.cpu()  # (N,)
        self.position = out.slots.token_position.cpu()  # (N,)
        response = self.types == int(TokenType.RESPONSE)
        self.response_index = response.long().cumsum(1) - 1  # (B, T) index among response tokens
        self._words: dict[int, str] = {}

    def grid_shape(self, b: int) -> tuple[int, int]:
        cells = self.grid[b][self.types[b] == int(TokenType.IMAGE)]  # (n_image, 2), CLS is (-1, -1)
        return int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1

    def word(self, token_id: int) -> str:
        if token_id not in self._words:
            self._words[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False).strip()
        return self._words[token_id]

    def response_tokens(self, b: int) -> list[ResponseToken]:
        """Surface text of each response token by incremental decoding (keeps the spaces)."""
        positions = (self.types[b] == int(TokenType.RESPONSE)).nonzero().flatten().tolist()
        ids = self.input_ids[b, positions].tolist()
        out, previous = [], ""
        for i, position in enumerate(positions):
            text = self.tokenizer.decode(ids[:i + 1], skip_special_tokens=False)
            out.append(ResponseToken(text[len(previous):] if text.startswith(previous) else
                                     " " + self.word(ids[i]), position))
            previous = text
        return out

    def firings(self, token_ids: Tensor, values: Tensor) -> tuple[np.ndarray, np.ndarray, list[TextFiring]]:
        """Split one atom's firings into image cells and text tokens."""
        sample, position = self.sample[token_ids], self.position[token_ids]  # (n,), (n,)
        kinds = self.types[sample, position]
        is_image = kinds == int(TokenType.IMAGE)
        cells = self.grid[sample[is_image], position[is_image]].long()  # (n_img, 2)
        on_grid = (cells >= 0).all(1)  # LLaVA "full" strategy: the CLS feature has no cell
        cells, cell_values = cells[on_grid].numpy(), values[is_image][on_grid].numpy()
        text = []
        for s, p, kind, v in zip(sample.tolist(), position.tolist(), kinds.tolist(), values.tolist()):
            if kind in (int(TokenType.PROMPT), int(TokenType.RESPONSE)):
                is_response = kind == int(TokenType.RESPONSE)
                text.append(TextFiring(self.word(int(self.input_ids[s, p])), p,
                                       int(self.response_index[s, p]) if is_response else -1,
                                       "response" if is_response else "prompt", float(v)))
        text.sort(key=lambda f: f.position)
        return cells.astype(np.int64), cell_values.astype(np.float32), text
