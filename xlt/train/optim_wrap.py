"""A torch optimizer that wraps another and shares its state (the base of xlt's optimizer wrappers)."""

from __future__ import annotations

from typing import Any

import torch


class DelegatingOptimizer(torch.optim.Optimizer):
    """Everything but ``step`` goes to the inner optimizer.

    Like accelerate's ``AcceleratedOptimizer`` it shares the inner optimizer's ``state``, ``param_groups``
    and ``defaults`` (no copy), so checkpoints, LR schedulers and gradient scalers see the real optimizer.
    Subclasses set ``self.optimizer`` in ``__init__`` (no ``super().__init__``: the inner optimizer owns the
    parameters and their state) and override ``step``.
    """

    @property
    def state(self):  # noqa: ANN201
        return self.optimizer.state

    @state.setter
    def state(self, state):  # noqa: ANN001
        self.optimizer.state = state

    @property
    def param_groups(self):  # noqa: ANN201
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):  # noqa: ANN001
        self.optimizer.param_groups = groups

    @property
    def defaults(self):  # noqa: ANN201
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):  # noqa: ANN001
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:  # train()/eval() of schedule-free optimizers, etc.
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"
