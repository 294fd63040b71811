"""Fast DS encode/decode (ds_element, ds_floats) against pydicom's own DS handling."""

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from adaptive.dicom._common import ds_element, ds_floats, ds_strings, new_dataset
from adaptive.errors import DicomInputError, MissingTagError


def test_ds_strings_fit_ps35_and_round_trip():
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.normal(0, 300, 500), [1e-12, -123456789.123456, 0.0, 1e20]])
    s = ds_strings(vals)
    assert all(len(v) <= 16 for v in s)  # PS3.5 6.2: DS at most 16 bytes
    back = np.array([float(v) for v in s])
    np.testing.assert_allclose(back, vals, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        ds_strings([1.0, np.nan])


def test_ds_element_written_and_read_by_pydicom(tmp_path):
    rng = np.random.default_rng(1)
    vals = rng.normal(0, 200, 300)
    ds = new_dataset("1.2.840.10008.5.1.4.1.1.481.3", "1.2.3.4")
    item = Dataset()
    item.add(ds_element("ContourData", vals))
    ds.ROIContourSequence = [Dataset()]
    ds.ROIContourSequence[0].ContourSequence = [item]
    p = tmp_path / "x.dcm"
    ds.save_as(p, enforce_file_format=True)
    # pydicom's own DS parsing of the file
    ref = pydicom.dcmread(p).ROIContourSequence[0].ContourSequence[0].ContourData
    np.testing.assert_allclose([float(v) for v in ref], vals, rtol=1e-9, atol=1e-9)
    # our reader on the undecoded element gives the same numbers
    c = pydicom.dcmread(p).ROIContourSequence[0].ContourSequence[0]
    np.testing.assert_array_equal(ds_floats(c, "ContourData", p), [float(v) for v in ref])
    with pytest.raises(MissingTagError):
        ds_floats(Dataset(), "ContourData", p)
    bad = Dataset()
    bad.add(pydicom.DataElement(0x30060050, "DS", b"1.0\\abc", already_converted=True))
    with pytest.raises(DicomInputError):
        ds_floats(bad, "ContourData", p)
