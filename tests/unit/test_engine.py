"""The engine's start: DeepSpeed's Muon module imported without compiling its kernels until one is called."""

import sys

import torch

from ds_mlm import engine

MODULE = '''
import torch

@torch.compile
def square(x):
    return x * x

@torch.compile(dynamic=False)
def cube(x):
    return x * x * x
'''


def test_the_muon_module_compiles_each_function_at_its_first_call_only(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model=None, **options):
        if model is None:
            return lambda function: fake_compile(function, **options)
        compiled.append((model.__name__, options))
        return model
    (tmp_path / "fake_muon.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(engine, "MUON", "fake_muon")
    monkeypatch.delitem(sys.modules, "fake_muon", raising=False)
    engine._import_muon_compiling_lazily()
    muon = sys.modules["fake_muon"]
    assert compiled == [] and torch.compile is fake_compile  # imported, nothing compiled, torch.compile as it was
    assert muon.square(3) == 9 and muon.square(4) == 16 and muon.cube(2) == 8
    assert compiled == [("square", {}), ("cube", {"dynamic": False})]  # once each, with the decorator's options
    assert muon.square.__name__ == "square"


def test_the_muon_module_that_is_not_there_is_no_error(monkeypatch):
    monkeypatch.setattr(engine, "MUON", "no_such_module_here")
    compile_before = torch.compile
    engine._import_muon_compiling_lazily()
    assert torch.compile is compile_before and "no_such_module_here" not in sys.modules
