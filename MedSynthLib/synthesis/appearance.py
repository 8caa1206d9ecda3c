"""The distribution a model's appearance code is drawn from, so that a seed stands for a training-like case.

A model with an appearance code (``style_dim > 0``) learnt from codes encoded from real training patches:
each patch gives a posterior N(mu, sigma^2) and the generator saw draws from it. The KL term pulls those
posteriors towards a standard normal, but not onto it: the shipped model's patches give codes with a mean
away from 0 (up to 0.22) and a spread of 0.80-0.91 per dimension, so a standard-normal draw is wider than
anything the generator met and, for the longest draws, darkens whole contrasts (the model card's seed sweep).

The distribution the generator did meet is the aggregate posterior over the training patches. Its first two
moments (mean: the mean of the patch means; covariance: the covariance of the patch means plus their mean
posterior variance) are fitted at export from patches drawn exactly as training drew them, and kept in the
model's ``config.json`` under ``"appearance"``. A seed's code is then ``mean + L @ eps(seed)`` with ``L``
the covariance's Cholesky factor and ``eps`` the seed's standard-normal draw
(:func:`~MedSynthLib.synthesis.networks.style_code`). A model without the record draws ``eps`` itself, as
every model did before it.

Synthesis can scale the draw about the mean (the appearance spread): below 1 it narrows the appearances towards the
mean one, as the truncation trick of style-based GANs trades variety for typicality (Karras et al., CVPR 2019); past
1 the codes leave the distribution the generator met in training. How far past 1 a model stays believable is a
property of the model, measured and recorded in its appearance record (``spread_limit``, :func:`check_model_spread`):
a model without the record is held to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from ..schema.errors import InputError, MedSynthError

if TYPE_CHECKING:
    import torch


class PatchSource(Protocol):
    """Draws training patches (``MedSynthLib.training.data.PatchSampler``): the step decides the draw."""

    def sample(self, volumes: Sequence[Any], seed: int, step: int, rank: int, batch_size: int,
               device: "torch.device | str" = "cpu") -> tuple["torch.Tensor", "torch.Tensor"]: ...


#: ``"kind"`` of the record in a model config.
GAUSSIAN = "aggregate-posterior-gaussian"

#: The appearance spreads any model may accept (:meth:`AppearancePrior.code`): 0 (every seed the mean appearance) to
#: 2; each model accepts up to its own limit within it (:func:`check_model_spread`).
SPREAD_RANGE: tuple[float, float] = (0.0, 2.0)

#: The widest spread of a model whose record declares none: 1, the training codes' distribution.  Wider draws were
#: measured and refused for such models: from 1.1 on, the default of session 40 leaves more of the brain's outermost
#: layer at its floor than real scans have (model card, "Appearance spread").
DEFAULT_SPREAD_LIMIT = 1.0


def check_appearance_spread(value: Any, name: str = "appearance spread") -> float:
    """``value`` as a float within :data:`SPREAD_RANGE`, else a one-line :class:`MedSynthError` naming ``name``."""
    low, high = SPREAD_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise MedSynthError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


class SpreadModel(Protocol):
    """What the spread check reads of a model (``MedSynthLib.synthesis.models.ModelCard``)."""

    name: str
    appearance: "AppearancePrior | None"


def spread_limit(model: SpreadModel) -> float:
    """The widest appearance spread ``model`` accepts: its record's ``spread_limit``, else 1."""
    return DEFAULT_SPREAD_LIMIT if model.appearance is None else model.appearance.spread_limit


def check_model_spread(value: Any, model: SpreadModel, name: str = "appearance spread") -> float:
    """:func:`check_appearance_spread`, then within the model's own :func:`spread_limit` (one line naming both)."""
    spread = check_appearance_spread(value, name)
    limit = spread_limit(model)
    if spread > limit:
        raise MedSynthError(f"{name} {spread:g} is wider than model {model.name} accepts (up to {limit:g}: the widest "
                            "spread at which its images were measured believable; see its model card)")
    return spread


@dataclass(frozen=True)
class AppearancePrior:
    """A Gaussian over appearance codes: where a seed's code comes from.

    Attributes:
        mean: (style_dim,) the codes' mean.
        covariance: (style_dim, style_dim) their covariance, symmetric positive definite.
        patches: how many training patches it was fitted on.
        seed: the patch draws' seed (with ``patches``, they repeat the fit exactly).
        spread_limit: the widest appearance spread synthesis accepts with this model (at least 1; declared when
            the model is registered, from the outermost-layer measurement of its model card).
    """

    mean: tuple[float, ...]
    covariance: tuple[tuple[float, ...], ...]
    patches: int
    seed: int
    spread_limit: float = DEFAULT_SPREAD_LIMIT

    @property
    def style_dim(self) -> int:
        return len(self.mean)

    def cholesky(self) -> np.ndarray:
        return np.linalg.cholesky(np.asarray(self.covariance, np.float64))

    def code(self, seed: int, spread: float = 1.0) -> "torch.Tensor":
        """The (1, style_dim) float32 code of ``seed``: the same seed always gives the same code.

        Args:
            seed: the draw.
            spread: scales the draw's distance from the mean (:data:`SPREAD_RANGE` for synthesis): 1 draws from
                the prior, 0 gives every seed the mean appearance.
        """
        import torch

        from .networks import style_code

        eps = spread * style_code(seed, self.style_dim).double().numpy()
        code = np.asarray(self.mean, np.float64)[None] + eps @ self.cholesky().T
        return torch.from_numpy(code.astype(np.float32))

    def to_json(self) -> dict[str, Any]:
        record = {"kind": GAUSSIAN, "mean": [float(v) for v in self.mean],
                  "covariance": [[float(v) for v in row] for row in self.covariance],
                  "patches": self.patches, "seed": self.seed}
        if self.spread_limit != DEFAULT_SPREAD_LIMIT:  # the records of models without one stay as they were
            record["spread_limit"] = float(self.spread_limit)
        return record

    @classmethod
    def from_json(cls, data: Any, source: Any, style_dim: int) -> "AppearancePrior":
        """The record of a model config, every value checked; a bad one is refused naming ``source``."""
        def refuse(problem: str) -> InputError:
            return InputError(source, f"model config: 'appearance' {problem}")

        if style_dim == 0:
            raise refuse("is given but the network has no appearance code (style_dim 0)")
        if not isinstance(data, dict) or data.get("kind") != GAUSSIAN:
            raise refuse(f"must be an object with \"kind\": {GAUSSIAN!r}")
        mean, covariance = data.get("mean"), data.get("covariance")
        if not _numbers(mean) or len(mean) != style_dim:
            raise refuse(f"'mean' must be {style_dim} finite numbers (the network's style_dim)")
        if not (isinstance(covariance, list) and len(covariance) == style_dim
                and all(_numbers(row) and len(row) == style_dim for row in covariance)):
            raise refuse(f"'covariance' must be {style_dim} rows of {style_dim} finite numbers")
        matrix = np.asarray(covariance, np.float64)
        if not np.allclose(matrix, matrix.T, rtol=0, atol=1e-9):
            raise refuse("'covariance' is not symmetric")
        try:
            np.linalg.cholesky(matrix)
        except np.linalg.LinAlgError:
            raise refuse("'covariance' is not positive definite") from None
        for key in ("patches", "seed"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or (key == "patches" and value < 2):
                raise refuse(f"{key!r} must be an integer" + (" of at least 2" if key == "patches" else ""))
        limit = data.get("spread_limit", DEFAULT_SPREAD_LIMIT)
        try:
            limit = check_spread_limit(limit)
        except MedSynthError as exc:
            raise refuse(str(exc)) from None
        return cls(tuple(float(v) for v in mean), tuple(tuple(float(v) for v in row) for row in covariance),
                   data["patches"], data["seed"], limit)


def check_spread_limit(value: Any) -> float:
    """A model's widest spread: a number from :data:`DEFAULT_SPREAD_LIMIT` to the top of :data:`SPREAD_RANGE`."""
    low, high = DEFAULT_SPREAD_LIMIT, SPREAD_RANGE[1]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise MedSynthError(f"'spread_limit' must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def aggregate_posterior(means: np.ndarray, log_variances: np.ndarray, seed: int) -> AppearancePrior:
    """The Gaussian with the first two moments of the mixture of the patches' posteriors.

    Args:
        means, log_variances: (patches, style_dim) the encoder's outputs, one row per patch.
        seed: the patch draws' seed, recorded.
    """
    means = np.asarray(means, np.float64)
    variances = np.exp(np.asarray(log_variances, np.float64))
    if means.ndim != 2 or means.shape != variances.shape or len(means) < 2:
        raise ValueError(f"need (patches >= 2, style_dim) arrays, got {means.shape} and {variances.shape}")
    covariance = np.cov(means, rowvar=False).reshape(means.shape[1], means.shape[1]) + np.diag(variances.mean(0))
    covariance = (covariance + covariance.T) / 2  # exactly symmetric for the record's check
    return AppearancePrior(tuple(means.mean(0).tolist()), tuple(tuple(row) for row in covariance.tolist()),
                           len(means), seed)


def fit_appearance_prior(encode: Callable[["torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]],
                         volumes: Sequence[Any], sampler: PatchSource, patches: int, seed: int,
                         device: "torch.device | str" = "cpu",
                         progress: Callable[[int], None] | None = None) -> AppearancePrior:
    """Encode ``patches`` training patches drawn as training draws them and fit their aggregate posterior.

    Args:
        encode: real images (1, 4, P, P, P) -> (mean, log-variance) of their code (the model's style encoder).
        volumes: the training cases.
        sampler: the training run's patch sampler (patch size and augmentation).
        patches: how many patches; at least 2.
        seed: seeds the draws (step ``n`` of :meth:`PatchSampler.sample` gives patch ``n``).
        progress: called with 1 after each patch.
    """
    import torch

    if patches < 2:
        raise ValueError(f"patches {patches}: at least 2 are needed for a covariance")
    means: np.ndarray | None = None
    log_variances: np.ndarray | None = None
    with torch.no_grad():
        for index in range(patches):
            _, real = sampler.sample(volumes, seed, index, 0, 1, device)
            mean, log_variance = encode(real)
            if means is None or log_variances is None:
                means = np.empty((patches, mean.shape[1]), np.float64)
                log_variances = np.empty_like(means)
            # Copied out, not kept as views: a view holds the encoder's tensor, and a thousand of those small
            # blocks scattered between the large patches' buffers kept the heap from being reused (RSS grew
            # ~3.5 MB a patch on 96-cubed patches).
            means[index] = mean[0].double().cpu().numpy()
            log_variances[index] = log_variance[0].double().cpu().numpy()
            del mean, log_variance
            if progress is not None:
                progress(1)
    assert means is not None and log_variances is not None  # patches >= 2
    return aggregate_posterior(means, log_variances, seed)
