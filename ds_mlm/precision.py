"""Which precision a run trains in: the one asked for, where the device computes it at speed, else the next best.

    fp16 asked, the device cannot do fp16 (most CPUs)   ->  bf16 where bf16 is native, else fp32
    bf16 asked, bf16 not native                         ->  fp32
    anything else                                       ->  as asked

Each fallback is one warning line (rank 0) naming the precision used. DeepSpeed's CPU accelerator says bf16 works on
any CPU, but without AVX512-BF16 or AMX PyTorch emulates it: a 2048x128 by 128x8000 matmul with its backward took
0.16 s in fp32 and 6.0 s in bf16 on an AVX2-only EPYC. oneDNN's own check tells the two kinds apart.
"""

from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
_EMULATED = "emulated without AVX512-BF16 or AMX, 10-40x slower than fp32"


@dataclass(frozen=True)
class Device:
    """What the accelerator can do, as far as the precision choice is concerned."""

    name: str
    """DeepSpeed's accelerator name: cpu, cuda, ..."""
    fp16: bool
    """Can DeepSpeed train in fp16 here?"""
    bf16_native: bool
    """Is bf16 computed at speed (not emulated)?"""
    product: str = ""
    """The GPU's name (torch.cuda.get_device_name), for its peak TFLOP/s (flops.py); empty on a CPU."""


def bf16_native(acc) -> bool:
    """Does the device compute bf16 at speed? (see the module docstring)"""
    if acc.device_name() == "cpu":
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(acc.is_bf16_supported())


def this_device() -> Device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    product = ""
    if acc.device_name() == "cuda":
        import torch

        product = torch.cuda.get_device_name()
    return Device(name=acc.device_name(), fp16=bool(acc.is_fp16_supported()), bf16_native=bf16_native(acc),
                  product=product)


def choose(asked: str, device: Device):
    """(precision to train in, warning line or None) for `asked` on `device`."""
    if asked == "fp16" and not device.fp16:
        used = "bf16" if device.bf16_native else "fp32"
        why = (" (pass --bf16 to say so)" if device.bf16_native else
               f" ({_EMULATED})" if device.name == "cpu" else " (nor is bf16)")
        return used, f"fp16 is not supported on this {device.name}: training in {used} instead{why}"
    if asked == "bf16" and not device.bf16_native:
        why = _EMULATED if device.name == "cpu" else "not supported"
        return "fp32", f"bf16 is {why} on this {device.name}: training in fp32"
    return asked, None
