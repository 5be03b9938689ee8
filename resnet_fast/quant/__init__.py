"""INT8 inference on CPU: `qmodel = resnet_fast.quantize(model, calibration)`.

    qmodel = resnet_fast.quantize(model.eval(), calibration_loader)   # <= a few batches suffice
    with torch.no_grad():
        logits = qmodel(images)                                        # float in, fp32 logits out
    torch.save(qmodel.state_dict(), "int8.pt")
    qmodel = resnet_fast.load_quantized(torch.load("int8.pt", weights_only=True))
"""
from .api import quantize
from .isa import has_exact_int8, weight_qmax
from .qmodule import QuantizedResNet, load_quantized
from .structure import UnsupportedModel

__all__ = ["quantize", "load_quantized", "QuantizedResNet", "UnsupportedModel", "has_exact_int8", "weight_qmax"]
