"""The quick walk to Pixel Data of the viewer's pixel batches (pacsd.imaging.frames.
native_frames_fast): the same frames as read_frames wherever it answers, None wherever it
should leave the file to pydicom, and the pixel budget held."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)

from data import ct_slice, sample
from pacsd.errors import InvalidDataset
from pacsd.imaging.frames import native_frames_fast, read_frames


def saved(tmp_path: Path, ds: Dataset, ts: str, name: str) -> Path:
    ds.file_meta.TransferSyntaxUID = ts
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def slice_(frames: int = 1) -> Dataset:
    ds = ct_slice(seed=3, patient=1, study=1, series=1, number=1, size=16)
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.PixelData = (np.arange(frames * 256, dtype=np.uint16) % 4096).tobytes()
    return ds


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("frames", [1, 7])
def test_the_same_frames_as_read_frames(tmp_path, ts, frames):
    ds = slice_(frames)
    # A defined-length sequence and an odd-length-padded long text before the pixels.
    item = Dataset()
    item.CodeValue = "T-D3000"
    ds.AnatomicRegionSequence = Sequence([item])
    ds.ImageComments = "x" * 70001
    path = saved(tmp_path, ds, ts, "f.dcm")
    fast = native_frames_fast(path, ts)
    assert fast is not None and len(fast) == frames
    assert fast == list(read_frames(path, ts, list(range(1, frames + 1))))


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_walks_over_sequences_of_undefined_length(tmp_path, ts):
    """As many scanners write them (PS3.5 7.5.2), items of undefined length, nested."""
    ds = slice_()
    inner, outer = Dataset(), Dataset()
    inner.CodeValue = "T-D3000"
    inner.is_undefined_length_sequence_item = True
    outer.CodeValue = "X"
    outer.AnatomicRegionModifierSequence = Sequence([inner])
    outer["AnatomicRegionModifierSequence"].is_undefined_length = True
    outer.is_undefined_length_sequence_item = True
    ds.AnatomicRegionSequence = Sequence([outer, Dataset()])
    ds["AnatomicRegionSequence"].is_undefined_length = True
    ds.ReferencedImageSequence = Sequence([])
    ds["ReferencedImageSequence"].is_undefined_length = True
    path = saved(tmp_path, ds, ts, "sq.dcm")
    assert b"\xfe\xff\xdd\xe0" in path.read_bytes()   # written with delimiters
    fast = native_frames_fast(path, ts)
    assert fast is not None
    assert fast == list(read_frames(path, ts, [1]))


def test_leaves_the_unusual_to_pydicom(tmp_path):
    ds = slice_()
    assert native_frames_fast(saved(tmp_path, ds, ExplicitVRBigEndian, "be.dcm"),
                              ExplicitVRBigEndian) is None
    assert native_frames_fast(saved(tmp_path, slice_(), DeflatedExplicitVRLittleEndian,
                                    "df.dcm"), DeflatedExplicitVRLittleEndian) is None
    rle = sample("MR_small_RLE.dcm")
    assert native_frames_fast(rle, RLELossless) is None
    # Not a Part 10 file.
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 200)
    assert native_frames_fast(tmp_path / "junk.dcm", ExplicitVRLittleEndian) is None


def test_holds_the_pixel_budget(tmp_path):
    ds = slice_()
    ds.PixelData = ds.PixelData[:100]   # carries less than it declares
    path = saved(tmp_path, ds, ExplicitVRLittleEndian, "short.dcm")
    with pytest.raises(InvalidDataset):
        native_frames_fast(path, ExplicitVRLittleEndian)
    ds = slice_()
    ds.Rows = ds.Columns = 60000   # a bomb: 3.6 G pixels declared
    path = saved(tmp_path, ds, ExplicitVRLittleEndian, "bomb.dcm")
    with pytest.raises(InvalidDataset):
        native_frames_fast(path, ExplicitVRLittleEndian)
