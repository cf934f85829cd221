"""Collects the sites one forward pass calls, in order of first call, and their statistics.

Every capture route (eager mode, torch.export graphs, TorchScript graphs, onnxruntime)
reports each activation call here; the recorder names sites, fixes their unit axis on first
sight and reduces each tensor into its SiteStats at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .sites import Activation, SiteInfo, resolve_unit_axis
from .stats import SiteGradStats, SiteStats



@dataclass
class _Site:
    base: str
    call: int
    activation: Activation
    stats: SiteStats
    tensor: str | None
    grad: SiteGradStats | None = None
    module: str | None = None
    node: str | None = None
    tokens: bool = False  # measured per real token: its stats' shape is per token ([batch, seq] dropped)


class SiteRecorder:
    def __init__(self, unit_axis: int | None = None, gradients: bool = False, percentiles: bool = False,
                 reduction: Any = None) -> None:
        self.unit_axis_override = unit_axis
        self.gradients = gradients
        self.percentiles = percentiles
        # How every site folds a batch; None: the plain route for the tensors' kind (stats.default_reduction)
        self.reduction = reduction
        self._sites: dict[tuple[str, int], _Site] = {}
        self._calls: dict[str, int] = {}
        self._mask: Any = None  # see masked()
        self._mask_full = False
        self._mask_samples: int | None = None
        self.notes: list[str] = []  # what the run should warn about (each once)

    def begin_forward(self) -> None:
        """Call counters restart with each forward pass: the k-th call of a module is site k."""
        self._calls.clear()

    @contextlib.contextmanager
    def masked(self, mask: Any, samples: int | None = None) -> Iterator[None]:
        """Measure only the real positions of the forward passes inside.

        `mask` is bool, True where a position is real: [batch] for rows that pad a batch to a
        model's fixed batch size, [batch, seq] for an attention mask (padding tokens). A site whose
        output starts with the mask's shape is measured at the True positions only: a [batch]
        mask drops rows; a [batch, seq] mask gathers the real tokens into [tokens, ...], so the
        site's units are its per-token axes (hidden features) and the batch counts as `samples`
        sequences (default: the mask's batch size). Other sites are measured whole, with a note."""
        if mask is None:
            yield
            return
        saved = self._mask, self._mask_full, self._mask_samples
        self._mask = mask.bool()
        self._mask_full = bool(self._mask.all())  # one read per batch; a full mask needs no gather
        self._mask_samples = samples if samples is not None else int(mask.shape[0])
        try:
            yield
        finally:
            self._mask, self._mask_full, self._mask_samples = saved

    def _mask_fits(self, output: Any, batched: bool) -> bool:
        """Whether `output` starts with the mask's axes ([batch, seq] ones followed by a feature axis)."""
        mask = self._mask
        if mask is None or not batched:
            return False
        needed = mask.dim() + (1 if mask.dim() == 2 else 0)
        return output.dim() >= needed and tuple(output.shape[:mask.dim()]) == tuple(mask.shape)

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def record(self, base: str, activation: Activation, output: Any, inp: Any = None,
               layout: str | None = None, unit_axis: int | None = None, tensor: str | None = None,
               module: str | None = None, node: str | None = None,
               batched: bool = True) -> SiteStats:
        """Fold one call's output into its site (created on first sight) and return the site's statistics."""
        call = self._calls.get(base, 0)
        self._calls[base] = call + 1
        site = self._sites.get((base, call))
        fits = self._mask_fits(output, batched)
        if self._mask is not None and not fits:
            self._note(f"site {base}{f'#{call}' if call else ''}: its output {tuple(output.shape)} does not start with "
                       f"the {'batch' if self._mask.dim() == 1 else '[batch, sequence]'} axes of the mask "
                       f"{tuple(self._mask.shape)}; measured at every position, padding included")
        if site is None:
            tokens = fits and self._mask is not None and self._mask.dim() == 2
            shape = tuple(output.shape[2:] if tokens else output.shape[1:] if batched else output.shape)
            axis = unit_axis if unit_axis is not None and self.unit_axis_override is None else \
                resolve_unit_axis(len(shape), layout, self.unit_axis_override)
            # torch tensors are measured on their device; numpy arrays (onnxruntime's) on the host with numpy
            device = None if isinstance(output, np.ndarray) else output.device
            stats = SiteStats(activation, shape, axis, device, percentiles=self.percentiles,
                              reduction=self.reduction)
            grad = SiteGradStats.on(device) if self.gradients else None
            site = _Site(base, call, activation, stats, tensor, grad, module, node, tokens)
            self._sites[(base, call)] = site
        if fits:
            self._update_masked(site, output, inp)
        else:
            site.stats.update(output, inp)
        if site.grad is not None and getattr(output, "requires_grad", False):
            # Fires during the backward pass with d(loss)/d(this output); in-place successors
            # do not affect it (the hook binds to the autograd node of this version).
            output.register_hook(site.grad.update)
        return site.stats

    def _update_masked(self, site: _Site, output: Any, inp: Any) -> None:
        """Fold only the mask's real positions ([tokens, ...] or the real rows) into the site."""
        mask = self._mask
        assert mask is not None
        if self._mask_full:
            if not site.tokens:
                site.stats.update(output, inp)
                return
            flat = (-1, *output.shape[2:])
            site.stats.update(output.detach().reshape(flat), None if inp is None else inp.detach().reshape(flat),
                              samples=self._mask_samples)
            return
        mask = mask.to(output.device)
        y = output.detach()[mask]
        x = None if inp is None else inp.detach()[mask]
        if site.tokens:
            site.stats.update(y, x, samples=self._mask_samples)
        elif mask.dim() == 1:
            site.stats.update(y, x)  # the real rows: a batch of fewer samples
        else:  # a site first met without the mask's axes: units per sample, tokens gathered anyway
            site.stats.update(output, inp)

    def __len__(self) -> int:
        return len(self._sites)

    def sites(self) -> list[tuple[SiteInfo, Activation, SiteStats]]:
        """Sites in order of first call, named `base` or `base#k` when a base is called more than once."""
        repeated = {site.base for site in self._sites.values() if site.call > 0}
        return [(SiteInfo(f"{site.base}#{site.call}" if site.base in repeated else site.base, site.activation.op,
                          site.stats.shape, site.stats.unit_axis, site.tensor, site.module, site.node),
                 site.activation, site.stats)
                for site in self._sites.values()]

    def host_view(self) -> list[tuple[SiteInfo, Activation, dict[str, Any]]]:
        return [(info, act, stats.to_host()) for info, act, stats in self.sites()]

    def poisoned(self) -> list[str]:
        """Sites whose deferred statistics saw NaN/Inf (one host read for all of them)."""
        sites = self.sites()
        if not sites or isinstance(sites[0][2].poisoned, np.ndarray):
            return []  # the host route checks every batch: nothing is deferred
        import torch

        device = sites[0][2].poisoned.device
        flags = torch.stack([stats.poisoned.to(device) for _, _, stats in sites]).cpu().tolist()
        return [info.name for (info, _, _), flag in zip(sites, flags) if flag]

    def fresh(self, **changes: Any) -> "SiteRecorder":
        """An empty recorder with the same settings (for a run that starts over)."""
        settings = {"unit_axis": self.unit_axis_override, "gradients": self.gradients,
                    "percentiles": self.percentiles, "reduction": self.reduction}
        return SiteRecorder(**{**settings, **changes})

    def all_reduce(self) -> None:
        """Merge every site across torch.distributed ranks; all ranks must have seen the same sites."""
        import torch.distributed as dist

        keys = list(self._sites)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, keys)
        if any(other != keys for other in gathered):
            from ..errors import ModelRunError

            raise ModelRunError("ranks called different activation sites (data-dependent control flow?); "
                                "run in a single process")
        for site in self._sites.values():
            site.stats.all_reduce()
            if site.grad is not None:
                site.grad.all_reduce()

    def gradient_view(self) -> list[dict[str, Any] | None]:
        """Per site, in the order of `sites()`: {"rms", "zero_fraction"} or None without --gradients."""
        return [None if site.grad is None else site.grad.to_dict() for site in self._sites.values()]
