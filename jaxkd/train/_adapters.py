"""Adapters from Flax linen and Flax NNX models to the step's apply signatures.

Student: ``apply(params, model_state, inputs, *, train, rng) -> (outputs, model_state)``.
Teacher: ``teacher_apply(teacher_params, inputs) -> outputs`` in inference mode,
where ``teacher_params`` holds everything the teacher needs (for linen the whole
variables dict, BatchNorm statistics included; for NNX the full state).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

from jaxkd.train._features import (
    Features,
    feature_paths,
    linen_capture_filter,
    select_features,
    with_features,
)

PyTree = Any


def linen_apply(
    module: nn.Module,
    *,
    train_kwarg: str | None = "train",
    mutable: Sequence[str] = ("batch_stats",),
    rng_collection: str = "dropout",
    features: Features = None,
):
    """Student apply for a linen module called as ``module(inputs, train=...)``.

    Args:
      module: the linen module.
      train_kwarg: name of the module's train/eval keyword argument, or ``None``.
      mutable: collections updated in training when present in ``model_state``.
      rng_collection: the rng stream given ``rng`` in training (dropout).
      features: intermediate values to return beside the logits, without changing
        the model: paths (``["stage1", "stage2/block0"]``, named by themselves) or
        ``{name: path}``; a path names a submodule (its output) or a value sown into
        the ``"intermediates"`` collection (see :mod:`jaxkd.train._features`).

    Returns:
      ``apply(params, model_state, inputs, *, train, rng)``; ``model_state`` is the
      variables dict without ``"params"`` (e.g. ``{"batch_stats": ...}`` or ``{}``).
      With ``features`` the outputs are ``{"logits": ..., "features": {name: ...}}``.
    """
    call = _linen_call(module, feature_paths(features))

    def apply(params, model_state, inputs, *, train: bool, rng=None):
        variables = {"params": params, **model_state}
        kwargs = {} if train_kwarg is None else {train_kwarg: train}
        rngs = {rng_collection: rng} if (train and rng is not None) else None
        updated = [name for name in mutable if name in model_state] if train else []
        outputs, changes = call(variables, inputs, rngs=rngs, mutable=updated, **kwargs)
        return outputs, ({**model_state, **changes} if changes else model_state)

    return apply


def _linen_call(module: nn.Module, paths: dict[str, str]):
    """``call(variables, inputs, *, mutable, **kwargs) -> (outputs, changed collections)``,
    recording the features at ``paths`` when there are any."""

    def call(variables, inputs, *, mutable, **kwargs):
        if not paths:
            if not mutable:
                return module.apply(variables, inputs, **kwargs), {}
            return module.apply(variables, inputs, mutable=list(mutable), **kwargs)
        outputs, changes = module.apply(
            variables,
            inputs,
            capture_intermediates=linen_capture_filter(paths),
            mutable=[*mutable, "intermediates"],
            **kwargs,
        )
        changes = dict(changes)
        recorded = changes.pop("intermediates", {})

        def everything():  # every module output and sown value, for an error
            _, captured = module.apply(
                variables, inputs, capture_intermediates=True, mutable=["intermediates"], **kwargs
            )
            return captured["intermediates"]

        selected = select_features(recorded, paths, everything=everything)
        return with_features(outputs, selected), changes

    return call


def linen_teacher_apply(
    module: nn.Module, *, train_kwarg: str | None = "train", features: Features = None
):
    """Teacher apply for a linen module: ``teacher_apply(variables, inputs)``.

    ``features`` as in :func:`linen_apply`: the outputs are then
    ``{"logits": ..., "features": {name: ...}}``.
    """
    call = _linen_call(module, feature_paths(features))

    def teacher_apply(variables, inputs):
        kwargs = {} if train_kwarg is None else {train_kwarg: False}
        return call(variables, inputs, mutable=(), **kwargs)[0]

    return teacher_apply


def split_linen_variables(variables: PyTree) -> tuple[PyTree, PyTree]:
    """``(params, model_state)`` from a linen variables dict."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def nnx_split(model: nnx.Module):
    """``(graphdef, params, model_state)`` of an NNX model.

    ``params`` are the ``nnx.Param`` variables (what the optimizer trains);
    ``model_state`` is everything else (BatchNorm statistics, rng counters).
    """
    return nnx.split(model, nnx.Param, ...)


def _stream_key(rng: jax.Array, tag: str) -> jax.Array:
    """The key of rng stream ``tag`` for one call: ``fold_in(rng, crc32(tag))``."""
    return jax.random.fold_in(rng, zlib.crc32(tag.encode()))


def _nnx_call(paths: dict[str, str]):
    """``call(model, inputs) -> outputs``, with the features at ``paths`` when any."""

    def call(model, inputs):
        if not paths:
            return model(inputs)
        outputs, recorded = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            inputs
        )
        return with_features(outputs, select_features(nnx.to_pure_dict(recorded), paths))

    return call


def nnx_apply(graphdef, *, features: Features = None):
    """Student apply for an NNX model split by :func:`nnx_split`.

    Training mode is set with ``model.train()`` / ``model.eval()``. In training
    with an ``rng``, every ``nnx.Rngs`` stream of the model (``"dropout"``,
    ``"default"``, ``"params"`` and any other tag) is reseeded for the call with
    ``nnx.reseed``: the stream tagged ``tag`` draws from
    ``fold_in(rng, crc32(tag))`` (split to the shape of streams with non-scalar
    keys), so nnx.Dropout and other stochastic layers draw from keys derived
    from ``rng`` alone, and devices given different keys (as the data-parallel
    step gives them) draw different masks. The rng variables are then returned as
    they came in, so the returned ``model_state`` differs from the input only in
    non-rng state such as BatchNorm statistics, and stays identical on every
    device.

    With ``rng=None`` in training, stochastic layers draw from the model's own
    ``nnx.Rngs`` (part of ``model_state``) and the returned ``model_state``
    carries their advanced counters. In eval mode ``rng`` is unused and
    ``model_state`` is returned unchanged.

    ``features``: intermediate values to return beside the logits, by module path
    (attribute names, list items by index: ``"blocks/0"``) or sown name
    (``self.sow(nnx.Intermediate, "name", x)``), as in :func:`linen_apply`.
    """
    call = _nnx_call(feature_paths(features))

    def apply(params, model_state, inputs, *, train: bool, rng=None):
        # copy=True: fresh Variables at the current trace level, so that BatchNorm
        # may update its statistics inside jax.grad.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        if not train:
            model.eval()
            return call(model, inputs), model_state
        model.train()
        if rng is None:
            outputs = call(model, inputs)
        else:
            streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
            saved = [
                (stream, stream.key.get_value(), stream.count.get_value()) for stream in streams
            ]
            tags = {stream.tag for stream in streams}
            nnx.reseed(model, policy="match_shape", **{tag: _stream_key(rng, tag) for tag in tags})
            outputs = call(model, inputs)
            nnx.restore_rngs(saved)
        _, _, model_state = nnx.split(model, nnx.Param, ...)
        return outputs, model_state

    return apply


def nnx_teacher_apply(graphdef, *, features: Features = None):
    """Teacher apply for an NNX model: ``teacher_apply(state, inputs)`` in eval mode,
    where ``state`` is ``nnx.split(model)[1]`` (or params and rest merged);
    ``features`` as in :func:`nnx_apply`."""
    call = _nnx_call(feature_paths(features))

    def teacher_apply(state, inputs):
        model = nnx.merge(graphdef, state, copy=True)
        model.eval()
        return call(model, inputs)

    return teacher_apply


def count_params(params: PyTree) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))
