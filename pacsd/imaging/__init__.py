"""DICOM objects as files and pixels: reading headers within bounds (header, bounds), decoding and
rendering frames (render, jpeg12), changing transfer syntax (transcode), DICOMDIR and ZIP (media).
No network code and no index here: the front ends and the nodes family call in.
"""
