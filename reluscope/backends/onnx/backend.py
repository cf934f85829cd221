"""The ONNX backend's measuring: onnxruntime runs the graph with each site reduced inside it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import UsageError
from ...measure.recorder import SiteRecorder
from ...run import Run
from ..base import Backend, Measurement, Pruning, PruneRequest
from .session import OnnxCapture

if TYPE_CHECKING:
    from ...data import Batch

GRADIENTS_UNAVAILABLE = ("gradient flow needs the PyTorch model: ONNX graphs are analysed with onnxruntime, which "
                         "has no backward pass; analyse the .pt/.pt2/TorchScript file with --gradients")


def resolve_device(requested: str) -> str:
    """Where onnxruntime runs: CUDA only through its own CUDA provider (onnxruntime-gpu), which `auto`
    takes when installed. Asked for and absent, CUDA is a usage error (exit 2)."""
    import onnxruntime

    requested = requested.lower()
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested.startswith("cuda") and not has_cuda:
        raise UsageError(f"--device {requested}: no CUDA GPU is available to onnxruntime here (it needs the "
                         "onnxruntime-gpu package and a GPU); use --device cpu or auto")
    return requested


class OnnxBackend(Backend):
    name = "onnxruntime"

    def measure(self, run: Run) -> Measurement:
        config = run.config
        device = resolve_device(config.device)
        # Site tensors come back from onnxruntime as host arrays: the PyTorch route on the CPU reduces them.
        run.recorder = SiteRecorder(unit_axis=config.unit_axis, percentiles=config.percentiles)
        session = OnnxCapture(self.loaded.module, run.recorder, device=str(device), path=self.loaded.path)
        run.source = run.source.select_inputs(session.input_names)  # feed the graph's inputs by their names
        with session:
            for batch in run.batches():
                run.forward(session, batch.inputs)
        run.unanalysed.extend(session.unanalysed + session.never_ran())
        missed = [item for item in run.unanalysed if item.get("reached", True)]
        if missed:
            names = ", ".join(item["name"] for item in missed[:5])
            more = f" and {len(missed) - 5} more" if len(missed) > 5 else ""
            run.warnings.append(f"the report is incomplete: {len(missed)} site(s) found in the model were not "
                                f"measured ({names}{more}; see unanalysed); --fail-on rules that would read them fail")
        run.warnings.extend(session.warnings)
        flow = None
        if config.gradients:
            run.warnings.append(GRADIENTS_UNAVAILABLE)
            flow = {"available": False, "reason": GRADIENTS_UNAVAILABLE}
        return Measurement(recorder=run.recorder,
                           run={"backend": self.name, "device": str(device), "processes": 1,
                                "batch_size": config.batch_size},
                           gradient_flow=flow)

    # pruning (reluscope prune) ----------------------------------------------
    def check_prunable(self, suffix: str | None) -> None:
        from .cost import check_suffix

        if suffix is not None:
            check_suffix(suffix)

    def prune(self, request: PruneRequest) -> Pruning:
        from .prune import prune_onnx

        return prune_onnx(self.loaded, request)

    def cost(self, model: Any, batch: Batch) -> dict[str, Any]:
        from .cost import cost

        return cost(model, batch)

    def serialize(self, model: Any, suffix: str, batch: Batch) -> bytes:
        from .cost import serialize

        return serialize(model, suffix)
