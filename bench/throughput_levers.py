"""Levers: what our step in the throughput benchmark can be measured with beside its defaults (--levers of
--mode compare, the flags of --mode ours): an attention backend, inductor settings, and the shipped
optimisations undone one at a time."""

from __future__ import annotations

import argparse
import functools

import throughput_common  # noqa: F401  (puts scripts/ on the path)
from ivr import loss as ivr_loss
from ivr import trainer as ivr_trainer

# Levers tried beside the default at the same batch (compare's extras): what each adds to our command line.
LEVERS = {"flash": ["--attention", "flash"],
          "autotuned": ["--compile-mode", "max-autotune-no-cudagraphs"], "cd-tuned": ["--cd-tuning"],
          # the shipped optimisations undone, one each: their "before"
          "inductor-rng": ["--inductor-rng"], "clip-apart": ["--clip-apart"], "inductor-loss": ["--inductor-loss"],
          "inline-rotary": ["--inline-rotary"], "torch-adamw": ["--torch-adamw"],
          # inductor settings tried as they are
          "combo": ["--inductor", "combo_kernels=True"],
          "no-mix-order": ["--inductor", "triton.mix_order_reduction=False"],
          # the loss over the whole batch of 16 at once (two chunks at the training default of 8,192)
          "chunk16k": ["--chunk", "16384"]}


def prefer_attention(name: str) -> None:
    """Experiment: put one SDPA backend first for everything that follows (compiled graphs included)."""
    if name == "default":
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    rest = [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH) if b != first]
    sdpa_kernel([first, *rest], set_priority=True).__enter__()


def inductor_setting(text: str) -> tuple[str, object]:
    """--inductor's KEY=VALUE, the value a Python literal."""
    import ast

    from torch._inductor import config as inductor_config

    key, equals, value = (part.strip() for part in text.partition("="))
    try:
        functools.reduce(getattr, key.split("."), inductor_config)
    except AttributeError:
        raise argparse.ArgumentTypeError(f"{key!r}: no such inductor setting") from None
    try:
        if equals:
            return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, VALUE a Python literal")


def before_prepare(args) -> None:
    """The levers of --mode ours that take effect when the stage is prepared (compiled, its optimizer made)."""
    prefer_attention(args.attention)
    if args.cd_tuning or args.inductor:
        from torch._inductor import config as inductor_config

        if args.cd_tuning:
            inductor_config.coordinate_descent_tuning = True
        for key, value in args.inductor:
            setattr(inductor_config, key, value)
    if args.inline_rotary:
        ivr_loss.rotary_tables_stored = False
    if args.torch_adamw:
        ivr_trainer.adamw_kernel_on_cuda = False


def after_prepare(args, prepared) -> None:
    """The levers of --mode ours that override what preparing the stage set, before the first step compiles."""
    if args.inductor_rng:
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = False
    if args.clip_apart:
        prepared.clip_in_step = False
    if args.inductor_loss:
        ivr_loss.triton_on_cuda = False
