"""``align plan``: predict the peak memory of reward-backprop fine-tuning before running it."""

from __future__ import annotations

import argparse

from align.commands.common import wrap_paragraphs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="predict peak memory of a training run and the largest batch / K that fit a budget",
        description=wrap_paragraphs(
            "Predict the peak memory of one optimiser step of `align train` from the model's architecture (config "
            "files only; no weights are downloaded) and the run's settings, broken down into weights, gradients, "
            "optimizer state and activations by phase, and find the largest batch size and truncation K that fit "
            "each memory budget. Presets work offline: sd15, sdxl, sd3, flux."
        ),
        epilog=(
            "examples:\n"
            "  align plan --model sd15 --method draft --truncation-steps 1 --steps 50 --resolution 512 --budget 24GB\n"
            "  align plan --model sdxl --mixed-precision bf16 --batch-size 2\n"
            "  align plan --model stabilityai/stable-diffusion-xl-base-1.0 --method alignprop --json\n"
            "  align plan --model flux --full-finetune --mixed-precision bf16 --processes 16 --sharding fsdp"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="sd15", help="preset (sd15, sdxl, sd3, flux), 'builtin', a local diffusers folder or a hub id")
    parser.add_argument("--method", default="draft", help="draft, draft_lv, alignprop or refl (not ddpo, grpo: see their error)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps T (default: the method's)")
    parser.add_argument("--truncation-steps", type=int, default=None, help="K, grad-enabled final steps (draft, alignprop)")
    parser.add_argument("--lv-copies", type=int, default=2, help="DRaFT-LV's re-noised copies")
    parser.add_argument("--batch-size", type=int, default=1, help="images per process per micro-step")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's native size)")
    cfg = parser.add_mutually_exclusive_group()
    cfg.add_argument("--cfg", dest="guidance", action="store_const", const=True, default=None, help="classifier-free guidance on")
    cfg.add_argument("--no-cfg", dest="guidance", action="store_const", const=False, help="classifier-free guidance off")
    parser.add_argument("--full-finetune", action="store_true", help="train the whole denoiser instead of LoRA")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--processes", type=int, default=1, help="GPUs the run is spread over (all machines together)")
    parser.add_argument(
        "--sharding", default="none",
        help="with --full-finetune: none (replicated), fsdp (weights, gradients and AdamW state divided by the "
        "processes), zero2 or zero3 (DeepSpeed); the figures are per process",
    )
    parser.add_argument("--no-checkpointing", action="store_true", help="no gradient checkpointing")
    parser.add_argument("--mixed-precision", default="no", help="no, fp16 or bf16")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens for sd3 / flux")
    parser.add_argument(
        "--budget", action="append", default=None, metavar="SIZE",
        help="memory budget such as 24GB (repeatable; default: 24GB and 80GB)",
    )
    parser.add_argument("--extra-memory", default="0GB", metavar="SIZE", help="memory to add for the reward model and anything else not modelled")
    parser.add_argument("--offline", action="store_true", default=None, help="use only local files")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--list-presets", action="store_true", help="list the built-in architecture presets and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from align.train.plan import (
        DEFAULT_BUDGETS_GB,
        PlanConfig,
        format_plan,
        parse_memory,
        plan_memory,
        preset_names,
    )

    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    budgets = [parse_memory(b) for b in args.budget] if args.budget else list(DEFAULT_BUDGETS_GB)
    config = PlanConfig(
        model=args.model, method=args.method, num_steps=args.steps, truncation_steps=args.truncation_steps,
        lv_copies=args.lv_copies, batch_size=args.batch_size, resolution=args.resolution, guidance=args.guidance,
        lora=not args.full_finetune, lora_rank=args.lora_rank, gradient_checkpointing=not args.no_checkpointing,
        mixed_precision=args.mixed_precision, device=args.device, max_sequence_length=args.max_sequence_length,
        budgets_gb=budgets, extra_memory_gb=parse_memory(args.extra_memory), offline=args.offline,
        processes=args.processes, sharding=args.sharding,
    )
    plan = plan_memory(config)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0
