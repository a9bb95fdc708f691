"""`bench profile`: measured or estimated training cost, through bench.profile.session."""
from __future__ import annotations


from bench.core.errors import ConfigError


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r} must be positive integers separated by commas, e.g. {flag} 1,4,8")
    return values


def _profile(args) -> int:
    from bench.profile.measure import format_table
    from bench.profile.session import run_profile

    result = run_profile(args.methods, arch=args.arch, resolutions=_int_list(args.resolution, "--resolution"),
                         batches=_int_list(args.batch, "--batch"),
                         precisions=[p for p in args.precision.split(",") if p] or [args.precision],
                         estimate=args.estimate, fit=args.fit, checkpointing=args.checkpointing,
                         attention=args.attention, steps=args.steps, condition=args.condition, store=args.store,
                         progress=not args.quiet)
    if args.estimate:
        _print_estimates(result, several_batches=len(_int_list(args.batch, "--batch")) > 1)
    for at, rows in result.measured:
        print(f"{result.base}, {at.resolution}px, batch {at.batch}, {at.precision}:")
        print(format_table(rows))
    if args.store:
        print(f"records: {args.store}")
    return 0


def _print_estimates(result, several_batches: bool) -> None:
    from bench.report.estimates import claim_verdicts, format_claims, format_curves, format_estimate

    if result.fits:
        from bench.profile.runplan import format_plan

        print(format_plan(result.fits))
        return
    print(format_estimate(result.estimates))
    if several_batches:
        print("\n" + format_curves(result.estimates))
    verdicts = claim_verdicts(result.records)
    if verdicts:
        print("\n" + format_claims(verdicts))


def add_commands(sub) -> None:
    pf = sub.add_parser("profile", help="params, train step time and peak memory per method, each in its own process",
                        description="Profile methods on a base model or a full-scale architecture with random "
                        "weights (sd15). Prints time/memory ratios against finetune (whole UNet trained) and frozen "
                        "(backward through the locked UNet) when they are among --methods.")
    pf.add_argument("--arch", default="sd15", help="sd15 or sdxl (random-weight SD1.5 / SDXL architecture), proxy, or a local "
                    "diffusers directory")
    pf.add_argument("--methods", default="finetune,frozen,controlnet,t2i_adapter,controlnext",
                    help="comma-separated method variants, name or name:key=value,...")
    pf.add_argument("--resolution", default="256", help="image resolution in pixels (comma-separated list)")
    pf.add_argument("--batch", default="1", help="batch size (comma-separated list, e.g. 1,4,8)")
    pf.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (autocast over fp32 weights), bf16-true "
                    "(pure bf16 weights and optimizer state); comma-separated list")
    pf.add_argument("--estimate", action="store_true", help="no timing: peak memory (weights, gradients, AdamW state, "
                    "activations) and FLOPs per training step, counted on fake tensors (no GPU, no real memory); "
                    "records are kind 'estimate'")
    pf.add_argument("--fit", metavar="SIZES", help="with --estimate, instead of the table: per method and card size "
                    "(e.g. 24GiB,40GiB,80GiB) a budget that fits: checkpointing, micro-batch x accumulation for the "
                    "largest --batch as effective batch, eval_batch_size, and the training, evaluation and data "
                    "pipeline (host) peaks")
    pf.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every diffusers model")
    pf.add_argument("--attention", default="default", help="SDPA kernel: default, math, or efficient (CUDA's "
                    "memory-efficient kernel; the CPU's flash kernel on the CPU)")
    pf.add_argument("--steps", type=int, default=3, help="timed steps after 2 warm-up steps (not used by --estimate, "
                    "which counts one steady-state step)")
    pf.add_argument("--condition", default="canny", help="control condition for the methods that need one")
    pf.add_argument("--store", help="also write one record per method to this SQLite store")
    pf.add_argument("--quiet", action="store_true", help="no progress bar")
    pf.set_defaults(func=_profile)
