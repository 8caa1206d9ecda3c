"""Brain tissue from all contrasts, bias-corrected, with registered atlas priors.

The classic recipe of brain tissue segmentation (SPM's unified segmentation,
FSL FAST, ANTs Atropos), built on SimpleITK and numpy:

1. each fitted contrast (T1, T2, FLAIR; T1ce optionally) is N4 bias-corrected,
   the field estimated at about 6 mm (Tustison et al., IEEE TMI 29(6), 2010);
2. the ICBM152 2009a T1 template (shipped in nilearn) is registered to the
   case's T1, affine then a smooth B-spline step, at about 6 mm, with the
   tumour and its oedema (grown by a margin) masked out of the metric; its GM and
   WM probability maps follow, CSF = brain - GM - WM;
3. a three-class multivariate Gaussian mixture is fitted by EM with those maps
   as voxel-wise priors, on healthy-looking brain only;
4. the posteriors are regularised by a Potts Markov random field (mean-field
   iterations), and every brain voxel takes its most probable class; within a
   band around the tumour only the T1 speaks (oedema brightens T2 and FLAIR).

Voxels where a fitted contrast is zero or negative inside the brain (the
interpolation undershoot of resampled scans, or a contrast's own brain mask
ending earlier) carry no intensity evidence: their class comes from the prior
and their neighbours, never from reading "dark" as CSF.

With T1 alone (a case read with ``--t1`` but no T2/FLAIR, the healthy FreeSurfer
test scan) the model falls back to the T1 k-means model of
:mod:`MedSynthLib.cases.kmeans_anatomy`, which agrees better with FreeSurfer on T1 alone
(docs/anatomy_check.md); the CLI says so, and the label map records the k-means model with its
own settings plus an ``anatomy_fallback`` note naming this one (:meth:`AtlasPriorEM.fitted_model`).
The healthy template is labelled by this model on its T1 with its own priors
(:meth:`AtlasPriorEM.segment_template`).
Everything is deterministic: registration and N4 run on one ITK thread, the
metric's sample grid has a fixed seed, EM starts from the priors.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..schema.errors import MedSynthError
from ..schema.grid import Grid
from .kmeans_anatomy import GaussianMixtureMRF, _neighbour_mean, _softmax  # the same mean-field MRF steps

#: Contrasts the model fits when present, in this order.
FIT_CONTRASTS: tuple[str, ...] = ("t1", "t2", "flair")


class RegistrationError(MedSynthError):
    """The atlas could not be registered to the case (the caller names the file)."""


@functools.lru_cache(maxsize=1)
def atlas() -> dict[str, Any]:
    """The ICBM152 2009a T1, GM and WM probabilities and brain mask (SimpleITK images, float32)."""
    from .icbm152 import _load  # one loader for the canvas and the priors

    t1, gm, wm, brain = _load()
    def image(array: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(array.astype(np.float32))
        out.CopyInformation(t1)
        return out

    t1_array = sitk.GetArrayFromImage(t1).astype(np.float32)
    # Warped priors are blurred by 2 mm (registration tolerance); blurring in atlas space, once,
    # is the same up to the (near-1) local scaling and costs nothing per case.
    sigma = 2.0 / np.asarray(t1.GetSpacing()[::-1])
    gm_smooth, wm_smooth = ndimage.gaussian_filter(gm, sigma), ndimage.gaussian_filter(wm, sigma)
    return {"t1": image(np.where(brain, t1_array, 0.0)), "gm": image(gm_smooth), "wm": image(wm_smooth),
            "brain": image(brain.astype(np.float32)), "t1_array": t1_array, "gm_array": gm, "wm_array": wm,
            "brain_array": brain}


@dataclass(frozen=True)
class AtlasPriorEM:
    """Multi-contrast EM tissue model with N4 and registered ICBM152 priors.

    Attributes:
        contrasts: contrasts fitted when the case has them (T1 is required).
        use_t1ce: also fit the post-contrast T1 (off: enhancing vessels and dura
            make it a poor tissue contrast).
        exclude_margin_mm: the tumour (all labels, oedema included) is grown by this
            much and left out of N4, registration and the EM fit.
        n4_spacing_mm: N4 estimates the bias field on a copy shrunk to about this spacing.
        n4_levels: N4 fitting levels (each doubles the bias field's control-point mesh).
        n4_iterations: N4 iterations per fitting level.
        registration_spacing_mm: the atlas is registered on copies at about this spacing.
        registration_sampling: share of those voxels the metric samples, on a regular grid
            jittered with ``registration_seed`` (deterministic; a fifth of the time of every voxel).
        registration_seed: the seed of that jitter.
        affine_iterations: gradient-descent iterations of the affine step.
        bspline_spacing_mm: control-point spacing of the deformable step (smooth).
        bspline_iterations: L-BFGS-B iterations of the deformable step (0: affine only).
        prior_floor: share of a uniform prior mixed into the atlas prior, so that
            anatomy the atlas does not expect (large ventricles, mass effect) stays possible.
        prior_weight: exponent of the prior in the posterior (1: Bayes; below 1 the images
            speak louder than the atlas, which a tumour-bearing brain needs).
        fit_prior_weight: the same exponent while EM estimates the class parameters (the full
            prior keeps each class anchored to its anatomy on weak-contrast scans).
        tied_covariance: one covariance shared by the classes.  Free covariances let the
            broad CSF class swallow every partial-volume voxel (measured: 24-32 % CSF).
        edge_mm: the band at the brain mask's edge left out of the fit: there every contrast
            blends with the zero background of the skull-stripped scan.
        edge_t2_level: edge voxels labelled CSF but darker on T2 than this point between the GM
            (0) and CSF (1) means are background blend, relabelled GM or WM.
        em_iterations: EM iterations of the mixture fit.
        beta: strength of the Potts prior.
        mrf_iterations: mean-field iterations.
        max_samples: voxels used for the EM fit (a deterministic stride).
        peritumour_mm: in a band this wide around the tumour (outside the expert label) voxels are
            labelled from T1 alone (each class's T1 marginal): oedema and infiltration beyond the
            label brighten T2 and FLAIR there, which reads as grey matter (0: off).
        min_brain_dice: registrations whose warped atlas brain overlaps the case's brain
            less than this (Dice) are refused as failed.
    """

    contrasts: tuple[str, ...] = FIT_CONTRASTS
    use_t1ce: bool = False
    exclude_margin_mm: float = 3.0
    n4_spacing_mm: float = 6.0
    n4_levels: int = 2
    n4_iterations: int = 20
    registration_spacing_mm: float = 6.0
    registration_sampling: float = 0.25
    registration_seed: int = 20261201
    affine_iterations: int = 100
    bspline_spacing_mm: float = 50.0
    bspline_iterations: int = 30
    prior_floor: float = 0.1
    prior_weight: float = 0.3
    fit_prior_weight: float = 0.5
    tied_covariance: bool = True
    edge_mm: float = 3.0
    edge_t2_level: float = 0.5
    em_iterations: int = 12
    beta: float = 1.0
    mrf_iterations: int = 4
    max_samples: int = 200_000
    peritumour_mm: float = 10.0
    min_brain_dice: float = 0.7
    name: str = "atlas-em"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["contrasts"] = list(self.contrasts)
        return out

    # --- the AnatomyModel interface ------------------------------------------------------------

    def segment(self, t1: np.ndarray, brain: np.ndarray, exclude: np.ndarray,
                spacing: tuple[float, float, float]) -> np.ndarray:
        """T1-only labelling (the :class:`AnatomyModel` protocol): the documented fallback."""
        grid = Grid(tuple(int(v) for v in t1.shape[::-1]), tuple(float(v) for v in spacing),  # type: ignore[arg-type]
                    (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
        return self.segment_images({"t1": t1}, brain, exclude, grid)

    def used_contrasts(self, images: dict[str, np.ndarray]) -> list[str]:
        """The contrasts of ``images`` this model fits (``["t1"]``: the T1-only fallback)."""
        if not self.multi_contrast(images):
            return ["t1"]
        wanted = list(self.contrasts) + (["t1ce"] if self.use_t1ce else [])
        return [c for c in wanted if c in images]

    def multi_contrast(self, images: dict[str, np.ndarray]) -> bool:
        """Whether ``images`` hold every contrast the atlas EM needs (T1, T2 and FLAIR)."""
        return all(c in images for c in self.contrasts)

    def missing_contrasts(self, images: dict[str, np.ndarray]) -> list[str]:
        """The contrasts the atlas EM needs that ``images`` lack (any: the T1-only fallback runs)."""
        return [c for c in self.contrasts if c not in images]

    def fitted_model(self, images: dict[str, np.ndarray]) -> AtlasPriorEM | GaussianMixtureMRF:
        """The model that labels ``images``: this one, or without T2/FLAIR the T1 k-means model.

        T1 alone: measured on the healthy FreeSurfer scan, this model's T1-only fit scores Dice GM 0.78 /
        WM 0.88 against the k-means model's 0.90 / 0.88, so the fallback is that model with its own
        settings (docs/anatomy_check.md); records name it, not this one.
        """
        return self if self.multi_contrast(images) else GaussianMixtureMRF()

    def segment_images(self, images: dict[str, np.ndarray], brain: np.ndarray, exclude: np.ndarray,
                       grid: Grid) -> np.ndarray:
        """Label CSF/GM/WM (1/2/3) on every brain voxel of a case.

        Args:
            images: contrast -> ``(k, j, i)`` array on ``grid`` (``t1`` required).
            brain: boolean brain mask.
            exclude: tumour mask (all tumour labels); grown by ``exclude_margin_mm``.
            grid: the geometry of the arrays (registration works in physical space).

        Raises:
            RegistrationError: when the atlas does not land on the brain.
        """
        fitted = self.fitted_model(images)
        if fitted is not self:
            return fitted.segment(images["t1"], brain, exclude, grid.spacing)
        box = _box(brain, margin=2)
        crop_grid = _crop_grid(grid, box)
        brainb, excludeb = brain[box], exclude[box]
        spacing = crop_grid.spacing
        # Tumour grown by the exclusion margin, and by the peritumoural band (one distance transform).
        grown, near_tumour = _grow_by(excludeb, (self.exclude_margin_mm, self.peritumour_mm), spacing)
        contrasts = self.used_contrasts(images)
        channels, valid = [], brainb.copy()
        for contrast in contrasts:
            array = images[contrast][box].astype(np.float32)
            valid &= array > 0
            channels.append(array)
        # The band at the mask's edge blends with the zero background: kept out of N4 (which would
        # read its darkening as bias and brighten it) and out of the fit.
        edge = brainb & _grow(~brainb, self.edge_mm, spacing)
        fit = brainb & ~grown & valid & ~edge
        if fit.sum() < 1000:
            fit = brainb & ~excludeb & valid
        if fit.sum() < 100:
            raise RegistrationError("too few healthy brain voxels with positive intensities to fit tissue classes")
        corrected = [_n4(np.maximum(c, 0.0), fit, crop_grid, self.n4_spacing_mm, self.n4_levels, self.n4_iterations)
                     for c in channels]
        gm, wm, atlas_brain = self._warped_priors(corrected[0], brainb, fit, crop_grid)
        priors = _tissue_priors(gm, wm, self.prior_floor)
        # Oedema and infiltration reach beyond the expert label and brighten T2 and FLAIR around it,
        # which would read as grey matter: in a band around the tumour only the T1 speaks.
        peritumour = near_tumour & ~excludeb if self.peritumour_mm > 0 else None
        labels_box = self._fit(corrected, contrasts, priors, brainb, fit, valid & ~excludeb, edge, peritumour)
        out = np.zeros(brain.shape, np.uint8)
        out[box] = labels_box
        return out

    def segment_template(self) -> np.ndarray:
        """Label the ICBM152 T1 itself: the priors need no registration there."""
        data = atlas()
        t1, brain = data["t1_array"], data["brain_array"]
        valid = brain & (t1 > 0)
        grid = Grid.from_image(data["t1"])
        box = _box(brain, margin=2)
        edge = brain[box] & _grow(~brain[box], self.edge_mm, grid.spacing)
        fit = valid[box] & ~edge
        corrected = [_n4(t1[box], fit, _crop_grid(grid, box), self.n4_spacing_mm, self.n4_levels,
                         self.n4_iterations)]
        priors = _tissue_priors(data["gm_array"][box], data["wm_array"][box], self.prior_floor)
        out = np.zeros(brain.shape, np.uint8)
        out[box] = self._fit(corrected, ["t1"], priors, brain[box], fit, valid[box], edge)
        return out

    # --- steps ---------------------------------------------------------------------------------

    def _warped_priors(self, t1: np.ndarray, brain: np.ndarray, fit: np.ndarray,
                       grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Register the atlas T1 to the case T1 and bring GM, WM and brain maps onto the case grid."""
        data = atlas()
        fixed_full = grid.image(np.where(brain, t1, 0.0).astype(np.float32))
        # About 24 samples across the brain at least: an adult brain registers at the nominal
        # spacing, a small or low-resolution volume at a finer one.
        extent = min(n * sp for n, sp in zip(grid.size, grid.spacing))
        spacing_mm = float(min(self.registration_spacing_mm, max(extent / 24.0, min(grid.spacing))))
        fixed = _shrink_to(fixed_full, spacing_mm, linear=True)
        fixed_mask = _shrink_to(grid.image(fit.astype(np.uint8)), spacing_mm, linear=False)
        moving = _atlas_shrunk("t1", round(spacing_mm, 1))
        fixed_brain = _shrink_to(grid.image(brain.astype(np.uint8)), spacing_mm, linear=False)
        moving_brain = _atlas_shrunk("brain", round(spacing_mm, 1))
        try:
            with _single_threaded():
                transform = _register(fixed, moving, fixed_mask, fixed_brain, moving_brain, self.affine_iterations,
                                      self.bspline_spacing_mm, self.bspline_iterations,
                                      self.registration_sampling, self.registration_seed)
        except RuntimeError as exc:
            overlap = "overlap" in str(exc).lower()
            reason = ("the atlas brain and the case's brain stopped overlapping" if overlap
                      else " ".join(str(exc).split())[-100:])
            raise RegistrationError(f"registration of the ICBM152 atlas to the case failed ({reason}); "
                                    "is this a whole brain?") from None
        # Displacements sampled on the coarse grid, then applied at full resolution: far faster
        # than evaluating the B-spline at every voxel, and the field is smooth at 4 mm anyway.
        field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(),
                                                  fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
        dense = sitk.DisplacementFieldTransform(field)
        # Warp onto a 2x coarser copy of the case grid, then interpolate up: the priors are smooth.
        half = sitk.BinShrink(fixed_full, [2, 2, 2])
        warped = [sitk.GetArrayFromImage(sitk.Resample(
            sitk.Resample(data[name], half, dense, sitk.sitkLinear, 0.0, sitk.sitkFloat32),
            fixed_full, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)) for name in ("gm", "wm", "brain")]
        dice = 2.0 * float(((warped[2] > 0.5) & brain).sum()) / max(int((warped[2] > 0.5).sum() + brain.sum()), 1)
        if not dice >= self.min_brain_dice:
            raise RegistrationError(f"registration of the ICBM152 atlas to the case failed: its brain overlaps the "
                                    f"case's brain with Dice {dice:.2f} (< {self.min_brain_dice}); is this a whole brain?")
        return warped[0], warped[1], warped[2]

    def _fit(self, channels: list[np.ndarray], names: list[str], priors: np.ndarray, brain: np.ndarray,
             fit: np.ndarray, informative: np.ndarray, edge: np.ndarray,
             peritumour: np.ndarray | None = None) -> np.ndarray:
        """EM with voxel-wise priors on ``fit``, then posteriors with an MRF on every brain voxel.

        ``informative``: voxels whose intensities count (not tumour, no non-positive value);
        ``edge``: the band at the brain's edge (see :attr:`edge_mm`).
        """
        # Scale each channel by its healthy median and clip the far tails (vessels, residual skull)
        # so a handful of extreme voxels cannot drag a class mean.
        features = []
        for channel in channels:
            low, median, high = np.percentile(channel[fit], [0.5, 50, 99.5])
            features.append(np.clip(channel, low, high) / max(float(median), 1e-6))
        x_all = np.stack(features, axis=-1)  # (k, j, i, c)
        index = np.flatnonzero(fit)
        index = index[:: max(1, index.size // self.max_samples)]
        x = x_all.reshape(-1, x_all.shape[-1])[index]
        # The class parameters are estimated with the full atlas prior, which anchors each class to
        # its anatomy; the labels then weigh the prior by ``prior_weight`` only.
        log_prior = self.fit_prior_weight * np.log(priors.reshape(3, -1)[:, index].T)  # (n, 3)
        responsibilities = _normalise(log_prior.copy())
        for _ in range(self.em_iterations):
            means, covariances = _gaussian_parameters(x, responsibilities, self.tied_covariance)
            responsibilities = _normalise(log_prior + _log_gaussian(x, means, covariances))
        means, covariances = _gaussian_parameters(x, responsibilities, self.tied_covariance)

        flat = x_all.reshape(-1, x_all.shape[-1])
        inside = np.flatnonzero(brain & informative)
        base = (self.prior_weight * np.log(priors)).astype(np.float32)
        values = _log_gaussian(flat[inside], means, covariances)
        if peritumour is not None and len(names) > 1 and peritumour.any():
            # The T1 marginal of each class's Gaussian: its T1 mean and variance.
            t1 = names.index("t1")
            near = peritumour.reshape(-1)[inside]
            values[near] = _log_gaussian(flat[inside][near][:, [t1]], means[:, [t1]],
                                         np.ascontiguousarray(covariances[:, [t1]][:, :, [t1]]))
        for c in range(3):
            base[c].reshape(-1)[inside] += values[:, c]
        q = _softmax(base.copy()) * brain
        for _ in range(self.mrf_iterations if self.beta > 0 else 0):
            q = _softmax(base + self.beta * _neighbour_mean(q)) * brain
        posterior = base + self.beta * _neighbour_mean(q)
        labels = (np.argmax(posterior, axis=0) + 1).astype(np.uint8)
        labels[~brain] = 0
        if "t2" in names:
            # CSF is the brightest tissue on T2.  At the brain's edge, voxels labelled CSF for being
            # dark on T1 but darker on T2 than halfway to grey matter are the resampled scan's
            # blend of cortex with the zero background: they take the likelier of GM and WM.
            channel = names.index("t2")
            threshold = means[1, channel] + self.edge_t2_level * (means[0, channel] - means[1, channel])
            blend = edge & (labels == 1) & (x_all[..., channel] < threshold)
            labels[blend] = (np.argmax(posterior[1:, blend], axis=0) + 2).astype(np.uint8)
        return labels


# --- helpers -----------------------------------------------------------------------------------


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    found = ndimage.find_objects(mask.astype(np.uint8))[0]
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(found, mask.shape))


def _crop_grid(grid: Grid, box: tuple[slice, ...]) -> Grid:
    start_ijk = np.array([box[2].start, box[1].start, box[0].start], dtype=float)
    origin = np.asarray(grid.origin) + grid.index_to_lps_matrix @ start_ijk
    size = (box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start)
    return Grid(size, grid.spacing, tuple(float(v) for v in origin), grid.direction)  # type: ignore[arg-type]


def _grow(mask: np.ndarray, margin_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """``mask`` grown by ``margin_mm`` (Euclidean), computed in the mask's bounding box only."""
    return _grow_by(mask, (margin_mm,), spacing)[0]


def _grow_by(mask: np.ndarray, margins_mm: tuple[float, ...],
             spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """``mask`` grown by each of ``margins_mm``, from one distance transform (for the largest)."""
    reach = max(margins_mm)
    if reach <= 0 or not mask.any():
        return [mask.copy() for _ in margins_mm]
    pad = [int(math.ceil(reach / s)) + 1 for s in spacing[::-1]]
    found = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(slice(max(f.start - p, 0), min(f.stop + p, n)) for f, p, n in zip(found, pad, mask.shape))
    # The nearest mask voxel lies inside the mask's own bounding box, which every box contains:
    # distances are the same whichever margin sized the box.
    distance = ndimage.distance_transform_edt(~mask[box], sampling=spacing[::-1])
    grown = []
    for margin_mm in margins_mm:
        out = mask.copy() if margin_mm <= 0 else np.zeros_like(mask)
        if margin_mm > 0:
            out[box] = distance <= margin_mm
        grown.append(out)
    return grown


@functools.lru_cache(maxsize=4)
def _atlas_shrunk(name: str, spacing_mm: float) -> sitk.Image:
    image = atlas()[name]
    return _shrink_to(sitk.Cast(image, sitk.sitkUInt8) if name == "brain" else image, spacing_mm, linear=name != "brain")


def _shrink_to(image: sitk.Image, spacing_mm: float, linear: bool) -> sitk.Image:
    """Resample onto a coarser grid of about ``spacing_mm`` (block averages for intensities)."""
    factors = [max(1, int(round(spacing_mm / s))) for s in image.GetSpacing()]
    if all(f == 1 for f in factors):
        return image
    if linear:
        sigma = [0.5 * f * s for f, s in zip(factors, image.GetSpacing())]
        image = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma)
        return sitk.BinShrink(image, factors)
    return sitk.Cast(sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors) > 0.5, sitk.sitkUInt8)


def _n4(array: np.ndarray, mask: np.ndarray, grid: Grid, spacing_mm: float, levels: int,
        iterations: int) -> np.ndarray:
    """Divide out the N4 bias field estimated on a copy shrunk to about ``spacing_mm``."""
    image = grid.image(array.astype(np.float32))
    mask_image = grid.image(mask.astype(np.uint8))
    factors = [max(1, int(round(spacing_mm / s))) for s in grid.spacing]
    small, small_mask = sitk.Shrink(image, factors), sitk.Shrink(mask_image, factors)
    if sitk.GetArrayViewFromImage(small_mask).sum() < 50:
        return array.astype(np.float32)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([iterations] * levels)
    with _single_threaded():
        n4.Execute(small, small_mask)
        log_bias = n4.GetLogBiasFieldAsImage(small)
    log_bias = sitk.Resample(log_bias, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return (array / np.exp(sitk.GetArrayFromImage(log_bias))).astype(np.float32)


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run ITK filters on one thread: the label map must not depend on the machine.

    ITK's registration metrics and N4 sum per-thread partial results, so the thread count
    changes the last bits of each gradient, and over a hundred optimiser steps that grows
    into a different transform.  The methods' own thread settings do not reach the
    metric, only the global default does.  The work runs on 6 mm copies, so one thread
    costs little.
    """
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _register(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, fixed_brain: sitk.Image,
              moving_brain: sitk.Image, affine_iterations: int, bspline_spacing_mm: float,
              bspline_iterations: int, sampling: float, seed: int) -> sitk.Transform:
    """Affine then B-spline registration of the atlas T1 (moving) to the case T1 (fixed)."""
    # Centre the brains on each other (their masks' centres of mass).  Computed here rather than
    # by sitk.CenteredTransformInitializer, whose MOMENTS mode was measured to return a different
    # translation (0.1-0.3 mm) on repeated calls with the same images in one process.
    fixed_centre, moving_centre = (np.asarray(image.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in ndimage.center_of_mass(sitk.GetArrayFromImage(image) > 0)[::-1]]))
        for image in (fixed_brain, moving_brain))
    initial = sitk.AffineTransform(3)
    initial.SetCenter([float(v) for v in fixed_centre])
    initial.SetTranslation([float(v) for v in moving_centre - fixed_centre])
    # A brain far smaller or larger than an adult's (a child, a phantom) starts from the volume
    # ratio, which the optimiser could not bridge from afar; adult brains start unscaled.
    volumes = [float(sitk.GetArrayViewFromImage(image).sum()) * float(np.prod(image.GetSpacing()))
               for image in (fixed_brain, moving_brain)]
    if min(volumes) > 0 and not 0.5 <= volumes[1] / volumes[0] <= 2.0:
        initial.SetMatrix((np.eye(3) * (volumes[1] / volumes[0]) ** (1.0 / 3.0)).ravel().tolist())
    affine = _method(fixed_mask, bins=32, sampling=sampling, seed=seed)
    affine.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=affine_iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    affine.SetOptimizerScalesFromPhysicalShift()
    affine.SetShrinkFactorsPerLevel([2, 1])
    affine.SetSmoothingSigmasPerLevel([1.0, 0.0])
    affine.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    affine.SetInitialTransform(initial, inPlace=True)
    affine_transform = affine.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))
    if bspline_iterations <= 0:
        return affine_transform
    extent = [sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, int(math.ceil(e / bspline_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    deformable = _method(fixed_mask, bins=32, sampling=sampling, seed=seed)
    deformable.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=bspline_iterations,
                                    maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * bspline_iterations,
                                    costFunctionConvergenceFactor=1e7)
    deformable.SetMovingInitialTransform(affine_transform)
    deformable.SetInitialTransform(bspline, inPlace=True)
    try:
        deformable.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))
    except RuntimeError:
        return affine_transform
    composite = sitk.CompositeTransform([affine_transform, bspline])
    # The deformable step must improve the fit of the brain outlines; on some scans (a large
    # tumour, a weak T1) mutual information pulls it astray, and the affine result is kept.
    if _brain_dice(fixed_brain, moving_brain, composite) < _brain_dice(fixed_brain, moving_brain, affine_transform):
        return affine_transform
    return composite


def _brain_dice(fixed_brain: sitk.Image, moving_brain: sitk.Image, transform: sitk.Transform) -> float:
    # A copy, not a view: a view of the temporary resampled image would read freed memory.
    warped = sitk.GetArrayFromImage(sitk.Resample(moving_brain, fixed_brain, transform,
                                                  sitk.sitkNearestNeighbor, 0)) > 0
    fixed = sitk.GetArrayViewFromImage(fixed_brain) > 0
    return 2.0 * float((warped & fixed).sum()) / max(int(warped.sum() + fixed.sum()), 1)


def _method(fixed_mask: sitk.Image, bins: int, sampling: float, seed: int) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    # A regular quarter of the voxels with a fixed seed: deterministic, and a fifth of the time
    # of every voxel (measured on a BraTS case: 0.98 s vs 4.87 s CPU; 2.9 % of labels change).
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(sampling, seed)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetNumberOfThreads(1)
    return method


def _tissue_priors(gm: np.ndarray, wm: np.ndarray, floor: float) -> np.ndarray:
    """(3, ...) CSF/GM/WM prior probabilities; CSF = 1 - GM - WM; a uniform share mixed in."""
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    total = gm + wm
    scale = np.where(total > 1, 1.0 / np.maximum(total, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = 1.0 - gm - wm
    priors = np.stack([csf, gm, wm]).astype(np.float32)
    priors = (1.0 - floor) * priors + floor / 3.0
    return np.maximum(priors, 1e-4)


def _gaussian_parameters(x: np.ndarray, weights: np.ndarray, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weighted means (3, c) and covariances (3, c, c), regularised against collapse.

    ``tied``: one covariance pooled over the classes (boundaries halfway between the means).
    """
    totals = weights.sum(axis=0) + 1e-9
    means = (weights.T @ x) / totals[:, None]
    overall = np.atleast_2d(np.cov(x.T))
    covariances = []
    for k in range(3):
        centred = x - means[k]
        cov = (weights[:, k, None] * centred).T @ centred / totals[k]
        # A floor of 1 % of the overall variance keeps a class from shrinking onto a spike.
        covariances.append(cov + 0.01 * np.diag(np.diag(overall)))
    stacked = np.stack(covariances)
    if tied:
        stacked = np.broadcast_to((stacked * totals[:, None, None]).sum(axis=0) / totals.sum(), stacked.shape)
    return means, np.ascontiguousarray(stacked)


def _log_gaussian(x: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], means.shape[0]), np.float32)
    for k in range(means.shape[0]):
        inverse = np.linalg.inv(covariances[k])
        _, logdet = np.linalg.slogdet(covariances[k])
        centred = (x - means[k]).astype(np.float32)
        mahalanobis = np.einsum("nc,cd,nd->n", centred, inverse.astype(np.float32), centred)
        out[:, k] = -0.5 * (mahalanobis + logdet)
    return out


def _normalise(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


__all__ = ["AtlasPriorEM", "RegistrationError", "FIT_CONTRASTS", "atlas"]
