"""Slot readout: states come from the response's <REF_POS> (never the prompt's), and the
linear probe recovers a planted label and stays near chance on noise."""

import torch

from analyses.slot_readout import probe_accuracy, slot_readout, slot_states
from saekit.inputs import TokenType, build_batch
from segcompass.world.scenes import generate
from segcompass.template import REF_TOKEN, build_prompt, format_response, k_for
from segcompass.world.warmstart import WarmstartConfig, build_policy
from tests.segcompass_tiny import TINY_POLICY


def test_states_are_read_at_the_first_response_ref_token():
    from PIL import Image

    loaded = build_policy(WarmstartConfig(**TINY_POLICY))
    samples = generate("testA", 6, seed=3)
    got = slot_states(loaded, samples, batch_size=4)
    assert got.states.shape == (6, TINY_POLICY["n_layers"] + 1, TINY_POLICY["hidden_size"])
    batch = build_batch(loaded, [Image.fromarray(s.image) for s in samples],
                        [build_prompt(s.instruction, multi=s.multi_prompt) for s in samples],
                        [format_response(s.cot, k_for(s.multi_prompt)) for s in samples], padding_side="right")
    ref_id = loaded.tokenizer.convert_tokens_to_ids(REF_TOKEN)
    ids, types = batch.model_inputs["input_ids"], batch.token_types
    rows = torch.arange(6)
    assert (ids[rows, got.positions] == ref_id).all()
    assert (types[rows, got.positions] == int(TokenType.RESPONSE)).all()
    assert ((ids == ref_id) & (types == int(TokenType.PROMPT))).any(dim=1).all()  # the prompt has one too
    for row in range(6):  # and it is the first response <REF_POS>
        response_refs = ((ids[row] == ref_id) & (types[row] == int(TokenType.RESPONSE))).nonzero().flatten()
        assert got.positions[row] == response_refs[0]


def test_probe_recovers_a_planted_label_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (600,), generator=generator)
    directions = torch.randn(6, 16, generator=generator)
    planted = directions[labels] + 0.3 * torch.randn(600, 16, generator=generator)
    noise = torch.randn(600, 16, generator=generator)
    assert probe_accuracy(planted[:400], labels[:400], planted[400:], labels[400:]) > 0.95
    assert probe_accuracy(noise[:400], labels[:400], noise[400:], labels[400:]) < 0.35


def test_readout_table_has_one_row_per_layer():
    from analyses.slot_readout import SlotStates

    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 6, (200, 2), generator=generator)
    states = torch.randn(200, 3, 8, generator=generator)
    states[:, 2, :6] += 4 * torch.nn.functional.one_hot(labels[:, 0], 6)  # colour planted at layer 2 only
    data = SlotStates(states, labels, torch.zeros(200, dtype=torch.long))
    table = slot_readout(SlotStates(*(t[:150] for t in data)), SlotStates(*(t[150:] for t in data)))
    assert table["layer"].tolist() == [0, 1, 2]
    assert table.loc[2, "colour_accuracy"] > 0.9 > table.loc[0, "colour_accuracy"]
    assert (table["shape_accuracy"] < 0.5).all()
