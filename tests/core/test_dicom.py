"""DICOM series in: real scans written as DICOM series read back with their exact voxels and
geometry, masks written from them overlay the DICOM pixels, and broken series are refused."""

from __future__ import annotations

import contextlib
import locale
import shutil
import warnings
from pathlib import Path

import napari
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from napari.components import ViewerModel

from napari_brain_uad import _reader, dicom
from napari_brain_uad.nifti import ScanError, ScanWarning, read_nifti, save_source_array
from napari_brain_uad.scan_reader import read_scan

PLUGIN = "napari-brain-uad"

# Thick oblique clinical FLAIR (uint16, 4 mm slices, LPS) and a 2 mm PSR T1 stored with a scale
# factor, so the series carries a rescale slope.
FLAIR = "mslub_longitudinal_raw/patient01/FLAIR.nii.gz"
IXI_T1 = "ixi_t1/IXI661-HH-2788_T1.nii.gz"
SCANS = {"flair": FLAIR, "ixi": IXI_T1}
SERIES_UIDS = {"flair": "1.2.826.0.1.3680043.9.7777.1.1", "ixi": "1.2.826.0.1.3680043.9.7777.1.2"}
STUDY_UID = "1.2.826.0.1.3680043.9.7777.1"

POSITION, ORIENTATION, RESCALE_SLOPE = "0020|0032", "0020|0037", "0028|1053"


# ------------------------------------------------------------------ writing a series as a scanner


@contextlib.contextmanager
def keeping_locale():
    """Undo what GDCM does to the process's locale when it writes decimal tags (LC_CTYPE becomes
    "C", so later subprocess output with non-ASCII characters no longer decodes)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@keeping_locale()
def write_series(nifti_path: Path, folder: Path, *, series_uid: str, description: str) -> None:
    """Write a NIfTI scan as an MR DICOM series, one file per slice, each placed by its own
    ImagePositionPatient / ImageOrientationPatient / PixelSpacing (LPS, as scanners write them).

    Array axis 0 of the NIfTI becomes the DICOM column index, axis 1 the row, axis 2 the slice.
    Scaled data are stored as integers with a rescale slope and intercept."""
    image = nib.load(nifti_path)
    stored = np.asarray(image.dataobj.get_unscaled())
    slope, intercept = float(image.dataobj.slope), float(image.dataobj.inter)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    spacing = np.linalg.norm(lps[:3, :2], axis=0)  # along axis 0 (between columns), axis 1 (between rows)
    directions = lps[:3, :2] / spacing
    shared_tags = {
        "0008|0060": "MR",
        "0020|000d": STUDY_UID,
        "0020|000e": series_uid,
        "0008|103e": description,
        ORIENTATION: "\\".join(f"{value:.8f}" for value in directions.T.ravel()),
        "0018|0050": f"{np.linalg.norm(lps[:3, 2]):.4f}",
    }
    if (slope, intercept) != (1.0, 0.0):
        slope = float(f"{slope:.10g}")  # a decimal string of at most 16 characters, as DICOM allows
        shared_tags.update({RESCALE_SLOPE: f"{slope:.10g}", "0028|1052": f"{intercept:.10g}",
                            "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "0"})
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()

    def write_slice(k: int) -> Path:
        rows_by_columns = stored[:, :, k].T
        rescaled = RESCALE_SLOPE in shared_tags
        pixels = rows_by_columns * slope + intercept if rescaled else rows_by_columns.astype(np.uint16)
        slice_image = sitk.GetImageFromArray(pixels)
        slice_image.SetSpacing(tuple(float(v) for v in spacing))  # GDCM writes PixelSpacing from it
        position = lps[:3, 3] + k * lps[:3, 2]
        tags = {**shared_tags, POSITION: "\\".join(f"{value:.6f}" for value in position),
                "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}"}
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(slice_image)
        return folder / f"IM{k:04d}.dcm"

    # Until ITK has read a DICOM file in this process, GDCM writes a rescaled MR slice as an
    # Enhanced MR file, without per-slice positions; so slice 0 is written and its header read
    # before every slice is written as classic MR.
    tag_numbers(write_slice(0), "0020|0013")
    for k in range(stored.shape[2]):
        write_slice(k)


@keeping_locale()
def rewrite_tag(file: Path, tag: str, value: str) -> None:
    """Change one tag of one slice file, keeping its pixels and every other tag."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    image = reader.Execute()[:, :, 0]
    for key in reader.GetMetaDataKeys():
        image.SetMetaData(key, reader.GetMetaData(key))
    image.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(file))
    writer.Execute(image)


def tag_numbers(file: Path, tag: str) -> np.ndarray:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(file))
    reader.ReadImageInformation()
    return np.array([float(value) for value in reader.GetMetaData(tag).split("\\")])


@pytest.fixture(scope="module")
def series_folders(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Each scan of SCANS written as a DICOM series in a folder of its own."""
    folders = {}
    for key, scan in SCANS.items():
        folders[key] = tmp_path_factory.mktemp(f"{key}_dicom")
        write_series(shared_data / scan, folders[key], series_uid=SERIES_UIDS[key], description=f"{key} test series")
    return folders


@pytest.fixture
def flair_copy(series_folders, tmp_path) -> Path:
    """A copy of the FLAIR series to break."""
    return Path(shutil.copytree(series_folders["flair"], tmp_path / "flair"))


def read_quietly(folder, **kwargs):
    """Read a series without the oblique-display warning the clinical FLAIR rightly raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        return dicom.read_dicom_series(folder, **kwargs)


def read_nifti_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        return read_nifti(path)


# ------------------------------------------------------------------ what a user cares about


@pytest.mark.parametrize("key", SCANS)
def test_series_reads_back_the_scans_voxels_and_affine(shared_data, series_folders, key):
    original = read_nifti_quietly(shared_data / SCANS[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        volume = read_scan(series_folders[key])
    assert volume.geometry.source == str(series_folders[key])
    assert volume.data.shape == original.data.shape
    np.testing.assert_allclose(volume.geometry.affine, original.geometry.affine, rtol=0, atol=1e-3)
    assert volume.geometry.axcodes == original.geometry.axcodes
    np.testing.assert_allclose(volume.data, original.data, rtol=1e-6, atol=0)


def test_rescale_slope_is_applied(shared_data, series_folders):
    """The T1's series stores integers with a rescale slope; the values read are the scaled ones."""
    first_file = sorted(series_folders["ixi"].iterdir())[0]
    slope = float(tag_numbers(first_file, RESCALE_SLOPE)[0])
    assert slope > 1.5
    volume = dicom.read_dicom_series(series_folders["ixi"])
    assert volume.data.dtype == np.float64
    stored = np.asarray(nib.load(shared_data / IXI_T1).dataobj.get_unscaled())
    np.testing.assert_allclose(volume.data, stored * slope, rtol=1e-9)


def test_mask_written_on_the_series_grid_overlays_the_dicom_pixels(series_folders, tmp_path):
    """A mask written from the series, read back as NIfTI, puts each voxel where the DICOM files
    put the pixel it was computed from: same position in the patient, same value."""
    folder = series_folders["flair"]
    volume = read_quietly(folder)
    threshold = np.percentile(volume.data, 90)
    path = save_source_array(volume.data > threshold, volume.geometry, tmp_path / "mask.nii.gz")
    mask = nib.load(path)
    assert mask.header.get_sform(coded=True)[1] == 1 and mask.header.get_qform(coded=True)[1] == 1
    assert mask.header["descrip"].item() == b"flair test series"

    dicom_slices = [DicomSlice(file) for file in sorted(folder.iterdir())]
    rng = np.random.default_rng(0)
    in_mask = np.argwhere(np.asarray(mask.dataobj) > 0)
    corners = [(0, 0, 0), (319, 0, 35), (0, 319, 17), (319, 319, 0)]
    for voxel in [*corners, *in_mask[rng.choice(len(in_mask), 6, replace=False)]]:
        lps = np.diag([-1.0, -1.0, 1.0]) @ nib.affines.apply_affine(mask.affine, voxel)
        pixel_value = pixel_at(dicom_slices, lps)
        assert pixel_value == volume.data[tuple(voxel)]
        assert (mask.dataobj[tuple(voxel)] > 0) == (pixel_value > threshold)


class DicomSlice:
    """One slice file as a DICOM viewer sees it: its plane in the patient and its pixels."""

    def __init__(self, file: Path):
        self.position = tag_numbers(file, POSITION)
        orientation = tag_numbers(file, ORIENTATION)
        self.along_row, self.down_column = orientation[:3], orientation[3:]
        self.between_rows, self.between_columns = tag_numbers(file, "0028|0030")
        self.pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))[0]


def pixel_at(slices: list[DicomSlice], lps: np.ndarray):
    """The pixel a DICOM viewer shows at a patient position (which must be a pixel centre)."""
    for one in slices:
        offset = lps - one.position
        if abs(offset @ np.cross(one.along_row, one.down_column)) < 1e-3:
            column, row = offset @ one.along_row / one.between_columns, offset @ one.down_column / one.between_rows
            assert abs(column - round(column)) < 1e-3 and abs(row - round(row)) < 1e-3
            return one.pixels[round(row), round(column)]
    raise AssertionError(f"no slice passes through {lps}")


# ------------------------------------------------------------------ napari


def test_napari_reader_opens_the_folder_like_the_nifti(shared_data, series_folders):
    reader = _reader.get_reader(str(series_folders["ixi"]))
    assert reader is not None
    (data, kwargs, layer_type), = reader(str(series_folders["ixi"]))
    (nifti_data, nifti_kwargs, _), = _reader.read_layers(str(shared_data / IXI_T1))
    assert layer_type == "image" and kwargs["name"] == "ixi test series"
    np.testing.assert_allclose(kwargs["scale"], nifti_kwargs["scale"], atol=1e-6)
    np.testing.assert_allclose(kwargs["translate"], nifti_kwargs["translate"], atol=1e-3)
    np.testing.assert_allclose(data, nifti_data, rtol=1e-6)


def test_label_drawn_in_napari_is_saved_on_the_series_grid(shared_data, series_folders, tmp_path):
    """Open the folder with napari, draw (threshold), save the Labels layer: the NIfTI has the
    series' voxels' affine, i.e. the original scan's."""
    viewer = ViewerModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        (image,) = viewer.open(str(series_folders["flair"]), plugin=PLUGIN)
    threshold = float(np.percentile(image.data, 90))
    labels = napari.layers.Labels((image.data > threshold).astype(np.uint8), scale=image.scale,
                                  translate=image.translate, metadata=image.metadata, name="lesions")
    out = tmp_path / "lesions.nii.gz"
    assert napari.save_layers(str(out), [labels], plugin=PLUGIN) == [str(out)]

    original, saved = nib.load(shared_data / FLAIR), nib.load(out)
    np.testing.assert_allclose(saved.affine, original.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(saved.dataobj) > 0, np.asarray(original.dataobj) > threshold)


def test_napari_reader_declines_folders_without_dicom(tmp_path, shared_data):
    (tmp_path / "notes.txt").write_text("not a scan")
    shutil.copy(shared_data / IXI_T1, tmp_path)
    assert _reader.get_reader(str(tmp_path)) is None
    assert _reader.get_reader(str(tmp_path / "missing")) is None


# ------------------------------------------------------------------ several series in a folder


@pytest.fixture
def two_series(series_folders, tmp_path) -> Path:
    folder = tmp_path / "two_series"
    folder.mkdir()
    for key, series_folder in series_folders.items():
        for file in series_folder.iterdir():
            shutil.copy(file, folder / f"{key}-{file.name}")
    return folder


def test_list_series_names_each_series_largest_first(two_series):
    found = dicom.list_series(two_series)
    assert [(series.uid, series.description, len(series.files)) for series in found] == [
        (SERIES_UIDS["ixi"], "ixi test series", 90), (SERIES_UIDS["flair"], "flair test series", 36)]


def test_folder_with_two_series_reads_the_larger_and_names_the_other(two_series):
    others = rf"The others: {SERIES_UIDS['flair']} \(flair test series, 36 files\)"
    with pytest.warns(ScanWarning, match=rf"reading the largest, {SERIES_UIDS['ixi']}.*{others}.*--series"):
        volume = dicom.read_dicom_series(two_series)
    assert volume.data.shape == (120, 120, 90)
    assert volume.geometry.source == f"{two_series} (series {SERIES_UIDS['ixi']})"


def test_series_uid_picks_the_other_series(two_series):
    volume = read_quietly(two_series, series_uid=SERIES_UIDS["flair"])
    assert volume.data.shape == (320, 320, 36)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScanWarning)
        assert read_scan(two_series, series_uid=SERIES_UIDS["flair"]).data.shape == (320, 320, 36)


def test_unknown_series_uid_is_refused_naming_the_series_there(two_series):
    holds = rf"the folder holds {SERIES_UIDS['ixi']} .*{SERIES_UIDS['flair']}"
    with pytest.raises(ScanError, match=rf"no DICOM series with UID 1\.2\.3; {holds}"):
        dicom.read_dicom_series(two_series, series_uid="1.2.3")


# ------------------------------------------------------------------ broken series


def test_missing_slice_is_refused(flair_copy):
    (flair_copy / "IM0017.dcm").unlink()
    gap = r"a gap of 8\.00 mm between IM0016\.dcm and IM0018\.dcm .*4\.00 mm apart \(about 1 missing\)"
    with pytest.raises(ScanError, match=rf"missing slices: {gap}"):
        read_quietly(flair_copy)


def test_uneven_slice_spacing_is_refused(flair_copy):
    file = flair_copy / "IM0017.dcm"
    normal = np.cross(*tag_numbers(file, ORIENTATION).reshape(2, 3))
    moved = tag_numbers(file, POSITION) + 1.0 * normal  # a quarter of a slice
    rewrite_tag(file, POSITION, "\\".join(f"{value:.6f}" for value in moved))
    with pytest.raises(ScanError, match=r"uneven slice spacing: .*IM0017\.dcm lies 1\.000 mm from a regular grid"):
        read_quietly(flair_copy)


def test_two_slices_at_one_position_are_refused(flair_copy):
    position = "\\".join(f"{value:.6f}" for value in tag_numbers(flair_copy / "IM0016.dcm", POSITION))
    rewrite_tag(flair_copy / "IM0017.dcm", POSITION, position)
    same = r"IM001[67]\.dcm and IM001[67]\.dcm lie at the same position"
    with pytest.raises(ScanError, match=rf"{same}; the series holds more than one volume"):
        read_quietly(flair_copy)


def test_mixed_orientations_are_refused(flair_copy):
    rewrite_tag(flair_copy / "IM0017.dcm", ORIENTATION, "1\\0\\0\\0\\0\\-1")  # a coronal slice
    with pytest.raises(ScanError, match=r"mixed slice orientations: 1 of 36 slices .*IM0017\.dcm"):
        read_quietly(flair_copy)


def test_slices_follow_their_instance_numbers(shared_data, flair_copy):
    """Numbered from the top down instead, the array runs the other way, on the same exact grid."""
    files = sorted(flair_copy.iterdir())
    for k, file in enumerate(files):
        rewrite_tag(file, "0020|0013", str(len(files) - k))
    volume = read_quietly(flair_copy)
    original = read_nifti_quietly(shared_data / FLAIR)
    np.testing.assert_array_equal(volume.data, original.data[:, :, ::-1])
    last_slice_first = np.diag([1.0, 1.0, -1.0, 1.0])
    last_slice_first[2, 3] = len(files) - 1
    np.testing.assert_allclose(volume.geometry.affine, original.geometry.affine @ last_slice_first, atol=1e-3)


def test_single_slice_is_refused(series_folders, tmp_path):
    shutil.copy(series_folders["flair"] / "IM0017.dcm", tmp_path)
    with pytest.raises(ScanError, match=r"single 2D slice \(IM0017\.dcm\); a 3D volume is needed"):
        read_quietly(tmp_path)


def test_folder_without_dicom_is_refused(tmp_path, shared_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScanError, match=r"empty: no DICOM series in this folder"):
        read_scan(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a scan")
    shutil.copy(shared_data / IXI_T1, other)
    with pytest.raises(ScanError, match=r"other: no DICOM series in this folder"):
        read_scan(other)


def test_single_dicom_file_asks_for_its_folder(series_folders):
    with pytest.raises(ScanError, match=r"IM0000\.dcm: is a single DICOM file; give the folder"):
        read_scan(series_folders["flair"] / "IM0000.dcm")


def test_read_scan_reads_nifti_files_as_before(shared_data):
    path = shared_data / IXI_T1
    np.testing.assert_array_equal(read_scan(path).data, read_nifti(path).data)
    with pytest.raises(ScanError, match="series UID was given"):
        read_scan(path, series_uid=SERIES_UIDS["ixi"])


def test_brain_uad_score_reads_a_dicom_folder_and_writes_on_its_grid(shared_data, series_folders, tmp_path):
    """The command line on a DICOM series (the IXI T1, with its brain mask as NIfTI): the map
    and mask come out on the series' grid, with the affine of the scan the series was made from."""
    from napari_brain_uad.cli import main

    outputs = {name: tmp_path / f"{name}.nii.gz" for name in ("map", "mask")}
    code = main(["score", str(series_folders["ixi"]),
                 "--brain-mask", str(shared_data / "ixi_t1/brainmask/IXI661-HH-2788_brainmask.nii.gz"),
                 "--out-map", str(outputs["map"]), "--out-mask", str(outputs["mask"]), "--quiet"])
    assert code == 0
    original = nib.load(shared_data / IXI_T1)
    for path in outputs.values():
        written = nib.load(path)
        assert written.shape == original.shape
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-3)
    score_map = np.asarray(nib.load(outputs["map"]).dataobj)
    brain = np.asarray(nib.load(shared_data / "ixi_t1/brainmask/IXI661-HH-2788_brainmask.nii.gz").dataobj) > 0
    assert score_map[brain].any() and not score_map[~brain].any()  # scored inside the brain only


def test_the_series_description_tells_the_contrast(two_series):
    """The model for a DICOM scan is picked by its SeriesDescription (the folder's name says nothing here)."""
    from napari_brain_uad.model_registry import read_scan_contrast, scan_contrast

    assert dicom.folder_series_description(two_series) == "ixi test series"  # the largest, as read
    assert scan_contrast(two_series) is None
    assert scan_contrast(two_series, series_uid=SERIES_UIDS["flair"]) == "FLAIR"
    assert dicom.folder_series_description(two_series, "1.2.3") == ""  # reading it says why
    volume = read_quietly(two_series, series_uid=SERIES_UIDS["flair"])
    assert read_scan_contrast(volume.geometry) == "FLAIR"  # from the header, as a napari layer carries it
