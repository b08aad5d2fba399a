"""fit() on data as users have it (issue 17, observed problem 3): tensors of any dtype, numpy,
a Split, a Dataset, a DataLoader or a list of batches, tuple/dict inputs, tuple/dict outputs
with ``output_fn``, ``num_data`` from the dataset, exact resume with a shuffling DataLoader."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import bayes_spectral as bs
from bayes_spectral.distributions import GaussianSpectrum

N, D, C = 96, 6, 3

# the models built without num_data take it from the dataset (the point of these tests)
pytestmark = pytest.mark.filterwarnings(r"ignore:bayesian\(\). num_data not given")


def gauss(shape):
    return GaussianSpectrum(1.0, shape, measure="penalty")


def toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 8)
        self.out = nn.Linear(8, C)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


class TwoInputs(Net):
    """``forward(a, b)`` on the two halves of the columns: the same function as ``Net``."""

    def forward(self, a, b):  # type: ignore[override]
        return super().forward(torch.cat([a, b], dim=-1))


class TupleOut(Net):
    def forward(self, x):
        return super().forward(x), x.sum()


class DictOut(Net):
    def forward(self, x):
        return {"logits": super().forward(x), "hidden": x}


class Items(Dataset):
    """A map-style dataset of ``(x_i, y_i)`` items (not a TensorDataset)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Batches:
    """A re-iterable of batches with no length and no dataset."""

    def __init__(self, x, y, bs):
        self.x, self.y, self.bs = x, y, bs

    def __iter__(self):
        for i in range(0, len(self.y), self.bs):
            yield self.x[i:i + self.bs], self.y[i:i + self.bs]


def build(net_cls=Net, num_data=N, **kw):
    torch.manual_seed(0)
    return bs.bayesian(net_cls(), {nn.Linear: gauss}, num_data=num_data, **kw)


def fitted(data, method="svi", net_cls=Net, num_data=N, build_kw=None, **kw):
    bn = build(net_cls, num_data, **(build_kw or {}))
    res = bs.fit(bn, data, method, epochs=3, batch_size=32, lr=1e-2, progress=False, seed=4,
                 **kw)
    return bn, {k: v.detach().clone() for k, v in res.params().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- each input form gives the plain-tensor fit ------------------------------------------


@pytest.mark.parametrize("form", ["numpy", "split", "tensor_dataset", "dataset"])
def test_input_forms_equal_the_tensor_fit_bit_for_bit(form):
    """Same seed, same randperm batch order: bit-identical SVI parameters."""
    x, y = toy()
    _, ref = fitted((x, y))
    data = {"numpy": (x.numpy(), y.numpy()),
            "split": bs.data.Split(x, y, x[:4], y[:4]),
            "tensor_dataset": TensorDataset(x, y),
            "dataset": Items(x, y)}[form]
    _, got = fitted(data)
    assert_same(got, ref)


@pytest.mark.parametrize("form", ["loader", "list", "iterable"])
def test_in_order_batches_equal_the_unshuffled_tensor_fit(form):
    """A DataLoader (shuffle=False, same batch size), a list of batches and a re-iterable
    give the MAP fit of the tensors with ``shuffle=False`` bit for bit."""
    x, y = toy()
    _, ref = fitted((x, y), "map", shuffle=False)
    data = {"loader": DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False),
            "list": [(x[i:i + 32], y[i:i + 32]) for i in range(0, N, 32)],
            "iterable": Batches(x, y, 32)}[form]
    _, got = fitted(data, "map")
    assert_same(got, ref)


def test_shuffled_tensor_fit_differs_from_in_order():
    x, y = toy()
    _, a = fitted((x, y), "map")
    _, b = fitted((x, y), "map", shuffle=False)
    assert not torch.equal(a["net.out.bias"], b["net.out.bias"])


# --- tuple and dict inputs; tuple and dict outputs ------------------------------------------


def test_tuple_and_dict_inputs_equal_the_single_input_fit():
    x, y = toy()
    a, b = x[:, :2], x[:, 2:]
    _, ref = fitted((x, y))
    _, tup = fitted(((a, b), y), net_cls=TwoInputs)
    _, dic = fitted(({"a": a, "b": b}, y), net_cls=TwoInputs)
    _, three = fitted(TensorDataset(a, b, y), net_cls=TwoInputs)
    for got in (tup, dic, three):
        assert_same(got, ref)


def test_dict_batches_from_a_dataloader():
    x, y = toy()
    items = [({"a": x[i, :2], "b": x[i, 2:]}, y[i]) for i in range(N)]
    loader = DataLoader(items, batch_size=32, shuffle=False)
    _, got = fitted(loader, "map", net_cls=TwoInputs)
    _, ref = fitted((x, y), "map", shuffle=False)
    assert_same(got, ref)


def test_tuple_output_needs_output_fn():
    x, y = toy()
    bn = build(TupleOut)
    with pytest.raises(TypeError, match="output_fn"):
        bs.fit(bn, (x, y), progress=False)


@pytest.mark.parametrize(("cls", "fn"), [(TupleOut, lambda o: o[0]),
                                         (DictOut, lambda o: o["logits"])])
def test_output_fn_gives_the_plain_fit(cls, fn):
    x, y = toy()
    _, ref = fitted((x, y))
    bn, got = fitted((x, y), net_cls=cls, build_kw={"output_fn": fn})
    assert bn.output_fn is fn
    assert_same(got, ref)


# --- integer token ids: Embedding + TransformerEncoder ------------------------------------


class TokenClassifier(nn.Module):
    def __init__(self, vocab=8, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        return self.head(self.encoder(self.emb(tokens)).mean(1))


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 8, (n, 6), generator=g)
    return t, (t == 3).any(1).long()


def test_integer_token_transformer_fits_from_a_dataloader():
    """class = whether token 3 appears (P = 1 - (7/8)^6 = 0.55: majority-class accuracy)."""
    xt, yt = tokens(512, 0)
    xs, ys = tokens(256, 1)
    torch.manual_seed(0)
    bn = bs.bayesian(TokenClassifier(), {"emb": gauss, "head": gauss})
    loader = DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True)
    res = bs.fit(bn, loader, "map", epochs=6, lr=1e-2, progress=False, seed=0)
    assert bn.num_data == 512  # taken from len(loader.dataset)
    probs = res.predict(xs)  # integer token ids all the way (eval mode)
    assert probs.shape == (1, 256, 2)
    acc = float((probs.mean(0).argmax(-1) == ys).float().mean())
    chance = float(max(ys.float().mean(), 1 - ys.float().mean()))
    assert acc > 0.9 > chance + 0.3, (acc, chance)


# --- num_data ----------------------------------------------------------------------------


def test_num_data_taken_from_the_dataset():
    x, y = toy()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    bn, inferred = fitted(loader, "map", num_data=None)
    assert bn.num_data == N
    _, given = fitted(loader, "map", num_data=N)
    assert_same(inferred, given)
    _, unscaled = fitted((x, y), "map", num_data=None, shuffle=False)  # a pair: as given
    assert not torch.equal(unscaled["net.out.bias"], given["net.out.bias"])
    bn = build(num_data=None)
    bs.fit(bn, Items(x, y), "map", epochs=1, batch_size=32, progress=False)
    assert bn.num_data == N


def test_unknown_length_requires_num_data():
    x, y = toy()
    with pytest.raises(ValueError, match="num_data"):
        fitted(Batches(x, y, 32), "map", num_data=None)
    with pytest.raises(TypeError, match="one-shot"):
        fitted(iter(Batches(x, y, 32)), "map")
    with pytest.raises(TypeError, match=r"pair \(x, y\)"):
        fitted([(x[:32],), (x[32:],)], "map")
    with pytest.raises(TypeError, match="DataLoader"):
        fitted(x, "map")


def test_integer_inputs_checked_not_refused():
    """Token ids stay integer (no cast to float); an id outside the embedding is a clear
    ValueError; float inputs with NaN are still refused."""
    torch.manual_seed(0)
    bn = bs.bayesian(TokenClassifier(), {"head": gauss}, num_data=8)
    t, y = tokens(8, 2)
    bn.check_data(t, y)
    with pytest.raises(ValueError, match="does not fit the network"):
        bn.check_data(t + 8, y)
    bn2 = build()
    with pytest.raises(ValueError, match="NaN"):
        bn2.check_data(({"a": torch.full((4, 2), float("nan"))}), torch.zeros(4).long())


# --- exact resume with a shuffling DataLoader -----------------------------------------------


class Interrupt(Exception):
    pass


def _stop_after_two(info):
    if info["epoch"] == 2:
        raise Interrupt


@pytest.mark.parametrize("seeded", [False, True])
def test_resume_with_a_shuffling_dataloader_is_bit_exact(tmp_path, seeded):
    """Kill after epoch 2 of 4, resume: equals the uninterrupted SVI run. ``seeded``: the
    DataLoader's own generator (its state is in the checkpoint); else the global RNG."""
    x, y = toy()

    def run(folder, callbacks=()):
        gen = torch.Generator().manual_seed(11) if seeded else None
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=gen)
        bn = build(num_data=None)
        res = bs.fit(bn, loader, "svi", epochs=4, lr=1e-2, progress=False, seed=2,
                     checkpoint_dir=tmp_path / folder, callbacks=callbacks)
        return {k: v.detach().clone() for k, v in res.params().items()}

    full = run("a")
    with pytest.raises(Interrupt):
        run("b", [_stop_after_two])
    resumed = run("b")
    assert_same(resumed, full)
    pyro.clear_param_store()


def test_validation_data_as_a_dataloader():
    """val_data in any form is read whole: the same history as the pair."""
    x, y = toy()
    xv, yv = toy(seed=1)
    loader = DataLoader(TensorDataset(xv, yv), batch_size=10, shuffle=False)
    histories = []
    for val in ((xv, yv), loader, Items(xv, yv)):
        bn = build()
        res = bs.fit(bn, (x, y), "map", epochs=2, batch_size=32, progress=False, val_data=val)
        histories.append(res.history)
    assert histories[0]["val_nll"] == histories[1]["val_nll"] == histories[2]["val_nll"]
    assert len(histories[0]["val_nll"]) == 2


def test_an_iterable_that_runs_dry_is_a_clear_error():
    """A re-iterable whose second pass is empty (an exhausted generator inside)."""
    x, y = toy()

    class Once:
        def __init__(self):
            self.it = iter([(x[i:i + 32], y[i:i + 32]) for i in range(0, N, 32)])

        def __iter__(self):
            return (b for b in self.it)

    with pytest.raises(ValueError, match="epoch 1 gave no batch|epoch 2 gave no batch"):
        fitted(Once(), "map")
