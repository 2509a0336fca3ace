"""Intermediate features of unmodified Flax models, selected by path.

Linen: ``module.apply(..., capture_intermediates=keep, mutable=["intermediates"])``
records the output of each module whose path is asked for, beside every value the
model sows into the ``"intermediates"`` collection. NNX: ``nnx.capture`` with
``method_outputs=nnx.Intermediate`` records every submodule's output and every
``sow``-n value. Both give a nested mapping by module path; a path names either a
module (its ``__call__`` output is taken) or a sown value:

* ``"Dense_1"``, ``"stage2/block0"``: the output of that submodule (linen's automatic
  names or attribute names; NNX attribute names, list items by index: ``"blocks/0"``);
* ``"stage2/features"``: the value sown as ``self.sow("intermediates", "features", x)``
  (linen) or ``self.sow(nnx.Intermediate, "features", x)`` (NNX) in module
  ``stage2``.

A model called with features returns ``{"logits": outputs, "features": {name: value}}``,
the mapping every objective reads (``logits_of``) and feature objectives take their
features from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PyTree = Any
Features = Sequence[str] | Mapping[str, str] | None


def feature_paths(features: Features) -> dict[str, str]:
    """``{name: path}`` from a sequence of paths (named by themselves) or a mapping."""
    if features is None:
        return {}
    if isinstance(features, str):
        raise TypeError(f"`features` must be a sequence of paths or a mapping, got {features!r}.")
    named = dict(features) if isinstance(features, Mapping) else {path: path for path in features}
    for name, path in named.items():
        if not isinstance(path, str) or not path.strip("/"):
            raise ValueError(f"Feature {name!r} has an empty or non-string path {path!r}.")
    return named


def _children(node) -> dict[str, Any]:
    """A mapping node's children by string key (NNX list items have int keys)."""
    if not isinstance(node, Mapping):
        return {}
    return {str(key): value for key, value in node.items()}


def available_paths(node, prefix: str = "") -> list[str]:
    """Every path that :func:`select_features` would accept in ``node``."""
    paths = []
    for key, child in _children(node).items():
        if key == "__call__":
            continue
        path = f"{prefix}{key}"
        if isinstance(child, Mapping):
            if "__call__" in child:
                paths.append(path)
            paths += available_paths(child, f"{path}/")
        else:
            paths.append(path)
    return paths


def _recorded_value(path: str, recorded) -> Any:
    """The one value of a module output (``{"__call__": (x,)}``) or sown entry (``(x,)``)."""
    if isinstance(recorded, Mapping):
        recorded = recorded.get("__call__")
    recorded = getattr(recorded, "value", recorded)  # an NNX Variable, or its value
    if not isinstance(recorded, tuple) or not recorded:
        raise ValueError(f"Feature path {path!r} holds no recorded value.")
    if len(recorded) > 1:
        raise ValueError(
            f"Feature path {path!r} was recorded {len(recorded)} times in one call (a module "
            "called, or a value sown, more than once); name a path recorded once."
        )
    return recorded[0]


def select_features(
    intermediates: Mapping, paths: Mapping[str, str], *, everything=None
) -> dict[str, Any]:
    """``{name: value}`` of ``paths`` in a nested mapping of recorded intermediates.

    Args:
      intermediates: the recorded values, nested by module path.
      paths: ``{name: path}`` to select.
      everything: for the error only, ``() -> mapping`` of every path the model can
        record (when ``intermediates`` holds only those asked for); default
        ``intermediates`` itself.

    Raises:
      KeyError: a path that was not recorded, listing the model's paths.
    """
    selected = {}
    for name, path in paths.items():
        node = intermediates
        for part in path.strip("/").split("/"):
            children = _children(node)
            if part not in children:
                listed = intermediates if everything is None else everything()
                raise KeyError(
                    f"Feature {name!r}: no module output or sown value at path {path!r}; "
                    f"the model's paths: {sorted(available_paths(listed))}."
                )
            node = children[part]
        selected[name] = _recorded_value(path, node)
    return selected


def linen_capture_filter(paths: Mapping[str, str]):
    """The ``capture_intermediates`` filter that records the modules at ``paths``."""
    wanted = {path.strip("/") for path in paths.values()}

    def keep(module, method_name: str) -> bool:
        return method_name == "__call__" and "/".join(module.path) in wanted

    return keep


def with_features(outputs, features: dict[str, Any]):
    """``{"logits": outputs, "features": features}`` (or ``outputs`` updated, when a
    mapping)."""
    if isinstance(outputs, Mapping):
        return {**outputs, "features": {**outputs.get("features", {}), **features}}
    return {"logits": outputs, "features": features}
