"""ds-mlm-fill-mask: guesses for one <mask> from an exported directory; other input is a one-line error."""

import pytest
from transformers import AutoTokenizer, RobertaForMaskedLM

from ds_mlm.errors import UserError
from ds_mlm.fill_mask import fill_mask, main
from ds_mlm.model import make_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer_dir):
    """An export-shaped directory (model and tokenizer together) of an untrained tiny model."""
    out = tmp_path_factory.mktemp("export") / "roberta_thai"
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    RobertaForMaskedLM(make_config("roberta-tiny", None, tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_one_mask_gives_top_k_guesses(model_dir, capsys):
    guesses = fill_mask(str(model_dir), "The <mask> was there.", top_k=3)
    assert len(guesses) == 3 and all("<mask>" not in g["sequence"] for g in guesses)
    assert main([str(model_dir), "The <mask> was there.", "--top_k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 2  # the text, then one line per guess


@pytest.mark.parametrize("text, count", [("no mask here", 0), ("The <mask> of the <mask>.", 2)])
def test_not_exactly_one_mask_is_a_user_error(model_dir, text, count):
    with pytest.raises(UserError, match=f"the text has {count} <mask>: put exactly one <mask>"):
        fill_mask(str(model_dir), text)


def test_a_directory_without_a_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a saved model"):
        fill_mask(str(tmp_path), "The <mask>.")
