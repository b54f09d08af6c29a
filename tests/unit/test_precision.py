"""The precision a run trains in, on both kinds of CPU this project's machines have and on a GPU."""

import pytest
import torch

from ds_mlm.precision import Device, bf16_native, choose, this_device

AVX512_BF16 = Device("cpu", fp16=False, bf16_native=True)
AVX2_ONLY = Device("cpu", fp16=False, bf16_native=False)
A100 = Device("cuda", fp16=True, bf16_native=True)
V100 = Device("cuda", fp16=True, bf16_native=False)


@pytest.mark.parametrize("asked, device, used, warning", [
    ("fp16", AVX512_BF16, "bf16", "fp16 is not supported on this cpu: training in bf16 instead (pass --bf16 to say so)"),
    ("fp16", AVX2_ONLY, "fp32", "fp16 is not supported on this cpu: training in fp32 instead (emulated without "
                                "AVX512-BF16 or AMX, 10-40x slower than fp32)"),
    ("bf16", AVX2_ONLY, "fp32", "bf16 is emulated without AVX512-BF16 or AMX, 10-40x slower than fp32 on this cpu: "
                                "training in fp32"),
    ("bf16", AVX512_BF16, "bf16", None),
    ("fp32", AVX2_ONLY, "fp32", None),
    ("fp16", A100, "fp16", None),
    ("fp16", V100, "fp16", None),
    ("bf16", V100, "fp32", "bf16 is not supported on this cuda: training in fp32"),
])
def test_the_rule(asked, device, used, warning):
    assert choose(asked, device) == (used, warning)


def test_bf16_native_asks_onednn_on_a_cpu(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    for answer in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda answer=answer: answer)
        assert bf16_native(get_accelerator()) is answer  # not DeepSpeed's CPU answer, which is always yes


def test_this_machine():
    device = this_device()
    assert device.name == "cpu"  # DeepSpeed takes fp16 on CPUs where oneDNN computes it (AVX512-FP16/AMX-FP16) only
    assert device.fp16 is bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    assert device.bf16_native is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
