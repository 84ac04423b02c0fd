"""Teacher-forced first errors of a policy, against a slow one-sample-at-a-time reference."""

import torch

from segcompass.world.scenes import generate
from segcompass.world.policy_eval import FirstError, first_error_patterns, first_errors
from segcompass.world.teacher import reference_example, teacher_batch
from segcompass.world.warmstart import WarmstartConfig, build_policy

TINY = dict(hidden_size=32, n_layers=1, n_heads=2, vision_hidden_size=16, vision_layers=2, image_size=32,
            patch_size=8)


def test_first_errors_match_a_per_sample_reference():
    loaded = build_policy(WarmstartConfig(**TINY))
    samples = generate("val", 3, seed=0)
    errors = first_errors(loaded, samples, grid=4, batch_size=2)
    assert len(errors) == 3
    tokenizer = loaded.tokenizer
    for sample, error in zip(samples, errors):
        batch = teacher_batch(loaded, [reference_example(sample, 4)])
        with torch.no_grad():
            guess = loaded.model(**batch.model_inputs).logits[0, :-1].argmax(-1)
        labels = batch.labels[0, 1:]
        truth = labels[labels != -100].tolist()
        guess = guess[labels != -100].tolist()
        mismatches = [i for i, (t, g) in enumerate(zip(truth, guess)) if t != g]
        assert mismatches, "a random policy gets some token wrong"
        i = mismatches[0]
        assert error.position == i and error.family == sample.family
        assert error.expected == tokenizer.convert_ids_to_tokens(truth[i])
        assert error.predicted == tokenizer.convert_ids_to_tokens(guess[i]) != error.expected
        assert list(error.context) == tokenizer.convert_ids_to_tokens(truth[max(0, i - 4):i])


def test_patterns_generalise_colours_and_shapes():
    errors = [FirstError("spatial", False, 9, ("of", "it", "is", "the"), "red", "blue"),
              FirstError("spatial", True, 9, ("of", "it", "is", "the"), "green", "red"),
              FirstError("spatial", False, 7, ("red", "square", "is", "at"), "top", "middle"),
              None]
    assert first_error_patterns(errors) == {"spatial": [("of it is the [colour]", 2), ("C S is at [top]", 1)]}
