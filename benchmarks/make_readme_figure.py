"""The figure of raw clinical scans in docs/reading-scans.md: the brain the plugin extracts, and the
default model's map.

Run by hand (matplotlib is a development tool here, not a plugin dependency):
    NAPARI_BRAIN_UAD_DATA=/work/shared/data .venv/bin/python benchmarks/make_readme_figure.py \\
        [--patient patient01] [--output docs/clinical_ms_scans.png]

One MS patient's first clinical study (``mslub_longitudinal_raw``: T1W, T2W and FLAIR as
acquired, skull on, 3-4 mm slices, each on its own grid) is analysed as a user would run it:
no brain mask, so the brain is extracted (``analysis.analyse_scan``, the bundled default model,
its default scorer and healthy-percentile threshold). One row per contrast: an axial slice
through the lateral ventricles with the extracted brain's outline, and the same slice with the
model's anomaly map and what it flags at the healthy threshold.

The default model is a T1 model. Its map on a T2W or a FLAIR compares the scan with a T1-like
reconstruction, so it is drawn but titled as not meaningful (the plugin warns about the same
mismatch from the scans' names).

The slice is chosen on the T1W, where the lateral ventricles are the largest dark region near
the midline; the T2W and FLAIR show the slice nearest the same point in the scanner's space
(the three were acquired in one session, so this is the same anatomy up to the patient's
movement and each series' tilt). Drawn in the radiological convention: the patient's right
on the viewer's left, anterior up.
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from bench_detection import DATA, REPOSITORY  # noqa: E402
from napari_brain_uad.analysis import AnalysisSettings, analyse_scan  # noqa: E402
from napari_brain_uad.nifti import ScanWarning, read_nifti  # noqa: E402
from napari_brain_uad.model_registry import resolve_model  # noqa: E402
from napari_brain_uad.models import load_model  # noqa: E402
from napari_brain_uad.thresholds import default_threshold  # noqa: E402

CONTRASTS = ("T1W", "T2W", "FLAIR")
WIDTH_PX = 1400
CAPTION = ("Raw clinical scans of one MS patient ({patient}, first study: skull on, 3–4 mm slices), "
           "MSLUB longitudinal (Lesjak et al. 2016), CC BY.\n"
           "Radiological view: the patient's right on the left. Green: the brain the plugin extracted. "
           "Right: the default model ({model}),\n"
           "anomaly map (residual; scores under half the threshold not drawn); cyan: flagged at its "
           "healthy threshold ({threshold}).")
MARGIN_MM = 8.0  # around the brain's box, so the outline is seen against the skull
# The PNG's palette (the documentation's budget is 300 KB): 32 greys, the map's colour map in 16 steps
# and the two outlines. Drawn with exactly these colours, nothing is lost in the conversion.
GREY_LEVELS = 32
MAP_COLOURS = matplotlib.colormaps["inferno"].resampled(16)
BRAIN_OUTLINE, FLAGGED_OUTLINE = "#3ddc4a", "#00e5ff"


class RasVolume:
    """A scan's arrays turned to canonical RAS voxel order (axis-aligned: the clinical affines
    are slightly oblique, which a figure can ignore) and the affine of that grid."""

    def __init__(self, affine: np.ndarray):
        self.orientation = nib.io_orientation(affine)
        self.source_affine = affine

    def turn(self, array: np.ndarray) -> np.ndarray:
        return nib.apply_orientation(array, self.orientation)

    def affine(self, shape) -> np.ndarray:
        return self.source_affine @ nib.orientations.inv_ornt_aff(self.orientation, shape)

    def spacing(self, shape) -> np.ndarray:
        return np.linalg.norm(self.affine(shape)[:3, :3], axis=0)


def ventricle_slice(image: np.ndarray, brain: np.ndarray, spacing: np.ndarray) -> int:
    """The axial slice (RAS z) with the most dark voxels near the midline, deep in the brain: on a
    T1 the bodies of the lateral ventricles. Sulcal CSF is kept out by eroding the brain 15 mm
    in-plane."""
    deep = ndimage.binary_erosion(brain, structure=np.ones((3, 3, 1), bool),
                                  iterations=max(1, int(round(15 / spacing[0]))))
    dark = image < np.percentile(image[brain], 15)
    centre_x = np.argwhere(brain)[:, 0].mean()
    near_midline = np.abs(np.arange(brain.shape[0]) - centre_x) * spacing[0] < 25
    counts = (dark & deep & near_midline[:, None, None]).sum(axis=(0, 1))
    return int(np.argmax(counts))


def analyse(patient: str, model, settings, threshold) -> dict:
    """Each contrast analysed without a mask: its arrays in RAS order, and what it flags."""
    results = {}
    for contrast in CONTRASTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ScanWarning)  # oblique affines: irrelevant to a picture
            scan = read_nifti(DATA / f"mslub_longitudinal_raw/{patient}/{contrast}.nii.gz")
            analysis = analyse_scan(scan, model, settings=settings)
        ras = RasVolume(scan.geometry.affine)
        shape = ras.turn(scan.data).shape
        flagged = analysis.mask_at(threshold.value).astype(bool)  # what an exported mask holds
        results[contrast] = {
            "image": ras.turn(scan.data.astype(np.float32)),
            "brain": ras.turn(analysis.brain.mask),
            "map": ras.turn(analysis.anomaly_map),
            "flagged": ras.turn(flagged),
            "flagged_ml": float(np.count_nonzero(flagged)) * float(np.prod(scan.geometry.spacing)) / 1000.0,
            "affine": ras.affine(shape),
            "spacing": ras.spacing(shape),
            "brain_ml": analysis.brain.volume_ml,
        }
        print(f"  {contrast}: {analysis.brain.describe()}", flush=True)
    return results


def slices_through_one_point(results: dict) -> dict[str, int]:
    """The ventricle slice on the T1W, and for the others the slice nearest the same point."""
    t1 = results["T1W"]
    z = ventricle_slice(t1["image"], t1["brain"], t1["spacing"])
    x, y = np.argwhere(t1["brain"][:, :, z]).mean(axis=0)
    point = t1["affine"] @ np.array([x, y, z, 1.0])
    chosen = {"T1W": z}
    for contrast in CONTRASTS[1:]:
        other = results[contrast]
        index = np.linalg.solve(other["affine"], point)[2]
        chosen[contrast] = int(np.clip(round(index), 0, other["image"].shape[2] - 1))
    return chosen


def radiological(plane: np.ndarray) -> np.ndarray:
    """An axial RAS plane (x, y) as an image: rows from anterior (top) to posterior, columns
    from the patient's right (left of the picture) to their left."""
    return plane.T[::-1, ::-1]


def figure(results: dict, chosen: dict, threshold, model_name: str, patient: str) -> plt.Figure:
    rows = len(CONTRASTS)
    fig, axes = plt.subplots(rows, 2, figsize=(7.0, 3.55 * rows + 0.5), dpi=WIDTH_PX / 7.0,
                             gridspec_kw={"wspace": 0.02, "hspace": 0.09})
    fig.subplots_adjust(left=0.05, right=0.99, top=0.975, bottom=0.045)
    for row, contrast in enumerate(CONTRASTS):
        result, z = results[contrast], chosen[contrast]
        image, brain = radiological(result["image"][:, :, z]), radiological(result["brain"][:, :, z])
        anomaly, flagged = radiological(result["map"][:, :, z]), radiological(result["flagged"][:, :, z])
        spacing_x, spacing_y = result["spacing"][:2]
        # Cropped to the brain's box over all slices, and a margin: the head fills the panel.
        footprint = radiological(result["brain"].any(axis=2))
        brain_rows, brain_columns = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
        top = max(0, brain_rows.min() - int(MARGIN_MM / spacing_y))
        bottom = min(image.shape[0], brain_rows.max() + 1 + int(MARGIN_MM / spacing_y))
        left = max(0, brain_columns.min() - int(MARGIN_MM / spacing_x))
        right = min(image.shape[1], brain_columns.max() + 1 + int(MARGIN_MM / spacing_x))
        crop = (slice(top, bottom), slice(left, right))
        extent = (0, (right - left) * spacing_x, (bottom - top) * spacing_y, 0)  # mm: true proportions
        low, high = np.percentile(result["image"][result["brain"]], (0.5, 99.5))
        grey = dict(cmap="gray", vmin=low, vmax=high, extent=extent, interpolation="nearest")
        outline = dict(levels=[0.5], extent=(extent[0], extent[1], extent[3], extent[2]), origin="upper")

        outline_axis, map_axis = axes[row]
        outline_axis.imshow(image[crop], **grey)
        outline_axis.contour(brain[crop].astype(float), colors=BRAIN_OUTLINE, linewidths=0.9, **outline)
        outline_axis.set_title(f"{contrast}: brain extracted, {result['brain_ml']:.0f} mL", fontsize=8.5, pad=3)
        outline_axis.set_ylabel(f"{contrast}, slice {z + 1} of {result['image'].shape[2]}", fontsize=8)

        map_axis.imshow(image[crop], **grey)
        # Scores under half the threshold are left out, so the anatomy stays readable.
        shown = np.ma.masked_where(~brain[crop] | (anomaly[crop] < 0.5 * threshold.value), anomaly[crop])
        map_axis.imshow(shown, cmap=MAP_COLOURS, vmin=0.5 * threshold.value, vmax=3 * threshold.value,
                        extent=extent, interpolation="nearest")
        if flagged[crop].any():
            map_axis.contour(flagged[crop].astype(float), colors=FLAGGED_OUTLINE, linewidths=0.9, **outline)
        if contrast == "T1W":
            title = f"T1 model's map: {result['flagged_ml']:.1f} mL flagged in the scan"
        else:
            title = f"T1 model on a {contrast}: not meaningful ({result['flagged_ml']:.0f} mL flagged)"
        map_axis.set_title(title, fontsize=8.5, pad=3)
        for axis in (outline_axis, map_axis):
            axis.set_xticks([]), axis.set_yticks([])
            for x, letter, align in ((0.03, "R", "left"), (0.97, "L", "right")):
                axis.text(x, 0.97, letter, transform=axis.transAxes, color="white", fontsize=8, va="top", ha=align)
    fig.text(0.5, 0.035, CAPTION.format(patient=patient, model=model_name, threshold=threshold.name),
             ha="center", va="top", fontsize=7, linespacing=1.4)
    return fig


def palette() -> np.ndarray:
    """The figure's colours, (n, 3) uint8."""
    greys = [(level, level, level) for level in np.linspace(0, 255, GREY_LEVELS).round()]
    mapped = [tuple(255 * np.asarray(MAP_COLOURS(index)[:3])) for index in range(MAP_COLOURS.N)]
    outlines = [tuple(int(outline[i:i + 2], 16) for i in (1, 3, 5)) for outline in (BRAIN_OUTLINE, FLAGGED_OUTLINE)]
    return np.asarray(greys + mapped + outlines).round().astype(np.uint8)


def save_small_png(fig: plt.Figure, path: Path) -> None:
    """A palette PNG drawn at its final width: nearest-neighbour scan pixels and a fixed palette
    of under 100 colours compress several times better than a smooth full-colour picture. Each
    pixel takes the nearest palette colour exactly (Pillow's own mapping approximates: white
    came out grey)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    pixels = np.asarray(Image.open(buffer).convert("RGB"))
    colours = palette()
    distinct, inverse = np.unique(pixels.reshape(-1, 3), axis=0, return_inverse=True)
    nearest = cKDTree(colours.astype(float)).query(distinct.astype(float))[1]
    image = Image.fromarray(nearest[inverse.ravel()].reshape(pixels.shape[:2]).astype(np.uint8))
    image.putpalette(colours.ravel().tolist())  # the indices become a palette ("P") image
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", default="patient01", choices=("patient01", "patient04"))
    parser.add_argument("--output", default=str(REPOSITORY / "docs/clinical_ms_scans.png"))
    args = parser.parse_args()
    model_path = resolve_model()
    model, metadata = load_model(model_path)
    settings = AnalysisSettings.for_model(metadata, device="cpu")
    threshold = default_threshold(metadata, settings.scorer)
    results = analyse(args.patient, model, settings, threshold)
    chosen = slices_through_one_point(results)
    print("  slices (RAS z): " + ", ".join(f"{contrast} {z}" for contrast, z in chosen.items()))
    fig = figure(results, chosen, threshold, model_path.name, args.patient)
    output = Path(args.output)
    save_small_png(fig, output)
    with Image.open(output) as saved:
        print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KB, {saved.width}×{saved.height} px, {saved.mode})")


if __name__ == "__main__":
    main()
