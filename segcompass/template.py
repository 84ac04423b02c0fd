"""The policy template: ONE definition of the prompt, the response format and its parsing.

The policy reads an instruction and writes

    <think> step-by-step reasoning </think> <REF_POS> … <REF_POS>      (K concentration tokens)

K is `K_SINGLE` = 1 for the single-object prompt and `K_MULTI` for the multi-object one.
Prompting (`build_prompt`), teacher forcing (`format_response`), parsing
(`parse_response`) and the format reward (`ParsedResponse.format_score`) all read the
constants below, so the prompt can never ask for K tokens while the reward demands
another number (the authors' code asks for 4 and rewards exactly 1).

The prompt names the special tokens literally, as the paper's does: a real 7B policy
cannot emit a token it was never shown. So `<REF_POS>` also occurs in the prompt;
concentration tokens are the ones in the *response* only (`ref_token_mask`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

K_SINGLE = 1
"""Concentration tokens for a single-object instruction (the paper's single-object setting)."""
K_MULTI = 4
"""Concentration tokens (= mask slots) for a multi-object instruction. The paper uses up to
K_s = 6 slots on gRefCOCO; the embedded world never has more than 4 targets
(`world.language.MAX_TARGETS`), and 4 slots keep the slot mapper and Hungarian matching cheap."""
REF_TOKEN = "<REF_POS>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE, REF_TOKEN)
"""Tokens added to the policy's tokenizer as special (never split)."""
MAX_THINK_CHARS = 2048
"""A longer reasoning block downgrades the format score to 0.9 (paper, Appendix B.3)."""

_SINGLE = ("{instruction}. Reason step by step in {open} {close}, then output {k} {ref} token "
           "for the target.")
_MULTI = ("{instruction}. There may be several targets or none. Reason step by step in "
          "{open} {close}, then output {k} {ref} tokens, one per target slot.")


def k_for(multi: bool) -> int:
    """How many concentration tokens the prompt asks for."""
    return K_MULTI if multi else K_SINGLE


def build_prompt(instruction: str, *, multi: bool) -> str:
    """The user prompt: the instruction, then the request to reason in <think> and output K tokens."""
    template = _MULTI if multi else _SINGLE
    return template.format(instruction=instruction.strip().rstrip("."), open=THINK_OPEN, close=THINK_CLOSE,
                           k=k_for(multi), ref=REF_TOKEN)


def prompt_vocabulary() -> list[str]:
    """Words of the prompt templates (for word-level tokenizers), special tokens excluded."""
    text = (_SINGLE + " " + _MULTI).replace("{instruction}", "").replace("{open}", "").replace(
        "{close}", "").replace("{ref}", "").replace("{k}", f"{K_SINGLE} {K_MULTI}")
    return sorted(set(re.findall(r"\w+|[^\w\s]", text.lower())))


def format_response(cot: str, k: int) -> str:
    """The canonical response for teacher forcing: '<think> {cot} </think> <REF_POS> × k'."""
    return " ".join([THINK_OPEN, cot.strip(), THINK_CLOSE, *[REF_TOKEN] * k])


class ParsedResponse(NamedTuple):
    """What a generated response contains, as far as the format is concerned."""

    think: str | None
    """Text between the first <think> and the first </think> after it (stripped); None if absent."""
    n_think_blocks: int
    """max(#<think>, #</think>): 1 for a well-formed response, 0 for none, 2+ for repeats."""
    n_ref_tokens: int
    """Number of <REF_POS> anywhere in the response."""
    ref_after_think: bool
    """There is at least one <REF_POS> and every one comes after the last </think>."""
    stray_before: str
    """Non-whitespace text before the first <think> (stripped; '' when clean)."""
    stray_after: str
    """Text after the last </think> other than the <REF_POS> tokens (stripped; '' when clean)."""
    k: int
    """How many concentration tokens were asked for."""

    @property
    def is_valid(self) -> bool:
        """Exactly one non-empty <think> block and exactly k <REF_POS>, all after </think>."""
        return (self.think is not None and self.think != "" and self.n_think_blocks == 1
                and self.n_ref_tokens == self.k and self.ref_after_think)

    @property
    def is_clean(self) -> bool:
        """Valid, with no stray text and a reasoning block of at most MAX_THINK_CHARS."""
        return (self.is_valid and not self.stray_before and not self.stray_after
                and len(self.think or "") <= MAX_THINK_CHARS)

    @property
    def format_score(self) -> float:
        """The paper's format score: 0 invalid, 0.9 valid but long/stray text, 1 clean."""
        return 1.0 if self.is_clean else 0.9 if self.is_valid else 0.0


def parse_response(text: str, k: int) -> ParsedResponse:
    """Parse a decoded response (special tokens kept, end-of-sequence markers removed)."""
    n_open, n_close = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    first_open = text.find(THINK_OPEN)
    think = None
    if first_open >= 0:
        close = text.find(THINK_CLOSE, first_open)
        if close >= 0:
            think = text[first_open + len(THINK_OPEN):close].strip()
    before = text[:first_open] if first_open >= 0 else text
    last_close = text.rfind(THINK_CLOSE)
    n_ref = text.count(REF_TOKEN)
    if last_close >= 0:
        tail = text[last_close + len(THINK_CLOSE):]
        ref_after = n_ref > 0 and tail.count(REF_TOKEN) == n_ref
        after = tail.replace(REF_TOKEN, " ")
    else:
        ref_after, after = False, ""
    if first_open < 0:
        before = text.replace(REF_TOKEN, " ") if last_close < 0 else before
    return ParsedResponse(think, max(n_open, n_close), n_ref, ref_after, " ".join(before.split()),
                          " ".join(after.split()), k)


def ref_token_mask(input_ids: torch.Tensor, token_types: torch.Tensor, ref_token_id: int) -> torch.Tensor:
    """(B, T) bool: positions of concentration tokens the policy wrote (response tokens only).

    `token_types` are saekit's (B, T) tags (RESPONSE = 2); a `<REF_POS>` inside the prompt
    (the prompt names the token) is never a concentration token.
    """
    from saekit.inputs import TokenType

    return (input_ids == ref_token_id) & (token_types == int(TokenType.RESPONSE))
