"""A model and its data loss seen as functions of one flat parameter vector θ (p,).

θ lists every tracked parameter in ``named_parameters()`` order, flattened: every trainable one,
or those named by ``tracked`` (``--params``), the others staying fixed at their values in the
module (they are part of the model, not of θ). Ordinary modules
go through ``torch.func`` (``functional_call``, ``vmap(grad)``, ``grad(grad)``); TorchScript modules
cannot be called statelessly, so they take a slower autograd path that writes θ into the module
(a loop over samples for per-sample gradients, double backward for Hessian-vector products).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from .losses import LossFn

__all__ = ["ModulePool", "Objective", "serialised"]

F = TypeVar("F", bound=Callable[..., torch.Tensor])

# ``functional_call`` swaps a module's parameters in place, so two threads calling one module at
# once see each other's θ (seen: wrong gradients and "ADInterpreters ... escaped" under 4 concurrent
# clients). torch.func's transforms themselves are per thread. So each thread that runs the model
# holds a module of its own from a small pool of copies (``ModulePool``): model calls of different
# threads run in parallel, up to the pool's size (a forward hook goes on the thread's own copy).
# TorchScript modules, which take θ written into the module itself, still take this process-wide
# lock; re-entrant, because the transforms call back into ``logits``.
_MODEL_LOCK = threading.RLock()
POOL_SIZE = max(1, min(os.cpu_count() or 1, 8))  # module copies: more than the cores buys nothing


class ModulePool:
    """Copies of one module handed to threads: a thread holds one for the length of a model call
    (nested calls in that thread reuse it); at most ``size`` copies are ever made, and a thread
    that finds none free waits for one."""

    def __init__(self, model: nn.Module, size: int = POOL_SIZE, *,
                 swapped: Iterable[torch.Tensor] = ()) -> None:
        """``swapped``: the parameters every call passes to ``functional_call``; a copy holds
        them as storage-less "meta" tensors (never read), so a copy costs the module's structure
        and not its weights (the other parameters and the buffers are shared, read-only)."""
        self._model = model
        self._swapped = {id(t) for t in swapped}
        self._size = size
        self._made = 0
        self._free: queue.LifoQueue[nn.Module] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextlib.contextmanager
    def hold(self) -> Iterator[nn.Module]:
        held = getattr(self._local, "module", None)
        if held is not None:  # a nested call in the same thread
            yield held
            return
        module = self._take()
        self._local.module = module
        try:
            yield module
        finally:
            self._local.module = None
            self._free.put(module)

    def _take(self) -> nn.Module:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            make = self._made < self._size
            self._made += make
        if make:
            with _MODEL_LOCK:  # nothing writes the shared module while it is copied
                return self._copy()
        return self._free.get()

    def _copy(self) -> nn.Module:
        memo: dict[int, Any] = {}
        for t in self._model.parameters():
            memo[id(t)] = (nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
                           if id(t) in self._swapped else t)
        for t in self._model.buffers():
            memo[id(t)] = t
        return copy.deepcopy(self._model, memo)


def serialised(fn: F) -> F:
    """Run the :class:`Objective` method ``fn`` with a module of this thread's own (the
    functional path) or holding the process-wide model lock (TorchScript)."""

    @functools.wraps(fn)
    def wrapper(self: Objective, *args: object, **kwargs: object) -> torch.Tensor:
        with self.holding():
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Objective:
    """Logits, losses, per-sample gradients and Hessian-vector products of ``model`` at θ."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, *, device: torch.device, dtype: torch.dtype,
        tracked: Iterable[str] | None = None,
    ) -> None:
        """``tracked``: the parameter names θ covers (None: every trainable parameter)."""
        self.model = model.to(device=device, dtype=dtype).eval()
        self.loss_fn = loss_fn
        self.device = device
        self.dtype = dtype
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        keep = None if tracked is None else set(tracked)
        if keep is not None and not keep <= {n for n, _ in trainable}:
            unknown = sorted(keep - {n for n, _ in trainable})
            raise ValueError(f"tracked parameters not in the model: {', '.join(unknown[:5])}")
        named = [(n, p) for n, p in trainable if keep is None or n in keep]
        self.frozen = [(n, p) for n, p in trainable if keep is not None and n not in keep]
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [math.prod(s) for s in self.shapes]
        self.n_params = sum(self.numels)
        self.functional = not isinstance(self.model, torch.jit.ScriptModule)
        self._buffers = dict(self.model.named_buffers())
        # parameters θ leaves fixed enter the functional call as constants (no gradient flows to them)
        self._buffers.update({n: p.detach() for n, p in self.frozen})
        self._params = [p for _, p in named]
        self._pool = ModulePool(self.model, swapped=self._params) if self.functional else None

    @contextlib.contextmanager
    def holding(self) -> Iterator[nn.Module]:
        """The module this thread may run: its own copy on the functional path (no lock), or
        the shared TorchScript module under the process-wide model lock."""
        if self._pool is None:
            with _MODEL_LOCK:
                yield self.model
        else:
            with self._pool.hold() as module:
                yield module

    # ----------------------------------------------------------------- parameters
    @property
    def params(self) -> list[torch.Tensor]:
        """The module's own tensors of the tracked parameters, in θ's order (training updates
        them in place; :meth:`flat_params` reads them back)."""
        return list(self._params)

    def flat_params(self) -> torch.Tensor:
        """θ (p,) as currently held by the module (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self._params]).clone()

    def load_flat(self, theta: torch.Tensor) -> None:
        """Write θ (p,) into the module's parameters."""
        with _MODEL_LOCK, torch.no_grad():
            for p, chunk in zip(self._params, theta.split(self.numels)):
                p.copy_(chunk.view_as(p))

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: c.view(s) for n, c, s in zip(self.names, theta.split(self.numels), self.shapes)
        }

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    def activation_numel(self, x: torch.Tensor) -> int:
        """Elements one sample produces across all leaf-module outputs (sizes HVP work blocks)."""
        if not self.functional:
            return 1024  # hooks are not available on TorchScript modules: a middling guess
        total = 0

        def hook(_m: nn.Module, _i: object, out: object) -> None:
            nonlocal total
            if isinstance(out, torch.Tensor):
                total += out.numel()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        with _MODEL_LOCK:
            handles = [m.register_forward_hook(hook) for m in leaves]
            try:
                with torch.no_grad():
                    self.model(self.as_input(x[:1]))
            finally:
                for h in handles:
                    h.remove()
        return max(total, 1)

    # ----------------------------------------------------------------- values
    @serialised
    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits (b, C) at θ for a batch x (b, *input_shape)."""
        x = self.as_input(x)
        if self.functional:
            with self.holding() as module:  # this thread's copy (already held by the caller)
                return functional_call(module, (self.unflatten(theta), self._buffers), (x,))
        self.load_flat(theta)
        return self.model(x)

    def mean_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean data loss over the batch (differentiable in θ on the functional path)."""
        return self.loss_fn(self.logits(theta, x), y.to(self.device))

    @serialised
    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample data losses (b,): entry i is L(z_i, θ)."""
        with torch.no_grad():
            logits = self.logits(theta, x)
            y = y.to(self.device)
            return vmap(lambda li, yi: self.loss_fn(li.unsqueeze(0), yi.unsqueeze(0)))(logits, y)

    @serialised
    def loss_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇θ of the mean data loss over the batch, (p,)."""
        if self.functional:
            return grad(self.mean_loss)(theta, x, y)
        self.load_flat(theta)
        loss = self.loss_fn(self.model(self.as_input(x)), y.to(self.device))
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, self._params)])

    # ----------------------------------------------------------------- per-sample gradients
    @serialised
    def sample_grads(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample data-loss gradients (b, p): row i is ∇θ L(z_i, θ)."""
        x = self.as_input(x)
        y = y.to(self.device)
        if self.functional:

            def one(th: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
                return self.mean_loss(th, xi.unsqueeze(0), yi.unsqueeze(0))

            return vmap(grad(one), in_dims=(None, 0, 0))(theta, x, y)
        return torch.stack([self.loss_grad(theta, x[i : i + 1], y[i : i + 1]) for i in range(len(x))])

    @serialised
    def input_grad_dot(self, theta: torch.Tensor, s: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                       ) -> torch.Tensor:
        """∇x [∇θL(z, θ)ᵀ s] for each sample, (b, *input_shape): how each input's pixels move the
        projection of its parameter gradient on s (Koh & Liang's ∇x∇θL, applied to s)."""
        x = self.as_input(x)
        y = y.to(self.device)
        if not self.functional:
            out = []
            for i in range(len(x)):
                xi = x[i : i + 1].clone().requires_grad_(True)
                self.load_flat(theta)
                loss = self.loss_fn(self.model(xi), y[i : i + 1])
                gs = torch.autograd.grad(loss, self._params, create_graph=True)
                dot = sum((g.reshape(-1) * part).sum() for g, part in zip(gs, s.split(self.numels)))
                out.append(torch.autograd.grad(dot, xi)[0][0])
            return torch.stack(out)

        def one(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            def dot(x_: torch.Tensor) -> torch.Tensor:
                g = grad(lambda th: self.mean_loss(th, x_.unsqueeze(0), yi.unsqueeze(0)))(theta)
                return g @ s

            return grad(dot)(xi)

        return vmap(one)(x, y)

    # ----------------------------------------------------------------- curvature
    @serialised
    def hvp(
        self, theta: torch.Tensor, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """∇²θ(mean data loss over the batch) · V for V (p, m) → (p, m); no regulariser."""
        y = y.to(self.device)
        if self.functional:
            x = self.as_input(x)

            # reverse over reverse, not jvp(grad): torch's forward-AD levels are process-wide,
            # so jvps in two threads at once fail ("no level exists"; 150 of 200 calls in 4
            # threads); nested grads are per thread, and measured faster here (2.5 vs 4.8 ms
            # for 8 vectors through a 2,000-parameter MLP on 256 points)
            def one(v: torch.Tensor) -> torch.Tensor:
                return grad(lambda th: grad(self.mean_loss)(th, x, y) @ v)(theta)

            return vmap(one)(vectors.T).T
        self.load_flat(theta)
        loss = self.loss_fn(self.model(self.as_input(x)), y)
        gs = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(loss, self._params, create_graph=True)]
        )
        cols = []
        for j in range(vectors.shape[1]):
            hv = torch.autograd.grad(gs, self._params, vectors[:, j], retain_graph=True)
            cols.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(cols, dim=1)

    def loss_value_and_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean data loss over the batch (a detached scalar), its ∇θ (p,)), in one pass on the
        functional path (``torch.func.grad_and_value``)."""
        with self.holding():
            if self.functional:
                g, value = grad_and_value(self.mean_loss)(theta, x, y)
                return value.detach(), g
            return self.mean_loss(theta, x, y).detach(), self.loss_grad(theta, x, y)
