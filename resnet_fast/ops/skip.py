"""When a fused path may stand in for a module's call: only where calling it could do nothing but what
its class's forward does. Checked on every call: hooks and forwards can be added at any time."""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


def global_hooks() -> bool:
    """Whether a hook registered for every module (nn.modules.module.register_module_*_hook) is set."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def skippable(module: nn.Module, types: tuple[type, ...]) -> bool:
    """module is exactly one of `types` (a subclass may run another forward), with no hook of its own
    and no forward set on the instance."""
    return (type(module) in types and "forward" not in module.__dict__
            and not (module._forward_hooks or module._forward_pre_hooks
                     or module._backward_hooks or module._backward_pre_hooks))
