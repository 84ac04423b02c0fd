"""The TRL engine of `segcompass.training.grpo`: `SegCompassGRPOTrainer` (a `trl.GRPOTrainer`) and the
callbacks of a run (metrics.jsonl, progress bar, stop-after for tests).

See `segcompass.training.grpo` for the design: which passes run per step, what each override does,
and what the recipe flags (`--seg-on`, `--top-p`, `--entropy-coef`, `--dynamic-sampling`,
`--consistency-reward-weight`) change.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessorList, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from saekit.atomic import atomic_file, atomic_write_json
from saekit.inputs import PAD_TYPE, build_batch
from saekit.run import config_record
from segcompass.training.common import (GRPO_STATE, SIDE_WEIGHTS, WorldPrompts, average_gradients,
                                        load_policy_weights, load_side_state, make_format_reward, param_groups,
                                        response_text, reward_config, side_state)
from segcompass.template import k_for
from segcompass.world.policy_eval import judge
from segcompass.policy import recorded_states
from segcompass.training.grpo_step import (Advantages, KeyedGumbelSampler, dapo_fill, group_advantages,
                                           grpo_policy_loss, head_pass, per_sample_segmentation_loss,
                                           reserve_index, rollout_batch, rollout_seed, zero_spread)
from segcompass.policy import PolicyForward, policy_forward
from segcompass.training.rewards import consistency_reward, format_reward, mask_rewards, total_reward


class SegCompassGRPOTrainer(GRPOTrainer):
    """GRPO + segmentation supervision on one forward pass; see the module docstring."""

    def __init__(self, *, segcompass, cfg, args: GRPOConfig, train_dataset: WorldPrompts, processing_class,
                 callbacks: list[TrainerCallback] | None = None):
        self.segcompass, self.cfg = segcompass, cfg
        self.rewards_cfg = reward_config(cfg)
        self.train_seg, self.train_rl = "seg" in cfg.mode, "rl" in cfg.mode
        self.world = train_dataset
        tokenizer = segcompass.loaded.tokenizer
        eos = [tokenizer.eos_token_id]
        self._text = (tokenizer, eos)  # how the format reward decodes a completion
        super().__init__(model=segcompass.policy, reward_funcs=[make_format_reward(tokenizer, eos)], args=args,
                         train_dataset=train_dataset.dataset(), processing_class=processing_class,
                         callbacks=callbacks)
        self._frame_targets: dict[int, Tensor] = {}
        self._completion_cache: dict[int, list[int]] = {}  # rollout seed -> completion (dynamic sampling)

    # ---- rollouts -------------------------------------------------------------------------
    def _tokenize_prompts(self, prompts: list):
        images, texts = [], []
        for messages in prompts:
            content = messages[-1]["content"]
            images.append(next(part["image"] for part in content if part["type"] == "image"))
            texts.append("".join(part["text"] for part in content if part["type"] == "text"))
        prompt_ids, self._prompt_types, fields = self._prompt_inputs(images, texts)
        return prompt_ids, [[image] for image in images], fields

    def _prompt_inputs(self, images: list, texts: list[str]) -> tuple[list[list[int]], list[Tensor], dict]:
        """Prompt token ids (unpadded), their saekit token types, and the vision inputs."""
        batch = build_batch(self.segcompass.loaded, images, texts, padding_side="left")
        keep = batch.attention_mask.bool()  # (B, T)
        prompt_ids = [row[k].tolist() for row, k in zip(batch.model_inputs["input_ids"], keep)]
        types = [row[k] for row, k in zip(batch.token_types, keep)]
        fields = {k: v for k, v in batch.model_inputs.items() if k not in ("input_ids", "attention_mask")}
        return prompt_ids, types, fields

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        if self._completion_cache and all(seed in self._completion_cache for seed in self._rollout_seeds):
            return [self._completion_cache[seed] for seed in self._rollout_seeds], None  # drawn while sampling
        return self._keyed_generate(prompt_ids, multimodal_fields, self._rollout_seeds), None

    def _keyed_generate(self, prompt_ids: list[list[int]], multimodal_fields: dict,
                        seeds: list[int]) -> list[list[int]]:
        """One batched `generate`, row b sampled with the keyed generator `seeds[b]`; completions
        cut after their end marker."""
        from trl.models import unwrap_model_for_generation
        from trl.trainer.utils import pad

        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        rows = [torch.tensor(ids) for ids in prompt_ids]
        inputs = {"input_ids": pad(rows, padding_value=pad_id, padding_side="left"),
                  "attention_mask": pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left"),
                  **{k: v for k, v in multimodal_fields.items() if isinstance(v, Tensor)}}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        sampler = KeyedGumbelSampler(seeds, self.temperature, device, top_p=self.cfg.top_p)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation) as unwrapped,
              torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
            out = unwrapped.generate(**inputs, generation_config=self._keyed_generation_config(),
                                     logits_processor=LogitsProcessorList([sampler]))
        completions = out[:, inputs["input_ids"].shape[1]:].tolist()  # (B, T_new)
        eos = set(self.eos_token_ids)
        cut = [next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in completions]
        return [row[:n] for row, n in zip(completions, cut)]

    def _keyed_generation_config(self) -> GenerationConfig:
        """Greedy decoding over keyed-Gumbel-perturbed scores = sampling at `temperature`.
        The image token and padding (unless it doubles as end of sequence) are never sampled."""
        pad_id = self._tokenizer.pad_token_id
        suppress = [self.segcompass.policy.config.image_token_id]
        suppress += [pad_id] if pad_id is not None and pad_id not in self.eos_token_ids else []
        return GenerationConfig(max_new_tokens=self.max_completion_length, do_sample=False, pad_token_id=pad_id,
                                eos_token_id=self.eos_token_ids, suppress_tokens=suppress, disable_compile=True)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # gathered
        start = self.accelerator.process_index * len(prompts)
        self._local_format = rewards[start:start + len(prompts), 0].clone()
        return rewards

    def _generate_and_score_completions(self, inputs):
        if self.cfg.dynamic_sampling and self.model.training:
            inputs = self._dynamic_sample(inputs)
        try:
            return self._score_completions(inputs)
        finally:
            self._completion_cache = {}

    def _score_completions(self, inputs):
        n, g = len(inputs), self.num_generations
        first = self.accelerator.process_index * n  # this process's rows in the generation batch
        self._rollout_seeds = [rollout_seed(self.args.seed, self.state.global_step, row["sample_index"],
                                            (first + j) % g) for j, row in enumerate(inputs)]
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        for key in ("reward", "reward_std", "frac_reward_zero_std"):  # TRL's: the format term only
            self._metrics[mode].pop(key, None)
        width = output["prompt_ids"].shape[1]
        types = torch.full((n, width), PAD_TYPE, dtype=torch.int8)
        for row, t in enumerate(self._prompt_types):
            types[row, width - len(t):] = t
        device = output["prompt_ids"].device
        output["prompt_types"] = types.to(device)
        output["sample_index"] = torch.tensor([row["sample_index"] for row in inputs], device=device)
        output["format_reward"] = self._local_format.to(device)
        return output

    def _dynamic_sample(self, inputs: list[dict]) -> list[dict]:
        """`--dynamic-sampling N` (DAPO; one process): rollouts of the batch's prompts are drawn and
        scored first; groups without reward spread are replaced by groups of reserve prompts
        (`grpo_step.reserve_index`), at most N draws (`grpo_step.dapo_fill`). The kept rollouts
        are cached, so TRL's generation returns them instead of sampling again."""
        g, step, cap = self.num_generations, self.state.global_step, self.cfg.dynamic_sampling
        per_draw = len(inputs) // g

        def groups(rows: list[dict]) -> list[list[dict]]:
            return [rows[i:i + g] for i in range(0, len(rows), g)]

        def draw(d: int, need: int):
            indices = [reserve_index(self.world.n, step, d, j, per_draw=per_draw, cap=cap) for j in range(need)]
            columns = self.world.rows({"sample_index": indices})
            rows = [{k: v[j] for k, v in columns.items()} for j in range(need) for _ in range(g)]
            return groups(rows), self._flat_groups(rows)

        chosen, stats = dapo_fill(groups(inputs), self._flat_groups(inputs), draw, cap)
        metrics = self._metrics["train"]
        metrics["dynamic/draws"].append(float(stats.draws))
        metrics["dynamic/zero_spread_drawn"].append(stats.zero_spread / stats.groups)
        return [row for group in chosen for row in group]

    def _flat_groups(self, rows: list[dict]) -> list[bool]:
        """Sample and score the rollouts of `rows` (consecutive groups of G) with the current
        weights, no gradient (the rewards `compute_loss` will compute); caches them by rollout
        seed; per group, whether its rewards have no spread."""
        from trl.trainer.utils import pad

        g, step = self.num_generations, self.state.global_step
        seeds = [rollout_seed(self.args.seed, step, row["sample_index"], j % g) for j, row in enumerate(rows)]
        texts = ["".join(part["text"] for part in row["prompt"][-1]["content"] if part["type"] == "text")
                 for row in rows]
        prompt_ids, types, fields = self._prompt_inputs([row["image"] for row in rows], texts)
        completions = self._keyed_generate(prompt_ids, fields, seeds)
        self._completion_cache.update(zip(seeds, completions))
        pad_id = self._tokenizer.pad_token_id
        prompt = pad([torch.tensor(ids) for ids in prompt_ids], padding_value=pad_id, padding_side="left")
        prompt_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], padding_value=0,
                          padding_side="left")
        prompt_types = pad([t.to(torch.int8) for t in types], padding_value=PAD_TYPE, padding_side="left")
        completion = pad([torch.tensor(c, dtype=torch.long) for c in completions], padding_value=pad_id,
                         padding_side="right")
        completion_mask = pad([torch.ones(len(c), dtype=torch.long) for c in completions], padding_value=0,
                              padding_side="right")
        vision = {"pixel_values": fields["pixel_values"]} if "pixel_values" in fields else {}
        batch = rollout_batch(prompt, prompt_mask, prompt_types, completion, completion_mask, self.eos_token_ids,
                              vision)
        index = [int(row["sample_index"]) for row in rows]
        with torch.no_grad():
            forward = policy_forward(self.segcompass.policy, batch, self.segcompass.config.sae_layer)
            out = head_pass(self.segcompass, forward, batch, self._image_embeddings(index))
        multi = [self.world.sample(i).multi_prompt for i in index]
        mask_r = mask_rewards(out.head.mask_logits, out.head.confidence_logits, [self._targets(i) for i in index],
                              multi, out.slots.slots_written, self.rewards_cfg.confidence_threshold)
        texts = [response_text(self._text[0], c, self._text[1]) for c in completions]
        fmt = torch.tensor([format_reward(t, k_for(m)) for t, m in zip(texts, multi)])
        total = total_reward(fmt, mask_r, self.rewards_cfg, self._consistency(index, texts))
        return zero_spread(total, g).tolist()

    def _consistency(self, index: list[int], texts: list[str] | None) -> Tensor | None:
        """(B,) `rewards.consistency_reward` of each rollout; None when its weight is 0."""
        if not self.rewards_cfg.consistency_weight:
            return None
        return torch.tensor([consistency_reward(self.world.sample(i), t) for i, t in zip(index, texts)])

    def _completion_texts(self, completion_ids: Tensor) -> list[str]:
        return [response_text(self._text[0], row, self._text[1]) for row in completion_ids.tolist()]

    def _prepare_inputs(self, generation_batch):
        from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        if self._step % self.args.steps_per_generation == 0 or self._buffered_inputs is None:
            batch = split_pixel_values_by_grid(self._generate_and_score_completions(generation_batch))
            # No shuffle (TRL shuffles here): rows stay in groups, so micro-batches hold whole groups.
            chunks = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(chunk) for chunk in chunks]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ---- the joint step -------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("SegCompassGRPOTrainer does not return outputs")
        batch = rollout_batch(inputs["prompt_ids"], inputs["prompt_mask"], inputs["prompt_types"],
                              inputs["completion_ids"], inputs["completion_mask"], self.eos_token_ids,
                              {"pixel_values": inputs["pixel_values"]} if "pixel_values" in inputs else {})
        ids, mask = batch.model_inputs["input_ids"], batch.attention_mask
        with recorded_states(self.segcompass.policy, self.segcompass.config.sae_layer) as states:
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, ids, mask, inputs["completion_ids"].shape[1], compute_entropy=True,
                pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                num_images=inputs.get("num_images"), mm_token_type_ids=inputs.get("mm_token_type_ids"))
        forward = PolicyForward(None, states["sae"], states["last"])
        index = inputs["sample_index"].tolist()
        # with --seg-on teacher the rollouts' head pass only scores masks: no gradient
        with torch.set_grad_enabled(self.train_seg and self.cfg.seg_on != "teacher" and torch.is_grad_enabled()):
            out = head_pass(self.segcompass, forward, batch, self._image_embeddings(index))
        texts = (self._completion_texts(inputs["completion_ids"])
                 if self.rewards_cfg.consistency_weight or self.cfg.seg_on == "correct" else None)
        # rollouts without a <REF_POS>: their slots read the last token (the format reward is 0)
        self._metrics["train" if self.model.training else "eval"]["rollouts/no_ref"].append(
            float((out.slots.slots_written == 0).float().mean()))
        targets = [self._targets(i) for i in index]
        multi = [self.world.sample(i).multi_prompt for i in index]
        mask_r = mask_rewards(out.head.mask_logits, out.head.confidence_logits, targets, multi,
                              out.slots.slots_written, self.rewards_cfg.confidence_threshold).to(logps.device)
        consistency = self._consistency(index, texts)
        total = total_reward(inputs["format_reward"].float(), mask_r, self.rewards_cfg, consistency)
        advantages, everyone = self._advantages(total, inputs["sample_index"])
        old = inputs.get("old_per_token_logps")
        policy = grpo_policy_loss(logps, logps.detach() if old is None else old, inputs.get("ref_per_token_logps"),
                                  advantages, inputs["completion_mask"], epsilon=self.epsilon_low, beta=self.beta,
                                  entropies=entropies, entropy_coef=self.cfg.entropy_coef)
        loss = policy.loss if self.train_rl else logps.sum() * 0.0
        seg = None
        if self.train_seg:
            seg = self._segmentation_loss(out, targets, index, advantages, texts)
            loss = loss + seg.total
        self._record_metrics(inputs, total, mask_r, everyone, policy, seg, entropies, consistency)
        return loss / self.current_gradient_accumulation_steps

    def _segmentation_loss(self, out, targets: list[Tensor], index: list[int], advantages: Tensor,
                           texts: list[str] | None):
        """`--seg-on`: all rollouts (the paper), the prompts' teacher-forced ground truth (one more
        policy pass), rollouts whose chain of thought names the targets (world), or rollouts
        weighted by their advantage clipped at 0."""
        config = self.cfg.loss_config()
        if self.cfg.seg_on == "teacher":
            from segcompass.training.batching import batch_from_samples

            unique = list(dict.fromkeys(index))
            batch = batch_from_samples(self.segcompass, [self.world.sample(i) for i in unique])
            teacher = self.segcompass(batch.model_batch, self._image_embeddings(unique))
            return per_sample_segmentation_loss(teacher.head.heatmap_logits, teacher.head.mask_logits,
                                                teacher.head.confidence_logits, batch.frame_targets, config,
                                                active_slots=batch.active_slots)
        weights = None
        if self.cfg.seg_on == "correct":
            weights = torch.tensor([float(judge(self.world.sample(i), t).target_correct) for i, t in zip(index, texts)])
        elif self.cfg.seg_on == "advantage":
            weights = advantages.detach().clamp(min=0)
        return per_sample_segmentation_loss(out.head.heatmap_logits, out.head.mask_logits, out.head.confidence_logits,
                                            targets, config, weights)

    def _image_embeddings(self, index: list[int]) -> Tensor:
        """(B, C, h, w): SAM's encoder once per distinct prompt, shared by its G rollouts."""
        unique = list(dict.fromkeys(index))
        embeddings = self.segcompass.image_embeddings([self.world.sample(i).image for i in unique])
        return embeddings[torch.tensor([unique.index(i) for i in index], device=embeddings.device)]

    def _targets(self, index: int) -> Tensor:
        """(N, S, S) target masks of world sample `index` in SAM's padded input frame."""
        if index not in self._frame_targets:
            from segcompass.postprocess import targets_to_frame

            if len(self._frame_targets) > 512:
                self._frame_targets.clear()
            masks = torch.from_numpy(self.world.sample(index).target_masks)
            self._frame_targets[index] = targets_to_frame(masks, input_size=self.segcompass.sam_input_size)
        return self._frame_targets[index]

    def _advantages(self, total: Tensor, sample_index: Tensor) -> tuple[Tensor, Advantages]:
        """Group-normalised advantages of this process's rows, formed over all processes'
        rows of the current micro-batch (a group may span processes); and those of all rows."""
        gathered = self.accelerator.gather(torch.stack([total.float(), sample_index.float()]).T)  # (N, 2)
        result = group_advantages(gathered[:, 0], gathered[:, 1].long(), self.num_generations)
        start = self.accelerator.process_index * total.numel()
        return result.advantages[start:start + total.numel()].to(total.device), result

    def _record_metrics(self, inputs, total, mask_r, everyone: Advantages, policy, seg, entropies,
                        consistency: Tensor | None = None) -> None:
        """Per-step means over all processes, into TRL's metric buffer (logged every log_every)."""
        cm = inputs["completion_mask"].float()
        local = {"reward/format": inputs["format_reward"].float().mean(), "reward/mask": mask_r.mean(),
                 "reward/total": total.mean(), "kl": policy.kl, "clip_fraction": policy.clip_fraction,
                 "policy/surrogate": policy.surrogate,
                 "entropy": (entropies * cm).sum() / cm.sum().clamp(min=1)}
        if consistency is not None:
            local["reward/consistency"] = consistency.float().mean()
        if seg is not None:
            scores = [float(s) for m in seg.matches for s in m.score]
            local.update({"seg/total": seg.total.detach(), "seg/heatmap_bce": seg.heatmap_bce.detach(),
                          "seg/mask_dice": seg.mask_dice.detach(), "seg/conf": seg.conf.detach(),
                          "seg/match_iou": torch.tensor(sum(scores) / len(scores) if scores else 0.0)})
        device = self.accelerator.device
        values = self.accelerator.gather(torch.stack([v.float().to(device) for v in local.values()])[None])
        means = values.mean(dim=0).tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in zip(local, means):
            metrics[name].append(value)
        metrics["advantage/std"].append(float(everyone.advantages.std()))
        metrics["reward/group_std"].append(float(everyone.group_std.mean()))
        metrics["reward/frac_zero_std_groups"].append(float((everyone.group_std < 1e-6).float().mean()))
        metrics["rollouts"].append(float((self.state.global_step + 1) * self.cfg.rl_prompts * self.num_generations))

    # ---- optimiser, gradients -------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(param_groups(self.segcompass, self.cfg),
                                               weight_decay=self.cfg.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            self.lr_scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=num_training_steps,
                pct_start=self.cfg.pct_start)
        return self.lr_scheduler

    def _optimised_params(self, side_only: bool = False) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups if not (side_only and g.get("name") == "policy")
                for p in g["params"]]

    def _clip_grad_norm(self, model):
        return self.accelerator.clip_grad_norm_(self._optimised_params(), self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._step % self.args.gradient_accumulation_steps == 0:
            # A new optimizer step. HF zeroes only `model` (the policy): clear the head's and SAM's.
            for param in self._optimised_params(side_only=True):
                param.grad = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            # DDP averages the policy's gradients; the head and SAM live outside TRL's model.
            average_gradients(self._optimised_params(side_only=True), self.accelerator.num_processes)
        return loss

    # ---- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            with atomic_file(folder / SIDE_WEIGHTS) as tmp:
                save_file(side_state(self.segcompass), str(tmp))
            atomic_write_json(folder / GRPO_STATE, {"step": self.state.global_step, "config": config_record(self.cfg)})
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # With LoRA the base never changes and the adapters come back from side.safetensors.
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled or self.segcompass.config.lora_rank):
            load_policy_weights(self.segcompass.policy, Path(resume_from_checkpoint))
        load_side_state(self.segcompass, Path(resume_from_checkpoint) / SIDE_WEIGHTS)


class JsonlLog(TrainerCallback):
    """Append every log record (TRL's + the step's own metrics) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path, self.t0 = path, time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "wall_s": round(time.perf_counter() - self.t0, 2),
                      **{k: v for k, v in logs.items() if isinstance(v, (int, float)) or v is None}}
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


class Progress(TrainerCallback):
    """One tqdm bar: optimizer steps, with rollouts so far and the latest rewards."""

    def __init__(self, enabled: bool, desc: str, rollouts_per_step: int):
        self.enabled, self.desc, self.per_step, self.bar = enabled, desc, rollouts_per_step, None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc,
                        disable=not (self.enabled and state.is_world_process_zero))

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        self.bar.set_postfix_str(f"rollouts {state.global_step * self.per_step}", refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward/total" in logs:
            self.bar.set_postfix_str(f"rollouts {state.global_step * self.per_step} reward "
                                     f"{logs['reward/total']:.3f} mask {logs['reward/mask']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


class StopAfter(TrainerCallback):
    """Save and stop after `steps` optimizer steps (simulates an interruption in tests)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_save = True
            control.should_training_stop = True
