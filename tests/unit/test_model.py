"""Model presets, the ancestor's sanity checks, and warm starts."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from ds_mlm.errors import UserError
from ds_mlm.model import PRESETS, build_model, check_compatible, make_config


def margs(**kw):
    base = dict(architecture="roberta-tiny", config_name=None, model_name_or_path=None, model_dir=None,
                pad_vocab_multiple=1, attn_implementation="sdpa")
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tok(bpe_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))


def test_presets_have_the_ancestors_shapes(tok):
    base = make_config("roberta-base", None, tok)
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (12, 768, 12, 3072)
    assert (base.max_position_embeddings, base.type_vocab_size, base.layer_norm_eps) == (514, 1, 1e-5)
    assert (base.bos_token_id, base.pad_token_id, base.eos_token_id) == (0, 1, 2)
    large = make_config("roberta-large", None, tok)
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    assert base.vocab_size == len(tok) == 2000
    assert set(PRESETS) == {"roberta-tiny", "roberta-base", "roberta-large"}


def test_max_seq_length_must_fit_the_position_embeddings(tok):
    config = make_config("roberta-tiny", None, tok)
    check_compatible(config, tok, 512)  # 512 + 1 + 1 = 514: fits exactly
    with pytest.raises(UserError, match="use --max_seq_length 512 or less"):
        check_compatible(config, tok, 513)


def test_special_token_mismatch_names_the_token(tok, tmp_path):
    path = tmp_path / "config.json"
    config = make_config("roberta-tiny", None, tok).to_dict()
    path.write_text(json.dumps({**config, "eos_token_id": 7}))
    with pytest.raises(UserError, match="eos token id is 2 but the model config expects 7"):
        build_model(margs(config_name=str(path)), tok, 128)


def test_warm_start_gives_the_same_weights(tok, tmp_path):
    torch.manual_seed(0)
    first = build_model(margs(), tok, 128)
    first.save_pretrained(tmp_path / "export")
    again = build_model(margs(model_name_or_path=str(tmp_path / "export")), tok, 128)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="neither model.safetensors nor pytorch_model.bin"):
        build_model(margs(model_dir=str(tmp_path)), tok, 128)
    with pytest.raises(UserError, match="does not exist"):
        build_model(margs(model_dir=str(tmp_path / "nope")), tok, 128)


def test_masked_positions_only_give_the_full_logits_loss_and_gradients(tok):
    """The training forward projects only masked positions: same loss and gradients as HF's full-logits forward."""
    from ds_mlm.model import RobertaForMLMPretraining

    torch.manual_seed(0)
    model = build_model(margs(), tok, 64).eval()  # eval: no dropout, so both forwards see the same network
    assert isinstance(model, RobertaForMLMPretraining)
    input_ids = torch.randint(5, len(tok), (3, 20))
    labels = torch.full_like(input_ids, -100)
    picked = torch.rand(input_ids.shape) < 0.3
    labels[picked] = input_ids[picked]
    attention_mask = torch.ones_like(input_ids)

    loss_sum, count = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # no labels: the parent's forward
    assert logits.shape == (3, 20, len(tok))
    full = torch.nn.functional.cross_entropy(logits.view(-1, len(tok)), labels.view(-1), reduction="sum")
    full.backward()
    assert int(count) == int(picked.sum()) > 0
    assert float(loss_sum) == pytest.approx(float(full), rel=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-6), name


def masked_batch(tok, rows=3, width=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, len(tok), (rows, width), generator=g)
    labels = torch.full_like(input_ids, -100)
    picked = torch.rand(input_ids.shape, generator=g) < 0.3
    labels[picked] = input_ids[picked]
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)


def test_padded_vocabulary_changes_shapes_not_numbers(tok):
    """--pad_vocab_multiple 64: 2000 rows become 2048 zero-padded ones, tied as before; same names, same initial
    weights, same loss, no gradient into the padding, logits only for the tokenizer's ids."""
    from ds_mlm.model import VOCAB_ROWS, padded_vocab_size, unpad_state_dict

    assert [padded_vocab_size(n, m) for n, m in ((2000, 64), (2048, 64), (50265, 64), (50265, 8), (2000, 1),
                                                 (2000, 0))] == [2048, 2048, 50304, 50272, 2000, 2000]
    torch.manual_seed(0)
    plain = build_model(margs(), tok, 64).eval()
    after_plain = torch.random.get_rng_state()
    torch.manual_seed(0)
    padded = build_model(margs(pad_vocab_multiple=64), tok, 64).eval()
    assert torch.equal(torch.random.get_rng_state(), after_plain)  # padding drew no random numbers
    assert plain.config.vocab_size == len(tok) == 2000 and padded.config.vocab_size == 2048
    assert padded.real_vocab_size == plain.real_vocab_size == 2000
    emb = padded.roberta.embeddings.word_embeddings
    assert emb.weight.shape == (2048, 128) and padded.lm_head.bias.shape == (2048,)
    assert padded.lm_head.decoder.weight is emb.weight and padded.lm_head.decoder.bias is padded.lm_head.bias
    assert [n for n, _ in padded.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert padded.state_dict().keys() == plain.state_dict().keys()
    assert not emb.weight[2000:].any() and not padded.lm_head.bias[2000:].any()
    for (name, a), b in zip(plain.state_dict().items(), unpad_state_dict(padded.state_dict(), 2000).values()):
        assert torch.equal(a, b), name  # the real rows and every other weight: the unpadded model's
    assert set(VOCAB_ROWS) <= set(padded.state_dict())

    batch = masked_batch(tok)
    losses = []
    for model in (plain, padded):
        loss_sum, count = model(**batch)
        loss_sum.backward()
        losses.append(float(loss_sum))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert not emb.weight.grad[2000:].any() and not padded.lm_head.bias.grad[2000:].any()
    assert emb.weight.grad[:2000].any()
    assert torch.allclose(emb.weight.grad[:2000], plain.roberta.embeddings.word_embeddings.weight.grad, atol=1e-6)
    logits = padded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (3, 20, 2000)  # no id without a token
    torch.testing.assert_close(logits, plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


def test_warm_start_from_an_export_is_padded_again(tok, tmp_path):
    torch.manual_seed(0)
    first = build_model(margs(), tok, 64)
    first.save_pretrained(tmp_path / "export")
    again = build_model(margs(model_name_or_path=str(tmp_path / "export"), pad_vocab_multiple=128), tok, 64)
    assert again.config.vocab_size == 2048 and again.real_vocab_size == 2000
    assert torch.equal(again.roberta.embeddings.word_embeddings.weight[:2000],
                       first.roberta.embeddings.word_embeddings.weight)


def test_attention_implementations_agree_and_flash_needs_cuda(tok):
    """eager and sdpa compute the same network; flash_attention_2 without flash_attn or CUDA is one line."""
    batch = masked_batch(tok, seed=1)
    batch["attention_mask"][0, 15:] = 0  # a padded row: the mask must reach every kernel
    losses = {}
    for attn in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = build_model(margs(attn_implementation=attn), tok, 64).eval()
        assert model.config._attn_implementation == attn
        losses[attn] = float(model(**batch)[0])
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5)
    assert "_attn_implementation" not in model.config.to_json_string()  # exports load with transformers' default
    with pytest.raises(UserError, match="flash_attention_2 needs the flash_attn package and a CUDA GPU"):
        build_model(margs(attn_implementation="flash_attention_2"), tok, 64)


def test_shape_flags_are_checked():
    from ds_mlm.args import ModelArguments

    assert ModelArguments().pad_vocab_multiple == 64 and ModelArguments().attn_implementation == "sdpa"
    with pytest.raises(UserError, match="unknown --attn_implementation 'flash'"):
        ModelArguments(attn_implementation="flash")
    with pytest.raises(UserError, match="--pad_vocab_multiple -8 must be 0 or more"):
        ModelArguments(pad_vocab_multiple=-8)


def test_head_rows_come_in_a_few_fixed_shapes(tok):
    """Masked-token counts that differ step to step reach the LM head as multiples of MASKED_ROWS_MULTIPLE (each new
    shape costs oneDNN a kernel kept for the process's life), with the same loss as the rows alone."""
    from ds_mlm.model import MASKED_ROWS_MULTIPLE

    torch.manual_seed(0)
    model = build_model(margs(), tok, 64).eval()
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    for seed in range(3):
        batch = masked_batch(tok, rows=4, width=30, seed=seed)
        with torch.no_grad():
            loss_sum, count = model(**batch)
        picked = batch["labels"] != -100
        with torch.no_grad():
            hidden = model.roberta(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            alone = torch.nn.functional.cross_entropy(model.lm_head(hidden.last_hidden_state[picked])[:, :len(tok)]
                                                      .float(), batch["labels"][picked], reduction="sum")
        assert int(count) == int(picked.sum()) and float(loss_sum) == pytest.approx(float(alone), rel=1e-5)
    head_rows = seen[0::2]  # each seed: the padded training forward, then the reference's own call
    assert all(r % MASKED_ROWS_MULTIPLE == 0 for r in head_rows) and len(set(seen[1::2])) > len(set(head_rows))
