"""A saved tokenizer directory loads without ds-mlm (trust_remote_code, the module files saved beside the vocabulary)
and without any network, in a fresh interpreter. load_tokenizer itself, fast: tests/unit/test_tokenization_load.py."""

import json
import subprocess
import sys

import pytest

from ds_mlm.tokenization import load_tokenizer

from unit.test_tokenization_load import LINES

pytestmark = pytest.mark.slow  # a fresh interpreter: seconds

_ISOLATED = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise RuntimeError("network access")
socket.socket.connect = refuse
import pythainlp.corpus.core as core
core.download = core.get_corpus_path = refuse  # a corpus that is not packaged would be fetched through these
sys.modules["ds_mlm"] = None  # any import of ds-mlm fails: the directory must carry its own code
from transformers import AutoTokenizer
lines = sys.argv[1:5]
for path in sys.argv[5:]:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    print(json.dumps([type(tok).__module__, tok(lines)["input_ids"]]))
"""


def test_a_saved_directory_loads_without_ds_mlm_and_without_network(tmp_path):
    """trust_remote_code loading from the module files saved beside the vocabulary; PyThaiNLP's dictionaries come
    from its package, nothing is fetched."""
    from ds_mlm.train_tokenizer import TrainTokenizerArguments, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(LINES + ["ข่าวรัฐบาลไทย วันนี้"]) + "\n", encoding="utf-8")
    lines = LINES[:3] + ["ข่าว <mask> รัฐบาลไทย วันนี้"]
    saved, want = [], []
    for kind in ("spm", "newmm", "syllable"):
        out = train(TrainTokenizerArguments(type=kind, input_dir=str(corpus), output_dir=str(tmp_path / kind),
                                            vocab_size=500, num_workers=1))
        tok = load_tokenizer(out, kind, add_space_token=True)
        saved.append(tmp_path / f"{kind}-saved")
        tok.save_pretrained(saved[-1])  # the flag must survive, too
        want.append(tok(lines)["input_ids"])
    assert want[1] != want[2]  # words and syllables: two dictionaries at work
    data_dir = tmp_path / "pythainlp-data"
    data_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", _ISOLATED, *lines, *saved], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, env={"HF_MODULES_CACHE": str(tmp_path / "modules"),
                                                          "HF_HUB_OFFLINE": "1", "PYTHAINLP_DATA_DIR": str(data_dir),
                                                          "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()[-3:]]
    assert [module.split(".")[0] for module, _ in results] == ["transformers_modules"] * 3
    assert [ids for _, ids in results] == want
    assert not any(data_dir.iterdir())  # nothing was downloaded into PyThaiNLP's data directory
