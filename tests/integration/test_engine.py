"""The engine's start, end to end: a ZeRO 2 step of AdamW never loads inductor (DeepSpeed's Muon module)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

ZERO2_STEP = '''
import sys
sys.path.insert(0, {repo!r})
import torch, deepspeed
from types import SimpleNamespace
from ds_mlm.engine import build_engine
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
config = {{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {{"stage": 2}},
          "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3}}}}}}
plan = SimpleNamespace(ds_config=config, schedule="deepspeed:none", weight_decay=0.0, torch_compile=False)
engine = build_engine(plan, model)
loss = engine(torch.ones(1, 4)).sum()
engine.backward(loss)
engine.step()
print("inductor" if "torch._inductor.compile_fx" in sys.modules else "no inductor")
'''


@pytest.mark.slow
def test_a_zero2_step_of_adamw_loads_no_inductor():
    proc = subprocess.run([sys.executable, "-c", ZERO2_STEP.format(repo=str(REPO))], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1",
                                            "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})
    assert proc.stdout.strip().splitlines()[-1:] == ["no inductor"], proc.stdout + proc.stderr
