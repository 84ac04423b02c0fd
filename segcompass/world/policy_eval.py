"""Greedy decoding of a policy on world samples and the warm start's evaluation.

Two numbers per sample: is the response format-valid (`template.parse_response`), and
does the chain of thought's final line name the right objects — 'target : red square .'
parsed into (colour, shape) pairs and compared with the targets in the inventory.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple, Sequence

import torch

_ANSWER = re.compile(r"\btargets? :(?P<items>[^.]*)\.?")


def parse_answer(cot: str) -> list[tuple[str, str]] | None:
    """(colour, shape) pairs named by the last 'target(s) : …' line; [] for 'none', None if absent
    or malformed (an item that is not a known colour followed by a known shape)."""
    from segcompass.world.render import COLOURS, SHAPES

    matches = list(_ANSWER.finditer(cot))
    if not matches:
        return None
    items = [item.split() for item in matches[-1].group("items").split(",")]
    if items == [["none"]]:
        return []
    pairs = []
    for words in items:
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            return None
        pairs.append((words[0], words[1]))
    return pairs


@torch.no_grad()
def generate_responses(loaded, samples: Sequence, *, batch_size: int = 50, max_new_tokens: int = 96,
                       progress: bool = False) -> list[str]:
    """Greedy responses (KV-cached `generate`, left-padded batches) to each sample's prompt.

    The text keeps the template's special tokens and stops before end-of-turn; padding
    and end markers never appear in it.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from saekit.inputs import build_batch
    from segcompass.template import build_prompt

    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = []
    for start in tqdm(range(0, len(samples), batch_size), desc="decode", disable=not progress):
        chunk = samples[start:start + batch_size]
        batch = build_batch(loaded, [Image.fromarray(s.image) for s in chunk],
                            [build_prompt(s.instruction, multi=s.multi_prompt) for s in chunk],
                            padding_side="left")
        inputs = {k: v.to(device) for k, v in batch.model_inputs.items()}
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=pad if pad is not None else eos)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():  # (B, T_new)
            row = row[:row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=False))
    return texts


class Judgement(NamedTuple):
    """One decoded sample, judged."""

    format_valid: bool
    """`parse_response(text, K).is_valid`."""
    named: list[tuple[str, str]] | None
    """(colour, shape) pairs of the final answer line; None when it cannot be parsed."""
    target_correct: bool
    """The named pairs equal the targets' (as a set; [] for no-target)."""


def judge(sample, text: str) -> Judgement:
    """Format validity and answer correctness of one response to one world sample."""
    from segcompass.template import k_for, parse_response

    parsed = parse_response(text, k_for(sample.multi_prompt))
    named = parse_answer(parsed.think or "")
    truth = {(sample.objects[i].colour, sample.objects[i].shape) for i in sample.targets}
    correct = named is not None and len(named) == len(set(named)) and set(named) == truth
    return Judgement(parsed.is_valid, named, correct)


def evaluate_policy(loaded, split: str, n: int, *, seed: int = 1, progress: bool = False,
                    examples: int = 5, grid: int = 0) -> dict:
    """Greedy decoding on `n` samples of `split`: format-valid and target-correct fractions,
    overall, for single-target samples, and per family; plus a few example responses. With
    the vision `grid` (> 0), also the commonest teacher-forced first errors per family
    (`first_errors`, `first_error_patterns`)."""
    from segcompass.world.scenes import generate

    samples = generate(split, n, seed)
    texts = generate_responses(loaded, samples, progress=progress)
    groups: dict[str, list[Judgement]] = defaultdict(list)
    for sample, text in zip(samples, texts):
        judgement = judge(sample, text)
        groups["all"].append(judgement)
        groups[f"family/{sample.family}"].append(judgement)
        if len(sample.targets) == 1:
            groups["single_target"].append(judgement)
    summary = {name: {"n": len(js), "format_valid": _mean(j.format_valid for j in js),
                      "target_correct": _mean(j.target_correct for j in js)}
               for name, js in sorted(groups.items())}
    report = {"split": split, "seed": seed, "n": n,
              "format_valid": summary["all"]["format_valid"],
              "single_target_correct": summary.get("single_target", {}).get("target_correct", 0.0),
              "groups": summary,
              "examples": [{"instruction": s.instruction, "truth": s.cot, "response": t}
                           for s, t in zip(samples[:examples], texts[:examples])]}
    if grid:
        errors = first_errors(loaded, samples, grid=grid)
        report["teacher_forced"] = {"all_correct": _mean(e is None for e in errors),
                                    "first_errors": first_error_patterns(errors)}
    return report


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else 0.0


class FirstError(NamedTuple):
    """Where teacher forcing on the ground-truth response first goes wrong for one sample."""

    family: str
    """The sample's instruction family."""
    multi_prompt: bool
    """Whether it was asked with the K-slot prompt."""
    position: int
    """Index of the wrong token among the supervised response tokens."""
    context: tuple[str, ...]
    """Up to four ground-truth tokens before it."""
    expected: str
    """The ground-truth token."""
    predicted: str
    """The policy's argmax there."""


@torch.no_grad()
def first_errors(loaded, samples: Sequence, *, grid: int, batch_size: int = 50) -> list[FirstError | None]:
    """Per sample, the first response token whose argmax differs from the ground truth when the
    policy reads the ground-truth prefix (teacher forcing), or None when every token is right.

    Free decoding shows where an answer ends up; this shows which reasoning step breaks first
    (a position word, a colour after 'the other', 'there' for a missing object), without
    the later steps being confounded by an earlier mistake.
    """
    from segcompass.world.teacher import reference_example, teacher_batch

    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    found: list[FirstError | None] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = teacher_batch(loaded, [reference_example(s, grid) for s in chunk]).to(device)
        predicted = model(**batch.model_inputs).logits[:, :-1].argmax(-1)  # (B, T-1): token t+1 predicted at t
        labels = batch.labels[:, 1:]  # (B, T-1)
        for row, sample in enumerate(chunk):
            supervised = labels[row] != -100
            truth, guess = labels[row][supervised].tolist(), predicted[row][supervised].tolist()
            wrong = next((i for i, (t, g) in enumerate(zip(truth, guess)) if t != g), None)
            if wrong is None:
                found.append(None)
                continue
            words = tokenizer.convert_ids_to_tokens(truth)
            found.append(FirstError(sample.family, sample.multi_prompt, wrong, tuple(words[max(0, wrong - 4):wrong]),
                                    words[wrong], tokenizer.convert_ids_to_tokens(guess[wrong])))
    return found


def first_error_patterns(errors: Sequence[FirstError | None], top: int = 5) -> dict[str, list[tuple[str, int]]]:
    """Family -> its `top` commonest first errors, colour and shape words written C and S
    ('left of it is the [colour]'), with counts; families with no error are left out."""
    from collections import Counter

    from segcompass.world.render import COLOURS, SHAPES

    def general(word: str) -> str:
        return "C" if word in COLOURS else "S" if word in SHAPES else word

    counts: dict[str, Counter] = defaultdict(Counter)
    for error in errors:
        if error is None:
            continue
        expected = "colour" if error.expected in COLOURS else "shape" if error.expected in SHAPES else error.expected
        counts[error.family][" ".join([*map(general, error.context), f"[{expected}]"])] += 1
    return {family: c.most_common(top) for family, c in sorted(counts.items())}
