"""Muon for the Transformer's hidden matrices and AdamW for the rest, as one torch optimizer.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces a matrix's
update by the orthogonalised Nesterov momentum: ``B <- mu B + (1 - mu) G``, ``U = NS((1 - mu) G
+ mu B)`` where NS is five quintic Newton-Schulz iterations (torch.optim.Muon's, run in bf16).
Liu et al. 2025 ("Muon is Scalable for LLM Training", Moonlight) make it a drop-in for AdamW at
scale: the update is scaled by ``0.2 * sqrt(max(rows, cols))`` so its RMS matches AdamW's (one
lr for both groups) and decoupled weight decay applies to the Muon matrices too:
``W <- W - lr * (0.2 * sqrt(max(A, B)) * U + weight_decay * W)``. The momentum warms up from
``muon_momentum_start`` to ``muon_momentum`` over ``muon_momentum_warmup`` steps, as Keller
Jordan's modded-nanogpt speedruns do.

The maths is torch's (`torch.optim._muon`: its Newton-Schulz and its ``match_rms_adamw`` lr
adjustment), and the AdamW groups are stepped by a `torch.optim.AdamW` that shares this
optimizer's param-group dicts and ``state``: `MuonAdamW` is ONE `torch.optim.Optimizer`, so
LambdaLR, grad clipping and DCP's ``get/set_optimizer_state_dict`` see plain param groups and
per-parameter tensors (``momentum_buffer`` and ``step`` for Muon, ``exp_avg``/``exp_avg_sq``/
``step`` for AdamW).

Sharded matrices (FSDP2 ``Shard(0)``, HSDP ``(Replicate, Shard(0))``, FSDP2 x TP with ``Shard(0)``
or ``Shard(1)`` on the tp dimension): the momentum stays a DTensor sharded like the parameter.
The Nesterov update is all-gathered (``full_tensor()``) over the ranks holding different shards;
one of them (round-robin over the matrices) runs Newton-Schulz, the others contribute zeros, and
a bf16 reduce-scatter gives each rank its slice. Cost per step: one all-gather of every Muon
matrix (the volume of one ZeRO-3 parameter all-gather) plus one bf16 reduce-scatter, and the
Newton-Schulz FLOPs (``ns_steps * (4 m^2 n + 2 m^3)`` for an m x n matrix, m <= n) divided over
the shard ranks; replicas repeat the work (docs/training.md, "Muon").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate

MUON_GROUP = "muon"
"""Value of ``group["name"]`` of the param group Muon updates; every other group is AdamW's."""

ADJUST_LR = "match_rms_adamw"
"""torch.optim.Muon's name for Moonlight's ``0.2 * sqrt(max(rows, cols))`` update scaling."""


def _torch_muon() -> Any:
    """torch's Muon module (torch >= 2.9), or an error naming the version and the fix."""
    try:
        from torch.optim import _muon
    except ImportError as e:  # torch < 2.9; the config validation says so first
        raise RuntimeError(
            f"optim.name=muon needs torch >= 2.9 (torch.optim.Muon); torch {torch.__version__} "
            "is installed: pip install 'torch>=2.9', or set --optim.name=adamw"
        ) from e
    return _muon


def momentum_at(step: int, *, momentum: float, start: float, warmup: int) -> float:
    """Muon's momentum for the update that follows ``step`` optimizer steps already taken:
    linear from ``start`` at step 0 to ``momentum`` at step ``warmup`` and after (modded-nanogpt's
    ``(1 - frac) * 0.85 + frac * 0.95``); ``warmup=0`` gives ``momentum`` throughout."""
    if warmup <= 0:
        return momentum
    frac = min(step / warmup, 1.0)
    return (1.0 - frac) * start + frac * momentum


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the param group named "muon", torch's AdamW on every other group.

    Args:
        muon_group: the Muon param group: ``params`` (2-D, each the whole matrix or a DTensor of
            it), ``weight_decay``, ``momentum``, ``momentum_start``, ``momentum_warmup``,
            ``ns_steps``; ``nesterov`` (True), ``ns_coefficients`` and ``eps`` default to
            torch.optim.Muon's.
        adamw_groups: param groups for AdamW (``name``, ``params``, ``weight_decay``).
        lr: peak learning rate of every group (the schedule scales all groups alike).
        adamw_kwargs: ``betas``, ``eps`` and kernel choice (``foreach``/``fused``) for AdamW.

    Raises:
        ValueError: a Muon parameter that is not 2-D.
        RuntimeError: torch < 2.9 (no torch.optim.Muon).
    """

    def __init__(
        self,
        muon_group: dict[str, Any],
        adamw_groups: list[dict[str, Any]],
        *,
        lr: float,
        adamw_kwargs: dict[str, Any],
    ) -> None:
        muon = _torch_muon()
        for p in muon_group["params"]:
            if p.ndim != 2:
                raise ValueError(f"Muon updates 2-D matrices only, got a parameter of {p.shape}")
        group = {
            "nesterov": True,
            "ns_coefficients": (muon.DEFAULT_A, muon.DEFAULT_B, muon.DEFAULT_C),
            "eps": muon.EPS,
            **muon_group,
            "name": MUON_GROUP,
        }
        # AdamW fills its groups with its defaults; this optimizer then holds the same dicts, so
        # the scheduler's lr changes reach both.
        self._adamw = (
            torch.optim.AdamW(adamw_groups, lr=lr, **adamw_kwargs) if adamw_groups else None
        )
        groups = [group] + (self._adamw.param_groups if self._adamw is not None else [])
        super().__init__(groups, {"lr": lr})
        self._link()

    def _link(self) -> None:
        """Point the inner AdamW at this optimizer's (possibly just loaded) groups and state."""
        adamw = self.__dict__.get("_adamw")
        if adamw is None:
            return
        adamw.param_groups = [g for g in self.param_groups if g.get("name") != MUON_GROUP]
        adamw.state = self.state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict replaces param_groups and state through here.
        super().__setstate__(state)
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon = _torch_muon()
        for group in self.param_groups:
            if group.get("name") == MUON_GROUP:
                self._muon_step(group, muon)
        if self._adamw is not None:
            self._adamw.step()
        return loss

    def _muon_step(self, group: dict[str, Any], muon: Any) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            grad = p.grad
            state = self.state[p]
            if not state:
                # step as AdamW keeps it (a float32 CPU scalar): DCP saves and reshards both alike
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["momentum_buffer"] = torch.zeros_like(
                    grad, memory_format=torch.preserve_format
                )
            mu = momentum_at(
                int(state["step"].item()),  # a CPU tensor: no device sync
                momentum=group["momentum"],
                start=group["momentum_start"],
                warmup=group["momentum_warmup"],
            )
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - mu)  # sharded like the parameter: elementwise, no communication
            update = grad.lerp(buf, mu) if group["nesterov"] else buf
            ortho = _orthogonalise(update, group, muon, index)
            p.mul_(1 - lr * wd)  # decoupled weight decay, as torch.optim.Muon
            # p.shape is the global shape of a DTensor: the scale of the whole matrix.
            p.add_(ortho, alpha=-muon._adjust_lr(lr, ADJUST_LR, p.shape))
            state["step"] += 1


def _orthogonalise(update: Tensor, group: dict[str, Any], muon: Any, index: int) -> Tensor:
    """Newton-Schulz of the whole matrix; for a DTensor, this rank's slice of the result.

    The ranks holding different shards of a matrix split the work: matrix ``index`` is
    orthogonalised by one of them (round-robin over the group's matrices), the others contribute
    zeros, and a reduce-scatter of the bf16 result gives every rank its slice. Replicated mesh
    dimensions (HSDP's replicas) repeat the same work, so no collective crosses them.
    """
    coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
    if not isinstance(update, DTensor):
        return muon._zeropower_via_newtonschulz(update, coefficients, steps, eps)
    mesh, placements = update.device_mesh, update.placements
    full = update.full_tensor()  # all-gather over the sharded dimensions of the mesh
    coordinate = mesh.get_coordinate()
    assert coordinate is not None  # every rank of the mesh calls this
    owners, me = 1, 0  # ranks holding different shards; this rank's index among them
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            owners *= mesh.size(dim)
            me = me * mesh.size(dim) + coordinate[dim]
    if index % owners == me:
        ortho = muon._zeropower_via_newtonschulz(full, coefficients, steps, eps)
    else:
        ortho = torch.zeros(full.shape, dtype=torch.bfloat16, device=full.device)
    # Partial (a sum of one owner's result and zeros: exact) -> the parameter's shards.
    source = [Partial() if p.is_shard() else Replicate() for p in placements]
    summed = DTensor.from_local(ortho, mesh, source, run_check=False)
    return summed.redistribute(mesh, placements)


def count_params(params: Iterable[Tensor]) -> int:
    """Elements of ``params`` (the global count for DTensors)."""
    return sum(p.numel() for p in params)


__all__ = ["ADJUST_LR", "MUON_GROUP", "MuonAdamW", "count_params", "momentum_at"]
