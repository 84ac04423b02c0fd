"""`segcompass train --mode rl | rl+seg`: GRPO on the reasoning path, jointly with segmentation
supervision, on TRL's `GRPOTrainer` (subclassed in `segcompass.training.grpo_trainer`).

Why TRL: it is a maintained engine for exactly this loop (rollouts from the current weights
with a KV cache, a frozen reference model, group-normalised advantages, accelerate-based
DDP / FSDP / DeepSpeed, vLLM rollouts, resumable checkpoints with optimiser, scheduler and
RNG state). What SegCompass adds lives in a few overrides:

  _tokenize_prompts      prompts through saekit's `build_batch` (the same tokens and token
                         types as evaluation and supervised training)
  _generate_single_turn  one batched `generate` call (KV cache) with keyed Gumbel-max
                         sampling: rollout r of sample i at step s is a pure function of
                         (seed, s, i, r) and the weights, on any number of processes
  _calculate_rewards     the format reward is a plain TRL reward function; its local slice
                         is kept for the joint step
  _prepare_inputs        no shuffling: consecutive rows are the G rollouts of one prompt
  compute_loss           the joint step (below)
  create_optimizer/_scheduler, _clip_grad_norm   the paper's LR groups, OneCycle, one clip
                         over policy + head
  training_step          the head and SAM are outside TRL's model: their gradients are
                         averaged across processes here (TRL's model = the policy)
  _save_checkpoint/_load_from_checkpoint        + side.safetensors (head, SAM)

Passes per optimizer step (num_iterations = 1; each rollout is used by exactly one update):
  1. `generate` over the B·G rollouts, current weights, no gradient (TRL);
  2. the frozen reference policy over prompt + completion, no gradient (TRL; for the KL);
  3. the policy over prompt + completion with gradients: TRL's own log-prob forward, during
     which hooks record block L (the SAE's input) and the final norm (the slot embeddings).
     From this one pass come the GRPO log-probabilities, the SAE codes, the head's masks,
     the mask reward (hence the advantages, computed right here, before the loss) and the
     segmentation loss; one backward for GRPO + beta·KL + lambda_s·L_seg + lambda_c·L_conf.
With `--rollout-engine vllm-*`, pass 1 runs in vLLM and TRL adds one no-grad policy pass
for its importance-sampling correction (vLLM's and the trainer's numerics differ).
SAM's image encoder runs once per prompt, not per rollout. There is no pass only for the
SAE or only for scoring masks. Because advantages are formed inside the step, each
micro-batch (over all processes together) must hold whole groups: the per-process
micro-batch is a multiple of G, or one micro-batch per step.

Rollouts always come from the current weights (upstream sampled from a never-updated copy).
With one update per rollout batch the importance ratio is exactly 1 and the epsilon-clip never
binds (clip fraction 0 is logged); the clipped objective is still the one optimised.

Recipe flags (issue 21, docs/results.md section 4; each default is the behaviour above):
  --init-from CKPT       head, SAM and policy from a trained checkpoint (`training.init_from`);
                         the KL reference is its policy
  --seg-on               where rl+seg's segmentation loss applies: all rollouts; teacher (the
                         prompts' ground-truth CoT, one more policy pass; world); correct
                         (rollouts whose CoT names the targets, `policy_eval.judge`; world); advantage
                         (rollouts weighted by max(A, 0)); weighted terms are sum w_b L_b / B
  --top-p                nucleus sampling of the rollouts (log-probabilities stay at temperature only,
                         as TRL's)
  --entropy-coef         - coef x token-mean entropy added to the policy loss
  --dynamic-sampling N   DAPO: groups without reward spread are replaced by groups of reserve prompts
                         (stream positions after the run's own), scored in one extra no-grad pass,
                         at most N draws per step (then the flat groups fill the batch); one process
  --consistency-reward-weight   + w x `rewards.consistency_reward` (world)
  --curriculum first-errors     prompts drawn by the policy's first errors (`training.curriculum`)
Logged per logging step besides rewards: reward/frac_zero_std_groups, entropy, kl, clip_fraction
(and dynamic/zero_spread_drawn, dynamic/draws); `plots.plot_grpo_curves` draws them at the end.

Output folder (cfg.out):
    trl/checkpoint-N/   TRL/HF checkpoint: policy (safetensors), optimizer, scheduler, RNG,
                        trainer state (HF reads these back with torch.load(weights_only=True)),
                        + side.safetensors (head, SAM) + segcompass_grpo.json (written last)
    final/              SegCompass checkpoint folder (`segcompass eval` / `predict` read it)
    metrics.jsonl       one record per logging step (rewards, advantages, KL, clip, seg losses)
    grpo_curves.png     zero-spread share, entropy, KL, clip fraction and rewards over the run
    curriculum.json     with --curriculum: the family weights (read back on resume)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from saekit.errors import UserError
from saekit.integrity import read_json_object
from saekit.run import apply_threads, check_resume, config_record, truncate_log
from segcompass.data.sources import TrainStream, parse_data_list
from segcompass.training.common import GRPO_STATE, WorldPrompts, per_device_rows
from segcompass.training.grpo_trainer import JsonlLog, Progress, SegCompassGRPOTrainer, StopAfter

TRL_DIR = "trl"


def build_processor(loaded, policy_path: Path):
    """The processor TRL needs: LLaVA's is assembled from the loaded tokenizer and image
    processor; other families load theirs from the policy folder."""
    if loaded.preset.family == "llava":
        from transformers import LlavaProcessor

        config = loaded.model.config
        return LlavaProcessor(image_processor=loaded.image_processor, tokenizer=loaded.tokenizer,
                              patch_size=config.vision_config.patch_size,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              image_token=loaded.preset.image_token, num_additional_image_tokens=1,
                              chat_template=loaded.tokenizer.chat_template)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(policy_path, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"train: no processor loads from {policy_path} ({str(err).splitlines()[0]})") from None


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete `checkpoint-N` (one that holds GRPO_STATE), or None."""
    complete = [c for c in directory.glob("checkpoint-*") if (c / GRPO_STATE).is_file()]
    return max(complete, key=lambda c: int(c.name.rsplit("-", 1)[1]), default=None)


def grpo_args(cfg, output_dir: Path, device: torch.device):
    """TRL/HF arguments of a GRPO run (everything not listed keeps TRL's default)."""
    from trl import GRPOConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=cfg.steps, per_device_train_batch_size=per_device_rows(cfg, world),
        gradient_accumulation_steps=cfg.grad_accum, num_generations=cfg.group_size,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, beta=cfg.kl_coef,
        epsilon=cfg.clip_epsilon, num_iterations=1, loss_type="grpo", scale_rewards="group",
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
        logging_steps=cfg.log_every, save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", disable_tqdm=True, shuffle_dataset=False,
        remove_unused_columns=False, dataloader_num_workers=0, log_completions=False,
        use_cpu=device.type == "cpu", bf16=cfg.bf16 and device.type == "cuda",
        activation_checkpointing=cfg.act_checkpointing and device.type == "cuda",
        mask_truncated_completions=False, **_vllm_args(cfg))


def _vllm_args(cfg) -> dict[str, Any]:
    """TRL's vLLM rollouts: weights are pushed to vLLM after every optimizer step (rollouts from
    the current policy) and TRL adds one no-grad policy pass for its importance-sampling correction."""
    if cfg.rollout_engine == "generate":
        return {}
    return {"use_vllm": True, "vllm_mode": cfg.rollout_engine.removeprefix("vllm-")}


def train_grpo(cfg, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) GRPO training (modes rl, rl+seg); returns `out/final` (or the
    checkpoint folder when `stop_after` ended the run early)."""
    from transformers import PrinterCallback

    from saekit.models import resolve_device
    from segcompass.model import build_segcompass, save_segcompass

    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    trl_dir = out / TRL_DIR
    if not cfg.resume:
        shutil.rmtree(trl_dir, ignore_errors=True)  # a fresh run must not resume a stale checkpoint later
    trl_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(trl_dir)
    if checkpoint is not None:
        state = read_json_object(checkpoint / GRPO_STATE, fields={"config": dict},
                                 fix=f"delete {checkpoint} to resume from the one before it")
        check_resume(state["config"], cfg, f"train: {checkpoint}")
    model = build_segcompass(cfg.model_config(), policy_path=cfg.policy, sae_path=cfg.sae, sam_path=cfg.sam_path,
                             seed=cfg.seed, device=device, allow_mismatch=cfg.allow_mismatch)
    if cfg.init_from is not None:  # also when resuming: TRL's reference policy is built from it
        from segcompass.training.init_from import init_from_checkpoint

        init_from_checkpoint(model, cfg.init_from, cfg.sae)
    if cfg.sam_path is not None:  # frozen pretrained encoder: embeddings computed once, kept on disk
        model.use_embedding_cache(cfg.sam_cache or out / "sam_cache")
    rows = cfg.steps * cfg.rl_prompts
    reserve = rows * cfg.dynamic_sampling  # dynamic sampling's extra prompts (grpo_step.reserve_index)
    if cfg.curriculum != "off":  # world families by the policy's first errors (training.curriculum)
        from segcompass.training.curriculum import CurriculumStream, curriculum_weights

        stream = CurriculumStream(curriculum_weights(cfg, model.loaded, out, resuming=checkpoint is not None),
                                  seed=cfg.seed)
    else:
        stream = TrainStream(parse_data_list(cfg.data), seed=cfg.seed, total=rows + reserve, split_by=cfg.split_by)
    callbacks = [JsonlLog(out / "metrics.jsonl"),
                 Progress(progress, f"grpo {cfg.mode}", cfg.rl_prompts * cfg.group_size)]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = SegCompassGRPOTrainer(segcompass=model, cfg=cfg, args=grpo_args(cfg, trl_dir, device),
                                    train_dataset=WorldPrompts("train", rows, cfg.seed, stream=stream),
                                    processing_class=build_processor(model.loaded, cfg.policy), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # metrics.jsonl and the bar replace the printed dicts
    _broadcast_side(trainer)
    if trainer.accelerator.is_main_process:
        truncate_log(out / "metrics.jsonl", 0 if checkpoint is None else int(checkpoint.name.rsplit("-", 1)[1]))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.state.global_step < cfg.steps:
        return latest_checkpoint(trl_dir)
    final = out / "final"
    if trainer.accelerator.is_main_process:
        save_segcompass(model, final, sae_path=cfg.sae,
                        record={"steps": cfg.steps, "mode": cfg.mode, "config": config_record(cfg)})
        from segcompass.training.plots import plot_grpo_curves

        plot_grpo_curves(out / "metrics.jsonl", out / "grpo_curves.png", title=f"{cfg.mode}, {out.name}")
    trainer.accelerator.wait_for_everyone()
    return final


def _broadcast_side(trainer) -> None:
    """Start every process from rank 0's head and SAM (DDP does the same for the policy)."""
    if trainer.accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*trainer.segcompass.head.parameters(), *trainer.segcompass.sam.parameters()]:
            dist.broadcast(tensor.data, src=0)
