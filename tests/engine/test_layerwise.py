"""Layer-wise per-sample gradients against vmap(grad), and the Kronecker projection against
vec(P_outᵀ G P_in) of the materialised gradient (float64)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from engine.errors import ModelError
from engine.grads.capture import capture
from engine.grads.kronecker import EXACT_BLOCK, KroneckerProjector
from engine.grads.layers import LayerKind, select_modules
from engine.grads.layerwise import (
    gradient_energy,
    layer_gradients,
    layer_matrices,
    layerwise_grads,
)
from engine.models.losses import cross_entropy
from engine.models.objective import Objective

CPU = torch.device("cpu")
F64 = torch.float64
# the asymmetric 'same' convolution below makes torch warn that it pads a copy of the input
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


class TwiceLinear(nn.Module):
    """A Linear layer applied to 3-d input (b, s, d) and a module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 9)
        self.shared = nn.Linear(9, 9, bias=False)
        self.norm = nn.LayerNorm(9)
        self.fc = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.view(x.shape[0], 2, 12)))  # (b, 2, 9)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.fc(self.norm(h).mean(1))


class Convs(nn.Module):
    """Convolutions with stride, 'same' (asymmetric), dilation, groups, depthwise, padding modes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, 4, padding="same", bias=False)  # total padding 3: asymmetric
        self.c3 = nn.Conv2d(6, 6, 3, dilation=2, padding=2, groups=2)
        self.c4 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)  # depthwise
        self.c5 = nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=(1, 1), padding_mode="reflect")
        self.c6 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in (self.c1, self.c2, self.c3, self.c4, self.c5, self.c6):
            h = torch.tanh(conv(h))
        return self.fc(self.gn(h).flatten(1))


class Block(nn.Module):
    """A ResNet basic block: in-place ReLU, ``out += shortcut``, BatchNorm (eval)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


def tiny_resnet() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4),
                          nn.ReLU(inplace=True), Block(4, 6, 2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():  # running statistics and affine terms away from their initial values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return model


CASES = {  # name: (model factory, input shape, classes)
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(24, 7), nn.Tanh(),
                                  nn.Linear(7, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)),
            (24,), 3),
    "twice": (TwiceLinear, (24,), 3),
    "convs": (Convs, (3, 8, 12), 5),
    "resnet": (tiny_resnet, (3, 8, 8), 3),
}


def setup(case: str, n: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape, classes = CASES[case]
    model = factory().to(F64)
    x = torch.randn(n, *shape, dtype=F64)
    y = torch.randint(0, classes, (n,))
    return model, x, y


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, selection) -> torch.Tensor:
    """vmap(grad) per-sample gradients restricted to the tracked parameters (n, p_tracked)."""
    obj = Objective(model, cross_entropy, device=CPU, dtype=F64)
    full = obj.sample_grads(obj.flat_params(), x, y)  # (n, p)
    return full[:, selection.flat_index(model)]


@pytest.mark.parametrize(("case", "patterns"), [
    ("mlp", None), ("twice", None), ("convs", None), ("resnet", None),
    ("resnet", "6"), ("resnet", "3.*"), ("resnet", "3.conv*,3.shortcut,1"), ("convs", "c3,c4,gn"),
])
def test_layer_gradients_equal_vmap(case: str, patterns: str | None) -> None:
    model, x, y = setup(case)
    sel = select_modules(model, patterns)
    ref = reference(model, x, y, sel)
    caps = capture(model, cross_entropy, x, y, selection=sel)
    got = layer_gradients(caps, selection=sel)
    assert got.shape == ref.shape == (len(x), sel.n_params)
    assert ref.abs().max() > 1e-3
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-10, atol=1e-13)


def test_selection_describes_the_tracked_layers() -> None:
    model, _, _ = setup("resnet")
    sel = select_modules(model, "3.*")  # the block: its convs and BatchNorms
    names = [layer.name for layer in sel.layers]
    assert names == ["3.conv1", "3.bn1", "3.conv2", "3.bn2", "3.shortcut.0", "3.shortcut.1"]
    assert [layer.kind for layer in sel.layers][:2] == [LayerKind.KRONECKER, LayerKind.EXACT]
    assert sel.n_params == sum(p.numel() for p in model[3].parameters())
    assert select_modules(model, "3").layers == sel.layers  # a container's match takes its modules
    assert select_modules(model, ["3.*"]).layers == sel.layers
    conv = sel.layers[0]
    assert (conv.d_in, conv.d_out, conv.groups, conv.bias) == (4 * 9, 6, 1, False)
    json.dumps(sel.to_dict())
    all_sel = select_modules(model)
    assert all_sel.n_params == sum(p.numel() for p in model.parameters())


def test_selection_refuses_what_it_cannot_differentiate() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="'0' of type Embedding"):
        select_modules(model)
    assert [layer.name for layer in select_modules(model, "1").layers] == ["1"]
    with pytest.raises(ModelError, match="matches no module"):
        select_modules(model, "nothing*")
    with pytest.raises(ModelError, match="running statistics"):
        select_modules(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ModelError, match="shared"):
        select_modules(tied)


def test_frozen_parameters_are_not_tracked() -> None:
    model, x, y = setup("resnet")
    for p in model[1].parameters():
        p.requires_grad_(False)
    sel = select_modules(model)
    assert "1" not in [layer.name for layer in sel.layers]
    got = layer_gradients(capture(model, cross_entropy, x, y, selection=sel), selection=sel)
    np.testing.assert_allclose(got.numpy(), reference(model, x, y, sel).numpy(),
                               rtol=1e-10, atol=1e-13)


def test_capture_leaves_the_model_mode_and_gradients_alone() -> None:
    model, x, y = setup("resnet")
    model.train()
    sel = select_modules(model)
    before = model[1].running_mean.clone()
    capture(model, cross_entropy, x, y, selection=sel)
    assert model.training and model[3].bn1.training
    assert torch.equal(model[1].running_mean, before)  # ran in eval mode
    assert all(p.grad is None for p in model.parameters())
    assert not model[0]._forward_hooks


def dense_kronecker(proj: KroneckerProjector, sel, caps_raw) -> torch.Tensor:
    """Reference: vec(P_outᵀ G P_in) of the materialised block-diagonal G per layer, then the
    exact block, (b, k)."""
    mats = layer_matrices(caps_raw)
    cols = []
    for layer in sel.kronecker:
        blocks = mats[layer.name]  # (b, g, d_out, d_in [+1])
        full = torch.stack([torch.block_diag(*list(bi)) for bi in blocks])  # (b, g·d_out, g·(.))
        p_out, p_in = proj.matrices(layer.name)
        cols.append((p_out.T @ full @ p_in).flatten(1))  # (b, k_out·k_in)
    if sel.exact:
        g = torch.cat([caps_raw.exact[layer.name] for layer in sel.exact], 1)
        p = proj.exact_matrix()
        cols.append(g if p is None else g @ p)
    return torch.cat(cols, 1)


@pytest.mark.parametrize(("case", "k"), [("mlp", 40), ("twice", 64), ("convs", 120),
                                         ("resnet", 90), ("resnet", 100_000)])
def test_kronecker_projection_equals_dense_reference(case: str, k: int) -> None:
    model, x, y = setup(case)
    sel = select_modules(model)
    proj = KroneckerProjector(sel, k, seed=3, dtype=F64)
    assert proj.k == min(k, sel.n_params)
    raw = capture(model, cross_entropy, x, y, selection=sel)
    want = dense_kronecker(proj, sel, raw)
    fast = proj.project(capture(model, cross_entropy, x, y, selection=sel, projector=proj))
    assert fast.shape == (len(x), proj.k)
    np.testing.assert_allclose(fast.numpy(), want.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(proj.project(raw).numpy(), want.numpy(), rtol=1e-10, atol=1e-13)
    if k >= sel.n_params:  # every factor as wide as its dimension: a rotation, norms kept
        full = layer_gradients(raw, selection=sel)
        np.testing.assert_allclose(torch.linalg.norm(fast, dim=1).numpy(),
                                   torch.linalg.norm(full, dim=1).numpy(), rtol=1e-10)


def test_split_is_recorded_deterministic_and_sums_to_k() -> None:
    model, _, _ = setup("resnet")
    sel = select_modules(model)
    proj = KroneckerProjector(sel, 90, seed=3, dtype=F64)
    split = proj.split()
    json.dumps(split)
    blocks = split["blocks"]
    assert split["k"] == sum(b["k"] for b in blocks) == 90
    assert [b["name"] for b in blocks] == [lay.name for lay in sel.kronecker] + [EXACT_BLOCK]
    for b in blocks[:-1]:
        assert b["k"] == b["k_out"] * b["k_in"] and b["k_out"] <= b["rows_out"]
        assert b["k_in"] <= b["rows_in"]
    assert [b["offset"] for b in blocks] == list(np.cumsum([0] + [b["k"] for b in blocks[:-1]]))
    again = KroneckerProjector(sel, 90, seed=3, dtype=F64)
    assert again.split() == split
    for layer in sel.kronecker:
        assert all(torch.equal(a, b) for a, b in zip(proj.matrices(layer.name),
                                                     again.matrices(layer.name)))
    other = KroneckerProjector(sel, 90, seed=4, dtype=F64)
    assert not torch.equal(other.matrices("0")[1], proj.matrices("0")[1])
    with pytest.raises(ModelError, match="below"):
        KroneckerProjector(sel, 3, seed=0, dtype=F64)


def test_split_balances_big_layers() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(512, 256), nn.Tanh(), nn.Linear(256, 10))
    sel = select_modules(model)
    split = KroneckerProjector(sel, 1024, seed=0, dtype=torch.float32).split()
    big, small = split["blocks"]
    assert split["k"] == 1024
    assert big["k"] > 900 and 0.5 <= big["k_out"] / big["k_in"] <= 2
    assert small["k"] >= 1


def test_kronecker_projection_preserves_inner_products() -> None:
    """JL: E‖P_outᵀ G P_in‖² = ‖G‖², and the Gram matrix of projected gradients approximates
    that of the full ones (a loose check at a fixed seed)."""
    model, x, y = setup("convs", n=24, seed=1)
    sel = select_modules(model)
    raw = capture(model, cross_entropy, x, y, selection=sel)
    full = layer_gradients(raw, selection=sel)
    ratios, grams = [], []
    for seed in range(80):
        g = KroneckerProjector(sel, 400, seed=seed, dtype=F64).project(raw)  # (n, 400)
        ratios.append((g.pow(2).sum(1) / full.pow(2).sum(1)).mean().item())
        grams.append(g @ g.T)
    assert abs(np.mean(ratios) - 1) < 0.05  # 80 draws: ~2.5 standard errors
    want = full @ full.T  # (n, n)
    for one in grams:
        assert torch.corrcoef(torch.stack([one.flatten(), want.flatten()]))[0, 1] > 0.97
    mean = torch.stack(grams).mean(0)
    assert torch.linalg.norm(mean - want) / torch.linalg.norm(want) < 0.15


def test_layerwise_grads_chunks_dtype_and_sink() -> None:
    model, x, y = setup("resnet", n=11)
    sel = select_modules(model)
    whole = layerwise_grads(model, cross_entropy, x, y, selection=sel, chunk=100)
    np.testing.assert_allclose(whole.numpy(), reference(model, x, y, sel).numpy(),
                               rtol=1e-10, atol=1e-13)
    proj = KroneckerProjector(sel, 64, seed=0, dtype=F64)
    got: dict[int, torch.Tensor] = {}
    seen: list[tuple[int, int]] = []
    layerwise_grads(model, cross_entropy, x, y, selection=sel, projector=proj, chunk=4,
                    sink=lambda rows, g: got.__setitem__(rows.start, g),
                    on_captures=lambda rows, c: seen.append(c.kron["3.conv1"].a.shape[::2]))
    assert sorted(got) == [0, 4, 8] and seen[0] == (4, proj.factors("3.conv1")[1])
    one = layerwise_grads(model, cross_entropy, x, y, selection=sel, projector=proj, chunk=100)
    np.testing.assert_allclose(torch.cat([got[0], got[4], got[8]]).numpy(), one.numpy(),
                               rtol=1e-12, atol=1e-14)
    model32 = model.float()
    proj32 = KroneckerProjector(sel, 64, seed=0, dtype=torch.float32)
    g32 = layerwise_grads(model32, cross_entropy, x, y, selection=sel, projector=proj32)
    assert g32.dtype == torch.float32
    np.testing.assert_allclose(g32.numpy(), one.numpy(), rtol=1e-3, atol=1e-5)


def test_gradient_energy_weights_the_split() -> None:
    model, x, y = setup("resnet", n=9)
    sel = select_modules(model)
    energy = gradient_energy(model, cross_entropy, x, y, selection=sel, chunk=4)
    full = reference(model, x, y, sel)
    for layer in sel.layers:
        want = full[:, layer.offset : layer.offset + layer.numel].pow(2).sum(1).mean().item()
        assert energy[layer.name] == pytest.approx(want, rel=1e-10)
    proj = KroneckerProjector(sel, 60, seed=1, dtype=F64, weights=energy)
    split = proj.split()
    assert split["k"] == 60 and split["weights"][EXACT_BLOCK] == pytest.approx(
        sum(energy[layer.name] for layer in sel.exact))
    by_params = KroneckerProjector(sel, 60, seed=1, dtype=F64).split()
    assert [b["k"] for b in split["blocks"]] != [b["k"] for b in by_params["blocks"]]
    head = next(b for b in split["blocks"] if b["name"] == "6")
    assert head["k"] >= next(b for b in by_params["blocks"] if b["name"] == "6")["k"]
    again = KroneckerProjector.from_split(sel, json.loads(json.dumps(split)), dtype=F64)
    assert again.split() == split
    assert torch.equal(again.matrices("6")[1], proj.matrices("6")[1])
    with pytest.raises(ModelError, match="no split weight"):
        KroneckerProjector(sel, 60, seed=1, dtype=F64, weights={"6": 1.0})
