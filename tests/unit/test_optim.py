"""Parameter groups and the learning-rate schedule: HF's values, a state that is only the step, new values on resume."""

import pytest
import torch

from ds_mlm.optim import DECAY, NO_DECAY, Schedule, apply_hyperparameters, multiplier, param_groups


def tiny_model():
    from transformers import RobertaConfig, RobertaForMaskedLM

    return RobertaForMaskedLM(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))


def test_param_groups_spare_biases_and_layernorm_from_weight_decay():
    model = tiny_model()
    decay, plain = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert (decay["name"], decay["weight_decay"], plain["name"], plain["weight_decay"]) == (DECAY, 0.01, NO_DECAY, 0.0)
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] or "layer_norm" in names[id(p)]
               for p in plain["params"])
    assert all(p.dim() == 2 for p in decay["params"])  # the matrices and embeddings, nothing else
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
def test_schedule_is_hfs(kind):
    from transformers import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    theirs_opt, ours_opt = torch.optim.SGD([p], lr=1e-3), torch.optim.SGD([p], lr=1e-3)
    theirs = get_scheduler(kind, theirs_opt, num_warmup_steps=7, num_training_steps=50)
    ours = Schedule(ours_opt, kind, 1e-3, 7, 50)
    for _ in range(55):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(theirs_opt.param_groups[0]["lr"], abs=1e-15)
        theirs.step()
        ours.step()
    assert multiplier("linear", 50, 7, 50) == 0.0 and multiplier("linear", 0, 7, 50) == 0.0


def test_schedule_state_is_the_step_and_a_load_follows_the_new_values():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    old = Schedule(opt, "linear", 1e-3, 0, 100)
    for _ in range(100):
        old.step()
    assert opt.param_groups[0]["lr"] == 0.0 and old.state_dict() == {"steps": 100}
    longer = Schedule(opt, "linear", 2e-3, 0, 200)  # --max_steps 200 --learning_rate 2e-3 on resume
    longer.load_state_dict(old.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 100 / 200)  # the new schedule at step 100, not lr 0
    longer.load_state_dict({"last_epoch": 10, "base_lrs": [9.0]})  # an older checkpoint's LambdaLR state
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 190 / 200)


def test_apply_hyperparameters_puts_the_plans_values_back_after_a_load():
    from types import SimpleNamespace

    model = tiny_model()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    schedule = Schedule(opt, "linear", 1e-3, 0, 10)
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        g.update(lr=5.0, betas=(0.5, 0.5), eps=1.0, weight_decay=3.0)
    opt.load_state_dict(saved)  # what a checkpoint load does: the old values come back
    plan = SimpleNamespace(optimizer="AdamW", weight_decay=0.02, betas=(0.9, 0.98), eps=1e-6)
    apply_hyperparameters(SimpleNamespace(lr_scheduler=schedule, optimizer=opt), plan)
    decay, plain = opt.param_groups
    assert (decay["lr"], decay["betas"], decay["eps"], decay["weight_decay"]) == (1e-3, (0.9, 0.98), 1e-6, 0.02)
    assert (plain["lr"], plain["weight_decay"]) == (1e-3, 0.0)
