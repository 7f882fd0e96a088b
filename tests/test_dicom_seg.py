"""``medmamba predict --output-format dicom-seg`` on the real DICOM series: the SEG reads back with
highdicom/pydicom, references the source series, its frames sit on the source slices, and its mask equals
the NIfTI prediction of the same run."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from medmamba.cli import main
from medmamba.clinic import imageio

from conftest import DATA_DIR
from test_predict import make_threshold_bundle

DICOM = os.path.join(DATA_DIR, "totalsegmentator", "example_ct_dicom")
hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")


@pytest.mark.skipif(not os.path.isdir(DICOM), reason=f"{DICOM} not found (set MEDMAMBA_DATA)")
def test_predict_writes_dicom_seg(tmp_path, capsys):
    bundle = make_threshold_bundle(str(tmp_path))
    with open(os.path.join(bundle, "configs", "metadata.json"), "w") as f:
        json.dump({"network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "body"}}}}}, f)
    coding = tmp_path / "coding.json"
    coding.write_text(json.dumps({"body": {"category": ["123037004", "SCT", "Anatomical Structure"],
                                           "type": ["38266002", "SCT", "Entire body as a whole"]}}))
    inp = tmp_path / "in"
    inp.mkdir()
    os.symlink(DICOM, inp / "patient1")
    out = tmp_path / "out"
    rc = main(["predict", "--model", bundle, "--input", str(inp), "--output", str(out), "--device", "cpu",
               "--output-format", "both", "--seg-coding", str(coding), "--quiet", "--json"])
    assert rc == 0
    log = json.loads(capsys.readouterr().out)
    entry = log["patient1"]
    assert entry["status"] == "ok" and entry["dicom_seg"].endswith("patient1_seg.dcm")

    seg = hd.seg.segread(entry["dicom_seg"])
    case = imageio.find_cases(str(inp))[0]
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in case.files]
    uids = [s.file_meta.MediaStorageSOPInstanceUID for s in sources]
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID and seg.SeriesInstanceUID != seg.StudyInstanceUID
    desc = seg.SegmentSequence[0]
    assert desc.SegmentLabel == "body" and desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "38266002"
    # every frame references a source slice and lies on it (position, orientation)
    by_uid = dict(zip(uids, sources))
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = by_uid[ref_uid]
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in src.ImagePositionPatient], atol=1e-3)
    orient = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in orient], [float(v) for v in sources[0].ImageOrientationPatient])
    # the mask equals the NIfTI prediction, slice by slice in the series' order
    mask = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "patient1.nii.gz")))
    assert mask.shape == nifti.shape and 0.05 < nifti.mean() < 0.95
    assert np.array_equal(mask, nifti)


def test_dicom_seg_refuses_nifti_input(tmp_path):
    bundle = make_threshold_bundle(str(tmp_path))
    img = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(img, str(inp / "a.nii.gz"))
    rc = main(["predict", "--model", bundle, "--input", str(inp), "--output", str(tmp_path / "o"), "--device", "cpu",
               "--output-format", "dicom-seg", "--quiet"])
    assert rc == 1
    log = json.loads((tmp_path / "o" / "predict_log.json").read_text())
    assert "references its source DICOM series" in log["cases"]["a"]["error"]
