"""Throughput accounting: the model FLOPs of a training micro-batch, and the peak they are measured against.

One formula, counted from the shapes of what the model really computes (matmuls only: layer norms, softmax, GELU,
dropout and the optimizer are a few per cent and left out, as in the usual MFU definitions). For a micro-batch of
`rows` samples padded to `width` positions, of which `masked` carry a label, and a RoBERTa of L layers, hidden H,
intermediate I and V vocabulary rows (the padded count, `config.vocab_size`, since that is what the matmul does):

    forward = L * (2 * rows * width * (4*H*H + 2*H*I)      Q, K, V and output projections, the two FFN matmuls,
                                                           at every position the encoder computes (padding included)
                   + 4 * rows * width * width * H)         attention scores Q.K^T and the weighted sum A.V
              + 2 * masked * (H*H + H*V)                   the LM head (dense + decoder) on the masked positions only
    train   = 3 * forward                                  the backward pass costs twice the forward

(A multiply-add is 2 FLOPs.) Logged per device: `tflops` = FLOPs of all ranks in the logging window / window seconds
/ world size / 1e12, and `mfu` = tflops / the device's peak. The peak is the dense (not 2:4-sparse) bf16/fp16 tensor
figure of the vendor's datasheet, from the table below or `--peak_tflops`; sparse peaks are twice as large and
halve the MFU (the mistake of Megatron-LM issue #1565).
"""

import re
from typing import Optional


def forward_flops(layers: int, hidden: int, intermediate: int, vocab: int, rows: int, width: int,
                  masked: int) -> float:
    """FLOPs of one forward pass (the formula of the module docstring)."""
    positions = rows * width
    encoder = layers * (2 * positions * (4 * hidden * hidden + 2 * hidden * intermediate)
                        + 4 * rows * width * width * hidden)
    head = 2 * masked * (hidden * hidden + hidden * vocab)
    return float(encoder + head)


def train_flops(config, rows: int, width: int, masked: int) -> float:
    """Forward + backward FLOPs of a micro-batch of `rows` x `width` positions with `masked` labelled ones."""
    return 3.0 * forward_flops(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                               config.vocab_size, rows, width, masked)


# Dense tensor-core peaks in TFLOP/s, per GPU: (name pattern, {precision: peak}, source). Patterns are matched in
# order against torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "Tesla T4");
# word boundaries keep "A10" from matching "A10G" and "H200" from matching "GH200". Volta and Turing have no bf16.
PEAKS = (
    (r"\bV100S\b", {"fp16": 130.0}, "NVIDIA V100S PCIe datasheet: tensor performance 130 TFLOPS"),
    (r"\bV100\b.*\bPCIE\b", {"fp16": 112.0}, "NVIDIA V100 datasheet (PCIe): tensor performance 112 TFLOPS"),
    (r"\bV100\b", {"fp16": 125.0}, "NVIDIA V100 datasheet (SXM2): tensor performance 125 TFLOPS"),
    (r"\bT4\b", {"fp16": 65.0}, "NVIDIA T4 datasheet: mixed precision FP16/FP32 65 TFLOPS"),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0}, "NVIDIA A10 datasheet: BF16/FP16 tensor 125 TF (250 sparse)"),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0}, "NVIDIA L4 datasheet: BF16/FP16 tensor 242 TF with sparsity"),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0}, "NVIDIA A100 datasheet (SXM and PCIe): BF16/FP16 tensor 312 TF "
                                                  "(624 sparse)"),
    (r"\bH100\b.*\bPCIE\b", {"bf16": 756.5, "fp16": 756.5}, "NVIDIA H100 datasheet (PCIe): BF16/FP16 tensor "
                                                             "1,513 TF with sparsity"),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.5, "fp16": 835.5}, "NVIDIA H100 datasheet (NVL): BF16/FP16 tensor "
                                                            "1,671 TF with sparsity"),
    (r"\bH100\b", {"bf16": 989.5, "fp16": 989.5}, "NVIDIA H100 datasheet (SXM): BF16/FP16 tensor 1,979 TF with "
                                                  "sparsity"),
    (r"\bH200\b.*\bNVL\b", {"bf16": 835.5, "fp16": 835.5}, "NVIDIA H200 datasheet (NVL): BF16/FP16 tensor "
                                                            "1,671 TF with sparsity"),
    (r"\bH200\b", {"bf16": 989.5, "fp16": 989.5}, "NVIDIA H200 datasheet (SXM): BF16/FP16 tensor 1,979 TF with "
                                                  "sparsity"),
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0}, "NVIDIA HGX B200 datasheet: FP16/BF16 tensor 36 PF with "
                                                    "sparsity per 8 GPUs (4.5 PF each, half without sparsity)"),
)


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """The dense bf16/fp16 tensor peak of a GPU by its name, or None (unknown GPU, fp32, or no such precision)."""
    for pattern, peaks, _source in PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks.get(precision)
    return None
