"""Parameters belong to their model: several models in one process each train their own,
with the project's Trainer and with plain pyro.infer.SVI, in either order, without clearing
Pyro's global param store in between."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_vae import SSVAE, VAE, Trainer
from pyro_vae.training.stepper import ParamClashError

X = torch.bernoulli(torch.full((32, 784), 0.3), generator=torch.Generator().manual_seed(0))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(module, before):
    return {k for k, v in module.named_parameters() if not torch.equal(v.detach(), before[k])}


def trainer_steps(model, n=3):
    trainer = Trainer(model.model, model.guide, lr=1e-2)
    for _ in range(n):
        trainer.step(X)


def svi_steps(model, n=3):
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(n):
        svi.step(X)


@pytest.mark.parametrize("train", [trainer_steps, svi_steps], ids=["Trainer", "SVI"])
def test_two_models_in_one_process_each_train_all_their_own_parameters(train):
    a, b = VAE(z_dim=4, hidden=(16,)), VAE(z_dim=4, hidden=(16,))
    for first, second in ((a, b), (b, a), (a, b)):  # either order, and back again
        before_first, before_second = snapshot(first), snapshot(second)
        train(first)
        assert changed(first, before_first) == set(before_first)
        assert changed(second, before_second) == set()  # untouched by the other's training
        before_first, before_second = snapshot(first), snapshot(second)
        train(second)
        assert changed(second, before_second) == set(before_second)
        assert changed(first, before_first) == set()


def test_copies_and_semi_supervised_models_get_names_of_their_own():
    a = VAE(z_dim=2, hidden=(8,))
    names = {a.pyro_name, copy.deepcopy(a).pyro_name, VAE().pyro_name, SSVAE().pyro_name}
    assert len(names) == 4
    c = copy.deepcopy(a)
    before = snapshot(c)
    svi_steps(c)
    assert changed(c, before) == set(before)


def test_trainer_optimises_the_module_from_the_start_and_loads_its_state_at_once():
    vae = VAE(z_dim=2, hidden=(8,))
    trainer = Trainer(vae.model, vae.guide)
    assert trainer.optimizer is not None
    assert {id(p) for p in trainer.params} == {id(p) for p in vae.parameters()}
    trainer.step(X)
    state = trainer.state_dict()
    fresh = VAE(z_dim=2, hidden=(8,))
    again = Trainer(fresh.model, fresh.guide)
    again.load_state_dict(state)  # no waiting for parameters to appear
    assert again.optimizer.state_dict()["state"][0]["step"] == 1
    other = VAE(z_dim=3, hidden=(8,))
    with pytest.raises(ValueError, match="does not fit"):
        Trainer(other.model, other.guide).load_state_dict(state)


def test_a_pyro_module_name_shared_by_two_modules_in_plain_functions_is_an_error():
    def make_pair():
        net = nn.Linear(3, 3)

        def model(x):
            pyro.module("net", net)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(net(x), 1.0).to_event(1), obs=x)

        def guide(x):
            pyro.module("net", net)

        return model, guide

    x = torch.randn(8, 3)
    model, guide = make_pair()
    Trainer(model, guide).step(x)
    model2, guide2 = make_pair()  # a second Linear under the same name, store not cleared
    with pytest.raises(ParamClashError, match="'net\\$\\$\\$weight' belongs to another module"):
        Trainer(model2, guide2).step(x)
    pyro.clear_param_store()
    Trainer(model2, guide2).step(x)  # fine once the store is cleared


def test_a_saved_optimizer_state_for_plain_functions_that_does_not_fit_is_an_error():
    def pair(size):
        def model(x):
            b = pyro.param("b", torch.zeros(size))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(b, 1.0).to_event(1), obs=x)

        return model, lambda x: None

    model, guide = pair(3)
    trainer = Trainer(model, guide)
    trainer.step(torch.randn(4, 3))
    state = trainer.state_dict()
    pyro.clear_param_store()
    model, guide = pair(3)
    again = Trainer(model, guide)
    again.load_state_dict(state)  # waits for the first step to find the parameters
    again.step(torch.randn(4, 3))
    assert again.optimizer.state_dict()["state"][0]["step"] == 2
    pyro.clear_param_store()

    def two_params(x):
        pyro.param("a", torch.zeros(3))
        model(x)

    wrong = Trainer(two_params, guide)
    wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        wrong.step(torch.randn(4, 3))
