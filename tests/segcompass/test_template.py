"""The policy template: prompt, teacher-forcing target and parsing agree on one definition."""

import pytest
import torch

from segcompass.template import (K_MULTI, K_SINGLE, REF_TOKEN, SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN,
                                 build_prompt, format_response, k_for, parse_response, prompt_vocabulary,
                                 ref_token_mask)

R = REF_TOKEN


def test_prompt_asks_for_the_k_that_parsing_expects():
    single, multi = build_prompt("the red square", multi=False), build_prompt("all the red objects", multi=True)
    assert single.startswith("the red square.") and multi.startswith("all the red objects.")
    for prompt, k in ((single, K_SINGLE), (multi, K_MULTI)):
        assert f"output {k} {REF_TOKEN} token" in prompt
        assert THINK_OPEN in prompt and THINK_CLOSE in prompt
        assert parse_response(format_response("a b .", k), k_for(k == K_MULTI)).is_clean
    assert k_for(False) == K_SINGLE == 1 and k_for(True) == K_MULTI >= 1


def test_prompt_words_are_in_the_prompt_vocabulary():
    import re

    words = set(prompt_vocabulary())
    for multi in (False, True):
        text = build_prompt("", multi=multi)
        for token in SPECIAL_TOKENS:
            text = text.replace(token, " ")
        assert set(re.findall(r"\w+|[^\w\s]", text.lower())) <= words


def test_format_response_round_trips_through_the_parser():
    cot = "the instruction asks for the red square . target : red square ."
    text = format_response(cot, 3)
    assert text == f"{THINK_OPEN} {cot} {THINK_CLOSE} {R} {R} {R}"
    parsed = parse_response(text, 3)
    assert parsed.think == cot and parsed.n_ref_tokens == 3 and parsed.n_think_blocks == 1
    assert parsed.ref_after_think and parsed.stray_before == "" and parsed.stray_after == ""
    assert parsed.format_score == 1.0


@pytest.mark.parametrize("text, k, valid, score, fields", [
    # valid and clean, with and without spaces
    (f"<think>x</think>{R}", 1, True, 1.0, {"think": "x"}),
    (f"  <think> a b </think>\n {R} ", 1, True, 1.0, {"think": "a b"}),
    # missing think block / empty think / unclosed think
    (f"a b {R}", 1, False, 0.0, {"think": None, "n_think_blocks": 0, "stray_before": "a b"}),
    (f"<think> </think> {R}", 1, False, 0.0, {"think": ""}),
    (f"<think> a b {R}", 1, False, 0.0, {"think": None, "ref_after_think": False}),
    # two think blocks
    (f"<think>a</think><think>b</think>{R}", 1, False, 0.0, {"n_think_blocks": 2}),
    # token inside the think block (before </think>)
    (f"<think>a {R}</think>", 1, False, 0.0, {"n_ref_tokens": 1, "ref_after_think": False}),
    (f"<think>a {R}</think>{R}", 1, False, 0.0, {"n_ref_tokens": 2, "ref_after_think": False}),
    # stray text before <think> / after the tokens: valid, downgraded
    (f"sure . <think>a</think>{R}", 1, True, 0.9, {"stray_before": "sure ."}),
    (f"<think>a</think>{R} done", 1, True, 0.9, {"stray_after": "done"}),
    (f"<think>a</think> so {R}", 1, True, 0.9, {"stray_after": "so"}),
    # K mismatch: the multi template asks for K_MULTI tokens, one is not enough (and vice versa)
    (f"<think>a</think>{R}", K_MULTI, K_MULTI == 1, 1.0 if K_MULTI == 1 else 0.0, {"n_ref_tokens": 1}),
    (f"<think>a</think>{R * K_MULTI}", K_MULTI, True, 1.0, {"n_ref_tokens": K_MULTI}),
    (f"<think>a</think>{R * 2}", 1, False, 0.0, {"n_ref_tokens": 2}),
    # no token at all
    ("<think>a</think>", 1, False, 0.0, {"n_ref_tokens": 0, "ref_after_think": False}),
])
def test_parse_canonical_cases(text, k, valid, score, fields):
    parsed = parse_response(text, k)
    assert parsed.is_valid is valid
    assert parsed.format_score == score
    for name, value in fields.items():
        assert getattr(parsed, name) == value, name


def test_long_think_is_downgraded():
    parsed = parse_response(format_response("word " * 500, 1), 1)  # 2500 characters
    assert parsed.is_valid and not parsed.is_clean and parsed.format_score == 0.9


def test_ref_token_mask_ignores_the_prompt_mention():
    from saekit.inputs import TokenType

    ids = torch.tensor([[5, 9, 7, 9, 9, 2]])  # 9 = <REF_POS>: once in the prompt, twice in the response
    types = torch.tensor([[TokenType.PROMPT, TokenType.PROMPT, TokenType.RESPONSE, TokenType.RESPONSE,
                           TokenType.RESPONSE, TokenType.SPECIAL]], dtype=torch.int8)
    assert ref_token_mask(ids, types, 9).tolist() == [[False, False, False, True, True, False]]
