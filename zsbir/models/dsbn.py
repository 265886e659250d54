"""Domain-specific BatchNorm (DSBN; Chang et al., "Domain-Specific Batch Normalization for
Unsupervised Domain Adaptation", CVPR 2019).

Every `nn.BatchNorm2d` of a backbone becomes a `DomainBatchNorm2d`: one set of batch and
running statistics per domain (sketch, photo), and one affine transform per domain or one
shared by both (`affine="shared"`). Sketches are always normalised with sketch statistics
and photos with photo statistics, in training, validation and test alike, so the network
sees at evaluation exactly the normalisation it was trained with.

Routing is by a per-sample domain tensor (indices into `DOMAINS`), so the same layer serves
an encoder called once per domain and one called once on a mixed batch. The encoder hands
the tensor to every layer through one shared `DomainRouter` before running the backbone.
"""
from __future__ import annotations

import torch
from torch import nn

from zsbir.models.encoder import DOMAINS

AFFINE_MODES = ("per_domain", "shared")


class DomainRouter:
    """The per-sample domains of the batch the backbone is running on (shared by its DSBN layers)."""

    def __init__(self):
        self.domains: torch.Tensor | None = None

    def route(self, domains: torch.Tensor) -> "DomainRouter":
        self.domains = domains
        return self

    def __enter__(self) -> "DomainRouter":
        return self

    def __exit__(self, *exc) -> None:
        self.domains = None  # a stale tensor must never route the next call


class DomainBatchNorm2d(nn.Module):
    """BatchNorm2d with per-domain statistics (and, with `affine="per_domain"`, per-domain scale and shift)."""

    def __init__(self, num_features: int, router: DomainRouter, affine: str = "per_domain", eps: float = 1e-5,
                 momentum: float | None = 0.1):
        super().__init__()
        if affine not in AFFINE_MODES:
            raise ValueError(f"model.dsbn must be one of {AFFINE_MODES} (or null for plain BatchNorm), got {affine!r}")
        per_domain = affine == "per_domain"
        self.num_features, self.affine = num_features, affine
        self.norms = nn.ModuleList(nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=per_domain)
                                   for _ in DOMAINS)
        self.weight = None if per_domain else nn.Parameter(torch.ones(num_features))
        self.bias = None if per_domain else nn.Parameter(torch.zeros(num_features))
        self._router = (router,)  # a tuple: the router is shared state, not a submodule

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, router: DomainRouter, affine: str) -> "DomainBatchNorm2d":
        """A DSBN layer that starts, in every domain, as `bn` (statistics and affine weights copied)."""
        layer = cls(bn.num_features, router, affine, eps=bn.eps, momentum=bn.momentum)
        for norm in layer.norms:
            norm.load_state_dict(bn.state_dict() if affine == "per_domain" else
                                 {k: v for k, v in bn.state_dict().items() if k not in ("weight", "bias")})
        if affine == "shared" and bn.affine:
            with torch.no_grad():
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
        return layer.to(bn.weight.device if bn.affine else bn.running_mean.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        domains = self._router[0].domains
        if domains is None:
            raise RuntimeError("DomainBatchNorm2d ran without domains; call the backbone through its encoder, "
                               "which routes each sample's domain (model.dsbn)")
        present = domains.unique().tolist() if len(domains) else [0]
        if len(present) == 1:  # one domain in the batch (the usual case): no gather / scatter
            out = self.norms[present[0]](x)
        else:
            out = torch.empty_like(x)
            for d in present:
                index = (domains == d).nonzero().squeeze(1)
                out = out.index_copy(0, index, self.norms[d](x.index_select(0, index)))
        if self.weight is not None:
            out = out * self.weight[:, None, None] + self.bias[:, None, None]
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, domains={DOMAINS}, affine={self.affine}"


def convert_to_dsbn(module: nn.Module, router: DomainRouter, affine: str = "per_domain") -> nn.Module:
    """Replace every BatchNorm2d inside `module` (in place) by a DomainBatchNorm2d; returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:  # exactly BatchNorm2d: subclasses (timm's BatchNormAct2d) also act
            setattr(module, name, DomainBatchNorm2d.from_batchnorm(child, router, affine))
        else:
            convert_to_dsbn(child, router, affine)
    return module
