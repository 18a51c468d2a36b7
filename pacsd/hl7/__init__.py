"""HL7 v2 in (issue 23): orders and patient updates from a RIS or HIS over MLLP, applied to the
Modality Worklist and, for patient updates and merges, to the archive through its corrections.
"""
