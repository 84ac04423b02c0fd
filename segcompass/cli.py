"""`segcompass` command line. Each subcommand lives in `segcompass.commands.<name>`
(`add_arguments(parser)`, `run(args) -> int`) and is imported only when it runs."""

from __future__ import annotations

import sys

from saekit.cli import dispatch

COMMANDS: dict[str, str] = {
    "world": "Generate the embedded reasoning-segmentation world and export it.",
    "score": "Score predicted masks against ground truth in the ReasonSeg layout.",
    "demo": "Run the whole embedded pipeline: world, warm start, SAE, training, evaluation, reports.",
    "warmstart": "Train the tiny policy on the world's chain of thought by teacher forcing.",
    "sam-pretrain": "Pretrain a world SAM preset as a promptable segmenter (the SA-1B stand-in).",
    "train": "Train SegCompass (segmentation, GRPO or both) on the world or real datasets.",
    "eval": "Evaluate a checkpoint on world or dataset splits: gIoU, cIoU, N-acc, T-acc, RLE predictions.",
    "predict": "Segment one image from an instruction and write an inspectable HTML report.",
    "analyze": "Interpretability analyses of a checkpoint: Figures 4, 5, 8, faithfulness, concept naming.",
    "ablate": "Run an ablation (training modes, reward, GRPO group size, backbone) on the embedded world.",
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("segcompass", "segcompass", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
