"""Rebuild the sample registry (``sample_data/samples.json``) from a local copy of the sample
files, and the tables in ``sample_data/README.md`` from the registry.

Run by maintainers when a sample is added: ``python scripts/build_sample_registry.py DATA_DIR``.
Hashes are taken from the local files, which are byte-for-byte the raw files at the pinned
commits named below; the IXI brain mask is derived (DLMUSE label > 0) and so is pinned by the
hash of its voxels instead (see ``napari_brain_uad.sample_registry``).
``python scripts/build_sample_registry.py --tables`` rewrites only the README's tables from the
registry as it is (after a hand edit of ``samples.json``); a test checks that they agree.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

NICHART = "https://raw.githubusercontent.com/CBICA/NiChart_Project/494c25e00cbd3fea601f5f27970f2e2de876a8ac/test_data/processed/IXI"
MSLUB = "https://raw.githubusercontent.com/muschellij2/open_ms_data/65704901f60650824565aa5a4818611aa89716f4/cross_sectional/MNI/patient26"
DEEPMEDIC = "https://raw.githubusercontent.com/deepmedic/deepmedic/e10ba7c3570d06194f5dadca91d99d5e7bba7de5/examples/dataForExamples/brats2015TrainingData/test/brats_2013_pat0001_1"
MSLUB_SUFFIX = "_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
IXI_SUBJECT = "IXI661-HH-2788"

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE = REPOSITORY / "src"
REGISTRY = REPOSITORY / "sample_data" / "samples.json"
README = REPOSITORY / "sample_data" / "README.md"
TABLES_START = "<!-- tables written by scripts/build_sample_registry.py from samples.json; edit there -->"
TABLES_END = "<!-- end of the written tables -->"

DATASETS = {
    "ixi": {
        "name": "IXI dataset (Hammersmith Hospital, 3T), as processed by the NiChart project",
        "licence": "CC BY-SA 3.0",
        "attribution": "IXI dataset, brain-development.org/ixi-dataset; processing by CBICA NiChart",
    },
    "mslub": {
        "name": "MSLUB: multiple sclerosis patients with multi-rater consensus lesion masks",
        "licence": "CC BY",
        "attribution": "Lesjak et al., Neuroinformatics 2018, doi:10.1007/s12021-017-9348-7",
    },
    "brats2013": {
        "name": "BRATS 2013 glioma case, as shipped with DeepMedic's examples (z-scored in the brain)",
        "licence": "CC BY-NC-SA 3.0",
        "attribution": "Menze et al., IEEE TMI 2015, doi:10.1109/TMI.2014.2377694; DeepMedic (Kamnitsas)",
    },
}

# local path (the layout of ../shared/data) -> (dataset, url, derived mask?)
FILES = {
    f"ixi_t1/{IXI_SUBJECT}_T1.nii.gz": ("ixi", f"{NICHART}/Nifti/T1/{IXI_SUBJECT}_T1.nii.gz", False),
    f"ixi_t1/brainmask/{IXI_SUBJECT}_brainmask.nii.gz": (
        "ixi", f"{NICHART}/DLMUSE/{IXI_SUBJECT}_T1_DLMUSE.nii.gz", True),
    "mslub/patient26/T1.nii.gz": ("mslub", f"{MSLUB}/T1{MSLUB_SUFFIX}", False),
    "mslub/patient26/T1c.nii.gz": ("mslub", f"{MSLUB}/T1POST{MSLUB_SUFFIX}", False),
    "mslub/patient26/T2.nii.gz": ("mslub", f"{MSLUB}/T2{MSLUB_SUFFIX}", False),
    "mslub/patient26/FLAIR.nii.gz": ("mslub", f"{MSLUB}/FLAIR{MSLUB_SUFFIX}", False),
    "mslub/patient26/lesionmask.nii.gz": (
        "mslub", f"{MSLUB}/GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz", False),
    "brats2013/pat0001/FLAIR.nii.gz": ("brats2013", f"{DEEPMEDIC}/Flair_subtrMeanDivStd.nii.gz", False),
    "brats2013/pat0001/T1c.nii.gz": ("brats2013", f"{DEEPMEDIC}/T1c_subtrMeanDivStd.nii.gz", False),
    "brats2013/pat0001/tumourmask.nii.gz": ("brats2013", f"{DEEPMEDIC}/OTMultiClass.nii.gz", False),
    "brats2013/pat0001/brainmask.nii.gz": ("brats2013", f"{DEEPMEDIC}/brainmask.nii.gz", False),
}

SAMPLES = {
    "ixi-healthy-t1": {
        "display_name": "Healthy T1 (IXI, 2 mm) with brain mask",
        "layers": [
            {"file": f"ixi_t1/{IXI_SUBJECT}_T1.nii.gz", "name": "IXI healthy T1"},
            {"file": f"ixi_t1/brainmask/{IXI_SUBJECT}_brainmask.nii.gz", "name": "IXI brain mask", "labels": True},
        ],
    },
    "mslub-patient26": {
        "display_name": "Multiple sclerosis (MSLUB patient 26): T1, T2, FLAIR, lesion mask",
        "layers": [
            {"file": "mslub/patient26/T1.nii.gz", "name": "MSLUB T1"},
            {"file": "mslub/patient26/T2.nii.gz", "name": "MSLUB T2"},
            {"file": "mslub/patient26/FLAIR.nii.gz", "name": "MSLUB FLAIR"},
            {"file": "mslub/patient26/lesionmask.nii.gz", "name": "MSLUB lesion mask", "labels": True},
        ],
    },
    "brats-glioma": {
        "display_name": "Glioma (BRATS 2013 case 1): FLAIR, T1c, tumour mask",
        "layers": [
            {"file": "brats2013/pat0001/FLAIR.nii.gz", "name": "BraTS FLAIR"},
            {"file": "brats2013/pat0001/T1c.nii.gz", "name": "BraTS T1c"},
            {"file": "brats2013/pat0001/tumourmask.nii.gz", "name": "BraTS tumour mask", "labels": True},
        ],
    },
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_link(url: str) -> str:
    """``[owner/repository@commit](url)`` for a raw GitHub file, the url itself otherwise."""
    pinned = re.match(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/([0-9a-f]{40})/", url)
    return f"[{pinned[1]}@{pinned[2][:7]}]({url})" if pinned else url


def readme_tables(registry: dict) -> str:
    """The samples and their files, as Markdown tables, from the registry alone."""
    datasets, files = registry["datasets"], registry["files"]
    lines = ["| sample | layers | dataset | licence | attribution |", "|---|---|---|---|---|"]
    for name, sample in registry["samples"].items():
        layers = ", ".join(layer["name"] for layer in sample["layers"])
        dataset = datasets[files[sample["layers"][0]["file"]]["dataset"]]
        lines.append(f"| `{name}` | {layers} | {dataset['name']} | {dataset['licence']} | {dataset['attribution']} |")
    lines += ["", "| file (path in the data folder) | licence | source, pinned to a commit | SHA256 |", "|---|---|---|---|"]
    for local, entry in files.items():
        source = _source_link(entry["url"])
        if "derived" in entry:
            source += f" (brain mask = {entry['derived']}; checked by its voxels' hash `{entry['mask_sha256'][:12]}…`)"
        lines.append(f"| `{local}` | {datasets[entry['dataset']]['licence']} | {source} | `{entry['sha256'][:12]}…` |")
    return "\n".join(lines)


def write_readme_tables(registry: dict) -> None:
    text = README.read_text()
    start, end = text.index(TABLES_START) + len(TABLES_START), text.index(TABLES_END)
    README.write_text(text[:start] + "\n" + readme_tables(registry) + "\n" + text[end:])
    print(f"wrote the tables in {README}")


def main(data_dir: str) -> None:
    # Imported here so the script runs from a checkout without installing anything else.
    sys.path.insert(0, str(SOURCE))
    from napari_brain_uad.sample_registry import mask_content_hash

    root = Path(data_dir)
    files = {}
    for local, (dataset, url, derived) in FILES.items():
        entry = {"dataset": dataset, "url": url, "sha256": sha256(root / local)}
        if derived:
            mask = np.asarray(nib.load(root / local).dataobj) > 0
            entry["derived"] = "labels > 0"
            entry["mask_sha256"] = mask_content_hash(mask)
        files[local] = entry
    registry = {"format": 1, "datasets": DATASETS, "files": files, "samples": SAMPLES}
    REGISTRY.write_text(json.dumps(registry, indent=2) + "\n")
    print(f"wrote {REGISTRY} ({len(files)} files, {len(SAMPLES)} samples)")
    write_readme_tables(registry)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Rebuild sample_data/samples.json and its README's tables.")
    parser.add_argument("data_dir", nargs="?", default="../shared/data",
                        help="a local copy of the sample files, laid out as the registry's paths")
    parser.add_argument("--tables", action="store_true", help="only rewrite the README's tables from the registry")
    args = parser.parse_args()
    if args.tables:
        write_readme_tables(json.loads(REGISTRY.read_text()))
    else:
        main(args.data_dir)
