"""The FLOP count of a training micro-batch (ds_mlm.flops): hand counts for two shapes, torch's own FLOP counter on
a real forward + backward, and the dense-peak table."""

from types import SimpleNamespace

import pytest
import torch

from ds_mlm.flops import PEAKS, peak_tflops, train_flops


def shape(layers, hidden, intermediate, vocab):
    return SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                           vocab_size=vocab)


def by_hand(layers, hidden, intermediate, heads, vocab, rows, width, masked) -> int:
    """Every matmul of the model written out as (m, k, n), 2*m*k*n FLOPs each, x3 for forward + backward."""
    tokens, head_dim = rows * width, hidden // heads
    per_layer = [(tokens, hidden, hidden)] * 4  # query, key, value, attention output
    per_layer += [(tokens, hidden, intermediate), (tokens, intermediate, hidden)]  # FFN in, FFN out
    per_layer += [(width, head_dim, width)] * (rows * heads)  # Q.K^T per sample and head
    per_layer += [(width, width, head_dim)] * (rows * heads)  # A.V per sample and head
    head = [(masked, hidden, hidden), (masked, hidden, vocab)]  # LM head dense + decoder, masked rows only
    forward = layers * sum(2 * m * k * n for m, k, n in per_layer) + sum(2 * m * k * n for m, k, n in head)
    return 3 * forward


def test_roberta_tiny_micro_batch_equals_the_hand_count():
    # 2 layers, hidden 128, FFN 512, 2 heads, 2048 (padded) rows; 4 samples x 64 positions, 40 masked:
    # per layer 2*256*(4*128*128 + 2*128*512) = 100,663,296 + attention 4*4*64*64*128 = 8,388,608;
    # head 2*40*(128*128 + 128*2048) = 22,282,240; forward 2*109,051,904 + 22,282,240 = 240,386,048; x3
    assert train_flops(shape(2, 128, 512, 2048), rows=4, width=64, masked=40) == 721_158_144
    assert by_hand(2, 128, 512, 2, 2048, 4, 64, 40) == 721_158_144


def test_roberta_base_micro_batch_equals_the_hand_count():
    # roberta-base with a 50,265-token vocabulary padded to 50,304; 32 x 512 positions, 2,458 masked
    expected = by_hand(12, 768, 3072, 12, 50304, 32, 512, 2458)
    assert train_flops(shape(12, 768, 3072, 50304), rows=32, width=512, masked=2458) == expected
    assert expected == pytest.approx(3 * (12 * (2 * 16384 * 7077888 + 4 * 32 * 512 * 512 * 768)
                                          + 2 * 2458 * (768 * 768 + 768 * 50304)), rel=0)
    # the attention scores grow with the width: at 512, per position, 1/9 of the projections' and FFN's FLOPs
    assert 9 * (4 * 512 * 768) == 2 * (4 * 768 * 768 + 2 * 768 * 3072)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_torchs_flop_counter_agrees_on_a_real_forward_and_backward(attn):
    """torch.utils.flop_counter counts every matmul the real model runs (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import RobertaConfig

    from ds_mlm.model import MASKED_ROWS_MULTIPLE, RobertaForMLMPretraining

    config = RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=160, max_position_embeddings=130, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = RobertaForMLMPretraining(config)
    rows, width = 3, 48
    input_ids = torch.randint(5, 1000, (rows, width))
    labels = torch.full_like(input_ids, -100)
    picked = torch.rand(rows, width) < 0.15
    labels[picked] = input_ids[picked]
    counter = FlopCounterMode(display=False)
    with counter:
        loss_sum, count = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        loss_sum.backward()
    head_rows = -(-int(count) // MASKED_ROWS_MULTIPLE) * MASKED_ROWS_MULTIPLE  # the LM head's rows come padded
    assert counter.get_total_flops() == train_flops(config, rows, width, head_rows) > 0


def test_the_peak_is_the_dense_figure_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5  # SXM: 1,979 with sparsity
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA H100 NVL", "fp16") == 835.5
    assert peak_tflops("NVIDIA H200", "bf16") == 989.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == peak_tflops("NVIDIA A100 80GB PCIe", "fp16") == 312.0
    assert peak_tflops("NVIDIA A10", "bf16") == 125.0 and peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops("NVIDIA B200", "bf16") == 2250.0
    assert peak_tflops("Tesla V100-SXM2-16GB", "fp16") == 125.0 and peak_tflops("Tesla V100-PCIE-32GB", "fp16") == 112.0
    assert peak_tflops("Tesla T4", "fp16") == 65.0
    assert peak_tflops("Tesla T4", "bf16") is None and peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # none
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None  # MFU is against the bf16/fp16 tensor peak only
    for other in ("NVIDIA A10G", "NVIDIA L40S", "NVIDIA GH200 480GB", "cpu", ""):  # not in the table: no guess
        assert peak_tflops(other, "bf16") is None, other
    assert all(source.startswith("NVIDIA") for _, _, source in PEAKS)  # every number names its datasheet
