"""How a network runs: device, autocast dtype and memory format, chosen the same
way for training (``training.engine``) and for answering (``ctapp.inference``)."""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

# "auto", "bf16", "int8" or "off" (fp32): see inference_precision.
INFERENCE_AMP_ENV = "CTAPP_INFERENCE_AMP"
INFERENCE_CHOICES = ("auto", "bf16", "int8", "off")


@dataclass
class Precision:
    """Where and how the model runs: device, autocast dtype (or None), memory
    format, and whether an int8 copy of the network answers (``ctapp.quantized``;
    a model without a calibration file answers in fp32)."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool = True
    int8: bool = False

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.autocast_dtype]
        amp = "int8 (calibrated)" if self.int8 else amp
        return f"{self.device.type}, {amp}, {'channels_last' if self.channels_last else 'contiguous'}"


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 / AMX). Elsewhere
    bf16 autocast is emulated and was measured 10x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


FP32 = Precision(torch.device("cpu"), None, channels_last=False)


def inference_precision(amp: str | None = None) -> Precision:
    """How models answer on this CPU, in channels_last: bf16 autocast where the
    CPU has native bf16 kernels (as training runs), fp32 elsewhere. ``amp``
    (default: the ``CTAPP_INFERENCE_AMP`` variable, else "auto") forces "bf16",
    "int8" or "off" (fp32).

    int8 (``ctapp.quantized``, about twice as fast as fp32 here) is chosen by
    name only: a default must keep the fp32 answer state on at least 99% of every
    shipped model's training-source slices, and int8 kept it on 87.5-98.8% of
    them (each model's ``quantization.json``; ``python -m training.quantize``).
    """
    amp = amp or os.environ.get(INFERENCE_AMP_ENV) or "auto"
    if amp not in INFERENCE_CHOICES:
        raise ValueError(f"{INFERENCE_AMP_ENV}={amp!r}: use {', '.join(INFERENCE_CHOICES)}")
    bf16 = amp == "bf16" or (amp == "auto" and cpu_has_fast_bf16())
    return Precision(torch.device("cpu"), torch.bfloat16 if bf16 else None, int8=amp == "int8")
