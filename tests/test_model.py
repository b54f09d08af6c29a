"""Model presets, the ancestor's sanity checks, and warm starts."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from ds_mlm.errors import UserError
from ds_mlm.model import PRESETS, build_model, check_compatible, make_config


def margs(**kw):
    base = dict(architecture="roberta-tiny", config_name=None, model_name_or_path=None, model_dir=None)
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
