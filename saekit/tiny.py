"""Tiny random-init twins of LLaVA-1.5 and Qwen2.5-VL, built in-process.

Same `transformers` classes as the 7B checkpoints (`LlavaForConditionalGeneration` with a
CLIP vision tower + Llama; `Qwen2_5_VLForConditionalGeneration`), at toy sizes, with a
word-level tokenizer made by the `tokenizers` library and the real chat formats. They run
on a CPU in milliseconds and round-trip through `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from saekit.presets import PRESETS, LoadedModel, ModelPreset

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
BASE_SPECIALS = (UNK, BOS, EOS, PAD)
QWEN_MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<|endoftext|>")

# Chat templates reproducing the real checkpoints' formats (content-list messages).
# llava-hf/llava-1.5-*-hf: "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Qwen/Qwen2.5-VL-7B-Instruct (images only; default system message as upstream).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_TEMPLATES = {"llava": LLAVA_CHAT_TEMPLATE, "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE}

DEFAULT_VOCAB: tuple[str, ...] = tuple("""
user assistant system you are a an the helpful is in on of to and or with what where which
who how why this that these those it its there here image picture photo scene object objects
thing things please describe find segment show point locate mark identify answer question
left right top bottom middle center front back behind near far above below under over next
between inside outside large small big little tall short long wide narrow round square
red green blue yellow orange purple pink brown black white gray grey dark light bright
circle triangle rectangle star ring disk box ball cube line shape shapes color colour
one two three four five six seven eight nine ten zero many few some all no none every each
person people man woman child dog cat bird horse car bus bike tree house table chair cup
bottle plate sky water grass road wall floor window door book phone food animal
can could would should will may might do does did be been being have has had not
i we they he she me us them my our your their his her
think reason because so then first second third last other same different more most less
only also very much both either neither if else when while after before again
yes true false count number size area part region mask area
""".split())
PUNCTUATION = tuple(". , ? ! : ; ' \" ( ) [ ] - / *".split())


def build_tiny(name: str) -> LoadedModel:
    """The default tiny twin of preset `name` ('tiny-llava' or 'tiny-qwen2.5-vl')."""
    builders = {"tiny-llava": build_tiny_llava, "tiny-qwen2.5-vl": build_tiny_qwen2_5_vl}
    return builders[name]()


def build_tokenizer(family: str, vocab: Sequence[str] | None = None, *,
                    extra_special_tokens: Sequence[str] = ()):
    """Word-level `PreTrainedTokenizerFast` with the family's special tokens and chat template.

    Lower-cased words, split on whitespace and punctuation; unknown words -> `<unk>`.
    LLaVA's tokenizer prepends `<s>` like Llama's; Qwen's adds nothing, like Qwen's.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    image_tokens = ("<image>",) if family == "llava" else QWEN_MARKERS
    specials = _unique([*BASE_SPECIALS, *image_tokens, *extra_special_tokens])
    words = [w for w in _unique([w.lower() for w in (vocab or DEFAULT_VOCAB)] + list(PUNCTUATION))
             if w not in specials]
    backend = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(specials + words)},
                                         unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if family == "llava":
        backend.post_processor = TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, specials.index(BOS))])
    extra = [t for t in specials if t not in BASE_SPECIALS]
    eos = EOS if family == "llava" else "<|im_end|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, bos_token=BOS if family == "llava" else None,
        eos_token=eos, pad_token=PAD, extra_special_tokens=extra,
        chat_template=CHAT_TEMPLATES[family], model_max_length=4096)


def build_tiny_llava(vocab: Sequence[str] | None = None, *, extra_special_tokens: Sequence[str] = (),
                     image_size: int = 64, patch_size: int = 8, hidden_size: int = 128,
                     n_layers: int = 4, n_heads: int = 4, intermediate_size: int | None = None,
                     vision_hidden_size: int = 64, vision_layers: int = 2, rope_theta: float = 10000.0,
                     seed: int = 0) -> LoadedModel:
    """A random-init `LlavaForConditionalGeneration`: tiny CLIP vision tower + tiny Llama.

    (image_size / patch_size)^2 `<image>` positions per image (CLS dropped, as LLaVA-1.5).
    `rope_theta` is the Llama rotary base (Vicuna-1.5: 10000).
    Seeded: the same arguments give the same weights, without touching the global RNG.
    """
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    _check_divisible("image_size", image_size, "patch_size", patch_size)
    tokenizer = build_tokenizer("llava", vocab, extra_special_tokens=extra_special_tokens)
    ids = _special_ids(tokenizer)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=n_layers,
        intermediate_size=intermediate_size or 4 * hidden_size, num_attention_heads=n_heads,
        num_key_value_heads=n_heads, max_position_embeddings=4096,
        # Vicuna-1.5's value; equal to CLIP's layer_norm_eps, which matters to TransformerLens's
        # bridge: it normalises the vision tower's LayerNorms with the text model's eps.
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD])
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden_size // 16),
        image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden_size)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=ids["<image>"], image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    preset = _tiny_preset("tiny-llava", hidden_size, n_layers)
    return LoadedModel(model, tokenizer, image_processor, preset)


def build_tiny_qwen2_5_vl(vocab: Sequence[str] | None = None, *,
                          extra_special_tokens: Sequence[str] = (), image_size: int = 64,
                          patch_size: int = 8, hidden_size: int = 128, n_layers: int = 4,
                          n_heads: int = 4, intermediate_size: int | None = None,
                          vision_hidden_size: int = 64, vision_layers: int = 2,
                          seed: int = 0) -> LoadedModel:
    """A random-init `Qwen2_5_VLForConditionalGeneration` with 2x2 patch merging.

    An `image_size`^2 image gives ((image_size / patch_size) / 2)^2 `<|image_pad|>`
    positions; other shapes keep their aspect ratio (smart resize, as the real processor).
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLImageProcessorPil)

    merge = 2
    _check_divisible("image_size", image_size, "patch_size * 2", patch_size * merge)
    head_dim = hidden_size // n_heads
    if head_dim % 8:
        raise ValueError(f"hidden_size / n_heads = {head_dim} must be a multiple of 8 (3-D rope)")
    tokenizer = build_tokenizer("qwen2_5_vl", vocab, extra_special_tokens=extra_special_tokens)
    ids = _special_ids(tokenizer)
    half = head_dim // 2  # mrope splits the rotary half-dim into (temporal, height, width)
    mrope_section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=n_layers,
        intermediate_size=intermediate_size or 4 * hidden_size, num_attention_heads=n_heads,
        num_key_value_heads=max(1, n_heads // 2), max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids[PAD])
    vision_config = dict(
        depth=vision_layers, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
        num_heads=max(1, vision_hidden_size // 16), patch_size=patch_size, spatial_merge_size=merge,
        temporal_patch_size=2, window_size=2 * merge * patch_size, out_hidden_size=hidden_size,
        fullatt_block_indexes=[vision_layers - 1], tokens_per_second=2)
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=merge, temporal_patch_size=2,
        size={"shortest_edge": (patch_size * merge) ** 2, "longest_edge": image_size * image_size})
    preset = _tiny_preset("tiny-qwen2.5-vl", hidden_size, n_layers)
    return LoadedModel(model, tokenizer, image_processor, preset)


def _tiny_preset(name: str, d_model: int, n_layers: int) -> ModelPreset:
    base = PRESETS[name]
    layer = base.default_layer if base.default_layer <= n_layers else max(1, n_layers // 2)
    return dataclasses.replace(base, d_model=d_model, n_layers=n_layers, default_layer=layer)


def _special_ids(tokenizer) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    return {tok: vocab[tok] for tok in (*BASE_SPECIALS, "<image>", *QWEN_MARKERS) if tok in vocab}


def _check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ValueError(f"{name} {value} must be a multiple of {by_name} ({by})")


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))
